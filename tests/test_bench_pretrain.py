"""bench/bench_pretrain.py's run records: a record is reused exactly when the row would train the same run."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bp():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        yield importlib.import_module("bench_pretrain")
    finally:
        sys.path.remove(str(ROOT / "bench"))


def _row(bp, name: str):
    return next(r for r in bp.runs_plan() if r.name == name)


def test_planned_config_is_what_training_writes(bp, tmp_path):
    """The key of a row equals the effective form of the config.json its command writes (data-resolved channels,
    mean and std included), so a record written from a run is found again by the plan: trained here for one
    step on a small variant of the row."""
    small = ("train.batch_size=8", "train.bn_recalibration=16", "train.rate_calibration=16", "data.subset=64")
    row = bp.Run("r", "r", "sweep", (*_row(bp, "rect_mu-2").sets, *small))
    cmd = bp.train_command(tmp_path / "run", row.sets, 1, 1)
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
    written = bp.effective_config(json.loads((tmp_path / "run" / "config.json").read_text()))
    planned = bp.planned_config(row, 1, 1)
    assert written == planned and written["model"]["in_channels"] == 1 and written["model"]["mean"]


def test_default_fix_is_written_out(bp):
    """A run on the default fix and one pinned to it share a key; fix off and another budget do not."""
    from models.methods import METHODS

    default = METHODS["rectified_lpjepa"].dead_dim_fix
    sweep = bp.planned_config(_row(bp, "rect_mu-2"), 600, 1)
    assert sweep["method"]["dead_dim_fix"] == default
    pinned = bp.Run("x", "x", "sweep", (*_row(bp, "rect_mu-2").sets, f"method.dead_dim_fix={default}"))
    assert bp.planned_config(pinned, 600, 1) == sweep
    assert bp.planned_config(_row(bp, "rect_mu-2_nofix"), 600, 1) != sweep
    assert bp.planned_config(_row(bp, "rect_mu-2"), 2400, 1) != sweep


def test_record_round_trip_and_staleness(bp, tmp_path):
    row = _row(bp, "rect_mu-3")
    config = bp.planned_config(row, 600, 1)
    report = {"linear_acc": 0.8, "l0": 0.007, "dim_rates": [0.0071234567, 0.0]}
    bp.save_record(tmp_path, row.name, config, "lpjepa train ...", {"status": "completed", "elapsed_s": 9.0}, report)
    record = bp.load_record(tmp_path, row.name, config)
    assert record is not None
    assert record["eval"]["linear_acc"] == 0.8 and record["eval"]["dim_rates"] == [0.00712, 0.0]
    assert record["summary"] == {"status": "completed", "elapsed_s": 9.0}
    assert bp.load_record(tmp_path, "rect_mu-2", config) is None  # no such record
    other = bp.planned_config(_row(bp, "rect_mu-2"), 600, 1)
    assert bp.load_record(tmp_path, row.name, other) is None  # stale: the row now means another run
    assert list(tmp_path.iterdir()) == [tmp_path / "rect_mu-3.json"]  # atomic: no temporary left behind


def test_operational_fields_do_not_change_the_key(bp):
    from pretrain.config import load_config

    base = ["method.mu=-1.0", "train.steps=600", "train.threads=1"]
    a = bp.effective_config(load_config("fmnist-cpu", [*base, "train.checkpoint_every=100"]).to_dict())
    b = bp.effective_config(load_config("fmnist-cpu", [*base, "train.log_every=7", "train.progress=false"]).to_dict())
    assert a == b
    c = bp.effective_config(load_config("fmnist-cpu", [*base, "train.seed=1"]).to_dict())
    assert c != a
