"""pretrain/rate_calibration.py on real Fashion-MNIST: the shift is numpy's per-dimension (1 - r) quantile of the
clean pre-activations, every dimension then fires at r on those images, only the last bias moves, and
`lpjepa calibrate` on a finished run gives what training with the step gives (the same weights, the shift to
float rounding)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cli.main import main
from data.sources import open_source
from models.config import ModelConfig
from models.encoder import build_model
from pretrain.evaluate.features import clean_batches
from pretrain.rate_calibration import calibrate_rates, calibration_indices, last_linear

TINY = [
    "data.subset=512",
    "train.batch_size=32",
    "model.backbone_kwargs.width=0.125",
    "model.projector_dims=[32,32,32]",
    "method.num_projections=64",
    "method.mu=-1.5",
    "train.threads=1",
    "train.precision=fp32",
    "train.steps=4",
    "train.bn_recalibration=256",
]


@pytest.fixture(scope="module")
def source():
    return open_source("fashion-mnist:test")


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(
        backbone="resnet18",
        backbone_kwargs={"width": 0.125, "small_stem": True},
        in_channels=1,
        image_size=28,
        mean=[0.286],
        std=[0.353],
        projector_dims=[64, 48],
    )
    return build_model(config).eval()


def _preacts(encoder: nn.Module, source, idx: np.ndarray) -> np.ndarray:
    """Independent of the module's hook: the projector's layers applied by hand up to its last Linear."""
    layers = list(encoder.projector)
    cut = max(i for i, m in enumerate(layers) if isinstance(m, nn.Linear)) + 1
    out = []
    with torch.no_grad():
        for batch in clean_batches(source, idx, encoder.config, 100):
            out.append(nn.Sequential(*layers[:cut])(encoder.backbone(batch)).numpy())
    return np.concatenate(out)


@pytest.mark.parametrize("rate", [0.5, 0.1, 0.01])
def test_shift_is_the_clean_quantile_and_every_dimension_fires_at_r(source, rate):
    encoder = _encoder()
    idx = calibration_indices(len(source), 600, seed=3)
    h = _preacts(encoder, source, idx)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    result = calibrate_rates(
        encoder, source, encoder.config, rate=rate, images=600, seed=3, batch_size=128, device=torch.device("cpu")
    )
    assert result["images"] == 600 and result["rate"] == rate
    assert result["l0_before"] == pytest.approx(float((h > 0).mean()), abs=1e-6)
    bias = last_linear(encoder).bias.detach().numpy()
    want = before[f"projector.{len(encoder.projector) - 2}.bias"].numpy() - np.quantile(h, 1 - rate, axis=0)
    np.testing.assert_allclose(bias, want, rtol=1e-5, atol=1e-6)
    after = _preacts(encoder, source, idx)
    rates = (after > 0).mean(axis=0)
    assert np.all(np.abs(rates - rate) <= 1.5 / 600), rates  # every dimension, up to the quantile's interpolation
    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [f"projector.{len(encoder.projector) - 2}.bias"]  # the backbone and the weights: untouched
    held_out = np.setdiff1d(np.arange(len(source)), idx)[:2000]  # unseen images: the mean rate generalises
    assert (_preacts(encoder, source, held_out) > 0).mean() == pytest.approx(rate, rel=0.25, abs=0.003)


def test_no_designed_rate_or_no_images_changes_nothing(source):
    encoder = _encoder()
    before = last_linear(encoder).bias.detach().clone()
    for rate, images in ((None, 100), (0.1, 0), (1.0, 100)):
        kw = {"images": images, "seed": 0, "batch_size": 64, "device": torch.device("cpu")}
        assert calibrate_rates(encoder, source, encoder.config, rate=rate, **kw) == {"images": 0}
    assert torch.equal(last_linear(encoder).bias, before)


def _train(out: Path, *extra: str) -> None:
    sets = [*TINY, *extra]
    args = ["train", "--config", "smoke", "--out", str(out), "--no-progress", *[a for s in sets for a in ("--set", s)]]
    assert main(args) == 0


def test_training_calibrates_and_lpjepa_calibrate_gives_the_same_model(tmp_path, capsys):
    _train(tmp_path / "with", "train.rate_calibration=384")
    summary = json.loads((tmp_path / "with" / "summary.json").read_text())
    assert summary["rate_calibration"]["images"] == 384
    assert summary["rate_calibration"]["rate"] == pytest.approx(summary["target_l0"])
    _train(tmp_path / "without", "train.rate_calibration=0")
    assert json.loads((tmp_path / "without" / "summary.json").read_text())["rate_calibration"] == {"images": 0}
    capsys.readouterr()
    assert main(["calibrate", str(tmp_path / "without"), "--images", "384", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 384
    a = load_file(str(tmp_path / "with" / "model.safetensors"))
    b = load_file(str(tmp_path / "without" / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ in ([], ["projector.6.bias"])  # every weight bit-identical; the shift up to forward rounding
    torch.testing.assert_close(a["projector.6.bias"], b["projector.6.bias"], rtol=0, atol=1e-5)
    cfg = json.loads((tmp_path / "without" / "config.json").read_text())
    assert cfg["train"]["rate_calibration"] == 384
    # a second time is refused (the message names the run and what was done), --force does it again
    assert main(["calibrate", str(tmp_path / "without")]) == 2
    assert "already calibrated on 384 images" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path / "without"), "--force", "--images", "384"]) == 0
    assert main(["calibrate", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
