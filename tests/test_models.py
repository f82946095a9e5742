"""Networks, configs and checkpoints: what export and serving rely on to rebuild a model from one file."""

from __future__ import annotations

import hashlib
import json
import math

import helpers
import pytest
import torch

from core.atomic_io import file_sha256
from models.checkpoint import CheckpointError, load_checkpoint, read_header, save_checkpoint
from models.config import ModelConfig
from models.encoder import build_model

FAMILIES = [
    ("resnet18", {"width": 0.125}),
    ("resnet50", {"width": 0.125}),
    ("vit", {"patch_size": 7, "num_layers": 1, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}),
    ("convnext", {"dims": [16, 32], "depths": [1, 1], "stem_stride": 2}),
]


def tiny_config(backbone: str = "resnet18", kwargs: dict | None = None, **over) -> ModelConfig:
    """helpers.tiny_config with another backbone and a smaller projector."""
    base = dict(backbone=backbone, backbone_kwargs=kwargs or {"width": 0.125}, projector_dims=[32, 32, 16])
    return helpers.tiny_config(**{**base, **over})


@pytest.mark.parametrize(("backbone", "kwargs"), FAMILIES)
def test_every_backbone_family_emits_a_rectified_embedding(backbone: str, kwargs: dict) -> None:
    model = build_model(tiny_config(backbone, kwargs)).eval()
    with torch.no_grad():
        feats, z = model.forward_features(torch.randn(3, 1, 28, 28))
    assert feats.shape == (3, model.feature_dim)
    assert z.shape == (3, 16)
    assert (z >= 0).all(), "the rectified projector must end in ReLU"


def test_raw_projector_for_ablation_keeps_negative_values() -> None:
    model = build_model(tiny_config(rectify=False)).eval()
    with torch.no_grad():
        z = model(torch.randn(64, 1, 28, 28))
    assert (z < 0).any()


def test_quarter_width_resnet_is_much_smaller_than_full() -> None:
    full = build_model(tiny_config(kwargs={"width": 1.0}))
    quarter = build_model(tiny_config(kwargs={"width": 0.25}))
    n_full = sum(p.numel() for p in full.backbone.parameters())
    n_quarter = sum(p.numel() for p in quarter.backbone.parameters())
    assert 10 < n_full / n_quarter < 20  # conv weights scale with width squared


def test_small_stem_keeps_resolution() -> None:
    small = build_model(tiny_config(kwargs={"width": 0.125, "small_stem": True})).backbone
    large = build_model(tiny_config(kwargs={"width": 0.125, "small_stem": False})).backbone
    x = torch.randn(1, 1, 28, 28)
    assert small.conv1(x).shape[-1] == 28
    assert large.maxpool(large.conv1(x)).shape[-1] == 7


@pytest.mark.parametrize(
    "bad",
    [
        dict(backbone="alexnet"),
        dict(method="byol"),
        dict(in_channels=2),
        dict(mean=[0.1, 0.2]),
        dict(std=[0.0]),
        dict(projector_dims=[]),
        dict(target_p=0.0),
    ],
)
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        tiny_config(**bad)


def test_config_rejects_unknown_keys() -> None:
    data = tiny_config().to_dict()
    data["colour"] = "blue"
    with pytest.raises(ValueError, match="colour"):
        ModelConfig.from_dict(data)


def test_checkpoint_round_trip_reproduces_outputs(tmp_path) -> None:
    config = tiny_config(target_mu=-2.0, target_sigma=0.5)
    model = build_model(config)
    model.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        model(torch.randn(16, 1, 28, 28) * 2 + 1)
    model.eval()
    path = save_checkpoint(tmp_path / "run" / "model.safetensors", model, extra={"step": 7})
    loaded, extra = load_checkpoint(tmp_path / "run")  # a run directory resolves to its model file
    assert extra == {"step": 7}
    assert loaded.config == config
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    cfg, _ = read_header(path)
    assert cfg.target_mu == -2.0
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()  # chunked read, same digest
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir())


def test_checkpoint_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(garbage)
    model = build_model(tiny_config())
    good = save_checkpoint(tmp_path / "good.safetensors", model)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(truncated)


def test_checkpoint_with_foreign_header_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "someone-else", "config": json.dumps({})})
    with pytest.raises(CheckpointError, match="not an lpjepa checkpoint"):
        load_checkpoint(path)


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch) -> None:
    import models.checkpoint as ckpt_mod

    model = build_model(tiny_config())
    path = save_checkpoint(tmp_path / "model.safetensors", model, extra={"step": 1})
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, model, extra={"step": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_checkpoint_without_target_kind_takes_it_from_the_method(tmp_path) -> None:
    """Checkpoints written before the target kind was stored still load; the kind, and with it the served
    embedding's expected l0, comes from the method registry."""
    from safetensors.torch import save_file

    from models.checkpoint import FORMAT

    model = build_model(tiny_config(method="ablation_rgn_raw", rectify=False, target_mu=-1.0))
    old = model.config.to_dict()
    del old["target_kind"]
    path = tmp_path / "old.safetensors"
    save_file(dict(model.state_dict()), str(path), metadata={"format": FORMAT, "config": json.dumps(old)})
    config, _ = read_header(path)
    assert config.target_kind == "rgn" and config.target.mu == -1.0
    assert config.expected_l0 is None  # raw codes: the RGN target's rate is not the embedding's
    old.update(method="rectified_lpjepa", rectify=True)
    save_file(dict(model.state_dict()), str(path), metadata={"format": FORMAT, "config": json.dumps(old)})
    config, _ = read_header(path)
    # p = 1: GN_1(mu, sigma) is the Laplace law with scale sigma, P(X > 0) = exp(mu / sigma) / 2 for mu < 0
    assert config.expected_l0 == pytest.approx(0.5 * math.exp(-1.0 / config.target_sigma), rel=1e-12)
    for method, kind in (("ablation_gn_relu", "gn"), ("lejepa", "gaussian"), ("ncl_relu", "none")):
        assert tiny_config(method=method).target_kind == kind and tiny_config(method=method).expected_l0 is None


def test_invalid_model_config_in_a_header_names_the_field(tmp_path) -> None:
    from safetensors.torch import save_file

    from models.checkpoint import FORMAT

    bad = {**tiny_config().to_dict(), "image_size": 4}
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": FORMAT, "config": json.dumps(bad)})
    with pytest.raises(CheckpointError, match=r"invalid model config: image_size: .*8, got 4$"):
        read_header(path)
