"""Backbone + projector as one module whose forward is exactly what export emits."""

from __future__ import annotations

import torch
from torch import nn

from models.backbones import build_backbone
from models.config import ModelConfig
from models.projector import build_projector


class Encoder(nn.Module):
    """`forward` returns the (rectified) embedding; `forward_features` also returns backbone features for probes."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(
            config.backbone, config.in_channels, config.image_size, **dict(config.backbone_kwargs)
        )
        self.feature_dim = int(self.backbone.out_dim)
        self.projector = build_projector(
            self.feature_dim, list(config.projector_dims), config.rectify, batch_norm=config.projector_bn
        )
        self.embed_dim = config.embed_dim

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone(x)
        return feats, self.projector(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def build_model(config: ModelConfig) -> Encoder:
    return Encoder(config)
