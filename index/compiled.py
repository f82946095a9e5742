"""The compiled loops of the csr backend (numba): the top-k heap scan and the inverted-index search.

They live in one module on purpose: numba's on-disk cache (``cache=True``) is keyed on the source file of the
function it compiled, so a kernel calling a jitted function from another module would keep running a stale
copy of it after that module changed.

The heap's layout, order and tie rule are described in :mod:`index.topk`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Scores checked per vectorised "can anything here enter?" test: long enough to amortise the branch, short
# enough that a stretch holding a new top-k entry is rescanned cheaply.
SKIP_STRETCH = 256


@njit(nogil=True, cache=True, inline="always")
def _worse(s: np.ndarray, r: np.ndarray, i: int, j: int) -> bool:
    return s[i] < s[j] or (s[i] == s[j] and r[i] > r[j])


@njit(nogil=True, cache=True)
def _replace_worst(s: np.ndarray, r: np.ndarray, value: float, row: int) -> float:
    """Put (value, row) in the root slot, restore the heap, return the new worst score."""
    k = s.size
    s[0] = value
    r[0] = row
    i = 0
    while True:
        child = 2 * i + 1
        if child >= k:
            break
        if child + 1 < k and _worse(s, r, child + 1, child):
            child += 1
        if not _worse(s, r, child, i):
            break
        s[i], s[child] = s[child], s[i]
        r[i], r[child] = r[child], r[i]
        i = child
    return s[0]


@njit(nogil=True, cache=True)
def scan_row(
    values: np.ndarray, n: int, s: np.ndarray, r: np.ndarray, row_offset: int, alive: np.ndarray, clear: bool
) -> None:
    """Push ``values[:n]`` (rows ``row_offset + i``) into the heap ``(s, r)``.

    ``alive`` (one flag per value, or empty for "all alive") drops removed rows. With ``clear`` the values are
    zeroed as they are scanned, while still in cache: the sparse kernel reuses them as its accumulator.
    """
    thr = s[0]
    masked = alive.size > 0
    full = n - n % SKIP_STRETCH
    # Constant-length inner loops: with a variable trip count the compiler leaves the test scalar (4x slower).
    for base in range(0, full, SKIP_STRETCH):
        hit = False
        for x in range(base, base + SKIP_STRETCH):
            hit |= values[x] > thr
        if hit:
            for x in range(base, base + SKIP_STRETCH):
                v = values[x]
                if v > thr and (not masked or alive[x]):
                    thr = _replace_worst(s, r, v, row_offset + x)
        if clear:
            for x in range(base, base + SKIP_STRETCH):
                values[x] = 0
    for x in range(full, n):
        v = values[x]
        if v > thr and (not masked or alive[x]):
            thr = _replace_worst(s, r, v, row_offset + x)
        if clear:
            values[x] = 0


@njit(nogil=True, cache=True)
def push_block(scores: np.ndarray, s: np.ndarray, r: np.ndarray, q_lo: int, row_offset: int) -> None:
    none = np.empty(0, np.bool_)
    for i in range(scores.shape[0]):
        scan_row(scores[i], scores.shape[1], s[q_lo + i], r[q_lo + i], row_offset, none, False)


@njit(nogil=True, cache=True)
def search_inverted(
    indptr: np.ndarray,
    rows: np.ndarray,
    data: np.ndarray,
    n_rows: int,
    dim: int,
    tile: int,
    t_lo: int,
    t_hi: int,
    q_indptr: np.ndarray,
    q_indices: np.ndarray,
    q_data: np.ndarray,
    lo: int,
    hi: int,
    heap_scores: np.ndarray,
    heap_rows: np.ndarray,
    heap_lo: int,
    row_offset: int,
    alive: np.ndarray,
    acc: np.ndarray,
) -> None:
    none = np.empty(0, np.bool_)
    for q in range(lo, hi):
        a, b = q_indptr[q], q_indptr[q + 1]
        s = heap_scores[heap_lo + q - lo]
        r = heap_rows[heap_lo + q - lo]
        for t in range(t_lo, t_hi):
            base = t * dim
            for e in range(a, b):
                j = q_indices[e]
                w = q_data[e]
                for p in range(indptr[base + j], indptr[base + j + 1]):
                    acc[rows[p]] += w * data[p]
            r0 = t * tile
            n = min(tile, n_rows - r0)
            mask = alive[r0 : r0 + n] if alive.size else none
            scan_row(acc, n, s, r, row_offset + r0, mask, True)


def warmup() -> None:
    """Compile (or load from numba's on-disk cache) every kernel now, with the argument types searches use.

    A cold compile takes ~1 s; a server calls this at start-up so that its first search does not pay it.
    """
    heap_s = np.full((1, 1), -np.inf, np.float32)
    heap_r = np.full((1, 1), -1, np.int64)
    push_block(np.zeros((1, 1), np.float32), heap_s, heap_r, 0, 0)
    search_inverted(
        np.zeros(2, np.int64),  # one tile, one dimension, no entries
        np.empty(0, np.uint16),
        np.empty(0, np.float32),
        1,
        1,
        1,
        0,
        1,
        np.zeros(2, np.int64),
        np.empty(0, np.int32),
        np.empty(0, np.float32),
        0,
        1,
        heap_s,
        heap_r,
        0,
        0,
        np.empty(0, np.bool_),
        np.zeros(1, np.float32),
    )
