"""`lpjepa eval` end to end on a small random checkpoint and real Fashion-MNIST, its errors, and the split logic."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import tiny_config
from PIL import Image

from cli.main import main
from data.sources import load_fashion_mnist
from models.checkpoint import save_checkpoint
from models.config import ModelConfig
from models.encoder import build_model
from models.rgg_law import expected_l0, expected_l1
from pretrain.evaluate import REQUIRED_KEYS, evaluate_checkpoint, target_expected
from pretrain.evaluate.splits import stratified_holdout, subsample, train_spec_for


def _tiny_config(in_channels: int = 1, **kw) -> ModelConfig:
    colour = {} if in_channels == 1 else {"mean": [0.5] * 3, "std": [0.25] * 3}
    return tiny_config(projector_dims=[64, 64, 32], in_channels=in_channels, **colour, **kw)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "model.safetensors", build_model(_tiny_config()), {"step": 0})
    return run


@pytest.fixture(scope="module")
def fashion_report(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "eval.json"
    argv = ["eval", str(tiny_checkpoint), "--data", "fashion-mnist:test", "--max-train", "400", "--limit", "200"]
    argv += ["--batch-size", "100", "--json", "--no-progress", "--out", str(out)]
    return argv, out


def test_eval_json_on_fashion_mnist(fashion_report, capsys):
    argv, out = fashion_report
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report)[: len(REQUIRED_KEYS)] == list(REQUIRED_KEYS)
    assert json.loads(out.read_text()) == report  # --out holds the same report
    for key in ("linear_acc", "knn_acc", "proj_linear_acc", "proj_knn_acc", "l0", "l1", "dead_dims", "nhsic"):
        assert 0.0 <= report[key] <= 1.0, key
    # random conv features still separate Fashion-MNIST far above chance (0.1); this fails if labels and
    # features were misaligned by the subsampling
    assert report["linear_acc"] > 0.4 and report["knn_acc"] > 0.4
    assert report["n_train"] == 400 and report["n_eval"] == 200
    assert report["train_data"] == "fashion-mnist:train" and report["eval_data"] == "fashion-mnist:test"
    assert report["holdout"] is False
    assert report["feature_dim"] == 64 and report["dim"] == 32 and report["num_classes"] == 10
    cfg = _tiny_config()
    assert report["expected_l0"] == pytest.approx(expected_l0(cfg.target_p, cfg.target_mu, cfg.target_sigma))
    assert report["expected_l1"] == pytest.approx(expected_l1(cfg.target_p, cfg.target_mu, cfg.target_sigma))
    assert report["k"] == 20 and report["knn_temperature"] == 0.07
    assert report["dead_dims_count"] == round(report["dead_dims"] * 32)
    assert any("--max-train" in note for note in report["notes"])
    assert report["timings"]["total_s"] > 0


def test_eval_table_and_holdout_on_the_train_split(tiny_checkpoint, capsys):
    argv = ["eval", str(tiny_checkpoint), "--data", "fashion-mnist", "--max-train", "120", "--limit", "60"]
    assert main([*argv, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "backbone (64)" in text and "projector (32)" in text and "nHSIC" in text
    assert "is itself the train split" in text and "80/20" in text


def _write_folder(root, images, labels, mode="L"):
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        d = root / f"class_{label}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").convert(mode).save(d / f"{i:04d}.png")


def test_api_on_a_folder_with_an_in_memory_colour_model(tmp_path):
    """A folder has no train split: seeded stratified 80/20 hold-out, PIL path, grey PNGs into an RGB model."""
    fm = load_fashion_mnist("test")
    keep = np.flatnonzero(fm.labels < 3)[:90]
    _write_folder(tmp_path, fm.array[keep], fm.labels[keep])
    torch.manual_seed(1)
    model = build_model(_tiny_config(in_channels=3, method="lejepa", rectify=False))
    report = evaluate_checkpoint(model, str(tmp_path), max_train=None, batch_size=32, progress=False)
    assert report["holdout"] is True and report["checkpoint"] is None
    counts = np.bincount(fm.labels[keep], minlength=3)
    assert report["n_eval"] == sum(round(0.2 * c) for c in counts)
    assert report["n_train"] + report["n_eval"] == 90
    assert report["expected_l0"] is None and report["expected_l1"] is None  # LeJEPA has no RGN target
    assert report["l0"] > 0.99  # an unrectified projector has (almost) no exact zeros
    assert report["linear_acc"] > 0.5  # 3 classes
    notes = " ".join(report["notes"])
    assert "no separate train split" in notes and "converted" in notes and "no RGN target" in notes


def test_target_expected_only_for_rgn_targets():
    rgn = _tiny_config(target_p=2.0, target_mu=-1.0, target_sigma=1.0)
    l0, l1 = target_expected(rgn)
    assert l0 == pytest.approx(0.5 * math.erfc(1 / math.sqrt(2)))  # Phi(-1)
    assert 0 < l1 < l0
    # ablation_rgn_raw matched an RGN target with raw codes: its embedding is dense, the target's rate is not its l0
    assert target_expected(_tiny_config(method="ablation_rgn_raw", rectify=False)) == (None, None)
    for method in ("vicreg", "simclr", "lejepa", "ablation_gn_relu", "ncl_relu"):
        assert target_expected(_tiny_config(method=method)) == (None, None)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_eval_errors_exit_2_with_one_line(tiny_checkpoint, tmp_path, capsys):
    base = ["--max-train", "50", "--limit", "20", "--no-progress"]
    assert main(["eval", str(tmp_path / "nope"), "--data", "fashion-mnist:test", *base]) == 2
    assert "no checkpoint" in _error_line(capsys)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage-not-json" + bytes(64))
    assert main(["eval", str(corrupt), "--data", "fashion-mnist:test", *base]) == 2
    assert "corrupt.safetensors" in _error_line(capsys)

    assert main(["eval", str(tiny_checkpoint), "--data", "no-such-data", *base]) == 2
    assert "unknown data spec" in _error_line(capsys)

    assert main(["eval", str(tiny_checkpoint), "--data", "fashion-mnist:valid", *base]) == 2
    assert "splits train and test" in _error_line(capsys)

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.full((28, 28), 40 * i, dtype=np.uint8)).save(flat / f"{i}.png")
    assert main(["eval", str(tiny_checkpoint), "--data", str(flat), *base]) == 2
    assert "has no labels" in _error_line(capsys)

    device = "cuda:7" if torch.cuda.device_count() < 8 else "cuda:99"
    assert main(["eval", str(tiny_checkpoint), "--data", "fashion-mnist:test", "--device", device, *base]) == 2
    assert "cuda" in _error_line(capsys).lower()

    assert main(["eval", str(tiny_checkpoint), "--data", "fashion-mnist:test", "--device", "gpu0", *base]) == 2
    assert "unknown device" in _error_line(capsys)

    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tiny_checkpoint), "--data", "fashion-mnist:test", "--limit", "-3"])
    assert exc.value.code == 2
    assert "positive integer" in _error_line(capsys)


def test_eval_rejects_a_model_that_outputs_nan(tmp_path, capsys):
    model = build_model(_tiny_config())
    with torch.no_grad():
        model.projector[0].weight.fill_(float("nan"))
    save_checkpoint(tmp_path / "model.safetensors", model)
    argv = ["eval", str(tmp_path), "--data", "fashion-mnist:test", "--max-train", "30", "--limit", "10"]
    assert main([*argv, "--no-progress"]) == 2
    assert "non-finite" in _error_line(capsys)


def test_train_spec_for_each_kind_of_spec(tmp_path):
    assert train_spec_for("fashion-mnist:test") == "fashion-mnist:train"
    assert train_spec_for("fmnist:test") == "fmnist:train"
    assert train_spec_for("fashion-mnist") is None and train_spec_for("fashion-mnist:train") is None
    assert train_spec_for("cifar10:test@/data/c10") == "cifar10:train@/data/c10"
    assert train_spec_for("imagenet100:val@/data/in100") == "imagenet100:train@/data/in100"
    assert train_spec_for("cifar100@/data/c100") is None
    assert train_spec_for("mnist") is None and train_spec_for(str(tmp_path)) is None


def test_stratified_holdout_and_subsample_are_seeded_and_disjoint():
    labels = np.repeat(np.arange(4), [10, 5, 2, 1])
    tr, ho = stratified_holdout(labels, 0.2, seed=3)
    assert set(tr).isdisjoint(ho) and len(tr) + len(ho) == len(labels)
    assert np.bincount(labels[ho], minlength=4).tolist() == [2, 1, 1, 0]  # singletons stay in train
    tr2, ho2 = stratified_holdout(labels, 0.2, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(ho, ho2)
    assert not np.array_equal(stratified_holdout(labels, 0.2, seed=4)[1], ho)
    sub = subsample(np.arange(100), 10, seed=0)
    assert len(set(sub)) == 10 and np.all(np.diff(sub) > 0)
    assert np.array_equal(subsample(np.arange(5), 10, seed=0), np.arange(5))
