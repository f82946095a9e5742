"""The csr backend's approximate mode: impact-ordered posting lists, a probed threshold, pruned traversal and
exact rescoring from the forward index.

Same tiles as the exact kernel (:mod:`index.inverted`), but each (tile, dimension) list is sorted by value,
largest first, so that "the entries worth more than c" is a prefix found by binary search. For one query:

1. **Probe**: each query dimension keeps the rows holding its ``TOP_ROWS`` largest values; those rows are
   scored exactly (forward index = the CSR rows) into the top-k heap. The heap's k-th score ``theta`` is then
   a true lower bound of the final k-th score, before any posting list is read.
2. **Pruned traversal**, tile by tile: of dimension j's list only the entries with ``q_j * value >= cut *
   theta`` are added into the tile accumulator (``theta`` rises as the heap fills, so later tiles read less).
   The first entry left out bounds what any row lost from that list: ``q_j * value < cut * theta``.
3. **Rescoring**: a touched row whose partial score plus the largest left-out contribution still reaches the
   heap is scored exactly from the forward index, so returned scores are exact inner products and ties are
   decided by row as in the exact mode.

What it can miss: a row of the true top-k is lost only if two or more of its terms each fell below
``cut * theta`` (one missing term is covered by step 3), or all of them did. ``cut = 0`` reads every list
entry and is exact; the benchmark and :meth:`index.csr_index.CsrIndex.tune_approx` pick the largest ``cut``
that keeps recall@10 at the target on held-out queries.

This is the idea of Seismic (Bruch et al., SIGIR 2024: keep the top of each posting list, skip what a bound
says cannot enter the top-k, rescore with the forward index) with the bound taken per list prefix, which the
impact order makes a binary search, instead of per clustered block with a summary vector.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from index import compiled
from index.errors import InvalidInputError
from index.inverted import TILE_ROWS, TiledInverted, build_inverted, guard_search, query_arrays, scratch

DEFAULT_CUT = 0.2  # recall@10 >= 0.999 on the Zipf-popularity benchmark data at 1% and 5% (bench_engines.py)
DEFAULT_SLACK = 3.0  # rescore rows that could still enter with up to 3 terms missing, each below the cut
# (cut, slack) pairs CsrIndex.tune_approx times, from aggressive to careful
TUNE_GRID = tuple((cut, slack) for cut in (0.5, 0.3, 0.2, 0.1, 0.05, 0.02) for slack in (1.0, 2.0, 3.0))
# Below this many posting-list entries per query (~10 us of exact work) the exact kernel is as fast: the
# approximate one pays the probe and the rescoring's random reads whatever it prunes.
APPROX_MIN_PRODUCTS = 10_000
# The exact mode's pruned kernel (safe bounds): all cut list parts together below SAFE_CUT * theta, used for
# blocks of at least SAFE_MIN_ROWS rows. Measured on one core, Zipf data (kernel only): 1M x 512 at 1% 290 ->
# 208 us, at 5% 20.6 -> 10.6 ms; 100k at 1% no gain (42 -> 38 us), at 5% a loss (0.41 -> 0.66 ms).
SAFE_CUT = 0.4
SAFE_LISTS = 4  # only the query's longest lists are cut (they hold most of the work under Zipf popularity)
SAFE_MIN_ROWS = 4 * TILE_ROWS
TOP_ROWS = 16  # rows kept per dimension for the probe (its largest values)
PROBE_ROWS = 128  # rows probed per query in all, spread over its dimensions (at least 2 each)
_LOCAL = threading.local()


@dataclass(frozen=True)
class ImpactTiles:
    """A :class:`TiledInverted` whose lists are sorted by value (descending, ties by row), and per dimension the
    global rows of its ``TOP_ROWS`` largest values (-1 where the dimension has fewer entries)."""

    inv: TiledInverted
    top_rows: np.ndarray  # int64, (dim, TOP_ROWS)
    lengths: np.ndarray  # int64, (dim,): entries per dimension over all tiles

    @property
    def nbytes(self) -> int:
        return int(self.inv.nbytes + self.top_rows.nbytes + self.lengths.nbytes)


def sort_by_impact(inv: TiledInverted) -> TiledInverted:
    """Reorder every list of ``inv`` by value, descending (ties by row, ascending).

    One ``np.sort`` of packed 64-bit keys (dimension, inverted float bits, local row) per tile instead of an
    argsort: positive float32 values order like their bit patterns, and a local row fits in 16 bits.
    """
    if inv.dim >= 1 << 16:  # the packed key has 16 bits for the dimension
        return _sort_by_impact_lexsort(inv)
    rows = np.empty_like(inv.rows)
    data = np.empty_like(inv.data)
    for t in range(inv.n_tiles):
        a, b = int(inv.indptr[t * inv.dim]), int(inv.indptr[(t + 1) * inv.dim])
        if a == b:
            continue
        counts = np.diff(inv.indptr[t * inv.dim : (t + 1) * inv.dim + 1])
        col = np.repeat(np.arange(inv.dim, dtype=np.uint64), counts)
        bits = np.uint64(0xFFFFFFFF) - inv.data[a:b].view(np.uint32).astype(np.uint64)
        key = (col << np.uint64(48)) | (bits << np.uint64(16)) | inv.rows[a:b].astype(np.uint64)
        key.sort()
        rows[a:b] = (key & np.uint64(0xFFFF)).astype(np.uint16)
        data[a:b] = (
            (np.uint64(0xFFFFFFFF) - ((key >> np.uint64(16)) & np.uint64(0xFFFFFFFF)))
            .astype(np.uint32)
            .view(np.float32)
        )
    return TiledInverted(indptr=inv.indptr, rows=rows, data=data, n_rows=inv.n_rows, dim=inv.dim, tile=inv.tile)


def _sort_by_impact_lexsort(inv: TiledInverted) -> TiledInverted:
    lists = np.repeat(np.arange(inv.indptr.size - 1), np.diff(inv.indptr))
    order = np.lexsort((inv.rows, -inv.data, lists))
    return TiledInverted(
        indptr=inv.indptr, rows=inv.rows[order], data=inv.data[order], n_rows=inv.n_rows, dim=inv.dim, tile=inv.tile
    )


def top_rows_per_dim(inv: TiledInverted, top: int = TOP_ROWS) -> np.ndarray:
    """Global rows of each dimension's ``top`` largest values, from impact-sorted tiles (each tile's list
    starts with its own largest values, so only the first ``top`` of each are candidates)."""
    dims, values, rows = [], [], []
    for t in range(inv.n_tiles):
        starts = inv.indptr[t * inv.dim : (t + 1) * inv.dim]
        counts = np.minimum(np.diff(inv.indptr[t * inv.dim : (t + 1) * inv.dim + 1]), top)
        dim_of = np.repeat(np.arange(inv.dim), counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        pos = np.repeat(starts, counts) + offsets
        dims.append(dim_of)
        values.append(inv.data[pos])
        rows.append(inv.rows[pos].astype(np.int64) + t * inv.tile)
    out = np.full((inv.dim, top), -1, np.int64)
    if not dims:
        return out
    dim_all, val_all, row_all = np.concatenate(dims), np.concatenate(values), np.concatenate(rows)
    order = np.lexsort((row_all, -val_all, dim_all))
    dim_all, row_all = dim_all[order], row_all[order]
    first = np.searchsorted(dim_all, np.arange(inv.dim))
    rank = np.arange(dim_all.size) - first[dim_all]
    keep = rank < top
    out[dim_all[keep], rank[keep]] = row_all[keep]
    return out


def build_impact(x: sp.csr_matrix, tile: int | None = None) -> ImpactTiles:
    inv = sort_by_impact(build_inverted(x, tile))
    lengths = np.bincount(x.indices, minlength=x.shape[1]).astype(np.int64)
    return ImpactTiles(inv=inv, top_rows=top_rows_per_dim(inv), lengths=lengths)


def check_params(cut: float, slack: float) -> None:
    """Refuse settings the kernel would misread (ValueError, which the index reports as bad input)."""
    if isinstance(cut, bool) or not isinstance(cut, int | float) or not 0 <= cut <= 1:
        raise InvalidInputError(f"approx_cut must be a number in [0, 1] (0 = exact), got {cut!r}")
    if isinstance(slack, bool) or not isinstance(slack, int | float) or not 0 <= slack < float("inf"):
        raise InvalidInputError(f"approx_slack must be a finite number >= 0, got {slack!r}")


def _buffers(tile: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's accumulator, touched-row list (+1: the branch-free append) and dense query."""
    return scratch(_LOCAL, "buffers", (tile, tile + 1, dim), (np.float32, np.int32, np.float32))


def search_approx(
    impact: ImpactTiles,
    x: sp.csr_matrix,
    queries: sp.csr_matrix,
    lo: int,
    hi: int,
    heap_scores: np.ndarray,
    heap_rows: np.ndarray,
    heap_lo: int,
    row_offset: int,
    alive: np.ndarray | None,
    cut: float,
    slack: float = 1.0,
    probe_rows: int = PROBE_ROWS,
    safe: bool = False,
) -> None:
    """Push approximate top-k results of queries ``lo:hi`` against the rows of ``x`` (whose impact tiles are
    ``impact``) into heaps ``heap_lo..``; arguments as :func:`index.inverted.search_inverted`. Releases the GIL."""
    inv = impact.inv
    check_params(cut, slack)
    if x.shape != (inv.n_rows, inv.dim):
        raise ValueError(f"shapes do not match: rows {x.shape}, tiles {(inv.n_rows, inv.dim)}")
    mask = guard_search(inv, queries, lo, hi, heap_scores, heap_rows, heap_lo, alive)
    if mask is None:
        return
    acc, touched, qdense = _buffers(min(inv.tile, TILE_ROWS), inv.dim)
    tiles, forward = (inv.kernel_args, impact.top_rows, impact.lengths), (x.indptr, x.indices, x.data)
    heaps, buffers = (heap_scores, heap_rows, heap_lo, row_offset, mask), (acc, touched, qdense)
    settings = (float(cut), float(slack), int(probe_rows), bool(safe), int(SAFE_LISTS))
    status = compiled.search_approx(*tiles, forward, query_arrays(queries), lo, hi, heaps, buffers, settings)
    if status:
        raise ValueError(f"query column indices outside [0, {inv.dim})")
