"""The packaged smoke config, unchanged, end to end: trains in under a minute on 2 CPU cores and its encoder
beats a randomly initialised copy of itself on kNN accuracy over real Fashion-MNIST test images."""

from __future__ import annotations

import pytest
import torch

from cli.main import main
from models.checkpoint import load_checkpoint
from models.encoder import build_model
from pretrain.evaluate import evaluate_checkpoint


@pytest.mark.slow
def test_smoke_config_learns(tmp_path):
    run = tmp_path / "smoke"
    assert main(["train", "--config", "smoke", "--out", str(run), "--no-progress"]) == 0
    model, extra = load_checkpoint(run)
    assert extra["step"] == extra["total_steps"] == 120
    kw = {"max_train": 5000, "limit": 2000, "progress": False}
    trained = evaluate_checkpoint(model, "fashion-mnist:test", **kw)
    torch.manual_seed(0)
    untrained = evaluate_checkpoint(build_model(model.config).eval(), "fashion-mnist:test", **kw)
    assert trained["knn_acc"] > 0.5
    assert trained["knn_acc"] > untrained["knn_acc"] + 0.02, (trained["knn_acc"], untrained["knn_acc"])
    assert abs(trained["l0"] - 0.5) < 0.1 and trained["dead_dims"] == 0.0
