"""BatchNorm recalibration at the end of training (pretrain/bn_recalibration.py), on real Fashion-MNIST images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_config
from torch import nn

from data.sources import load_fashion_mnist
from models.checkpoint import load_checkpoint
from models.encoder import build_model
from pretrain.bn_recalibration import recalibrate_batchnorm, recalibration_indices
from pretrain.evaluate.features import clean_batches


def _first_bn(model: nn.Module) -> nn.BatchNorm2d:
    return next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_running_statistics_are_the_average_over_clean_batches():
    """Independent reference: the first BatchNorm's input captured by a hook, averaged per batch in numpy
    (update_bn's cumulative average: mean of the batch means, mean of the unbiased batch variances)."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg).eval()
    source = load_fashion_mnist("train")
    bn = _first_bn(model)
    bn.running_mean.fill_(3.0)  # stale statistics, as after training on augmented views
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    n = recalibrate_batchnorm(model, source, cfg, images=300, seed=1, batch_size=128, device=torch.device("cpu"))
    assert n == 300 and not model.training  # the caller's mode comes back
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()

    idx = recalibration_indices(len(source), 300, seed=1)
    inputs = []
    hook = bn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach().double().numpy()))
    with torch.no_grad():  # eval mode: the first BatchNorm's input does not depend on any statistics
        for batch in clean_batches(source, idx, cfg, 128):
            model(batch)
    hook.remove()
    means = [x.mean(axis=(0, 2, 3)) for x in inputs]
    variances = [x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).var(axis=1, ddof=1) for x in inputs]
    assert [len(x) for x in inputs] == [128, 128, 44]
    np.testing.assert_allclose(running_mean.numpy(), np.mean(means, axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(running_var.numpy(), np.mean(variances, axis=0), rtol=1e-4, atol=1e-5)
    for key, value in weights.items():  # only running statistics move
        assert torch.equal(model.state_dict()[key], value), key


def test_indices_are_seeded_distinct_and_capped():
    a, b = recalibration_indices(1000, 200, seed=0), recalibration_indices(1000, 200, seed=0)
    assert np.array_equal(a, b) and len(np.unique(a)) == 200 and a.max() < 1000
    assert not np.array_equal(a, recalibration_indices(1000, 200, seed=1))
    assert np.array_equal(recalibration_indices(50, 200, seed=0), np.arange(50))


def test_zero_images_or_no_batchnorm_changes_nothing():
    cfg = tiny_config()
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = load_fashion_mnist("test")
    assert recalibrate_batchnorm(model, source, cfg, images=0, seed=0, batch_size=64, device=torch.device("cpu")) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    plain = nn.Sequential(nn.Flatten(), nn.Linear(784, 4))
    assert recalibrate_batchnorm(plain, source, cfg, images=64, seed=0, batch_size=64, device=torch.device("cpu")) == 0


@pytest.mark.parametrize("images", [0, 512])
def test_training_ends_with_recalibrated_statistics(tmp_path, lpjepa, images):
    """The checkpoint a run leaves holds the statistics of `train.bn_recalibration` clean train images; with 0
    they are the training views' running averages."""
    out = tmp_path / "run"
    sets = ["train.steps=2", "train.batch_size=32", "train.threads=1", f"train.bn_recalibration={images}"]
    sets += [
        'model.backbone_kwargs={"width": 0.125, "small_stem": true}',
        "model.projector_dims=[64, 64]",
        "probe.enabled=false",
    ]
    code, _, err = lpjepa(
        "train", "--config", "fmnist-cpu", "--out", str(out), "--no-progress", *sum((["--set", s] for s in sets), [])
    )
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bn_recalibration_images"] == images
    model, *_ = load_checkpoint(out, device="cpu")
    cfg = model.config
    reference = load_checkpoint(out, device="cpu")[0]
    recalibrate_batchnorm(
        reference, load_fashion_mnist("train"), cfg, images=512, seed=0, batch_size=32, device=torch.device("cpu")
    )
    same = torch.allclose(
        _first_bn(model).running_mean, _first_bn(reference).running_mean, atol=1e-4
    )  # channels_last convs: ~1e-6 apart
    assert same == (images == 512)
