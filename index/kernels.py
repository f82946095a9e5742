"""Exact score kernels for a CSR database and the cost model that picks one per search.

Three ways to compute the (queries x database) inner products, each fastest in a different density range:

* ``sparse``  - sparse x sparse through the inverted index (:mod:`index.inverted`): each query adds up only
  the posting lists of its own non-zero dimensions, a compiled loop that feeds the top-k directly. Work is
  sum_i sum_{j in nz(q_i)} nnz(column j), i.e. about density^2 of the dense work, but scattered (no SIMD).
* ``spdense`` - sparse database x dense query block (``csr @ dense``): nnz(database) x n_queries multiply-adds
  in contiguous, vectorised rows; the work falls with the database density only.
* ``dense``   - densify a chunk of database rows and call BLAS (sgemm), as FAISS IndexFlatIP does; fastest
  once the data is dense enough that skipping zeros no longer pays.
* ``blockmax`` - large blocks through :mod:`index.blockmax` (an upper bound per group of similar rows, only the
  groups that can still enter the top-k scored), the rest as ``sparse``. Its work is what a build-time probe
  measured: the bound pass (groups x query non-zeros) and the rows it scored per query.

All of them release the GIL, so the callers run them on query blocks in a thread pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import scipy.sparse as sp

KERNELS = ("auto", "sparse", "spdense", "dense", "blockmax")


def row_slice(x: sp.csr_matrix, lo: int, hi: int) -> sp.csr_matrix:
    """Rows lo:hi sharing ``x``'s data and indices (scipy's own slicing copies them)."""
    a, b = int(x.indptr[lo]), int(x.indptr[hi])
    indptr = (x.indptr[lo : hi + 1] - a).astype(x.indptr.dtype, copy=False)
    out = sp.csr_matrix((x.data[a:b], x.indices[a:b], indptr), shape=(hi - lo, x.shape[1]), copy=False)
    out.has_sorted_indices = x.has_sorted_indices
    return out


@dataclass(frozen=True)
class CostModel:
    """Nanoseconds of one core per unit of work of each kernel, fitted on the project's 2-core AMD EPYC box.

    Only the ratios matter (every kernel spreads over the cores alike, and the top-k selection that all of them
    pay is left out). The defaults come from ``bench/bench_index.py --calibrate`` (50k rows; uniform positions
    at D 512 and 2048, density 0.5% to 50%, and Zipf-like dimension popularity at D 512, 0.5% to 25%, the
    skew of learned codes; 1 to 200 queries; median relative error of the fit 21%, the log in
    docs/results/index-calibrate.log). Checked on 100k x 512 at 5%, Zipf, batch 100: the fit picks ``sparse``,
    measured 36 ms against 115 ms for ``spdense`` on one core. Override with ``CsrIndex(..., costs=CostModel(...))``
    on a machine where they differ.
    """

    sparse_per_product: float = 1.201  # one scattered multiply-add (posting list entry x query weight)
    sparse_per_query: float = 0.0  # per-query overhead (the fit found it negligible)
    spdense_per_fma: float = 0.2122  # one vectorised multiply-add (database non-zero x query)
    spdense_per_pass: float = 1.328  # streaming one database non-zero per query block
    dense_per_fma: float = 0.01829  # one sgemm multiply-add (database element x query)
    dense_per_element: float = 1.388  # densifying one database element (once per search)
    query_block: int = 64  # queries per spdense block
    # Block-max kernel: least squares (relative error) over single queries at 1M x 512, Zipf, 300 at 1% and 40
    # at 5%, caches evicted between queries as in the interleaved benchmark (time against block bounds, visited
    # blocks x query non-zeros and rows scored; the slowest 10% left out as scheduler stalls), scaled by the
    # sparse kernel's per-product time on the same queries (2.37 ns on the loaded box) to sparse_per_product.
    blockmax_per_bound: float = 0.43  # one block bound, per query non-zero (bytes, vectorised)
    blockmax_per_visit: float = 25.8  # bounding one visited block's parts, per query non-zero
    blockmax_per_row: float = 175.0  # one row scored from the forward CSR (a cache miss or two)
    # The probe's queries (stored rows) may be easier than new ones: the structure is kept only if it is
    # estimated this much cheaper than the sparse kernel for them (1M x 512, Zipf, 1%: ~2.3x; at 5% the probe
    # gives up).
    blockmax_keep_margin: float = 1.5
    # The inverted index costs as much memory as the data. Above this density it is never built: at 75% it
    # halved single-query latency (100k x 2048: 94 ms instead of 189 ms) yet FAISS Flat on the dense copy took
    # 48 ms, so dense data belongs in the faiss backend and doubling csr's memory buys nothing.
    sparse_max_density: float = 0.5

    def costs(self, *, n_rows: int, dim: int, db_nnz: int, n_queries: int, sparse_products: float) -> dict:
        blocks = -(-n_queries // self.query_block)
        too_dense = db_nnz > self.sparse_max_density * n_rows * dim
        return {
            "sparse": math.inf
            if too_dense
            else self.sparse_per_product * sparse_products + self.sparse_per_query * n_queries,
            "spdense": self.spdense_per_fma * db_nnz * n_queries + self.spdense_per_pass * db_nnz * blocks,
            "dense": self.dense_per_fma * n_rows * dim * n_queries + self.dense_per_element * n_rows * dim,
        }

    def blockmax(self, *, bounds: float, visits: float, rows_scored: float, other_products: float) -> float:
        """Nanoseconds of the ``blockmax`` kernel: ``bounds`` block bounds (blocks x query non-zeros),
        ``visits`` visited blocks x query non-zeros (their parts' bounds), ``rows_scored`` rows scored exactly,
        ``other_products`` posting entries of the blocks it leaves to the sparse kernel (too small for it)."""
        return (
            self.blockmax_per_bound * bounds
            + self.blockmax_per_visit * visits
            + self.blockmax_per_row * rows_scored
            + self.sparse_per_product * other_products
        )

    def choose(self, blockmax: float | None = None, **work: float) -> str:
        """The cheapest kernel for ``work`` (see :meth:`costs`); ``blockmax`` is that kernel's estimate, where
        the index has block-max structures."""
        estimates = self.costs(**work)
        if blockmax is not None and math.isfinite(estimates["sparse"]):
            estimates["blockmax"] = blockmax
        return min(estimates, key=estimates.__getitem__)
