"""Exact search over a scipy.sparse CSR database: the default backend, built for 1% to 75% dense embeddings.

Layout: the rows live in a few CSR blocks (float32 data, int32 indices) whose sizes shrink geometrically
(a log-structured list: each add appends a block, and adjacent blocks merge while the older one is at most twice
the newer), so adding one vector never copies the whole database, yet there are only O(log n) blocks to scan.

Removal marks rows dead (tombstones); searches skip dead rows in the top-k, so removed ids never come back,
and once dead rows exceed ``compact_ratio`` of all rows the blocks are rewritten without them.

Blocks of at least ``blockmax.MIN_ROWS`` rows also get a block-max structure (:mod:`index.blockmax`), kept where
a build-time probe says it beats the inverted index; the cost model then sends queries to it (``blockmax_exact=False``
turns it off).

Each search picks the cheapest exact kernel for the data it holds (see :mod:`index.kernels`), works through
the database in chunks whose score buffers stay under ``chunk_mb``, and spreads query blocks over ``threads``
worker threads (the compiled inverted-index search, scipy's sparse products and BLAS all release the GIL).

``mode="approx"`` (an index option, or per call ``search(..., mode="approx")``) trades a little recall for
speed: pruned, impact-ordered posting lists with exact rescoring (:mod:`index.approx`), tuned by ``approx_cut``
(0 = exact) and :meth:`CsrIndex.tune_approx`. Exact is the default.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from index import approx, blockmax, compiled, inverted, store
from index.base import VectorIndex
from index.errors import CorruptIndexError, InvalidInputError
from index.inverted import TiledInverted, build_inverted, search_inverted
from index.kernels import KERNELS, CostModel, row_slice
from index.rowmap import RowMap, RowMapped
from index.topk import RunningTopK
from index.validation import MAX_ID, Vectors, check_vectors

# Queries per sparse-kernel task: enough to amortise a thread-pool hand-off (~50 us), few enough that the
# workers finish together.
SPARSE_CHUNK_QUERIES = 32
# Estimated work of one core (cost model) above which a single query's tiles are split between the workers,
# if there are at least SPLIT_MIN_TILES_PER_WORKER tiles each (fewer split unevenly: 100k rows are 2 tiles of 65k
# and 35k rows, and at 100k x 512, 5% the split made a query slower, 0.29 -> 0.41 ms). Only the plain kernel
# splits (blocks of >= approx.SAFE_MIN_ROWS use the pruned one). On a loaded machine the second thread waits for
# a core: at 1M x 512, 1% (0.25 ms of work) a split query took 7 ms (bench_engines, load average ~10), so the
# threshold stays well above such queries.
SPLIT_MIN_WORK_NS = 500_000
SPLIT_MIN_TILES_PER_WORKER = 4
MODES = ("exact", "approx")
_CALL = threading.local()  # per-call search options (``search(..., mode=...)``), read by ``_search``

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def _pool(threads: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="csr-search")
        return _POOLS[threads]


def _run(tasks: list[Callable[[], None]], threads: int) -> None:
    """Run ``tasks`` on ``threads`` workers, the calling thread being one of them (one pool hand-off fewer:
    ~20-50 us, which is most of a split single query's gain)."""
    if threads <= 1 or len(tasks) <= 1:
        for task in tasks:
            task()
        return
    futures = [_pool(threads - 1).submit(task) for task in tasks[1:]]
    try:
        tasks[0]()
    finally:
        for future in futures:
            future.result()


def _vstack(blocks: list[sp.csr_matrix], dim: int) -> sp.csr_matrix:
    """Concatenate CSR row blocks without scipy's index upcasting and re-validation."""
    if len(blocks) == 1:
        return blocks[0]
    nnz = sum(b.nnz for b in blocks)
    index_dtype = np.int32 if nnz < np.iinfo(np.int32).max else np.int64
    parts = [np.zeros(1, np.int64)]
    offset = 0
    for b in blocks:
        parts.append(b.indptr[1:].astype(np.int64) + offset)
        offset += b.nnz
    indptr = np.concatenate(parts).astype(index_dtype)
    data = np.concatenate([b.data for b in blocks]).astype(np.float32, copy=False)
    indices = np.concatenate([b.indices for b in blocks]).astype(np.int32, copy=False)
    rows = sum(b.shape[0] for b in blocks)
    return sp.csr_matrix((data, indices, indptr), shape=(rows, dim), copy=False)


@dataclass(slots=True, eq=False)  # a block equals only itself: its fields are arrays
class _Block:
    """One CSR block of consecutive global rows, with caches built on first use."""

    x: sp.csr_matrix
    start: int
    inv: TiledInverted | None = None  # inverted index, for the sparse kernel
    impact: approx.ImpactTiles | None = None  # impact-ordered lists, for the approximate mode
    colcount: np.ndarray | None = None  # non-zeros per dimension, for the cost model
    bmax: blockmax.BlockMaxRows | None = None  # regrouped rows and block bounds, for the blockmax kernel
    bmax_checked: bool = False  # bmax was built (and kept only if it pays)

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


class CsrIndex(RowMapped, VectorIndex):
    """Exact inner-product / cosine search over sparse non-negative vectors (see module docstring)."""

    backend = "csr"
    _file_roles = ("data", "indices", "indptr", "ids", "norms")

    def __init__(
        self,
        dim: int,
        metric: str = "ip",
        *,
        kernel: str = "auto",
        threads: int | None = None,
        chunk_mb: float = 64.0,
        compact_ratio: float = 0.25,
        costs: CostModel | None = None,
        mode: str = "exact",
        pruned_exact: bool = True,
        blockmax_exact: bool = True,
        approx_cut: float = approx.DEFAULT_CUT,
        approx_slack: float = approx.DEFAULT_SLACK,
    ) -> None:
        super().__init__(dim, metric)
        if mode not in MODES:
            raise InvalidInputError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        approx.check_params(approx_cut, approx_slack)
        if kernel not in KERNELS:
            raise InvalidInputError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InvalidInputError(f"threads must be a positive integer, got {threads!r}")
        if not chunk_mb > 0:
            raise InvalidInputError(f"chunk_mb must be positive, got {chunk_mb!r}")
        if not 0 < compact_ratio <= 1:
            raise InvalidInputError(f"compact_ratio must be in (0, 1], got {compact_ratio!r}")
        self.kernel = kernel
        self.threads = threads or available_cores()
        self.chunk_bytes = int(chunk_mb * 2**20)
        self.compact_ratio = float(compact_ratio)
        self.costs = costs or CostModel()
        self.mode = mode
        for name, flag in (("pruned_exact", pruned_exact), ("blockmax_exact", blockmax_exact)):
            if not isinstance(flag, bool):
                raise InvalidInputError(f"{name} must be true or false, got {flag!r}")
        self.pruned_exact, self.blockmax_exact = pruned_exact, blockmax_exact
        self.approx_cut = float(approx_cut)
        self.approx_slack = float(approx_slack)
        self.last_kernel: str | None = None  # the kernel the latest search ran (benchmarks report it)
        self._blocks: list[_Block] = []
        self._row_ids = np.empty(0, np.int64)  # id of each global row (dead rows keep their old id)
        self._alive = np.empty(0, bool)
        self._norms = np.empty(0, np.float32)  # L2 norm as added, so cosine vectors can be reconstructed
        self._map = RowMap()  # live id -> global row
        self._n_dead = 0
        self._cache_lock = threading.Lock()  # searches share the read lock but build caches lazily
        self._colcount_cache: np.ndarray | None = None  # _colcounts(); dropped whenever the blocks change

    @property
    def nbytes(self) -> int:
        """Bytes held by the vectors, id maps and caches (what the benchmark reports as memory)."""
        total = self._row_ids.nbytes + self._alive.nbytes + self._norms.nbytes + self._map.nbytes
        for b in self._blocks:
            total += b.x.data.nbytes + b.x.indices.nbytes + b.x.indptr.nbytes
            total += sum(cache.nbytes for cache in (b.inv, b.impact, b.bmax) if cache is not None)
        return int(total)

    def _add(self, ids: np.ndarray, vectors: Vectors, norms: np.ndarray) -> None:
        x = vectors if sp.issparse(vectors) else sp.csr_matrix(vectors)
        x.indices = x.indices.astype(np.int32, copy=False)
        start = self.total_rows
        new_rows = np.arange(start, start + ids.size, dtype=np.int64)
        replaced = self._map.upsert(ids, new_rows)  # replace: the old rows die
        self._row_ids = np.concatenate([self._row_ids, ids])
        self._alive = np.concatenate([self._alive, np.ones(ids.size, bool)])
        self._norms = np.concatenate([self._norms, norms.astype(np.float32)])
        self._alive[replaced] = False
        self._n_dead += int(replaced.size)
        self._blocks.append(_Block(x, start))
        self._colcount_cache = None
        while len(self._blocks) >= 2 and self._blocks[-2].rows <= 2 * self._blocks[-1].rows:
            newer = self._blocks.pop()
            older = self._blocks.pop()
            self._blocks.append(_Block(_vstack([older.x, newer.x], self._dim), older.start))
        self._maybe_compact()

    def _remove(self, ids: np.ndarray) -> None:
        self._alive[self._map.delete(ids)] = False
        self._n_dead += int(ids.size)
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        if self._n_dead and self._n_dead >= self.compact_ratio * self.total_rows:
            self._compact()

    def _compact(self) -> None:
        if not self._n_dead and len(self._blocks) <= 1:
            return
        parts = []
        for b in self._blocks:
            keep = np.flatnonzero(self._alive[b.start : b.start + b.rows])
            parts.append(b.x if keep.size == b.rows else b.x[keep])
        parts = [p for p in parts if p.shape[0]]
        keep_rows = self._alive
        self._map.renumber(keep_rows)
        self._row_ids = self._row_ids[keep_rows]
        self._norms = self._norms[keep_rows]
        self._alive = np.ones(self._row_ids.size, bool)
        self._n_dead = 0
        self._blocks = [_Block(_vstack(parts, self._dim), 0)] if parts else []
        self._colcount_cache = None

    def _inverted(self, block: _Block) -> TiledInverted:
        """The lists the exact kernel walks: impact-ordered ones serve as well when they exist (same sums,
        added in the same dimension order), so an approximate index holds one copy."""
        with self._cache_lock:
            if block.inv is None and block.impact is not None:
                return block.impact.inv
            if block.inv is None:
                block.inv = build_inverted(block.x)
            return block.inv

    def _impact(self, block: _Block) -> approx.ImpactTiles:
        with self._cache_lock:
            if block.impact is None:
                block.impact = approx.build_impact(block.x)
            return block.impact

    def _blockmax(self, block: _Block) -> blockmax.BlockMaxRows | None:
        """The block's block-max structure, built on first use for blocks of at least ``blockmax.MIN_ROWS`` rows,
        and kept only if its probe says a typical query (a stored row) costs clearly less than through the inverted
        index: at 1M x 512, Zipf, it does at 1% density (~0.2% of the rows scored) and not at 5% (most of them;
        the structure would only cost memory, as much as the rows themselves)."""
        wanted = (self.blockmax_exact and self.mode == "exact") or self.kernel == "blockmax"
        if not wanted or block.rows < blockmax.MIN_ROWS:  # an approximate index's exact searches (tuning) skip it
            return None
        with self._cache_lock:
            if not block.bmax_checked:
                bmr = blockmax.build_blockmax(block.x)
                colcount = self._colcount_locked(block).astype(np.float64)
                typical_nnz = block.x.nnz / block.rows
                cost = self.costs.blockmax(
                    bounds=bmr.n_blocks * typical_nnz,
                    visits=bmr.visits_per_query * typical_nnz,
                    rows_scored=bmr.rows_per_query,
                    other_products=0.0,
                )
                sparse = self.costs.sparse_per_product * float((colcount**2).sum() / block.rows)
                pays = cost * self.costs.blockmax_keep_margin < sparse
                block.bmax = bmr if (pays or self.kernel == "blockmax") else None
                block.bmax_checked = True
            return block.bmax

    def _colcount(self, block: _Block) -> np.ndarray:
        with self._cache_lock:
            return self._colcount_locked(block)

    def _colcount_locked(self, block: _Block) -> np.ndarray:
        if block.colcount is None:
            block.colcount = np.bincount(block.x.indices, minlength=self._dim)
        return block.colcount

    def prepare(self) -> None:
        """Build now what the first searches would build lazily: column counts, block-max structures (exact
        mode; ~1.5 s at 1M x 512, 1%, rebuilt at load: they are not saved), and the inverted index if a
        single query like the stored vectors would use the sparse kernel (it costs as much memory as the data
        itself, so it is not built for dense data), and the compiled kernels. Benchmarks count this as part of the
        build; a server calls it at start-up."""
        compiled.warmup()
        with self._lock.read():
            colcount = self._colcounts()
            if not self._blocks:
                return
            bmax = [self._blockmax(block) is not None for block in self._blocks]
            for block, has_bmax in zip(self._blocks, bmax, strict=True):
                if self.mode == "approx" or (self._pruned(block) and not has_bmax):
                    self._impact(block)
            if self.mode == "approx" or all(self._pruned(b) or m for b, m in zip(self._blocks, bmax, strict=True)):
                return
            expected_products = float((colcount.astype(np.float64) ** 2).sum() / max(1, self.total_rows))
            single = self.costs.choose(
                n_rows=self.total_rows,
                dim=self._dim,
                db_nnz=int(colcount.sum()),
                n_queries=1,
                sparse_products=expected_products,
            )
            if single == "sparse" or self.kernel == "sparse":
                for block in self._blocks:
                    self._inverted(block)

    def _colcounts(self) -> np.ndarray:
        """Stored non-zeros per dimension, over all blocks (cached until the blocks change)."""
        total = self._colcount_cache
        if total is None:
            total = sum((self._colcount(b) for b in self._blocks), np.zeros(self._dim, np.int64))
            self._colcount_cache = total
        return total

    def _sparse_products(self, queries: sp.csr_matrix) -> float:
        """Multiply-adds the inverted index would do for these queries (posting-list entries they visit)."""
        return float(self._colcounts()[queries.indices].sum())

    def choose_kernel(self, queries: sp.csr_matrix) -> str:
        """The kernel ``search`` would use for these (validated) queries."""
        return self._choose(queries, self._sparse_products(queries))

    def _choose(self, queries: sp.csr_matrix, sparse_products: float) -> str:
        if self.kernel != "auto":
            return self.kernel
        return self.costs.choose(
            self._blockmax_cost(queries),
            n_rows=self.total_rows,
            dim=self._dim,
            db_nnz=sum(b.x.nnz for b in self._blocks),
            n_queries=queries.shape[0],
            sparse_products=sparse_products,
        )

    def _blockmax_cost(self, queries: sp.csr_matrix) -> float | None:
        """The cost model's estimate for the blockmax kernel on these queries (None: no block has the structure):
        the bound pass and the probed rows per query in blocks that have it, the sparse kernel's work elsewhere."""
        structures = [(b, self._blockmax(b)) for b in self._blocks]
        if all(bmr is None for _, bmr in structures):
            return None
        bounds = visits = rows = other = 0.0
        for block, bmr in structures:
            if bmr is None:
                other += float(self._colcount(block)[queries.indices].sum())
            else:
                bounds += bmr.n_blocks * queries.nnz
                visits += bmr.visits_per_query * queries.nnz
                rows += bmr.rows_per_query * queries.shape[0]
        return self.costs.blockmax(bounds=bounds, visits=visits, rows_scored=rows, other_products=other)

    def search(self, queries: Any, k: int = 10, *, mode: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` scores and ids per query row, best first; ``mode`` overrides the index's mode for this call
        ("exact": the true top-k; "approx": see :mod:`index.approx`, returned scores are still exact)."""
        if mode is not None and mode not in MODES:
            raise InvalidInputError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        return self._search_with(queries, k, mode=mode)

    def _search_with(self, queries: Any, k: int, **call: Any) -> tuple[np.ndarray, np.ndarray]:
        """``VectorIndex.search`` with per-call options (mode, cut, slack) for ``_search``, kept thread-local so
        that concurrent searches (and a tuning run) never see each other's."""
        previous = getattr(_CALL, "options", None)
        _CALL.options = call
        try:
            return super().search(queries, k)
        finally:
            _CALL.options = previous

    def _search(self, queries: Vectors, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = queries if sp.issparse(queries) else sp.csr_matrix(queries)
        top = RunningTopK(q.shape[0], k)
        parts = [(b, self._alive[b.start : b.start + b.rows] if self._n_dead else None) for b in self._blocks]
        products = self._sparse_products(q)
        call = getattr(_CALL, "options", None) or {}
        cut = call.get("cut", self.approx_cut)
        if (call.get("mode") or self.mode) == "approx" and self._approx_pays(q.shape[0], products, cut):
            self.last_kernel = "approx"
            self._search_approx(parts, q, top, cut, call.get("slack", self.approx_slack))
            return self._results(top)
        kernel = self._choose(q, products)
        self.last_kernel = kernel
        if kernel == "sparse":
            self._search_sparse(parts, q, top, split_tiles=self._split_tiles(q.shape[0], products))
        elif kernel == "blockmax":
            self._search_sparse(parts, q, top, split_tiles=False, use_blockmax=True)
        else:
            getattr(self, f"_search_{kernel}")(parts, q, top)
        return self._results(top)

    def _results(self, top: RunningTopK) -> tuple[np.ndarray, np.ndarray]:
        rows = top.rows
        ids = np.where(rows >= 0, self._row_ids[np.maximum(rows, 0)], -1)
        return top.scores, ids

    def _approx_pays(self, n_queries: int, sparse_products: float, cut: float) -> bool:
        """Whether the approximate kernel is worth running instead of the exact ones: not at ``approx_cut`` 0
        (it would be exact, only slower), not when the exact inverted-index work per query is below
        ``APPROX_MIN_PRODUCTS`` (the probe and rescoring cost more than the pruning saves), and not above the
        cost model's density limit, where no posting lists are built (they would double the memory)."""
        if cut <= 0 or sparse_products < approx.APPROX_MIN_PRODUCTS * n_queries:
            return False
        nnz = sum(b.x.nnz for b in self._blocks)
        return nnz <= self.costs.sparse_max_density * max(1, self.total_rows) * self._dim

    def _search_approx(self, parts: list, q: sp.csr_matrix, top: RunningTopK, cut: float, slack: float) -> None:
        def task(lo: int, hi: int) -> None:
            for block, alive in parts:
                approx.search_approx(
                    self._impact(block), block.x, q, lo, hi, top.scores, top.rows, lo, block.start, alive, cut, slack
                )

        ranges = self._query_ranges(q.shape[0], SPARSE_CHUNK_QUERIES)
        _run([lambda lo=lo, hi=hi: task(lo, hi) for lo, hi in ranges], self.threads)

    def tune_approx(
        self,
        queries: Any,
        k: int = 10,
        target_recall: float = 0.997,
        grid: tuple[tuple[float, float], ...] = approx.TUNE_GRID,
    ) -> dict[str, Any]:
        """Set ``approx_cut`` / ``approx_slack`` to the fastest pair of ``grid`` whose recall@k against the exact
        search reaches ``target_recall`` on ``queries`` (held out from the data, as they would come at serving
        time); if none does, to (0, slack): exact.

        Speed is the median single-query latency over (up to 100 of) the queries, as served. Recall counts a
        returned row as correct when its score reaches the true k-th best (scores are exact in both modes, so
        rows tied with the k-th are not misses); a query with fewer than k positive scores is judged on those.
        Returns ``{"param", "value", "slack", "recall", "tried"}``, like
        :meth:`index.faiss_index.FaissIndex.tune`'s report.
        """
        if not 0 < target_recall <= 1:
            raise InvalidInputError(f"target_recall must be in (0, 1], got {target_recall!r}")
        q = check_vectors(queries, self._dim, what="tuning queries")
        truth, _ = self._search_with(q, k, mode="exact")
        kth = np.where(truth[:, -1:] > 0, truth[:, -1:], np.float32(np.finfo(np.float32).tiny))
        positive = (truth > 0).sum(axis=1)
        singles = [row_slice(q, i, i + 1) for i in range(min(100, q.shape[0]))]
        tried = []
        for cut, slack in grid:
            approx.check_params(cut, slack)
            found, _ = self._search_with(q, k, mode="approx", cut=cut, slack=slack)
            ok = (found >= kth - 1e-6 * np.maximum(1.0, np.abs(kth))).sum(axis=1)
            hit = np.minimum(ok, positive)[positive > 0] / positive[positive > 0]
            recall = float(np.mean(hit)) if hit.size else 1.0
            latency = []
            for single in singles:
                t0 = time.perf_counter()
                self._search_with(single, k, mode="approx", cut=cut, slack=slack)
                latency.append(time.perf_counter() - t0)
            tried.append({"cut": cut, "slack": slack, "recall": recall, "latency_us": 1e6 * float(np.median(latency))})
        good = [t for t in tried if t["recall"] >= target_recall]
        best = min(good, key=lambda t: t["latency_us"], default={"cut": 0.0, "slack": self.approx_slack, "recall": 1.0})
        with self._lock.write():
            self.approx_cut, self.approx_slack = float(best["cut"]), float(best["slack"])
        return {
            "param": "approx_cut",
            "value": self.approx_cut,
            "slack": self.approx_slack,
            "recall": best["recall"],
            "tried": tried,
        }

    def _query_ranges(self, n: int, size: int) -> list[tuple[int, int]]:
        size = max(1, min(size, -(-n // self.threads)))  # at least one range per worker
        return [(lo, min(n, lo + size)) for lo in range(0, n, size)]

    @staticmethod
    def _push_chunks(
        parts: list, top: RunningTopK, lo: int, rows: int, scores_of: Callable[[sp.csr_matrix], np.ndarray]
    ) -> None:
        """Push the (queries lo.., rows) score blocks that ``scores_of`` gives for ``rows`` stored rows at a time
        into ``top``, dead rows at -inf."""
        for block, alive in parts:
            for r0 in range(0, block.rows, rows):
                r1 = min(block.rows, r0 + rows)
                scores = scores_of(row_slice(block.x, r0, r1))
                if alive is not None and not alive[r0:r1].all():
                    scores[:, ~alive[r0:r1]] = -np.inf
                top.push(lo, scores, block.start + r0)

    def _search_sparse(
        self, parts: list, q: sp.csr_matrix, top: RunningTopK, *, split_tiles: bool, use_blockmax: bool = False
    ) -> None:
        # The kernel fuses the top-k into its scan (index.inverted), so no score block is ever materialised:
        # memory is one tile accumulator per worker. Large blocks take the pruned exact kernel instead
        # (index.approx with safe bounds): same results, without reading every list entry or scanning every row;
        # with ``use_blockmax`` those that have a block-max structure take that kernel (index.blockmax).
        n = q.shape[0]
        bmax = [self._blockmax(block) if use_blockmax else None for block, _ in parts]
        pruned = [self._pruned(block) for block, _ in parts]
        if not split_tiles or any(pruned):  # one task per query range, each walking every block: no shared heaps

            def task(lo: int, hi: int) -> None:
                for (block, alive), prune, bmr in zip(parts, pruned, bmax, strict=True):
                    out = (top.scores, top.rows, lo, block.start, alive)  # heaps, first heap row, row offset, mask
                    if bmr is not None:
                        blockmax.search_blockmax(bmr, q, lo, hi, *out)
                    elif prune:
                        approx.search_approx(
                            self._impact(block), block.x, q, lo, hi, *out, approx.SAFE_CUT, 0.0, safe=True
                        )
                    else:
                        search_inverted(self._inverted(block), q, lo, hi, *out)

            ranges = self._query_ranges(n, SPARSE_CHUNK_QUERIES)
            _run([lambda lo=lo, hi=hi: task(lo, hi) for lo, hi in ranges], self.threads)
            return
        # Fewer queries than workers: each worker takes a contiguous run of tiles into its own top-k; merged last.
        tiles = [(i, t) for i, (block, _) in enumerate(parts) for t in range(self._inverted(block).n_tiles)]
        work = []
        for group in np.array_split(np.arange(len(tiles)), self.threads):
            runs: dict[int, tuple[int, int]] = {}  # block -> its tiles in this group (consecutive)
            for i, t in (tiles[g] for g in group):
                runs[i] = (runs.get(i, (t, t))[0], t + 1)
            work.append((runs, RunningTopK(n, top.k)))

        def tile_task(runs: dict[int, tuple[int, int]], partial: RunningTopK) -> None:
            for i, span in runs.items():
                block, alive = parts[i]
                inv = self._inverted(block)
                search_inverted(inv, q, 0, n, partial.scores, partial.rows, 0, block.start, alive, span)

        _run([lambda r=r, p=p: tile_task(r, p) for r, p in work], self.threads)
        top.absorb([p for _, p in work])

    def _pruned(self, block: _Block) -> bool:
        """Whether the exact search of ``block`` uses the pruned kernel: for blocks of at least
        ``approx.SAFE_MIN_ROWS`` rows, where reading every posting and scanning every row's score cost more than
        the probe and the rescoring (see index.approx)."""
        return self.pruned_exact and block.rows >= approx.SAFE_MIN_ROWS

    def _split_tiles(self, n_queries: int, sparse_products: float) -> bool:
        """Split tiles rather than queries: only for fewer queries than workers and enough work to beat the
        pool hand-off and merge (~0.15 ms). Measured on one query: 1M x 512, 5%: 1.67 -> 1.24 ms; 100k x 512, 5%
        (0.3 ms of work, two unequal tiles) got slower, 0.29 -> 0.41 ms."""
        if (
            n_queries >= self.threads
            or self.total_rows < SPLIT_MIN_TILES_PER_WORKER * self.threads * inverted.TILE_ROWS
        ):
            return False
        return self.costs.sparse_per_product * sparse_products > SPLIT_MIN_WORK_NS

    def _search_spdense(self, parts: list, q: sp.csr_matrix, top: RunningTopK) -> None:
        qb = self.costs.query_block
        rows_per_chunk = max(256, self.chunk_bytes // (4 * qb))

        def task(lo: int, hi: int) -> None:
            qt = np.ascontiguousarray(row_slice(q, lo, hi).toarray().T)
            self._push_chunks(
                parts, top, lo, rows_per_chunk, lambda x: np.ascontiguousarray(np.asarray(x @ qt, np.float32).T)
            )

        ranges = self._query_ranges(q.shape[0], qb)
        _run([lambda lo=lo, hi=hi: task(lo, hi) for lo, hi in ranges], self.threads)

    def _search_dense(self, parts: list, q: sp.csr_matrix, top: RunningTopK) -> None:
        # Query ranges and row chunks sized so that densified rows plus the score block fit ``chunk_mb``.
        q_per_range = max(1, min(q.shape[0], self.chunk_bytes // (8 * self._dim)))

        for lo in range(0, q.shape[0], q_per_range):  # in this thread: BLAS already uses every core
            hi = min(q.shape[0], lo + q_per_range)
            qd = row_slice(q, lo, hi).toarray()
            rows_per_chunk = max(256, self.chunk_bytes // (4 * (self._dim + hi - lo)))
            self._push_chunks(parts, top, lo, rows_per_chunk, lambda x, qd=qd: qd @ x.toarray().T)  # sgemm

    def _reconstruct(self, ids: np.ndarray) -> sp.csr_matrix:
        rows = self._map.rows_of(ids)
        starts = np.array([b.start for b in self._blocks], np.int64)
        which = np.searchsorted(starts, rows, side="right") - 1
        parts: list[sp.csr_matrix | None] = [None] * ids.size
        for bi in np.unique(which):
            sel = np.flatnonzero(which == bi)
            block = self._blocks[int(bi)]
            sub = block.x[rows[sel] - block.start]
            for j, s in enumerate(sel):
                parts[s] = sub[j]
        out = sp.vstack(parts, format="csr", dtype=np.float32)
        if self._metric == "cosine":
            out = sp.csr_matrix(sp.diags(self._norms[rows]) @ out, dtype=np.float32)
        return out

    def _before_save(self) -> None:
        self._compact()

    def _options(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "chunk_mb": self.chunk_bytes / 2**20,
            "compact_ratio": self.compact_ratio,
            "mode": self.mode,
            "pruned_exact": self.pruned_exact,
            "blockmax_exact": self.blockmax_exact,
            "approx_cut": self.approx_cut,
            "approx_slack": self.approx_slack,
        }

    def _writers(self) -> dict[str, tuple[str, store.Writer]]:
        x = self._blocks[0].x if self._blocks else sp.csr_matrix((0, self._dim), dtype=np.float32)
        arrays = {
            "data": x.data.astype(np.float32, copy=False),
            "indices": x.indices.astype(np.int32, copy=False),
            "indptr": x.indptr.astype(np.int64),
            "ids": self._row_ids,
            "norms": self._norms,
        }
        return {role: (".npy", lambda path, a=a: store.write_npy(path, a)) for role, a in arrays.items()}

    def _read_files(self, options: dict[str, Any], paths: dict[str, Path]) -> None:
        dim = self._dim
        data = store.read_npy(paths["data"], dtype=np.float32, ndim=1)
        indices = store.read_npy(paths["indices"], dtype=np.int32, ndim=1)
        indptr = store.read_npy(paths["indptr"], dtype=np.int64, ndim=1)
        ids = store.read_npy(paths["ids"], dtype=np.int64, ndim=1)
        norms = store.read_npy(paths["norms"], dtype=np.float32, ndim=1)
        n = ids.size
        problems = []
        if indptr.size != n + 1 or norms.size != n:
            problems.append(f"{n} ids but {indptr.size - 1} rows and {norms.size} norms")
        elif indptr[0] != 0 or indptr[-1] != data.size or data.size != indices.size or np.any(np.diff(indptr) < 0):
            problems.append("row pointers do not match the data")
        elif indices.size and (indices.min() < 0 or indices.max() >= dim):
            problems.append(f"column indices outside [0, {dim})")
        elif not np.all(np.isfinite(data)) or (data.size and data.min() < 0):
            problems.append("negative or non-finite values")
        elif n and (ids.min() < 0 or ids.max() > MAX_ID or np.unique(ids).size != n):
            problems.append("invalid or duplicate ids")
        if problems:
            raise CorruptIndexError(f"{paths['data'].parent}: inconsistent CSR files: {problems[0]}")
        if n:
            index_dtype = np.int32 if data.size < np.iinfo(np.int32).max else np.int64
            x = sp.csr_matrix((data, indices, indptr.astype(index_dtype)), shape=(n, dim), copy=False)
            self._blocks = [_Block(x, 0)]
            self._map = RowMap(ids)
            self._row_ids = ids
            self._alive = np.ones(n, bool)
            self._norms = norms
