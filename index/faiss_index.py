"""FAISS backend: ``IndexIDMap2`` over Flat (exact), IVF or HNSW (approximate), on densified vectors.

Removal differs by structure, because FAISS cannot remove everywhere:

* Flat: ``remove_ids`` (IndexFlat compacts its rows, and IndexIDMap2 compacts its id map in step).
* IVF and HNSW: tombstones. HNSW has no ``remove_ids`` at all, and IndexIDMap2 over IVF mislabels results
  after ``remove_ids`` (IVF does not renumber the rows it keeps while the id map does; checked with
  faiss 1.15). So a removed row's id in the id map becomes -1, searches then pass a FAISS ``IDSelectorRange``
  that admits only real ids (>= 0), and once ``compact_ratio`` of the rows are dead the structure is rebuilt
  from the live vectors (IVF keeps its trained centroids).

Approximate defaults: IVF with nlist = sqrt(n) trained on the first add, HNSW32 with efConstruction 40. Their
search effort (nprobe, efSearch) is set by :meth:`FaissIndex.tune`, which raises it until recall@k against exact
search on sample queries reaches a target (0.95 by default); ``lpjepa index build`` tunes automatically.
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from index import store
from index.base import VectorIndex
from index.errors import CorruptIndexError, InvalidInputError
from index.rowmap import RowMap, RowMapped
from index.validation import MAX_ID, Vectors, check_ids, check_k, check_vectors, normalize_rows, row_norms

_SPEC = re.compile(r"^(?:(?P<flat>Flat)|IVF(?P<nlist>\d*)(?:,Flat)?|HNSW(?P<m>\d*)(?:,Flat)?)$")
_CHUNK_BYTES = 64 << 20  # densify at most this much of a CSR batch at a time
_ADD_ROWS = 16384  # rows re-added per step when rebuilding


def _faiss():
    import faiss

    return faiss


def parse_spec(spec: str) -> dict[str, Any]:
    """'Flat' | 'IVF[nlist][,Flat]' | 'HNSW[M][,Flat]' -> {'kind', 'nlist' or 'm'}."""
    match = _SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if not match:
        raise InvalidInputError(f"unsupported FAISS index {spec!r}; use Flat, IVF[nlist][,Flat] or HNSW[M][,Flat]")
    if match["flat"]:
        return {"kind": "flat"}
    if match["m"] is not None:
        m = int(match["m"] or 32)
        if not 2 <= m <= 512:
            raise InvalidInputError(f"HNSW M must be in [2, 512], got {m}")
        return {"kind": "hnsw", "m": m}
    nlist = int(match["nlist"]) if match["nlist"] else None
    if nlist is not None and nlist < 1:
        raise InvalidInputError("IVF nlist must be at least 1")
    return {"kind": "ivf", "nlist": nlist}


def _dense_chunks(vectors: Vectors):
    rows = max(1, _CHUNK_BYTES // (4 * vectors.shape[1]))
    for lo in range(0, vectors.shape[0], rows):
        chunk = vectors[lo : lo + rows]
        yield lo, np.ascontiguousarray(chunk.toarray() if sp.issparse(chunk) else chunk, dtype=np.float32)


class FaissIndex(RowMapped, VectorIndex):
    """FAISS Flat / IVF / HNSW behind the common interface (see module docstring)."""

    backend = "faiss"
    _file_roles = ("faiss", "norms")

    def __init__(
        self,
        dim: int,
        metric: str = "ip",
        *,
        spec: str = "Flat",
        nprobe: int | None = None,
        ef_search: int | None = None,
        ef_construction: int = 40,
        compact_ratio: float = 0.25,
        use_gpu: bool | None = None,
    ) -> None:
        super().__init__(dim, metric)
        self.spec = spec
        self._kind = parse_spec(spec)
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search), ("ef_construction", ef_construction)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < compact_ratio <= 1:
            raise InvalidInputError(f"compact_ratio must be in (0, 1], got {compact_ratio!r}")
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.ef_construction = ef_construction
        self.compact_ratio = float(compact_ratio)
        self.use_gpu = use_gpu
        self.tuned: dict[str, Any] = {}
        self._index = None if self._kind["kind"] == "ivf" else self._new_index()  # IVF waits for training data
        self._row_ids = np.empty(0, np.int64)  # mirror of the FAISS id map; -1 marks a tombstone
        self._norms = np.empty(0, np.float32)
        self._map = RowMap()
        self._n_dead = 0
        self._gpu_index = None
        self._gpu_lock = threading.Lock()  # searches share the read lock but create the GPU copy lazily

    @property
    def kind(self) -> str:
        return self._kind["kind"]

    @property
    def nlist(self) -> int | None:
        return None if self._index is None or self.kind != "ivf" else int(self._ivf().nlist)

    def _ivf(self):
        return _faiss().extract_index_ivf(self._index.index)

    def _new_index(self, nlist: int | None = None):
        faiss = _faiss()
        kind = self.kind
        if kind == "flat":
            inner = faiss.IndexFlatIP(self._dim)
        elif kind == "hnsw":
            inner = faiss.index_factory(self._dim, f"HNSW{self._kind['m']},Flat", faiss.METRIC_INNER_PRODUCT)
            faiss.downcast_index(inner).hnsw.efConstruction = self.ef_construction
        else:
            inner = faiss.index_factory(self._dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        return faiss.IndexIDMap2(inner)  # faiss's wrapper keeps a Python reference to ``inner``

    def train(self, vectors: Any) -> None:
        """Train the IVF coarse quantizer (``add`` does it on first use); a no-op for Flat and HNSW."""
        if self.kind != "ivf":
            return
        x = check_vectors(vectors, self._dim, what="training vectors")
        if self._metric == "cosine":
            x = normalize_rows(x, row_norms(x))
        with self._lock.write():
            if self._index is not None and self._index.ntotal:
                raise InvalidInputError(
                    f"the IVF index is trained and holds {self._index.ntotal} vectors; retraining would drop them"
                )
            self._train(x)

    def _train(self, x: Vectors) -> None:
        n = x.shape[0]
        nlist = self._kind["nlist"] or max(1, min(int(round(math.sqrt(n))), n // 39 or 1))
        if n < nlist:
            raise InvalidInputError(
                f"IVF{nlist} needs at least {nlist} training vectors, got {n}; add a larger first batch,"
                " call train() first, or choose a smaller nlist"
            )
        index = self._new_index(nlist)
        sample = x
        if n > 256 * nlist:  # FAISS would subsample to this anyway; avoid densifying the rest
            rows = np.sort(np.random.default_rng(0).choice(n, 256 * nlist, replace=False))
            sample = x[rows]
        train = sample.toarray() if sp.issparse(sample) else sample
        index.train(np.ascontiguousarray(train, dtype=np.float32))
        ivf = _faiss().extract_index_ivf(index.index)
        ivf.set_direct_map_type(_faiss().DirectMap.Array)  # enables reconstruct() and rebuilds
        self._index = index

    @property
    def nbytes(self) -> int:
        """Bytes of vectors, graph / lists, FAISS id map and our mirrors (what the benchmark reports)."""
        total = self._row_ids.nbytes * 2 + self._norms.nbytes + self._map.nbytes  # x2: FAISS's own id map
        if self._index is None:
            return total
        n, d = int(self._index.ntotal), self._dim
        total += n * d * 4
        if self.kind == "ivf":
            total += n * 8 + int(self._ivf().nlist) * d * 4 + n * 8  # list ids, centroids, direct map
        elif self.kind == "hnsw":
            hnsw = _faiss().downcast_index(self._index.index).hnsw
            total += hnsw.neighbors.size() * 4 + hnsw.levels.size() * 4 + hnsw.offsets.size() * 8
        return int(total)

    def _add(self, ids: np.ndarray, vectors: Vectors, norms: np.ndarray) -> None:
        if self._index is None:
            self._train(vectors)
        self._gpu_index = None
        if self.kind == "flat":
            present = self._map.contains(ids)
            if present.any():
                self._remove(ids[present])
        start = self.total_rows
        new_rows = np.arange(start, start + ids.size, dtype=np.int64)
        for lo, chunk in _dense_chunks(vectors):
            self._index.add_with_ids(chunk, ids[lo : lo + chunk.shape[0]])
        replaced = self._map.upsert(ids, new_rows)
        self._row_ids = np.concatenate([self._row_ids, ids])
        self._norms = np.concatenate([self._norms, norms.astype(np.float32)])
        if replaced.size:
            self._kill(replaced)

    def _remove(self, ids: np.ndarray) -> None:
        self._gpu_index = None
        rows = self._map.delete(ids)
        if self.kind == "flat":
            self._index.remove_ids(_faiss().IDSelectorBatch(ids))
            keep = np.ones(self.total_rows, bool)
            keep[rows] = False
            self._keep_rows(keep)
        else:
            self._kill(rows)

    def _keep_rows(self, keep: np.ndarray) -> None:
        """Drop the storage rows where ``keep`` is False from our mirrors, renumbering the rest."""
        self._map.renumber(keep)
        self._row_ids = self._row_ids[keep]
        self._norms = self._norms[keep]

    def _kill(self, rows: np.ndarray) -> None:
        """Tombstone storage rows (IVF / HNSW); rebuild once too many are dead."""
        self._row_ids[rows] = -1
        self._n_dead += int(rows.size)
        if self._n_dead >= self.compact_ratio * self.total_rows:
            self._compact()
        else:  # FAISS's id map mirrors ours, tombstones (-1) included
            _faiss().copy_array_to_vector(self._row_ids, self._index.id_map)
            self._index.construct_rev_map()

    def _compact(self) -> None:
        if not self._n_dead or self.kind == "flat":
            return
        faiss = _faiss()
        live = np.flatnonzero(self._row_ids >= 0)
        inner = self._index.index
        if self.kind == "ivf":
            fresh_inner = faiss.clone_index(inner)
            fresh_inner.reset()
            fresh = faiss.IndexIDMap2(fresh_inner)
            faiss.extract_index_ivf(fresh.index).set_direct_map_type(faiss.DirectMap.Array)
        else:
            fresh = self._new_index()
        for lo in range(0, live.size, _ADD_ROWS):
            rows = live[lo : lo + _ADD_ROWS]
            fresh.add_with_ids(inner.reconstruct_batch(rows), self._row_ids[rows])
        self._index = fresh
        self._keep_rows(self._row_ids >= 0)
        self._n_dead = 0
        self._gpu_index = None

    def _params(self, *, exhaustive: bool = False):
        faiss = _faiss()
        sel = faiss.IDSelectorRange(0, MAX_ID + 1) if self._n_dead else None
        kwargs = {} if sel is None else {"sel": sel}
        if self.kind == "ivf":
            nlist = int(self._ivf().nlist)
            nprobe = nlist if exhaustive else min(nlist, self.nprobe or max(1, nlist // 16))
            return faiss.SearchParametersIVF(nprobe=nprobe, **kwargs), sel
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=self.ef_search or 128, **kwargs), sel
        return (faiss.SearchParameters(**kwargs) if sel is not None else None), sel

    def _search(self, queries: Vectors, k: int) -> tuple[np.ndarray, np.ndarray]:
        params, sel = self._params()
        gpu = self._gpu() if sel is None else None
        scores = np.empty((queries.shape[0], k), np.float32)
        ids = np.empty((queries.shape[0], k), np.int64)
        for lo, chunk in _dense_chunks(queries):
            hi = lo + chunk.shape[0]
            if gpu is not None:
                scores[lo:hi], ids[lo:hi] = gpu.search(chunk, k)
            else:
                scores[lo:hi], ids[lo:hi] = self._index.search(chunk, k, params=params)
        return scores, ids

    def _exact(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Exact top-k ids (brute force over the stored vectors), the reference for :meth:`tune` (which holds
        the write lock, so compacting here is safe)."""
        if self.kind == "ivf":
            params, _ = self._params(exhaustive=True)
            return self._index.search(queries, k, params=params)[1]
        if self.kind == "flat":
            return self._index.search(queries, k, params=self._params()[0])[1]
        if self._n_dead:  # the storage scan below cannot skip tombstones
            self._compact()
        _, rows = _faiss().downcast_index(self._index.index).storage.search(queries, k)
        return np.where(rows >= 0, self._row_ids[np.maximum(rows, 0)], -1)

    def tune(self, queries: Any, k: int = 10, target_recall: float = 0.95, query_ids: Any = None) -> dict[str, Any]:
        """Raise nprobe (IVF) / efSearch (HNSW) until recall@k on ``queries`` reaches ``target_recall``
        (plus two standard errors of the estimate, as margin for queries not seen here).

        The reference is exact search over the same stored vectors. When the queries are stored vectors, pass
        their ids as ``query_ids``: each query's own id is then dropped from both result lists, since finding
        a vector itself is easy and would flatter the recall. Returns {'param', 'value', 'recall', 'k'}; the
        chosen value is saved with the index.
        """
        k = check_k(k)
        if not 0 < target_recall <= 1:
            raise InvalidInputError(f"target_recall must be in (0, 1], got {target_recall}")
        q = check_vectors(queries, self._dim, what="tuning queries")
        own = None if query_ids is None else check_ids(query_ids, what="query_ids")
        if own is not None and own.size != q.shape[0]:
            raise InvalidInputError(f"got {own.size} query_ids for {q.shape[0]} tuning queries")
        if self._metric == "cosine":
            q = normalize_rows(q, row_norms(q))
        qd = np.ascontiguousarray(q.toarray() if sp.issparse(q) else q, dtype=np.float32)
        with self._lock.write():
            if self.kind == "flat" or self._count() == 0:
                return {"param": None, "value": None, "recall": 1.0, "k": k}
            k = min(k, self._count() - (own is not None))
            if k < 1:
                return {"param": None, "value": None, "recall": 1.0, "k": 0}
            extra = 0 if own is None else 1
            truth = _drop_own(self._exact(qd, k + extra), own, k)
            if self.kind == "ivf":
                nlist = int(self._ivf().nlist)
                name, values = "nprobe", sorted({min(nlist, 2**i) for i in range(0, 31)})
            else:
                name, values = "ef_search", [max(k + extra, 2**i) for i in range(4, 14)]
            # Aim two standard errors above the target, so that on new queries the recall stays above it.
            needed = min(1.0, target_recall + 2 * math.sqrt(target_recall * (1 - target_recall) / truth.size))
            recall = 0.0
            for value in values:
                setattr(self, name, value)
                params, _ = self._params()
                found = _drop_own(self._index.search(qd, k + extra, params=params)[1], own, k)
                recall = _recall(found, truth)
                if recall >= needed:
                    break
            self._gpu_index = None
            self.tuned = {"param": name, "value": int(getattr(self, name)), "recall": recall, "k": k}
            return dict(self.tuned)

    def _gpu(self):
        """A GPU copy of Flat / IVF for searching when faiss-gpu and a GPU are present (rebuilt after writes)."""
        faiss = _faiss()
        if self.use_gpu is False or self.kind == "hnsw" or not hasattr(faiss, "StandardGpuResources"):
            return None
        if faiss.get_num_gpus() < 1:
            return None
        with self._gpu_lock:  # pragma: no cover - needs a GPU
            if self._gpu_index is None:
                try:
                    self._gpu_res = faiss.StandardGpuResources()
                    gpu = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._index)
                    if self.kind == "ivf":
                        faiss.extract_index_ivf(gpu).nprobe = self._params()[0].nprobe
                except (RuntimeError, AttributeError):
                    self.use_gpu = False  # e.g. a structure the GPU cloner lacks: stay on the CPU
                    return None
                self._gpu_index = gpu
            return self._gpu_index

    def _reconstruct(self, ids: np.ndarray) -> sp.csr_matrix:
        rows = self._map.rows_of(ids)
        dense = self._index.index.reconstruct_batch(rows)
        if self._metric == "cosine":
            dense = dense * self._norms[rows][:, None]
        return sp.csr_matrix(dense, dtype=np.float32)

    def _before_save(self) -> None:
        self._compact()

    def _options(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "ef_construction": self.ef_construction,
            "compact_ratio": self.compact_ratio,
            "tuned": self.tuned,
            "trained": self._index is not None,
        }

    def _writers(self) -> dict[str, tuple[str, store.Writer]]:
        def write_index(path: Path) -> None:
            if self._index is None:
                path.write_bytes(b"")
            else:
                _faiss().write_index(self._index, str(path))

        return {"faiss": (".index", write_index), "norms": (".npy", lambda p: store.write_npy(p, self._norms))}

    def _read_files(self, options: dict[str, Any], paths: dict[str, Path]) -> None:
        faiss = _faiss()
        self.tuned = dict(options.get("tuned") or {})
        norms = store.read_npy(paths["norms"], dtype=np.float32, ndim=1)
        if paths["faiss"].stat().st_size == 0:
            if norms.size or options.get("trained", False):
                raise CorruptIndexError(f"{paths['faiss']} is empty but the index holds vectors")
            return
        try:
            loaded = faiss.read_index(str(paths["faiss"]))
        except RuntimeError as err:
            raise CorruptIndexError(f"cannot read {paths['faiss'].name}: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, faiss.IndexIDMap2) or loaded.d != self._dim:
            raise CorruptIndexError(f"{paths['faiss'].name} is not an IndexIDMap2 of dimension {self._dim}")
        row_ids = faiss.vector_to_array(loaded.id_map).astype(np.int64)
        if row_ids.size != loaded.ntotal or norms.size != row_ids.size:
            raise CorruptIndexError(f"{paths['faiss'].parent}: {loaded.ntotal} vectors but {norms.size} norms")
        live = row_ids >= 0
        try:
            check_ids(row_ids[live])
        except ValueError as err:
            raise CorruptIndexError(f"{paths['faiss'].name}: invalid id map: {err}") from None
        inner_kind = {"flat": faiss.IndexFlat, "ivf": faiss.IndexIVF, "hnsw": faiss.IndexHNSW}[self.kind]
        if not isinstance(faiss.downcast_index(loaded.index), inner_kind):
            raise CorruptIndexError(f"{paths['faiss'].name} does not hold a {self.spec} index")
        if self.kind == "flat" and not live.all():
            raise CorruptIndexError(f"{paths['faiss'].name}: a Flat index cannot hold tombstones")
        self._index = loaded
        self._row_ids = row_ids
        self._norms = norms
        self._map = RowMap(row_ids[live], np.flatnonzero(live))
        self._n_dead = int((~live).sum())


def _drop_own(labels: np.ndarray, own: np.ndarray | None, k: int) -> np.ndarray:
    """Per row, remove the query's own id (if given) and keep the first k labels, -1 padded."""
    if own is None:
        return labels[:, :k]
    out = np.full((labels.shape[0], k), -1, np.int64)
    for i, row in enumerate(labels):
        row = row[(row >= 0) & (row != own[i])][:k]
        out[i, : row.size] = row
    return out


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(np.intersect1d(f[f >= 0], t[t >= 0]).size for f, t in zip(found, truth, strict=True))
    total = int((truth >= 0).sum())
    return hits / total if total else 1.0
