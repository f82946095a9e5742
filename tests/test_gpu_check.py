"""scripts/gpu_check.sh --device cpu --quick: the GPU check's own steps on CPU, so the script cannot rot.

It runs the script as a user would (bash, its own interpreter choice) with the packages the GPU machine lacks
blocked, and reads the JSON it writes: the DDP path under torchrun (gloo, one rank) must reproduce the plain
process's losses and weights exactly, and the exported ONNX model must reproduce PyTorch's zeros exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_in_session

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def check(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu-check")
    cmd = ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--quick", "--out", str(out)]
    returncode, log, _ = run_in_session(
        cmd, "gpu_check.sh --device cpu --quick", merge_stderr=True, env={"PYTHON": sys.executable}
    )
    path = out / "gpu_check.json"
    assert path.is_file(), log[-3000:]
    doc = json.loads(path.read_text())
    doc["_returncode"], doc["_log"] = returncode, log
    return doc


@pytest.mark.ddp
def test_cpu_quick_run_passes_every_step(check):
    steps = check["steps"]
    assert check["_returncode"] == 0 and check["passed"] is True, check["_log"][-3000:]
    assert check["failed_steps"] == []
    expected = {"imports", "train_smoke", "train_cifar10_shaped", "ddp", "export_onnx", "tensorrt", "faiss_gpu"}
    assert expected <= set(steps)
    assert check["schema"] == "lpjepa-gpu-check/1" and check["device_requested"] == "cpu" and check["quick"]
    assert "gpu_check.json" in check["_log"]  # the summary table names where the results went


@pytest.mark.ddp
def test_imports_need_nothing_the_gpu_machine_lacks(check):
    imports = check["steps"]["imports"]
    assert imports["status"] == "ok" and imports["required_failed"] == {}
    assert {"fastapi", "pydantic_settings", "faiss", "numba", "pytest", "hypothesis"} <= set(imports["blocked"])
    # the block is real: serve's app cannot import without fastapi, and the survey says so
    assert "fastapi" in imports["unavailable_without_blocked"]["serve.app"]


@pytest.mark.ddp
def test_training_steps_report_speed_on_cpu(check):
    for name, recipe in (("train_smoke", "smoke"), ("train_cifar10_shaped", "cifar10-gpu")):
        step = check["steps"][name]
        assert step["status"] == "ok" and step["recipe"] == recipe and step["device"] == "cpu"
        assert step["images_per_s"] > 0 and step["peak_gpu_mem_mib"] is None
        assert step["channels_last"] is True
    assert check["steps"]["compile"]["status"] == "skipped"  # CUDA only


@pytest.mark.ddp
def test_ddp_one_rank_matches_single_process(check):
    ddp = check["steps"]["ddp"]
    assert ddp["status"] == "ok", ddp
    assert ddp["backend"] == "gloo" and ddp["world_size"] == 1  # the DDP path was really taken
    assert ddp["steps"] == 3 and len(ddp["losses_single"]) == 3
    assert ddp["losses_identical"] and ddp["losses_single"] == ddp["losses_torchrun"]
    assert ddp["loss_max_rel_diff"] == 0.0 and ddp["weights_identical"]


@pytest.mark.ddp
def test_export_parity_zeros_exact(check):
    export = check["steps"]["export_onnx"]
    assert export["status"] == "ok", export
    assert export["zeros_exact"] and export["zero_pattern_flips"] == 0 and export["support_mismatches"] == 0
    assert export["max_abs_err"] <= 1e-4 and export["export_parity"]["passed"]
    assert export["runtime_providers"] == ["CPUExecutionProvider"] and not export["cuda_provider"]
    assert 0 < export["l0_torch"] < 1 and export["l0_onnx"] == export["l0_torch"]
    assert export["n_images"] == 64


@pytest.mark.ddp
def test_optional_gpu_backends_say_not_available(check):
    trt = check["steps"]["tensorrt"]
    assert trt["status"] == "not available" and "tensorrt" in trt["reason"]
    faiss = check["steps"]["faiss_gpu"]
    if faiss["status"] == "not available":
        return
    assert faiss["status"] == "ok" and not faiss["searched_on_gpu"] and faiss["gpu"].startswith("not available")
    assert faiss["max_score_err_vs_numpy"] <= 1e-3


def test_synthetic_fallback_reads_as_fashion_mnist(tmp_path, monkeypatch):
    """Without real data on the GPU machine the check writes Fashion-MNIST's own files; the product reads them."""
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    root = gpu_check.synthetic_fashion_mnist(tmp_path / "fm", n_train=200, n_test=50)
    monkeypatch.setenv("LPJEPA_FASHION_MNIST_DIR", str(root))
    from data.sources import open_source

    train, test = open_source("fashion-mnist"), open_source("fashion-mnist:test")
    assert len(train) == 200 and len(test) == 50 and train.array.shape == (200, 28, 28)
    # each class is a bright square at its own place: the mean image of a class is brightest there
    for c in range(10):
        r, q = divmod(c, 4)
        mean = train.array[train.labels == c].mean(axis=0)
        assert np.all(mean[2 + 8 * r : 10 + 8 * r, 2 + 6 * q : 10 + 6 * q] == 230)


def test_cuda_requested_without_gpu_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the default --device cuda would run the whole check")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "--device cpu" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()
