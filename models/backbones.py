"""torchvision backbones, configurable down to sizes a laptop CPU trains, returning pooled feature vectors."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

_RESNET_LAYERS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class ResNetTrunk(nn.Module):
    """A torchvision ResNet built from its own blocks, with a width multiplier and a small-image stem.

    torchvision's ResNet class fixes the widths at 64..512; a quarter-width ResNet-18 trains about 10x faster on a
    CPU, which is what makes the laptop recipes possible. The small stem (3x3 stride 1, no max-pool) keeps
    spatial resolution for 28-32 px inputs, as in the CIFAR recipes.
    """

    def __init__(self, arch: str, in_channels: int, width: float = 1.0, small_stem: bool = False) -> None:
        super().__init__()
        block, layers = _RESNET_LAYERS[arch]
        widths = [max(8, int(round(w * width))) for w in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        if small_stem:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], layers[0], 1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = widths[3] * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class ViTTrunk(nn.Module):
    """torchvision's VisionTransformer with its class-token output as the feature and any number of channels."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        patch_size: int = 4,
        num_layers: int = 6,
        num_heads: int = 4,
        hidden_dim: int = 192,
        mlp_dim: int = 384,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"ViT image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.vit = VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim)
        self.vit.conv_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.vit.heads = nn.Identity()
        self.out_dim = hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)


class ConvNeXtTrunk(nn.Module):
    """torchvision's ConvNeXt with configurable widths/depths; a stride-2 stem keeps 28-32 px inputs viable."""

    def __init__(
        self,
        in_channels: int,
        dims: tuple[int, ...] = (32, 64, 128, 256),
        depths: tuple[int, ...] = (2, 2, 2, 2),
        stem_stride: int = 4,
        stochastic_depth_prob: float = 0.0,
    ) -> None:
        super().__init__()
        if len(dims) != len(depths):
            raise ValueError("convnext dims and depths need the same length")
        setting = [
            CNBlockConfig(d, dims[i + 1] if i + 1 < len(dims) else None, n)
            for i, (d, n) in enumerate(zip(dims, depths, strict=True))
        ]
        net = ConvNeXt(setting, stochastic_depth_prob=stochastic_depth_prob)
        stem = net.features[0]
        stem[0] = nn.Conv2d(in_channels, dims[0], kernel_size=stem_stride, stride=stem_stride)
        net.classifier[2] = nn.Identity()
        self.net = net
        self.out_dim = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_backbone(name: str, in_channels: int, image_size: int, **kwargs: Any) -> nn.Module:
    """Build a trunk that maps (B, C, H, W) images to (B, out_dim) features; `out_dim` is an attribute."""
    if name in _RESNET_LAYERS:
        width, small_stem = float(kwargs.pop("width", 1.0)), bool(kwargs.pop("small_stem", image_size <= 64))
        return ResNetTrunk(name, in_channels, width=width, small_stem=small_stem, **kwargs)
    if name == "vit":
        return ViTTrunk(in_channels, image_size, **kwargs)
    if name == "convnext":
        for key in ("dims", "depths"):
            if key in kwargs:
                kwargs[key] = tuple(int(v) for v in kwargs[key])
        return ConvNeXtTrunk(in_channels, **kwargs)
    raise ValueError(f"unknown backbone {name!r}")
