"""Exact score kernels for a CSR database and the cost model that picks one per search.

Three ways to compute the (queries x database) inner products, each fastest in a different density range:

* ``sparse``  - sparse x sparse through the inverted index (the database transposed to CSR, one row per
  dimension): each query adds up only the database columns of its own non-zero dimensions. Work is
  sum_i sum_{j in nz(q_i)} nnz(column j), i.e. about density^2 of the dense work, but scattered (no SIMD).
* ``spdense`` - sparse database x dense query block (``csr @ dense``): nnz(database) x n_queries multiply-adds
  in contiguous, vectorised rows; the work falls with the database density only.
* ``dense``   - densify a chunk of database rows and call BLAS (sgemm), as FAISS IndexFlatIP does; fastest
  once the data is dense enough that skipping zeros no longer pays.

scipy's sparse kernels release the GIL, so the callers run them on query blocks in a thread pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

KERNELS = ("auto", "sparse", "spdense", "dense")


def transpose_csr(x: sp.csr_matrix) -> sp.csr_matrix:
    """The inverted index: row j lists the database rows that are non-zero in dimension j."""
    xt = x.T.tocsr()
    xt.indices = xt.indices.astype(np.int32, copy=False)
    if xt.nnz < np.iinfo(np.int32).max:
        xt.indptr = xt.indptr.astype(np.int32, copy=False)
    return xt


def row_slice(x: sp.csr_matrix, lo: int, hi: int) -> sp.csr_matrix:
    """Rows lo:hi sharing ``x``'s data and indices (scipy's own slicing copies them)."""
    a, b = int(x.indptr[lo]), int(x.indptr[hi])
    indptr = (x.indptr[lo : hi + 1] - a).astype(x.indptr.dtype, copy=False)
    out = sp.csr_matrix((x.data[a:b], x.indices[a:b], indptr), shape=(hi - lo, x.shape[1]), copy=False)
    out.has_sorted_indices = x.has_sorted_indices
    return out


def _zeroed(out: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """``out`` cleared (a reused, already-touched buffer), or a new zero array.

    Reuse matters at low density: a fresh np.zeros is mapped lazily, so the scatter itself pays a page fault per
    4 KiB of scores it first touches, which at 1% density cost more than the arithmetic (measured 2.5x).
    """
    if out is None:
        return np.zeros(shape, np.float32)
    if out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"score buffer must be float32 {shape}, got {out.dtype} {out.shape}")
    out.fill(0)
    return out


def _scores_sparse_public(xt: sp.csr_matrix, q: sp.csr_matrix, out: np.ndarray | None = None) -> np.ndarray:
    out = _zeroed(out, (q.shape[0], xt.shape[1]))
    indptr, indices, data = q.indptr, q.indices, q.data
    for i in range(q.shape[0]):
        lo, hi = indptr[i], indptr[i + 1]
        if lo != hi:  # gather the posting lists of the query's dimensions, then one scatter-add in C
            out[i] = xt[indices[lo:hi]].T @ data[lo:hi]
    return out


def _scores_sparse_direct(xt: sp.csr_matrix, q: sp.csr_matrix, out: np.ndarray | None = None) -> np.ndarray:
    """The same computation with one call of scipy's compiled CSC mat-vec per query and no copying.

    ``csc_matvec`` adds ``x[j] * column j`` for the column ranges ``Ap[j]:Ap[j+1]`` and skips a range whose
    end is before its start. Taking the query's dimensions in descending order and giving the matvec the
    posting lists as columns [start_j, end_j), interleaved with "gap" columns [end_j, start_next) that are
    empty (start_next <= end_j because dimensions descend) and weighted 0, it reads the posting lists in place:
    no gather copy (which cost as much as the scatter) and no per-call validation of scipy's public indexing
    (~40 us, more than the arithmetic at 1% density). Measured 1.7x faster than the public path at 5%.
    """
    from scipy.sparse import _sparsetools

    itype = xt.indptr.dtype
    out = _zeroed(out, (q.shape[0], xt.shape[1]))
    for r in range(q.shape[0]):
        a, b = int(q.indptr[r]), int(q.indptr[r + 1])
        if a == b:
            continue
        dims = q.indices[a:b][::-1]  # CSR rows have sorted indices: this is descending
        ptr = np.empty(2 * dims.size, itype)
        ptr[0::2] = xt.indptr[dims]
        ptr[1::2] = xt.indptr[dims + 1]
        weights = np.zeros(2 * dims.size - 1, np.float32)
        weights[0::2] = q.data[a:b][::-1]
        _sparsetools.csc_matvec(xt.shape[1], weights.size, ptr, xt.indices, xt.data, weights, out[r])
    return out


def _direct_path_works() -> bool:
    """Use the private sparsetools entry points only if they exist and agree with the public path here."""
    try:
        rng = np.random.default_rng(0)
        x = sp.random(50, 30, density=0.2, format="csr", dtype=np.float32, random_state=rng)
        q = sp.random(4, 30, density=0.3, format="csr", dtype=np.float32, random_state=rng)
        for m in (x, q):
            m.indices = m.indices.astype(np.int32)
            m.indptr = m.indptr.astype(np.int32)
        xt = transpose_csr(x)
        return bool(np.allclose(_scores_sparse_direct(xt, q), _scores_sparse_public(xt, q), atol=1e-6))
    except Exception:  # noqa: BLE001 - any failure (missing module, changed signature) means: do not use it
        return False


_DIRECT: bool | None = None


def scores_sparse(xt: sp.csr_matrix, q: sp.csr_matrix, out: np.ndarray | None = None) -> np.ndarray:
    """(n_queries, n_rows) scores via the inverted index ``xt`` (dims x rows), written into ``out`` if given."""
    global _DIRECT
    if _DIRECT is None:
        _DIRECT = _direct_path_works()
    same_index_types = xt.indptr.dtype == xt.indices.dtype
    if _DIRECT and same_index_types and q.nnz and q.has_sorted_indices:
        return _scores_sparse_direct(xt, q, out)
    return _scores_sparse_public(xt, q, out)


def scores_spdense(x: sp.csr_matrix, qt: np.ndarray) -> np.ndarray:
    """(n_rows, n_queries) scores of database rows ``x`` against dense queries ``qt`` (dims x n_queries)."""
    return np.asarray(x @ qt, dtype=np.float32)


def scores_dense(x: sp.csr_matrix, q: np.ndarray) -> np.ndarray:
    """(n_queries, n_rows) scores via a densified chunk and BLAS."""
    return q @ x.toarray().T


@dataclass(frozen=True)
class CostModel:
    """Nanoseconds of one core per unit of work of each kernel, fitted on the project's 2-core AMD EPYC box.

    Only the ratios matter (every kernel spreads over the cores alike, and the top-k selection that all of them
    pay is left out). The defaults come from ``bench/bench_index.py --calibrate`` (50k rows, D 512 and 2048,
    density 0.5% to 50%, 1 to 200 queries; median relative error of the fit 24%) and can be overridden with
    ``CsrIndex(..., costs=CostModel(...))`` on a machine where they differ.
    """

    sparse_per_product: float = 1.133  # one scattered multiply-add (posting list entry x query weight)
    sparse_per_query: float = 0.0  # per-query overhead (the fit found it negligible)
    spdense_per_fma: float = 0.2069  # one vectorised multiply-add (database non-zero x query)
    spdense_per_pass: float = 0.8401  # streaming one database non-zero per query block
    dense_per_fma: float = 0.02683  # one sgemm multiply-add (database element x query)
    dense_per_element: float = 0.8755  # densifying one database element (once per search)
    query_block: int = 64  # queries per spdense block
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

    def choose(self, **work: float) -> str:
        estimates = self.costs(**work)
        return min(estimates, key=estimates.__getitem__)
