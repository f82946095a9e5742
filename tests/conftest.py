"""Fixtures shared across test modules (plain helpers are in helpers.py).

One torch thread for the whole session; the tiny exported model (with and without an OOD calibration) and the
Fashion-MNIST test split, each made once per session because export and loading are the slowest parts of the
set-up; the in-process `lpjepa` CLI; one local Milvus server (see index/milvus_server.py). Starting milvus-lite
costs ~1-2 s and each process holds ~100 MB, so every Milvus test shares this one server and isolates itself with
its own collection name (``milvus_collection``).
"""

from __future__ import annotations

import itertools
import os

import pytest

_names = itertools.count()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests' tensors are tiny: on a shared 2-core box OpenMP threads only spin against each other (10x
    slower). Subprocesses get OMP_NUM_THREADS=1 from helpers.py instead."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    """The tiny encoder (helpers.tiny_config, seed 0) exported to ONNX: shared by the serve, index and OOD tests."""
    from helpers import export_tiny_model

    return export_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def calibrated_model(model_path, tmp_path_factory):
    """A copy of ``model_path`` carrying an OOD calibration: (path, calibration dict)."""
    from helpers import calibrated_copy

    return calibrated_copy(model_path, tmp_path_factory.mktemp("tiny-calibrated"))


@pytest.fixture(scope="session")
def fmnist():
    """The real Fashion-MNIST test split (10,000 images), read once."""
    from data.sources import load_fashion_mnist

    return load_fashion_mnist("test")


@pytest.fixture
def lpjepa(capsys):
    """`lpjepa` in process (the console script's code path minus interpreter start-up): lpjepa(*argv) returns
    (exit code, stdout, stderr); argparse's exit 2 is returned, not raised."""
    from cli.main import main

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse errors (OneLineParser) exit 2 from parse_args
            code = exc.code
        out, err = capsys.readouterr()
        return int(code), out, err

    return run


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
