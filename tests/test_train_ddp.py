"""Two gloo processes on CPU via torchrun: a smoke-size DDP run completes, writes one checkpoint, and both ranks
end with bit-identical weights (DDP's gradient averaging plus the rank-synchronised loss randomness)."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import run_in_session

from models.checkpoint import load_checkpoint


@pytest.mark.ddp
def test_two_process_gloo_run(tmp_path):
    run = tmp_path / "ddp"
    sets = [
        "data.subset=512",
        "train.batch_size=32",
        "model.backbone_kwargs.width=0.125",
        "model.projector_dims=[32,32,32]",
        "method.num_projections=64",
        "train.steps=4",
        "train.log_every=1",
        "train.threads=1",
        "train.device=cpu",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cli.main",
        "train",
        "--config",
        "smoke",
        "--out",
        str(run),
        "--no-progress",
        *[a for s in sets for a in ("--set", s)],
    ]
    returncode, stdout, stderr = run_in_session(cmd, "the 2-process DDP run")
    assert returncode == 0, stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed" and summary["step"] == 4
    digests = summary["weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    model, extra = load_checkpoint(run)
    assert extra["step"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rank 0 alone writes the metrics
    assert "trained 4/4 steps" in stdout and stdout.count("trained") == 1
