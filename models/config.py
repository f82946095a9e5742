"""The model's whole description, stored inside every checkpoint so export and serving need nothing else."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

from models.methods import METHODS, TARGET_KINDS
from models.rgg import Target

# Normalisation statistics shipped with the built-in data sets; a user's own data can set any.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BACKBONES = ("resnet18", "resnet34", "resnet50", "vit", "convnext")


_TYPE_WORDS = {
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "bool_type": "expected true or false",
    "float_type": "expected a number",
    "finite_number": "expected a finite number",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected an object",
    "model_type": "expected an object",
}


def one_line(err: ValidationError, known: Callable[[tuple[Any, ...]], list[str]] | None = None) -> str:
    """A pydantic error as one CLI-sized line, each problem naming its key (`train.steps: expected an integer,
    got 'abc'`); `known(section_path)` lists the keys an unknown key could have been."""
    lines = []
    for e in err.errors(include_url=False):
        loc, value = tuple(e["loc"]), e.get("input")
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "config"
        if e["type"] == "extra_forbidden":
            lines.append(
                f"unknown config key {key!r}" + (f"; known keys here: {', '.join(known(loc[:-1]))}" if known else "")
            )
            continue
        msg = _TYPE_WORDS.get(e["type"], e["msg"].removeprefix("Value error, "))
        said = isinstance(value, dict) or (e["type"] == "value_error" and repr(value) in msg)
        lines.append(f"{key}: {msg}" + ("" if said else f", got {value!r}"))
    return "; ".join(lines)


class ModelConfig(BaseModel):
    """Architecture, input contract and training target of an encoder.

    The input fields (image_size, in_channels, mean, std) define the evaluation transform, which the ONNX runtime
    must reproduce bit for bit; the target fields (the `Target` the model was trained toward) travel into the
    exported metadata so a served model can state its designed activation rate.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    backbone: Literal[BACKBONES] = "resnet18"  # type: ignore[valid-type]
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)
    projector_dims: list[PositiveInt] = Field(default_factory=lambda: [512, 512, 512], min_length=1)
    # BatchNorm in the projector's hidden layers (SimCLR/NCL's reference projector has none).
    projector_bn: bool = True
    rectify: bool = True
    in_channels: Literal[1, 3] = 3
    image_size: int = Field(32, ge=8)
    mean: list[float] = Field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[PositiveFloat] = Field(default_factory=lambda: list(IMAGENET_STD))
    method: Literal[tuple(METHODS)] = "rectified_lpjepa"  # type: ignore[valid-type]
    target_p: PositiveFloat = 1.0
    target_mu: float = 0.0
    target_sigma: PositiveFloat = 0.7071067811865476
    # Which form of the law the loss matched (models.methods.TargetKind); null in checkpoints written before
    # it was stored, and then taken from the method's registry entry.
    target_kind: Literal[TARGET_KINDS] | None = None  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError("mean and std need one entry per input channel")
        if self.target_kind is None:
            self.target_kind = METHODS[self.method].target
        return self

    @property
    def embed_dim(self) -> int:
        return int(self.projector_dims[-1])

    @property
    def target(self) -> Target:
        return Target(self.target_p, self.target_mu, self.target_sigma, self.target_kind)  # type: ignore[arg-type]

    @property
    def expected_l0(self) -> float | None:
        """The activation rate the served embedding is designed to have (None where the target says nothing)."""
        return self.target.embedding_l0(self.rectify)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)
