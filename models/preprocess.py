"""The evaluation transform: the one input contract shared by training's evaluation and the ONNX runtime, which
re-implements it bit for bit on PIL images (export.preprocess says how)."""

from __future__ import annotations

from torchvision.transforms import v2

from models.config import ModelConfig


def pil_mode(in_channels: int) -> str:
    return "L" if in_channels == 1 else "RGB"


def eval_transform(config: ModelConfig) -> v2.Compose:
    import torch

    mode = pil_mode(config.in_channels)
    return v2.Compose(
        [
            v2.Lambda(lambda img: img.convert(mode) if img.mode != mode else img),
            v2.Resize(config.image_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(config.image_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(config.mean), std=list(config.std)),
        ]
    )
