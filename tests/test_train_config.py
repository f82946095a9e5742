"""Training config: packaged configs load, overrides are type-checked, bad keys/values name themselves."""

from __future__ import annotations

import json
import math

import pytest

from pretrain.config import ConfigError, TrainConfig, apply_override, config_names, load_config

PACKAGED = ("smoke", "fmnist-cpu", "cifar10-gpu", "cifar100-gpu", "imagenet100-gpu")


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_configs_load_and_round_trip(name):
    cfg = load_config(name)
    assert cfg.name == name
    again = TrainConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert name in config_names()


def test_gpu_recipes_follow_method_md():
    c100 = load_config("cifar100-gpu")
    assert (c100.optim.name, c100.optim.lr, c100.optim.weight_decay, c100.optim.eta) == ("lars", 0.03, 1e-4, 0.02)
    assert c100.train.batch_size == 256 and c100.train.epochs == 1000 and c100.method.w_rdm == 250
    assert c100.augment.crop_scale == [0.2, 1.0] and c100.augment.solarize_p == 0.1
    assert c100.model.backbone_kwargs.get("small_stem") is True and c100.model.projector_dims == [512] * 3
    inet = load_config("imagenet100-gpu")
    assert inet.model.backbone == "resnet50" and inet.model.projector_dims == [2048] * 3
    assert inet.method.w_rdm == 125 and inet.model.image_size == 224
    # the reference yaml: batch 128, 1000 epochs, crop 0.2-1, lr 0.165 scaled by solo-learn's batch / 256
    assert inet.train.batch_size == 128 and inet.train.epochs == 1000 and inet.augment.crop_scale == [0.2, 1.0]
    assert inet.optim.lr == pytest.approx(0.165 * 128 / 256) and inet.optim.clip_lr and inet.optim.eta == 0.02
    assert c100.optim.clip_lr


def test_baselines_get_their_reference_projector_and_lr():
    """solo-learn's configs: VICReg 2048-2048-2048 (BN) at lr 0.3, SimCLR/NCL 2048 -> 256 without BN at lr 0.4."""
    v = load_config("cifar10-gpu", ["method.name=vicreg"])
    assert (v.model.projector_dims, v.model.projector_bn, v.optim.lr) == ([2048] * 3, True, 0.3)
    s = load_config("cifar10-gpu", ["method.name=simclr"])
    assert (s.model.projector_dims, s.model.projector_bn, s.optim.lr) == ([2048, 256], False, 0.4)
    n = load_config("fmnist-cpu", ["method.name=ncl_relu"])
    assert (n.model.projector_dims, n.model.projector_bn) == ([2048, 256], False)
    r = load_config("cifar10-gpu")  # Rectified LpJEPA keeps the recipe's own projector and lr
    assert (r.model.projector_dims, r.model.projector_bn, r.optim.lr) == ([512] * 3, True, 0.03)
    keep = load_config("fmnist-cpu", ["method.name=vicreg", "model.projector=dims"])
    assert keep.model.projector_dims == [512] * 3  # "dims": what the config says, for every method
    with pytest.raises(ConfigError, match="lr_by_method"):
        load_config("fmnist-cpu", ['optim.lr_by_method={"vicreg": -1}', "method.name=vicreg"])


def test_method_l0_solves_mu_against_scipy():
    """method.l0 = r sets mu so that P(X > 0) = r under scipy's gennorm; stored in method.mu, kept on reload."""
    from scipy import stats

    for p, rate, sigma in ((1.0, 0.01, "gn"), (2.0, 0.2, "gn"), (1.0, 0.05, 0.5)):
        cfg = load_config("smoke", [f"method.p={p}", f"method.l0={rate}", f"method.sigma={json.dumps(sigma)}"])
        sig = 1 / math.sqrt(2) if (p, sigma) == (1.0, "gn") else (1.0 if sigma == "gn" else sigma)
        law = stats.gennorm(beta=p, loc=cfg.method.mu, scale=sig * p ** (1 / p))
        assert law.sf(0.0) == pytest.approx(rate, rel=1e-6)
        again = TrainConfig.from_dict(json.loads(cfg.to_json()))
        assert again.method.mu == cfg.method.mu and again.method.l0 == rate
    for bad in ("0", "1", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match="method.l0"):
            load_config("smoke", [f"method.l0={bad}"])


def test_overrides_are_typed():
    cfg = load_config(
        "smoke",
        [
            "method.mu=-1",
            "optim.lr=0.01",
            "train.steps=7",
            "method.sigma=rgn",
            "model.backbone_kwargs.width=0.5",
            "model.projector_dims=[64, 32]",
            "method.dead_dim_fix=leaky",
            "augment.crop_scale=[0.5,1]",
            "description=a b",
        ],
    )
    assert cfg.method.mu == -1.0 and isinstance(cfg.method.mu, float)
    assert cfg.optim.lr == 0.01 and cfg.train.steps == 7 and cfg.method.sigma == "rgn"
    assert cfg.model.backbone_kwargs["width"] == 0.5 and cfg.model.backbone_kwargs["small_stem"] is True
    assert cfg.model.projector_dims == [64, 32] and cfg.method.dead_dim_fix == "leaky"
    assert cfg.augment.crop_scale == [0.5, 1.0] and cfg.description == "a b"
    cfg = load_config("smoke", ["method.sigma=0.5", "method.dead_dim_fix=null"])
    assert cfg.method.sigma == 0.5 and cfg.method.dead_dim_fix is None and cfg.dead_dim_fix == "preact_upper"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("nosection.x=1", "unknown config key 'nosection'"),
        ("train.steps=abc", "train.steps: expected an integer"),
        ("train.steps=1.5", "train.steps: expected an integer"),
        ("train.batch_size=1", "train.batch_size"),
        ("method.name=byol", "unknown method 'byol'"),
        ("method.sigma=wide", "method.sigma"),
        ("method.p=0", "method.p"),
        ("model.channels_last=yes", "model.channels_last: expected true or false"),
        ("optim=1", "optim is a section"),
        ("train.steps", "not of the form key=value"),
        ("augment.crop_scale=[0.9,0.1]", "augment.crop_scale"),
        ("method.dead_dim_fix=bn", "method.dead_dim_fix"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("smoke", [override])


def test_unknown_config_name_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no config named 'nope'.*smoke"):
        load_config("nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(str(bad))
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"train": {"stepz": 3}}))
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(str(typo))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.json"))


def test_apply_override_on_dict_field_creates_entry():
    cfg = TrainConfig()
    apply_override(cfg, "model.backbone_kwargs.dims=[16,32]")
    assert cfg.model.backbone_kwargs == {"dims": [16, 32]}
