"""Fixtures shared across test modules: one local Milvus server for the whole session (see index/milvus_server.py).

Starting milvus-lite costs ~1-2 s and each process holds ~100 MB, so every Milvus test shares this one server and
isolates itself with its own collection name (``milvus_collection``).
"""

from __future__ import annotations

import itertools
import os

import pytest

_names = itertools.count()


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A real Milvus (milvus-lite's engine) on a free loopback port, stopped at the end of the session."""
    from index.milvus_server import LocalMilvus, free_port

    server = LocalMilvus(tmp_path_factory.mktemp("milvus-server"), free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def milvus_collection() -> str:
    """A collection name no other test of this session uses."""
    return f"t{os.getpid()}_{next(_names)}"


@pytest.fixture
def options(request):
    """Backend options of the index contract tests (parametrized indirectly): ``{"milvus": True, ...}`` becomes the
    session server's uri and a fresh collection, so the same tests run against a real Milvus."""
    opts = dict(request.param)
    if opts.pop("milvus", False):
        opts.update(
            uri=request.getfixturevalue("milvus_server").uri, collection=request.getfixturevalue("milvus_collection")
        )
    return opts
