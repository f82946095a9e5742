"""Index stage: exact sparse (CSR), FAISS and Milvus vector indexes with caller-chosen ids, payloads, atomic files.

Entry points: :func:`index.factory.create_index`, :func:`index.factory.load_index`; errors in
:mod:`index.errors` (``ValueError`` subclasses for bad input or files; ``BackendUnavailableError``, a
``ConnectionError``, when a Milvus server cannot be reached). numpy, scipy and faiss load on first use of the factory,
so importing the package (as ``lpjepa --help`` does through ``index.cli``) stays cheap.
"""

from __future__ import annotations

from typing import Any

from index.errors import (
    BackendUnavailableError,
    CorruptIndexError,
    DimensionMismatchError,
    IndexError_,
    IndexMismatchError,
    InvalidInputError,
    UnknownIdError,
)

BACKENDS = ("csr", "faiss", "milvus")

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "CorruptIndexError",
    "DimensionMismatchError",
    "IndexError_",
    "IndexMismatchError",
    "InvalidInputError",
    "UnknownIdError",
    "create_index",
    "load_index",
]


def __getattr__(name: str) -> Any:
    if name in ("create_index", "load_index"):
        from index import factory

        return getattr(factory, name)
    raise AttributeError(f"module 'index' has no attribute {name!r}")
