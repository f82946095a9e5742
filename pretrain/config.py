"""The training configuration: one JSON-serialisable tree of pydantic sections, loaded by name or path, with
overrides.

A run folder stores the resolved config (config.json) so `--resume` and later readers never depend on the
packaged defaults changing. Sections are strict (data.config.Section), so a typo or a wrong type in a file or
an override (`--set optim.lr=0.01`) is a one-line error naming the key instead of a silently ignored value.
Field types and ranges are checked as a section is built or a key is set; `TrainConfig.validate` does the
cross-field checks and fills what the method implies (mu from a target l0, a baseline's projector and lr) once
every override is in.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, ValidationError, field_validator

from core.errors import InvalidError
from data.config import AugmentConfig, Count, DataConfig, Int, Section, Unit
from models.config import BACKBONES, one_line
from models.methods import METHODS, method_spec
from models.rgg import Target
from models.rgg_law import mu_for_l0

CONFIG_PACKAGE = "pretrain.configs"
DEAD_DIM_FIXES = ("none", "marginal", "threshold", "threshold_sym", "threshold_q", "leaky", "quantile")
DEAD_DIM_FIXES += ("quantile_shift", "marginal+quantile", "marginal+quantile_shift", "threshold_q+quantile")
DEAD_DIM_FIXES += ("preact", "marginal+preact", "preact_upper")
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]


class ConfigError(InvalidError):
    """A config that cannot be loaded or an override that does not fit; the message names the key."""


def _method_name(name: str) -> str:
    method_spec(name)  # "unknown method 'byol'; choose one of ..."
    return name


class ModelSection(Section):
    """The network; in_channels / mean / std left empty are taken from the data (0 / [] mean 'auto')."""

    backbone: Literal[BACKBONES] = "resnet18"  # type: ignore[valid-type]
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)
    projector_dims: Annotated[list[Annotated[Int, Field(ge=1)]], Field(min_length=1)] = [512, 512, 512]
    # "auto": the baselines get their reference projector (models.methods, written into projector_dims and
    # projector_bn when the config is loaded); "dims": projector_dims / projector_bn as given, for every method.
    projector: Literal["auto", "dims"] = "auto"
    projector_bn: bool = True
    image_size: Annotated[Int, Field(ge=8)] = 32
    in_channels: Literal[0, 1, 3] = 0
    mean: list[float] = Field(default_factory=list)
    std: list[Positive] = Field(default_factory=list)
    channels_last: bool = True
    sync_bn: bool = False


class MethodConfig(Section):
    """The objective: method name, RGN target, loss weights and the dead-dimension fix (see methods.py)."""

    name: Annotated[str, AfterValidator(_method_name)] = "rectified_lpjepa"
    p: Positive = 1.0
    mu: float = 0.0
    sigma: str | float = "gn"
    # Target activation rate: when set, mu is solved from it (models.rgg_law.mu_for_l0: Phi(mu / sigma) = l0)
    # and stored in `mu` beside it, so config.json, the checkpoint and the served model all carry the solved mu.
    l0: Annotated[float, Field(gt=0, lt=1)] | None = None
    w_inv: float = 25.0
    w_rdm: float = 125.0
    num_projections: Annotated[Int, Field(ge=1)] = 512
    projections: Literal["random", "eigen"] = "random"
    # Dead-dimension fix, each described in pretrain/methods.py; null = the method's default (models.methods:
    # "preact_upper" for rectified_lpjepa, else "none"). The forward pass (every exported code) is the exact ReLU.
    dead_dim_fix: Literal[DEAD_DIM_FIXES] | None = None  # type: ignore[valid-type]
    leaky_slope: Unit = 0.1
    # Share of the RDMReg weight given to the coordinate axes (measured: 0.2 keeps accuracy, 0.5 costs 1.5 pt).
    marginal_weight: Unit = 0.2
    # Share of training, at its end, over which the axis-fix weight falls linearly to 0 while the RDMReg term takes
    # its share back, so the run ends on the paper's objective (0: constant weight).
    marginal_anneal: Unit = 0.0
    # The axis fix trains the projector only: its term reads pre-activations of the detached backbone features, so
    # the backbone learns from the paper's objective alone (one more projector pass per step).
    marginal_detach: bool = False
    # Share of training over which the target's location slides linearly from 0 (half the code active) to mu, the
    # projector's last bias moved along with it (started at 0): the backbone first learns from a dense code.
    mu_warmup: Unit = 0.0
    # Weight of the quantile rate term ("quantile", "quantile_shift"), as a share of w_rdm.
    rate_weight: NonNegative = 0.2
    lejepa_lambda: Unit = 0.05
    lejepa_projections: Annotated[Int, Field(ge=1)] = 1024
    vicreg_sim: float = 25.0
    vicreg_var: float = 25.0
    vicreg_cov: float = 1.0
    temperature: Positive = 0.2

    @field_validator("sigma", mode="plain")
    @classmethod
    def _sigma(cls, value: Any) -> str | float:
        if isinstance(value, str) and value.lower() in ("gn", "rgn"):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf"):
            return float(value)
        raise ValueError("must be 'gn', 'rgn' or a positive number")


class OptimConfig(Section):
    name: Literal["lars", "adamw", "sgd"] = "lars"
    lr: Positive = 0.3
    weight_decay: NonNegative = 1e-4
    momentum: float = 0.9
    # Per-method learning rate (the reference's own lr for each baseline in a LARS recipe); when the method is
    # listed, its entry replaces `lr` as the config is loaded (config.json stores the lr actually used).
    lr_by_method: dict[str, Positive] = Field(default_factory=dict)
    eta: float = 0.02  # LARS trust coefficient
    clip_lr: bool = True  # LARS: per-layer step min(trust, lr), as every reference config (solo-learn clip_lr)
    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] = [0.9, 0.999]
    warmup_steps: Count = 0
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1  # used when warmup_steps is 0
    min_lr_ratio: Unit = 0.0


class TrainSection(Section):
    batch_size: Annotated[Int, Field(ge=2)] = 256  # global batch (split over DDP ranks); statistics need two
    steps: Count = 0  # total optimizer steps; 0 -> derive from epochs
    epochs: float = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda|mps)$|^cuda:")] = "auto"  # or cuda:N
    threads: Count = 0  # torch intra-op threads on CPU; 0 = torch's default
    seed: Int = 0
    checkpoint_every: Count = 500  # 0 = only at the end
    # Clean train images that re-estimate every BatchNorm's running statistics before the last checkpoint, so the
    # deployed model normalises clean inputs as it was trained to (pretrain/bn_recalibration.py); 0 = off.
    bn_recalibration: Count = 10240
    # Clean train images whose per-dimension (1 - r) quantiles move the last bias after that, so every dimension
    # of the deployed code fires at the designed rate r on clean inputs (pretrain/rate_calibration.py); only
    # for codes with a designed rate (rectified methods with an RGN target); 0 = off.
    rate_calibration: Count = 10240
    log_every: Annotated[Int, Field(ge=1)] = 20
    progress: bool = True


class ProbeConfig(Section):
    """Online linear probes on detached features (backbone and projector), trained inside the train step."""

    enabled: bool = True
    lr: float = 1e-3
    weight_decay: float = 1e-6


class TrainConfig(Section):
    name: str = "custom"
    description: str = ""
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)

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

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        cfg = _build(data)
        cfg.validate()
        return cfg

    def validate(self) -> None:  # type: ignore[override]  # pydantic v1's classmethod of that name is deprecated
        """Fill what the method implies (mu solved from `method.l0`; a baseline's reference projector when
        model.projector is "auto", its lr from optim.lr_by_method) and check what no field type can state."""
        m, d, t = self.method, self.model, self.train
        if m.l0 is not None:
            try:
                m.mu = float(mu_for_l0(m.p, m.l0, m.sigma)[0])
            except ValueError as err:
                raise ConfigError(f"method.l0: {err}") from err
        reference = METHODS[m.name].projector
        if d.projector == "auto" and reference is not None:
            d.projector_dims, d.projector_bn = list(reference[0]), reference[1]
        self.optim.lr = float(self.optim.lr_by_method.get(m.name, self.optim.lr))
        if len(d.mean) != len(d.std):
            raise ConfigError("model.mean: mean and std need the same length")
        if not (t.steps > 0 or t.epochs > 0):
            raise ConfigError("train.epochs: set train.steps or a positive train.epochs")


def _section(path: tuple[Any, ...]) -> Any:
    """The section class (or field type) at a key path; None where the path leaves the schema."""
    node: Any = TrainConfig
    for part in path:
        fields = node.model_fields if isinstance(node, type) and issubclass(node, BaseModel) else {}
        node = fields[part].annotation if part in fields else None
    return node


def _build(data: Any) -> TrainConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected an object, got {data!r}")
    try:
        return TrainConfig(**data)
    except ValidationError as err:
        raise ConfigError(one_line(err, lambda path: sorted(_section(path).model_fields))) from None


def apply_override(cfg: TrainConfig, assignment: str) -> None:
    """Apply one `a.b=value`; a key inside a dict field (model.backbone_kwargs.width=0.25) sets that entry."""
    data = cfg.to_dict()
    _set(data, assignment)
    cfg.__dict__.update(_build(data).__dict__)


def _set(data: dict[str, Any], assignment: str) -> None:
    """Write one `a.b=value` into a config's raw JSON tree; the values are checked when the tree is built."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} is not of the form key=value")
    *path, last = key.split(".")
    section = _section((*path, last))
    if isinstance(section, type) and issubclass(section, BaseModel):
        raise ConfigError(f"{key} is a section; set one of its keys, e.g. {key}.{next(iter(section.model_fields))}")
    node: Any = data
    for i, part in enumerate(path):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])} is not an object; cannot set {key!r}")
    try:  # `--set` values are JSON when they parse as JSON (numbers, true/false/null, lists), else plain strings
        node[last] = json.loads(raw)
    except json.JSONDecodeError:
        node[last] = raw


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
    data = read_config_file(name_or_path)
    for assignment in overrides or []:
        _set(data, assignment)
    return TrainConfig.from_dict(data)
