"""The training configuration: one JSON-serialisable tree of dataclasses, loaded by name or path, with overrides.

A run folder stores the resolved config (config.json) so `--resume` and later readers never depend on the
packaged defaults changing. Overrides (`--set optim.lr=0.01`) are type-checked against the dataclass field
types, so a typo or a wrong type is a one-line error instead of a silently ignored key.
"""

from __future__ import annotations

import copy
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from core.errors import InvalidError
from models.config import BACKBONES
from models.methods import METHODS
from models.rgg import Target

CONFIG_PACKAGE = "pretrain.configs"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("lars", "adamw", "sgd")
PROJECTION_KINDS = ("random", "eigen")
RECIPES = ("auto", "grey", "color")
DEAD_DIM_FIXES = (
    "none",
    "marginal",
    "threshold",
    "threshold_sym",
    "threshold_q",
    "leaky",
    "quantile",
    "quantile_shift",
    "marginal+quantile",
    "marginal+quantile_shift",
    "threshold_q+quantile",
    "preact",
    "marginal+preact",
)
DEVICES = ("auto", "cpu", "cuda", "mps")
PROJECTOR_CHOICES = ("auto", "dims")


class ConfigError(InvalidError):
    """A config that cannot be loaded or an override that does not fit; the message names the key."""


@dataclass
class DataConfig:
    """Where training images come from (a data spec of data.sources) and how they are batched."""

    spec: str = "fashion-mnist"
    # Use only the first N images (0 = all): smoke tests and quick sweeps on a small CPU.
    subset: int = 0
    # DataLoader workers for file-backed sources; in-memory arrays are augmented in-process as whole batches.
    num_workers: int = 0


@dataclass
class AugmentConfig:
    """Multi-view augmentation (METHOD.md §3 CIFAR recipe by default); 'grey' drops hue/saturation/grayscale."""

    recipe: str = "auto"
    global_views: int = 2
    small_views: int = 0
    small_size: int = 0  # 0 -> about 0.57 x image_size (96 -> 224 ratio of the multi-crop papers)
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    small_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.2])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    solarize_p: float = 0.1
    blur_p: float = 0.0


@dataclass
class ModelSection:
    """The network; in_channels / mean / std left empty are taken from the data (0 / [] mean 'auto')."""

    backbone: str = "resnet18"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    projector_dims: list[int] = field(default_factory=lambda: [512, 512, 512])
    # "auto": the baselines get their reference projector (models.methods, written into projector_dims and
    # projector_bn when the config is loaded); "dims": projector_dims / projector_bn as given, for every method.
    projector: str = "auto"
    projector_bn: bool = True
    image_size: int = 32
    in_channels: int = 0
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    channels_last: bool = True
    sync_bn: bool = False


@dataclass
class MethodConfig:
    """The objective: method name, RGN target, loss weights and the dead-dimension fix (see methods.py)."""

    name: str = "rectified_lpjepa"
    p: float = 1.0
    mu: float = 0.0
    sigma: str | float = "gn"
    # Target activation rate: when set, mu is solved from it (models.rgg_law.mu_for_l0: Phi(mu / sigma) = l0)
    # and stored in `mu` beside it, so config.json, the checkpoint and the served model all carry the solved mu.
    l0: float | None = None
    w_inv: float = 25.0
    w_rdm: float = 125.0
    num_projections: int = 512
    projections: str = "random"
    # Dead-dimension fix (pretrain/methods.py): "marginal" adds the D coordinate axes as slicing directions,
    # matched with a straight-through gradient for samples that should fire and do not; "threshold" and
    # "threshold_sym" pull by the distance to the GN quantile instead; "leaky" gives the final ReLU a leaky
    # backward everywhere; "preact" matches the pre-activation to the un-rectified GN along the axes (last bias
    # starts at mu); "none" is the paper's objective. null = "marginal" for rectified_lpjepa, else "none".
    # The forward pass (and so every exported code) is the exact ReLU in every case.
    dead_dim_fix: str | None = None
    leaky_slope: float = 0.1
    # Share of the RDMReg weight given to the coordinate axes (measured: 0.2 keeps accuracy, 0.5 costs 1.5 pt).
    marginal_weight: float = 0.2
    # Weight of the quantile rate term ("quantile", "quantile_shift"), as a share of w_rdm.
    rate_weight: float = 0.2
    lejepa_lambda: float = 0.05
    lejepa_projections: int = 1024
    vicreg_sim: float = 25.0
    vicreg_var: float = 25.0
    vicreg_cov: float = 1.0
    temperature: float = 0.2


@dataclass
class OptimConfig:
    name: str = "lars"
    lr: float = 0.3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    # Per-method learning rate (the reference's own lr for each baseline in a LARS recipe); when the method is
    # listed, its entry replaces `lr` as the config is loaded (config.json stores the lr actually used).
    lr_by_method: dict[str, Any] = field(default_factory=dict)
    eta: float = 0.02  # LARS trust coefficient
    clip_lr: bool = True  # LARS: per-layer step min(trust, lr), as every reference config (solo-learn clip_lr)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    warmup_fraction: float = 0.1  # used when warmup_steps is 0
    min_lr_ratio: float = 0.0


@dataclass
class TrainSection:
    batch_size: int = 256  # global batch (split over DDP ranks)
    steps: int = 0  # total optimizer steps; 0 -> derive from epochs
    epochs: float = 1.0
    precision: str = "auto"
    device: str = "auto"
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 20
    progress: bool = True


@dataclass
class ProbeConfig:
    """Online linear probes on detached features (backbone and projector), trained inside the train step."""

    enabled: bool = True
    lr: float = 1e-3
    weight_decay: float = 1e-6


@dataclass
class TrainConfig:
    name: str = "custom"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    # ---------------------------------------------------------------------------------------------- derived
    @property
    def dead_dim_fix(self) -> str:
        if self.method.dead_dim_fix is None:
            return METHODS[self.method.name].dead_dim_fix
        return self.method.dead_dim_fix

    @property
    def target(self) -> Target:
        """The method's target, sigma resolved: what the loss matches and the checkpoint stores."""
        m = self.method
        return Target.from_spec(m.p, m.mu, m.sigma, METHODS[m.name].target)

    def resolve_method_defaults(self) -> None:
        """The baselines' reference projector (model.projector = "auto") and lr (optim.lr_by_method)."""
        name = self.method.name
        reference = METHODS[name].projector if name in METHODS else None
        if self.model.projector == "auto" and reference is not None:
            dims, bn = reference
            self.model.projector_dims, self.model.projector_bn = list(dims), bn
        if name in self.optim.lr_by_method:
            lr = self.optim.lr_by_method[name]
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise ConfigError(f"optim.lr_by_method.{name}: must be a positive number, got {lr!r}")
            self.optim.lr = float(lr)

    def resolve_target(self) -> None:
        """Solve mu from `method.l0` when it is set (validate() calls this, so every loaded config is resolved)."""
        m = self.method
        if m.l0 is None:
            return
        if not (0.0 < m.l0 < 1.0):
            raise ConfigError(f"method.l0: must lie strictly between 0 and 1 (a rate), got {m.l0!r}")
        from models.rgg_law import mu_for_l0

        try:
            m.mu = float(mu_for_l0(m.p, m.l0, m.sigma)[0])
        except ValueError as err:
            raise ConfigError(f"method.l0: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        cfg = cls()
        _merge(cfg, data, prefix="")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Cross-field checks that a type check cannot do; each message names the offending key."""

        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{key}: {msg}")

        m, o, t, a, d = self.method, self.optim, self.train, self.augment, self.model
        need(m.p > 0 and math.isfinite(m.p), "method.p", "must be a finite number > 0")
        self.resolve_target()
        need(d.projector in PROJECTOR_CHOICES, "model.projector", f"must be one of {PROJECTOR_CHOICES}")
        self.resolve_method_defaults()
        need(m.name in METHODS, "method.name", f"unknown method {m.name!r}; choose one of {', '.join(METHODS)}")
        need(d.backbone in BACKBONES, "model.backbone", f"unknown backbone {d.backbone!r}; one of {BACKBONES}")
        need(o.name in OPTIMIZERS, "optim.name", f"unknown optimizer {o.name!r}; choose one of {OPTIMIZERS}")
        need(t.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}")
        need(t.device in DEVICES or t.device.startswith("cuda:"), "train.device", f"must be one of {DEVICES}")
        need(m.projections in PROJECTION_KINDS, "method.projections", f"must be one of {PROJECTION_KINDS}")
        need(a.recipe in RECIPES, "augment.recipe", f"must be one of {RECIPES}")
        need(m.p > 0 and math.isfinite(m.p), "method.p", "must be a finite number > 0")
        need(math.isfinite(m.mu), "method.mu", "must be finite")
        if isinstance(m.sigma, str):
            need(m.sigma.lower() in ("gn", "rgn"), "method.sigma", "must be 'gn', 'rgn' or a positive number")
        else:
            need(m.sigma > 0 and math.isfinite(m.sigma), "method.sigma", "must be 'gn', 'rgn' or a positive number")
        need(
            m.dead_dim_fix is None or m.dead_dim_fix in DEAD_DIM_FIXES,
            "method.dead_dim_fix",
            f"must be null or one of {DEAD_DIM_FIXES}",
        )
        need(0 <= m.marginal_weight <= 1, "method.marginal_weight", "must lie in [0, 1]")
        need(m.rate_weight >= 0, "method.rate_weight", "must be >= 0")
        need(0 <= m.leaky_slope <= 1, "method.leaky_slope", "must lie in [0, 1]")
        need(m.num_projections >= 1, "method.num_projections", "must be >= 1")
        need(m.lejepa_projections >= 1, "method.lejepa_projections", "must be >= 1")
        need(0.0 <= m.lejepa_lambda <= 1.0, "method.lejepa_lambda", "must lie in [0, 1]")
        need(m.temperature > 0, "method.temperature", "must be > 0")
        need(o.lr > 0, "optim.lr", "must be > 0")
        need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        need(0 <= o.warmup_fraction < 1, "optim.warmup_fraction", "must lie in [0, 1)")
        need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must lie in [0, 1]")
        need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two numbers in [0, 1)")
        need(t.batch_size >= 2, "train.batch_size", "must be >= 2 (batch statistics need two samples)")
        need(t.steps >= 0, "train.steps", "must be >= 0")
        need(t.steps > 0 or t.epochs > 0, "train.epochs", "set train.steps or a positive train.epochs")
        need(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0 = only at the end)")
        need(t.log_every >= 1, "train.log_every", "must be >= 1")
        need(t.threads >= 0, "train.threads", "must be >= 0")
        need(d.image_size >= 8, "model.image_size", "must be >= 8")
        need(d.in_channels in (0, 1, 3), "model.in_channels", "must be 0 (auto), 1 or 3")
        need(
            len(d.projector_dims) >= 1 and all(w >= 1 for w in d.projector_dims),
            "model.projector_dims",
            "must be a non-empty list of positive widths",
        )
        need(len(d.mean) == len(d.std), "model.mean", "mean and std need the same length")
        need(all(s > 0 for s in d.std), "model.std", "entries must be positive")
        need(a.global_views >= 2, "augment.global_views", "must be >= 2 (the loss compares two views)")
        need(a.small_views >= 0, "augment.small_views", "must be >= 0")
        for key in ("crop_scale", "small_crop_scale", "ratio"):
            lo_hi = getattr(a, key)
            need(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1], f"augment.{key}", "must be [low, high], 0 < low <= high")
        need(a.crop_scale[1] <= 1 and a.small_crop_scale[1] <= 1, "augment.crop_scale", "scales must be <= 1")
        for key in ("flip_p", "jitter_p", "grayscale_p", "solarize_p", "blur_p"):
            need(0 <= getattr(a, key) <= 1, f"augment.{key}", "probability must lie in [0, 1]")
        for key in ("brightness", "contrast", "saturation"):
            need(0 <= getattr(a, key) <= 1, f"augment.{key}", "must lie in [0, 1]")
        need(0 <= a.hue <= 0.5, "augment.hue", "must lie in [0, 0.5]")
        need(self.data.subset >= 0, "data.subset", "must be >= 0")
        need(self.data.num_workers >= 0, "data.num_workers", "must be >= 0")
        need(bool(self.data.spec.strip()), "data.spec", "must name a data set")


# -------------------------------------------------------------------------------------- typing machinery
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and minimally convert: int -> float) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
            if not math.isfinite(out):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return out
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected an object, got {value!r}")
        return copy.deepcopy(value)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _hints(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _merge(obj: Any, data: dict[str, Any], prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected an object, got {data!r}")
    hints = _hints(obj)
    known = {f.name for f in fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key {full!r}; known keys here: {', '.join(sorted(known))}")
        current = getattr(obj, key)
        if is_dataclass(current):
            _merge(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def parse_value(text: str) -> Any:
    """`--set` values are JSON when they parse as JSON (numbers, true/false/null, lists), else plain strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(cfg: TrainConfig, assignment: str) -> None:
    """Apply one `a.b=value`; a key inside a dict field (model.backbone_kwargs.width=0.25) sets that entry."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} is not of the form key=value")
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        if isinstance(obj, dict):
            if i == len(parts) - 1:
                obj[part] = parse_value(raw)
                return
            obj = obj.setdefault(part, {})
            if not isinstance(obj, dict):
                raise ConfigError(f"{path} is not an object")
            continue
        if not is_dataclass(obj):
            raise ConfigError(f"{'.'.join(parts[:i])} is not a section; cannot set {key!r}")
        names = {f.name for f in fields(obj)}
        if part not in names:
            raise ConfigError(f"unknown config key {path!r}; known keys here: {', '.join(sorted(names))}")
        current = getattr(obj, part)
        if i == len(parts) - 1:
            if is_dataclass(current):
                raise ConfigError(f"{path} is a section; set one of its keys, e.g. {path}.{fields(current)[0].name}")
            setattr(obj, part, _coerce(parse_value(raw), _hints(obj)[part], path))
            return
        obj = current


def config_names() -> list[str]:
    return sorted(
        p.name[: -len(".json")] for p in resources.files(CONFIG_PACKAGE).iterdir() if p.name.endswith(".json")
    )


def read_config_file(name_or_path: str) -> dict[str, Any]:
    """A packaged config by name (`smoke`, `fmnist-cpu`, ...) or a JSON file path."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        where = str(path)
    else:
        res = resources.files(CONFIG_PACKAGE) / f"{name_or_path}.json"
        if not res.is_file():
            raise ConfigError(
                f"no config named {name_or_path!r}; packaged configs: {', '.join(config_names())}"
                " (or give a path to a .json file)"
            )
        text = res.read_text(encoding="utf-8")
        where = name_or_path
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"config {where} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config {where} must hold a JSON object")
    return data


def load_config(name_or_path: str, overrides: list[str] | None = None) -> TrainConfig:
    cfg = TrainConfig()
    _merge(cfg, read_config_file(name_or_path), prefix="")
    for assignment in overrides or []:
        apply_override(cfg, assignment)
    cfg.validate()
    return cfg
