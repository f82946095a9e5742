"""The compiled loops of the csr backend (numba): the top-k heap scan, the exact inverted-index search and the
approximate (pruned, rescored) one.

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
# Argument groups of the compiled searches: tuples, unpacked in the kernel (a call costs ~0.1 us more than loose)
Lists = tuple[np.ndarray, np.ndarray, np.ndarray, int, int, int]  # posting lists: TiledInverted.kernel_args
Csr = tuple[np.ndarray, np.ndarray, np.ndarray]  # indptr, indices, data: of the queries or of the stored rows
Heaps = tuple[np.ndarray, np.ndarray, int, int, np.ndarray]  # scores, rows, first heap row, row offset, alive


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
    lists: Lists, t_lo: int, t_hi: int, queries: Csr, lo: int, hi: int, heaps: Heaps, acc: np.ndarray
) -> int:
    """Returns 1, having changed nothing, if a query column lies outside [0, dim), else 0."""
    indptr, rows, data, n_rows, dim, tile = lists
    q_indptr, q_indices, q_data = queries
    heap_scores, heap_rows, heap_lo, row_offset, alive = heaps
    if _columns_outside(q_indptr, q_indices, lo, hi, dim):
        return 1
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
    return 0


@njit(nogil=True, cache=True, inline="always")
def _rescore(forward: Csr, row: int, qdense: np.ndarray) -> float:
    """Exact score of one stored row against the dense query, from the forward index (the CSR rows).

    Bit-identical to the inverted-index sum: both add the same float32 products in ascending dimension order
    (dimensions the query lacks add +0.0, which changes nothing).
    """
    x_indptr, x_indices, x_data = forward
    total = np.float32(0.0)
    for p in range(x_indptr[row], x_indptr[row + 1]):
        total += qdense[x_indices[p]] * x_data[p]
    return total


@njit(nogil=True, cache=True, inline="always")
def _offer(s: np.ndarray, r: np.ndarray, value: float, row: int) -> None:
    """Push (value, row) unless the heap already holds ``row``: the approximate search meets a row more than once
    (probe, then its tile) and in no particular row order, so ties are decided here by row, not arrival."""
    if value > s[0] or (value == s[0] and row < r[0]):
        for i in range(r.size):
            if r[i] == row:
                return
        _replace_worst(s, r, value, row)


@njit(nogil=True, cache=True)
def merge_heaps(s: np.ndarray, r: np.ndarray, ps: np.ndarray, pr: np.ndarray) -> None:
    """Offer every filled slot of the heaps ``(ps, pr)`` (same queries, other rows) to the heaps ``(s, r)``."""
    for q in range(s.shape[0]):
        for j in range(ps.shape[1]):
            if pr[q, j] >= 0:
                _offer(s[q], r[q], ps[q, j], pr[q, j])


@njit(nogil=True, cache=True)
def search_approx(
    lists: Lists,
    top_rows: np.ndarray,
    lengths: np.ndarray,
    forward: Csr,
    queries: Csr,
    lo: int,
    hi: int,
    heaps: Heaps,
    buffers: tuple[np.ndarray, np.ndarray, np.ndarray],
    settings: tuple[float, float, int, bool, int],
) -> int:
    """Top-k over impact-ordered tiles (see :mod:`index.approx` for the method and its guarantee): approximate,
    or with ``safe`` exact: only the query's ``safe_lists`` longest lists (``lengths`` per dimension) are cut,
    each at ``cut * theta / (n_cut * q_j)``, so all left-out parts together stay below ``cut * theta``, and a row
    is skipped only if its partial score plus all of them cannot enter. ``buffers``: accumulator, touched rows,
    dense query; ``settings``: cut, slack, probe rows, safe, safe lists.

    Returns 1, having changed nothing, if a query column lies outside [0, dim), else 0."""
    indptr, rows, data, n_rows, dim, tile = lists
    q_indptr, q_indices, q_data = queries
    heap_scores, heap_rows, heap_lo, row_offset, alive = heaps
    acc, touched, qdense = buffers
    cut, slack, probe_rows, safe, safe_lists = settings
    if _columns_outside(q_indptr, q_indices, lo, hi, dim):
        return 1
    n_tiles = (n_rows + tile - 1) // tile
    cuttable = np.zeros(dim, np.bool_)
    for q in range(lo, hi):
        a, b = q_indptr[q], q_indptr[q + 1]
        s = heap_scores[heap_lo + q - lo]
        r = heap_rows[heap_lo + q - lo]
        n_cut = _mark_cuttable(q_indices, a, b, cuttable, safe, lengths, safe_lists)
        per_list = cut / max(1, n_cut) if safe else cut
        for e in range(a, b):
            qdense[q_indices[e]] = q_data[e]
        _probe(top_rows, forward, q_indices, a, b, qdense, s, r, row_offset, alive, probe_rows)
        for t in range(n_tiles):
            nt, worst_missed, all_missed = _accumulate_tile(
                indptr, rows, data, t * dim, q_indices, q_data, a, b, cuttable, per_list, s[0], acc, touched
            )
            # approximate: a row of the true top-k missing at most `slack` contributions (each at most
            # worst_missed) still passes; safe: no row that could enter is skipped
            bound = all_missed if safe else slack * worst_missed
            rescore = worst_missed > 0
            _offer_tile(nt, touched, acc, bound, t * tile, rescore, forward, qdense, s, r, row_offset, alive)
        for e in range(a, b):
            qdense[q_indices[e]] = 0
            cuttable[q_indices[e]] = False
    return 0


@njit(nogil=True, cache=True, inline="always")
def _columns_outside(q_indptr: np.ndarray, q_indices: np.ndarray, lo: int, hi: int, dim: int) -> bool:
    """Whether a column of queries ``lo:hi`` lies outside [0, dim): the kernels then change nothing."""
    for e in range(q_indptr[lo], q_indptr[hi]):  # noqa: SIM110 - numba compiles the loop, not any(generator)
        if q_indices[e] < 0 or q_indices[e] >= dim:
            return True
    return False


@njit(nogil=True, cache=True, inline="always")
def _mark_cuttable(
    q_indices: np.ndarray, a: int, b: int, cuttable: np.ndarray, safe: bool, lengths: np.ndarray, safe_lists: int
) -> int:
    """Flag the lists of the query (entries ``a:b``) that may be cut and return how many: all of them, or with
    ``safe`` its ``safe_lists`` longest, where pruning saves the most (they share the whole budget)."""
    if not safe:
        for e in range(a, b):
            cuttable[q_indices[e]] = True
        return b - a
    n_cut = 0
    for _ in range(min(safe_lists, b - a)):
        best, best_len = -1, -1
        for e in range(a, b):
            j = q_indices[e]
            if not cuttable[j] and lengths[j] > best_len:
                best, best_len = j, lengths[j]
        cuttable[best] = True
        n_cut += 1
    return n_cut


@njit(nogil=True, cache=True, inline="always")
def _probe(
    top_rows: np.ndarray,
    forward: Csr,
    q_indices: np.ndarray,
    a: int,
    b: int,
    qdense: np.ndarray,
    s: np.ndarray,
    r: np.ndarray,
    row_offset: int,
    alive: np.ndarray,
    probe_rows: int,
) -> None:
    """The rows holding each query dimension's largest values, scored exactly, give the first threshold (a true
    lower bound of the k-th best score)."""
    masked = alive.size > 0
    per_dim = min(top_rows.shape[1], max(2, probe_rows // max(1, b - a)))
    for e in range(a, b):
        j = q_indices[e]
        for i in range(per_dim):
            row = top_rows[j, i]
            if row < 0:
                break
            if masked and not alive[row]:
                continue
            _offer(s, r, _rescore(forward, row, qdense), row_offset + row)


@njit(nogil=True, cache=True, inline="always")
def _accumulate_tile(
    indptr: np.ndarray,
    rows: np.ndarray,
    data: np.ndarray,
    base: int,
    q_indices: np.ndarray,
    q_data: np.ndarray,
    a: int,
    b: int,
    cuttable: np.ndarray,
    per_list: float,
    theta: float,
    acc: np.ndarray,
    touched: np.ndarray,
) -> tuple[int, np.float32, np.float32]:
    """Partial scores of one tile's rows into ``acc`` (their tile-local numbers into ``touched``), each cuttable
    list cut at ``per_list * theta / q_j``. Returns (rows touched, the largest contribution left out, the sum of
    the left-out maxima over the cut lists: a bound on what any row lacks)."""
    nt = 0
    worst_missed = np.float32(0.0)
    all_missed = np.float32(0.0)
    for e in range(a, b):
        j = q_indices[e]
        w = q_data[e]
        p0, p1 = indptr[base + j], indptr[base + j + 1]
        if theta > 0 and p1 > p0 and cuttable[j]:
            c = per_list * theta / w
            left, right = p0, p1  # first entry below the cut (lists are sorted by value, descending)
            while left < right:
                mid = (left + right) // 2
                if data[mid] >= c:
                    left = mid + 1
                else:
                    right = mid
            if left < p1:
                worst_missed = max(worst_missed, w * data[left])
                all_missed += w * data[left]
            p1 = left
        for p in range(p0, p1):  # branch-free: the append is undone unless the row was untouched
            lr = rows[p]
            old = acc[lr]
            touched[nt] = lr
            nt += old == 0
            acc[lr] = old + w * data[p]
    return nt, worst_missed, all_missed


@njit(nogil=True, cache=True, inline="always")
def _offer_tile(
    nt: int,
    touched: np.ndarray,
    acc: np.ndarray,
    bound: float,
    r0: int,
    rescore: bool,
    forward: Csr,
    qdense: np.ndarray,
    s: np.ndarray,
    r: np.ndarray,
    row_offset: int,
    alive: np.ndarray,
) -> None:
    """Offer the touched rows of a tile (first row ``r0``) whose partial score plus ``bound`` can still enter,
    rescored exactly when lists were cut; zeroes ``acc`` behind itself."""
    masked = alive.size > 0
    for i in range(nt):
        lr = touched[i]
        v = acc[lr]
        acc[lr] = 0
        if v + bound < s[0]:
            continue
        row = r0 + lr
        if masked and not alive[row]:
            continue
        if rescore:
            v = _rescore(forward, row, qdense)
        _offer(s, r, v, row_offset + row)


@njit(nogil=True, cache=True)
def csr_problem(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, dim: int) -> int:
    """Why a CSR matrix is not already a clean, canonical embedding batch: 0 = it is; 1 = a NaN or infinite
    value; 2 = a negative value; 3 = not canonical (unsorted or repeated column, stored zero, bad row
    pointers); 4 = a column outside [0, dim). One pass, so single queries skip scipy's copy and re-sort."""
    n = indptr.size - 1
    if n < 0 or indptr[0] != 0 or indptr[n] > data.size or data.size != indices.size:
        return 3
    for i in range(n):
        a, b = indptr[i], indptr[i + 1]
        if b < a:
            return 3
        last = -1
        for p in range(a, b):
            v = data[p]
            if not np.isfinite(v):
                return 1
            if v < 0:
                return 2
            j = indices[p]
            if j < 0 or j >= dim:
                return 4
            if j <= last or v == 0:
                return 3
            last = j
    return 0


@njit(nogil=True, cache=True)
def finish_topk(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Results in their final order: per row best score first, ties by ascending id, empty slots (non-finite
    score or id < 0) last as (-inf, -1). Insertion sort: k is small."""
    n, k = scores.shape
    out_s = np.empty((n, k), np.float32)
    out_i = np.empty((n, k), np.int64)
    big = np.iinfo(np.int64).max
    for q in range(n):
        for j in range(k):
            v = np.float32(scores[q, j])
            d = ids[q, j]
            if not np.isfinite(v) or d < 0:
                v, d = np.float32(-np.inf), big
            i = j
            while i > 0 and (out_s[q, i - 1] < v or (out_s[q, i - 1] == v and out_i[q, i - 1] > d)):
                out_s[q, i] = out_s[q, i - 1]
                out_i[q, i] = out_i[q, i - 1]
                i -= 1
            out_s[q, i] = v
            out_i[q, i] = d
        for j in range(k):
            if out_i[q, j] == big:
                out_i[q, j] = -1
    return out_s, out_i


def warmup() -> None:
    """Compile (or load from numba's on-disk cache) every kernel now, with the argument types searches use.

    A cold compile takes ~1 s; a server calls this at start-up so that its first search does not pay it.
    """
    import scipy.sparse as sp

    from index import inverted  # imports this module: here, not at the top

    heap_s = np.full((1, 1), -np.inf, np.float32)
    heap_r = np.full((1, 1), -1, np.int64)
    push_block(np.zeros((1, 1), np.float32), heap_s, heap_r, 0, 0)
    one = sp.csr_matrix((1, 1), dtype=np.float32)  # one row, one dimension, no entries: the search's own path
    inverted.search_inverted(inverted.build_inverted(one), one, 0, 1, heap_s, heap_r, 0, 0)
