"""The model's whole description, stored inside every checkpoint so export and serving need nothing else."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Normalisation statistics shipped with the built-in data sets; a user's own data can set any.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BACKBONES = ("resnet18", "resnet34", "resnet50", "vit", "convnext")
METHODS = (
    "rectified_lpjepa",
    "lejepa",
    "vicreg",
    "simclr",
    "nvicreg_relu",
    "ncl_relu",
    "ablation_gn_raw",  # GN target, raw (unrectified) features
    "ablation_gn_relu",  # GN target, rectified features
    "ablation_rgn_raw",  # RGN target, raw features
)


@dataclass
class ModelConfig:
    """Architecture, input contract and training target of an encoder.

    The input fields (image_size, in_channels, mean, std) define the evaluation transform, which the ONNX runtime
    must reproduce bit for bit; the target fields travel into the exported metadata so a served model can state
    its designed activation rate.
    """

    backbone: str = "resnet18"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    projector_dims: list[int] = field(default_factory=lambda: [512, 512, 512])
    # BatchNorm in the projector's hidden layers (SimCLR/NCL's reference projector has none).
    projector_bn: bool = True
    rectify: bool = True
    in_channels: int = 3
    image_size: int = 32
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    method: str = "rectified_lpjepa"
    target_p: float = 1.0
    target_mu: float = 0.0
    target_sigma: float = 0.7071067811865476

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError("mean and std need one entry per input channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std entries must be positive")
        if not self.projector_dims or any(int(d) < 1 for d in self.projector_dims):
            raise ValueError("projector_dims must be a non-empty list of positive widths")
        if not self.target_p > 0 or not self.target_sigma > 0:
            raise ValueError("target_p and target_sigma must be positive")

    @property
    def embed_dim(self) -> int:
        return int(self.projector_dims[-1])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))
