"""Create or load an index by backend name, so callers (CLI, server, benchmark) never import a backend directly."""

from __future__ import annotations

import importlib
import os
from typing import Any

from index import BACKENDS
from index.base import VectorIndex
from index.errors import IndexMismatchError, InvalidInputError
from index.store import read_manifest

# backend name -> module:class in index/, imported on first use (faiss and pymilvus are slow to import)
_CLASSES = {"csr": "csr_index:CsrIndex", "faiss": "faiss_index:FaissIndex", "milvus": "milvus_index:MilvusIndex"}


def _backend_class(name: str) -> type[VectorIndex]:
    if name not in _CLASSES:
        raise InvalidInputError(f"unknown index backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, _, cls = _CLASSES[name].partition(":")
    return getattr(importlib.import_module(f"index.{module}"), cls)


def create_index(backend: str = "csr", dim: int = 0, metric: str = "ip", **options: Any) -> VectorIndex:
    """``create_index("csr", 512, "cosine")``, ``create_index("faiss", 512, spec="HNSW32")`` or
    ``create_index("milvus", 512, uri="x.db" | "http://host:19530", collection="lpjepa", token=None,
    index="exact" | "wand", timeout_s=10.0, batch_rows=2000)`` (see index/milvus_index.py)."""
    cls = _backend_class(backend)
    try:
        return cls(dim, metric, **options)
    except TypeError as err:  # an option the backend does not have
        raise InvalidInputError(f"bad option for the {backend} backend: {err}") from None


def load_index(
    directory: str | os.PathLike[str],
    *,
    expected_dim: int | None = None,
    expected_metric: str | None = None,
    verify: bool = True,
) -> VectorIndex:
    """Load whatever backend the manifest names, after checking it matches what the caller will feed it."""
    manifest = read_manifest(directory)
    if expected_dim is not None and manifest["dim"] != expected_dim:
        raise IndexMismatchError(
            f"the index in {directory} has dimension {manifest['dim']} but the model produces {expected_dim};"
            " was it built with another model?"
        )
    if expected_metric is not None and manifest["metric"] != expected_metric:
        raise IndexMismatchError(
            f"the index in {directory} uses metric {manifest['metric']!r}, not {expected_metric!r}"
        )
    cls = _backend_class(str(manifest["backend"]))
    return cls.load(directory, manifest=manifest, verify=verify)
