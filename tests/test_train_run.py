"""`lpjepa train` end to end on real Fashion-MNIST at smoke size: run folder, checkpoint, metrics, Ctrl-C and
--resume (bit-identical to an uninterrupted run), and the CLI's one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cli.main import main
from models.checkpoint import load_checkpoint
from models.rgg import sigma_gn
from pretrain.rundir import load_state

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.subset=512",
    "train.batch_size=32",
    "model.backbone_kwargs.width=0.125",
    "model.projector_dims=[32,32,32]",
    "method.num_projections=64",
    "train.threads=1",
    "train.log_every=1",
    "train.precision=fp32",
]


def _args(out: Path, *extra: str, steps: int = 6) -> list[str]:
    sets = [*TINY, f"train.steps={steps}", *extra]
    return ["train", "--config", "smoke", "--out", str(out), "--no-progress", *[a for s in sets for a in ("--set", s)]]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_a_complete_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(run, "train.checkpoint_every=4")) == 0
    assert "trained 6/6 steps" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "train_state.pt", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "invariance", "rdmreg", "marginal", "l0", "lr", "images_per_s", "probe_acc", "epoch"):
        assert key in rows[-1], key
    assert rows[-1]["target_l0"] == pytest.approx(0.5)
    model, extra = load_checkpoint(run)
    cfg = model.config
    assert (cfg.method, cfg.in_channels, cfg.image_size, cfg.rectify) == ("rectified_lpjepa", 1, 28, True)
    assert cfg.target_sigma == pytest.approx(sigma_gn(1.0)) and cfg.mean == [0.286]
    assert extra["step"] == 6 and extra["train_config"]["train"]["steps"] == 6
    stored = json.loads((run / "config.json").read_text())
    assert stored["model"]["in_channels"] == 1 and stored["model"]["mean"] == [0.286]  # resolved, self-contained
    with torch.no_grad():
        z = model(torch.randn(8, 1, 28, 28))
    assert z.shape == (8, 32) and (z >= 0).all() and (z == 0).any()  # exact zeros from the rectified projector
    state = load_state(run / "train_state.pt")
    assert state.step == 6 and state.total_steps == 6
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 6
    rates = [json.loads(line) for line in (run / "dim_rates.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rates] == [1, 2, 3, 4, 5, 6] and all(len(r["rates"]) == 32 for r in rates)
    last = np.array(rates[-1]["rates"])  # one step of 32 samples: rates are multiples of 1/32
    assert rows[-1]["rate_p50"] == pytest.approx(np.percentile(last, 50), abs=1e-5)
    assert rows[-1]["near_dead_dims"] == int((last < 0.1 * 0.5).sum())
    assert np.allclose(last * 32, np.round(last * 32), atol=1e-3)


def test_eval_reports_online_probes_and_train_mode_l0(tmp_path):
    """The online probes stored in train_state.pt, scored on the eval features by hand, match the report;
    l0 in train mode (batch statistics) is reported beside the eval-mode l0."""
    from pretrain.evaluate import evaluate_checkpoint, extract
    from pretrain.evaluate.splits import resolve_splits

    run = tmp_path / "run"
    assert main(_args(run, steps=4)) == 0
    report = evaluate_checkpoint(
        run, "fashion-mnist:test", max_train=200, limit=100, batch_size=50, progress=False, dim_rates=True
    )
    model, _ = load_checkpoint(run)
    splits = resolve_splits("fashion-mnist:test", max_train=200, limit=100, seed=0)
    feats, z, y = extract(model, splits.eval_source, model.config, 50, indices=splits.eval_indices, progress=False)
    probe = load_state(run / "train_state.pt").probe
    for key, x, name in (("online_linear_acc", feats, "probe_feat"), ("online_proj_linear_acc", z, "probe_code")):
        logits = x.double().numpy() @ probe[f"{name}.weight"].double().numpy().T + probe[f"{name}.bias"].numpy()
        assert report[key] == pytest.approx(float((logits.argmax(1) == y.numpy()).mean())), key
    assert 0 < report["l0_train_mode"] <= 1 and report["l0_train_mode"] != report["l0"]
    assert report["near_dead_dims"] is not None and "rate_p95" in report
    np.testing.assert_allclose(report["dim_rates"], (z > 0).double().mean(0).numpy(), atol=1e-6)


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    cases = [
        (["train", "--config", "nope", "--out", str(run)], "no config named 'nope'"),
        (["train", "--config", "smoke", "--set", "optim.lrr=1", "--out", str(run)], "unknown config key 'optim.lrr'"),
        (["train", "--config", "smoke", "--set", "train.steps=x", "--out", str(run)], "expected an integer"),
        (["train", "--out", str(run)], "--config is required"),
        (["train", "--out", str(run), "--resume"], "nothing to resume"),
        (["train", "--config", "smoke", "--set", "data.spec=/no/such/dir", "--out", str(run)], "unknown data spec"),
        (["train", "--config", "smoke", "--set", "model.backbone_kwargs.depth=3", "--out", str(run)], "cannot build"),
        (["train", "--config", "smoke", "--set", "data.subset=100", "--out", str(run)], "fewer than one batch"),
        (
            [
                "train",
                "--config",
                "smoke",
                "--set",
                "model.mean=[0.5,0.5]",
                "--set",
                "model.std=[1,1]",
                "--out",
                str(run),
            ],
            "model.mean",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert main(_args(run, steps=2)) == 0
    capsys.readouterr()
    assert main(_args(run, steps=2)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*_args(run, steps=2), "--resume", "--set", "method.mu=-1"]) == 2
    assert "differs from the run's in method.mu" in capsys.readouterr().err
    assert main([*_args(run, steps=2), "--force"]) == 0
    summary = (run / "summary.json").read_text()
    assert main([*_args(run, steps=2), "--resume"]) == 0  # a finished run: nothing to do, nothing rewritten
    assert (run / "summary.json").read_text() == summary


def test_sigint_checkpoint_and_resume_match_uninterrupted_run(tmp_path):
    steps = 40
    ref = tmp_path / "ref"
    assert main(_args(ref, steps=steps)) == 0

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cli.main", *_args(run, steps=steps)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            metrics = run / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume" in err
    stopped = load_state(run / "train_state.pt").step
    assert 3 <= stopped < steps
    assert load_checkpoint(run)[1]["step"] == stopped

    assert main([*_args(run, steps=steps), "--resume"]) == 0
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # no step lost or logged twice
    ref_rows = _metrics(ref)
    assert rows[-1]["lr"] == ref_rows[-1]["lr"]
    assert rows[-1]["loss"] == pytest.approx(ref_rows[-1]["loss"], rel=1e-5)
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-5, atol=1e-6), key
