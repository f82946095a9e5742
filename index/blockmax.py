"""The csr backend's block-max exact kernel: rows regrouped into small blocks, an upper bound per block, and
only the blocks whose bound can still beat the k-th score scored exactly.

The idea of Block-Max Pruning (Mallia, Suel, Tonellotto, SIGIR 2024, "Faster Learned Sparse Retrieval with
Block-Max Pruning"), on the forward index instead of posting lists:

* **Build** (at prepare, once per CSR block): rows are reordered so that rows sharing their largest dimensions
  sit together (sorted by their top dimension, then their second, then by the top value, descending), cut into
  blocks of ``BLOCK_ROWS``, and per block the largest value of every dimension is stored, quantised *upward* to
  a byte per (dimension, block) with a per-dimension scale: ``scale_j * maxq[j, b] >= x[r, j]`` for every row r
  of block b, so bounds stay safe; likewise for each block's ``SUB_BLOCKS`` parts (``subq``). A copy of the
  rows in the new order (forward CSR) and the map back to the original rows are kept. A probe (stored rows as
  queries) measures what a query costs, for the cost model (:mod:`index.kernels`).
* **Search** (one query): every block's bound ``sum_j q_j * scale_j * maxq[j, b]`` (the query has a few
  non-zeros, so a few byte rows are read), then blocks in decreasing bound order - one level of bounds at a
  time, a level's blocks sorted - each visited block's parts bounded again and the rows of the parts that can
  still enter scored exactly from the forward CSR into the top-k heap, until the next bound cannot beat the
  heap's k-th score. At 1M x 512, 1%, Zipf: 7,813 blocks bounded, ~21 visited, ~390 rows scored a query.

Results are identical to the plain exact kernel's: scores are the same float32 sums in the same dimension order
(:func:`index.compiled._rescore`), ties go to the smaller row whatever order rows arrive in (the heap decides by
row), a block is skipped only if its bound (widened by the float32 rounding of both sums) is strictly below the
k-th score, and rows that score 0 are still candidates when fewer than k rows score more (all blocks are then
visited, as the plain kernel scans every row).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from numba import njit

from index.compiled import Csr, Heaps, _columns_outside, _replace_worst, _rescore
from index.inverted import guard_search, query_arrays, scratch

SUB_BLOCKS = 8  # a visited block's parts are bounded again (finer maxima, read only for visited blocks)
BLOCK_ROWS = 128  # rows per block: bounds tighten as blocks shrink, the bound pass grows with their number
LEVEL_FRACTION = 0.5  # each round takes the blocks whose bound lies within this fraction of the previous round's
MIN_LEVEL = 0.05  # below this fraction of the best bound, one last round takes every block left
# Blocks of fewer rows than this keep the inverted-index kernels (a bound pass over few blocks saves little).
MIN_ROWS = 1 << 16
PROBE_QUERIES = 32
PROBE_K = 10
PROBE_GIVE_UP = 0.1  # probe queries scoring more than this share of the blocks on average: no pay (stopped early)
_LOCAL = threading.local()


@dataclass(frozen=True)
class BlockMaxRows:
    """One CSR block's rows regrouped for block-max search (see module docstring)."""

    perm: np.ndarray  # int64 (n,): original local row of each position
    indptr: np.ndarray  # int64 (n + 1,): the rows in the new order (forward CSR)
    indices: np.ndarray  # int32
    data: np.ndarray  # float32
    maxq: np.ndarray  # uint8 (dim, n_blocks): block maxima, quantised upward
    subq: np.ndarray  # uint8 (n_blocks, dim, n_sub): maxima of each block's n_sub equal parts, same scale
    scale: np.ndarray  # float32 (dim,): maxq * scale bounds each value
    block_rows: int
    rows_per_query: float = 0.0  # rows a query scores, measured at build (:func:`probe`): the cost model's input
    visits_per_query: float = 0.0  # blocks it visits (bounds its parts), likewise

    @property
    def n_rows(self) -> int:
        return int(self.perm.size)

    @property
    def dim(self) -> int:
        return int(self.maxq.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.maxq.shape[1])

    @property
    def nbytes(self) -> int:
        arrays = (self.perm, self.indptr, self.indices, self.data, self.maxq, self.subq, self.scale)
        return int(sum(a.nbytes for a in arrays))


@njit(nogil=True, cache=True)
def _top_two(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: its largest value's dimension, its second largest's (dim if none) and the largest value."""
    n = indptr.size - 1
    dim1 = np.empty(n, np.int64)
    dim2 = np.empty(n, np.int64)
    top = np.zeros(n, np.float32)
    for i in range(n):
        b1, b2 = -1, -1
        v1, v2 = np.float32(-1.0), np.float32(-1.0)
        for p in range(indptr[i], indptr[i + 1]):
            v = data[p]
            if v > v1:
                b2, v2 = b1, v1
                b1, v1 = indices[p], v
            elif v > v2:
                b2, v2 = indices[p], v
        dim1[i] = b1
        dim2[i] = b2
        top[i] = max(v1, np.float32(0.0))
    return dim1, dim2, top


@njit(nogil=True, cache=True)
def _sub_maxima(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, dim: int, block_rows: int, n_sub: int
) -> np.ndarray:
    """(n_blocks, dim, n_sub) maxima of each block's parts of block_rows / n_sub rows (contiguous per block and
    dimension: the search reads all parts of one dimension of a visited block at once)."""
    n = indptr.size - 1
    n_blocks = (n + block_rows - 1) // block_rows
    part = block_rows // n_sub
    out = np.zeros((n_blocks, dim, n_sub), np.float32)
    for i in range(n):
        b = i // block_rows
        t = (i - b * block_rows) // part
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            if data[p] > out[b, j, t]:
                out[b, j, t] = data[p]
    return out


@njit(nogil=True, cache=True)
def _quantise(maxima: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(n_blocks, dim, n_sub) maxima as bytes, rounded up: ``scale[j] * out[b, j, t] >= maxima[b, j, t]``."""
    n_blocks, dim, n_sub = maxima.shape
    out = np.zeros((n_blocks, dim, n_sub), np.uint8)
    for b in range(n_blocks):
        for j in range(dim):
            s = np.float64(scale[j])
            if s <= 0:
                continue
            for t in range(n_sub):
                m = np.float64(maxima[b, j, t])
                q = np.ceil(m / s)
                if q * s < m:  # the division rounded down
                    q += 1
                out[b, j, t] = min(q, 255.0)
    return out


def quantise_up(maxima: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bytes and per-row (dimension) scales with ``scale[j] * q[j, b] >= maxima[j, b]`` in exact arithmetic:
    a byte bound is never below the value it bounds."""
    top = maxima.max(axis=1).astype(np.float64) if maxima.size else np.zeros(maxima.shape[0])
    scale = (top / 255.0).astype(np.float32)
    short = scale.astype(np.float64) * 255.0 < top  # float32 rounding went down: step up one ulp
    scale[short] = np.nextafter(scale[short], np.float32(np.inf))
    return _quantise(np.ascontiguousarray(maxima, np.float32)[None], scale)[0], scale


def _group_order(dim1: np.ndarray, dim2: np.ndarray, top: np.ndarray, dim: int) -> np.ndarray:
    """Rows by (top dimension, second dimension, top value descending, row): one stable sort of packed 64-bit
    keys where the dimensions fit 15 bits each (positive float32 values order like their bit patterns), else a
    lexsort."""
    if dim < 1 << 15:
        bits = np.uint64(0xFFFFFFFF) - top.view(np.uint32).astype(np.uint64)
        key = ((dim1 + 1).astype(np.uint64) << np.uint64(47)) | ((dim2 + 1).astype(np.uint64) << np.uint64(32)) | bits
        return np.argsort(key, kind="stable").astype(np.int64)
    return np.lexsort((np.arange(dim1.size), -top, dim2, dim1)).astype(np.int64)


def build_blockmax(x: sp.csr_matrix, block_rows: int | None = None) -> BlockMaxRows:
    """Reorder ``x``'s rows by their two largest dimensions and top value, and bound each block of them
    (``block_rows`` defaults to BLOCK_ROWS)."""
    block_rows = BLOCK_ROWS if block_rows is None else block_rows
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    n, dim = x.shape
    indptr = x.indptr.astype(np.int64, copy=False)
    indices = x.indices.astype(np.int32, copy=False)
    data = x.data.astype(np.float32, copy=False)
    dim1, dim2, top = _top_two(indptr, indices, data)
    perm = _group_order(dim1, dim2, top, dim)
    grouped = x[perm]  # scipy copies each row's entries as they are
    f_ptr = grouped.indptr.astype(np.int64, copy=False)
    f_idx, f_val = grouped.indices.astype(np.int32, copy=False), grouped.data.astype(np.float32, copy=False)
    n_sub = SUB_BLOCKS if block_rows % SUB_BLOCKS == 0 else 1
    parts = _sub_maxima(f_ptr, f_idx, f_val, dim, block_rows, n_sub)
    maxq, scale = quantise_up(np.ascontiguousarray(parts.max(axis=2).T))
    bmr = BlockMaxRows(
        perm=perm,
        indptr=f_ptr,
        indices=f_idx,
        data=f_val,
        maxq=maxq,
        subq=_quantise(parts, scale),
        scale=scale,
        block_rows=block_rows,
    )
    rows, visits = probe(bmr, x)
    return dataclasses.replace(bmr, rows_per_query=rows, visits_per_query=visits)


def probe(bmr: BlockMaxRows, x: sp.csr_matrix, n_queries: int = PROBE_QUERIES, k: int = PROBE_K) -> tuple[float, float]:
    """Mean rows scored and blocks visited per query, with ``n_queries`` of the stored rows (evenly spaced, so
    deterministic) as the queries: they come from the distribution real queries do, which decides how tight the
    bounds are (at 1M x 512 Zipf a query scores ~0.04% of the rows at 1% density, 3-8% at 5%). Stored rows
    are easier queries than new ones (their own group holds rows like them), hence the cost model's margin."""
    n = x.shape[0]
    if n == 0:
        return 0.0, 0.0
    picks = np.unique(np.linspace(0, n - 1, min(n, n_queries)).astype(np.int64))
    q = x[picks]
    scores = np.full((picks.size, k), -np.inf, np.float32)
    rows = np.full((picks.size, k), -1, np.int64)
    budget = max(1, int(PROBE_GIVE_UP * bmr.n_blocks * picks.size))  # blocks, over all probe queries
    scored = visited = 0
    for i in range(picks.size):
        stats = search_blockmax(bmr, q, i, i + 1, scores, rows, i, 0, max_visits=budget - visited)
        if stats is None:  # bounds too loose here: the structure will not pay, stop probing
            return float(n), float(bmr.n_blocks)
        scored += int(stats[0])
        visited += int(stats[1])
    return scored / picks.size, visited / picks.size


def rounding_margin(dim: int) -> float:
    """Relative widening of a bound that covers float32 rounding: a row score and a block bound are sums of at
    most ``dim`` products each, every operation off by at most 2^-24 relative (non-negative terms)."""
    return (2 * dim + 8) * 2.0**-23


@njit(nogil=True, cache=True, inline="always")
def _place(qdense, q_indices, q_data, a, b, load):  # noqa: ANN001, ANN202 - numba kernel
    """Scatter query entries [a, b) into the dense buffer (load) or zero them again (not load)."""
    for e in range(a, b):
        qdense[q_indices[e]] = q_data[e] if load else 0


@njit(nogil=True, cache=True, inline="always")
def _block_bounds(maxq, scale, q_indices, q_data, a, b, bounds, widen):  # noqa: ANN001, ANN202 - numba kernel
    """Every block's upper bound for query entries [a, b), widened for rounding; returns the largest."""
    n_blocks = maxq.shape[1]  # the buffer may be longer (reused across indexes)
    for i in range(n_blocks):
        bounds[i] = 0
    for e in range(a, b):
        j = q_indices[e]
        w = np.float32(q_data[e] * scale[j])
        bytes_j = maxq[j]
        for i in range(n_blocks):
            bounds[i] += w * np.float32(bytes_j[i])
    top = np.float32(0.0)
    for i in range(n_blocks):
        bounds[i] *= widen
        top = max(top, bounds[i])
    return top


@njit(nogil=True, cache=True, inline="always")
def _part_bounds(subq_blk, scale, q_indices, q_data, a, b, sub_bounds):  # noqa: ANN001, ANN202 - numba kernel
    """One visited block's parts: the same sums as the block bound, over the finer per-part maxima."""
    for t2 in range(sub_bounds.size):
        sub_bounds[t2] = 0
    for e in range(a, b):
        j = q_indices[e]
        w = np.float32(q_data[e] * scale[j])
        for t2 in range(sub_bounds.size):
            sub_bounds[t2] += w * np.float32(subq_blk[j, t2])


@njit(nogil=True, cache=True, inline="always")
def _score_rows(perm, forward, p0, p1, alive, qdense, row_offset, s, r):  # noqa: ANN001, ANN202 - numba kernel
    """Score the reordered rows [p0, p1) exactly and offer each live one to the heap (ties: smaller row)."""
    masked = alive.size > 0
    for pos in range(p0, p1):
        row = perm[pos]
        if masked and not alive[row]:
            continue
        v = _rescore(forward, pos, qdense)
        g = row_offset + row
        if v > s[0] or (v == s[0] and g < r[0]):
            _replace_worst(s, r, v, g)


@njit(nogil=True, cache=True, inline="always")
def _round_blocks(bounds, n_blocks, order, floor, upper):  # noqa: ANN001, ANN202 - numba kernel
    """The blocks bounded in [floor, upper), highest bound first (one round of the search)."""
    m = 0
    for i in range(n_blocks):  # branch-free append
        v = bounds[i]
        order[m] = i
        m += (v >= floor) & (v < upper)
    if m <= 1:
        return order[:m]
    keys = np.empty(m, np.float32)
    for t in range(m):
        keys[t] = -bounds[order[t]]
    return order[:m][np.argsort(keys)]


@njit(nogil=True, cache=True)
def _search_blockmax(
    rows: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    maxima: tuple[np.ndarray, np.ndarray, np.ndarray, int],
    queries: Csr,
    lo: int,
    hi: int,
    heaps: Heaps,
    buffers: tuple[np.ndarray, np.ndarray, np.ndarray],
    settings: tuple[float, float, float, int],
    stats: np.ndarray,
) -> int:
    """Returns -1, having changed nothing, if a query column lies outside [0, dim), else 0, having added the
    rows scored and the blocks visited to ``stats[0]``, ``stats[1]`` (the build's probe reads them). Past
    ``max_visits`` blocks it stops at once, results incomplete, and returns -2: the probe's way to give up on
    data where bounds do not prune. ``rows``: perm and the forward CSR; ``maxima``: maxq, subq, scale, block rows;
    ``buffers``: block bounds, block order, dense query; ``settings``: margin, level fraction, min level, max visits."""
    perm, f_indptr, f_indices, f_data = rows
    forward = (f_indptr, f_indices, f_data)
    maxq, subq, scale, block_rows = maxima
    q_indptr, q_indices, q_data = queries
    heap_scores, heap_rows, heap_lo, row_offset, alive = heaps
    bounds, order, qdense = buffers
    margin, level_fraction, min_level, max_visits = settings
    dim, n_blocks = maxq.shape
    n_sub = subq.shape[2]
    part = block_rows // n_sub
    n = perm.size
    sub_bounds = np.empty(n_sub, np.float32)
    if _columns_outside(q_indptr, q_indices, lo, hi, dim):
        return -1
    widen = np.float32(1.0 + margin)
    visited = 0
    for q in range(lo, hi):
        a, b = q_indptr[q], q_indptr[q + 1]
        s = heap_scores[heap_lo + q - lo]
        r = heap_rows[heap_lo + q - lo]
        _place(qdense, q_indices, q_data, a, b, True)
        top = _block_bounds(maxq, scale, q_indices, q_data, a, b, bounds, widen)
        # Levels of bounds, highest first: [floor, upper) per round, floor = max(level, theta); a round whose
        # floor is theta leaves only blocks bounded below the k-th score. The last level (-inf) takes the rest.
        upper = np.float32(np.inf)
        level = top * np.float32(level_fraction)
        while upper > s[0]:
            if level <= top * np.float32(min_level):
                level = np.float32(-np.inf)
            theta = s[0]
            floor = max(level, theta)
            sel = _round_blocks(bounds, n_blocks, order, floor, upper)
            for t in range(sel.size):
                blk = sel[t]
                if bounds[blk] < s[0]:  # sorted: no later block of this round can enter either
                    break
                visited += 1
                stats[1] += 1
                if visited > max_visits:
                    _place(qdense, q_indices, q_data, a, b, False)  # the buffer is this thread's: leave it zeroed
                    return -2
                _part_bounds(subq[blk], scale, q_indices, q_data, a, b, sub_bounds)
                for t2 in range(n_sub):
                    if sub_bounds[t2] * widen < s[0]:
                        continue
                    p0 = blk * block_rows + t2 * part
                    p1 = min(n, p0 + part)
                    stats[0] += max(0, p1 - p0)
                    _score_rows(perm, forward, p0, p1, alive, qdense, row_offset, s, r)
            if floor == theta or level == -np.inf:
                break
            upper = floor
            level *= np.float32(level_fraction)
        _place(qdense, q_indices, q_data, a, b, False)
    return 0


def _buffers(n_blocks: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's block bounds, block order and dense query (index.inverted.scratch)."""
    return scratch(_LOCAL, "buffers", (n_blocks, n_blocks, dim), (np.float32, np.int64, np.float32))


def search_blockmax(
    bmr: BlockMaxRows,
    queries: sp.csr_matrix,
    lo: int,
    hi: int,
    heap_scores: np.ndarray,
    heap_rows: np.ndarray,
    heap_lo: int,
    row_offset: int,
    alive: np.ndarray | None = None,
    max_visits: int | None = None,
) -> np.ndarray | None:
    """Push the exact top-k of queries ``lo:hi`` against ``bmr``'s rows into heaps ``heap_lo..``; arguments as
    :func:`index.inverted.search_inverted` (``alive`` is indexed by original row). Releases the GIL.
    Returns (rows scored, blocks visited); with ``max_visits`` (blocks), None once more were needed (results
    incomplete)."""
    mask = guard_search(bmr, queries, lo, hi, heap_scores, heap_rows, heap_lo, alive)
    stats = np.zeros(2, np.int64)
    if mask is None:
        return stats
    bounds, order, qdense = _buffers(bmr.n_blocks, bmr.dim)
    visits = bmr.n_blocks * max(1, hi - lo) if max_visits is None else int(max_visits)
    rows, maxima = (bmr.perm, bmr.indptr, bmr.indices, bmr.data), (bmr.maxq, bmr.subq, bmr.scale, bmr.block_rows)
    heaps, buffers = (heap_scores, heap_rows, heap_lo, row_offset, mask), (bounds, order, qdense)
    settings = (rounding_margin(bmr.dim), LEVEL_FRACTION, MIN_LEVEL, visits)
    status = _search_blockmax(rows, maxima, query_arrays(queries), lo, hi, heaps, buffers, settings, stats)
    if status == -1:
        raise ValueError(f"query column indices outside [0, {bmr.dim})")
    return None if status == -2 else stats
