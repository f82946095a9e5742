"""The rectified MLP projector: Linear-BN-ReLU blocks, a final Linear, then (for the rectified methods) ReLU.

Without `batch_norm` the hidden blocks are Linear(with bias)-ReLU: the SimCLR/NCL reference projector.
"""

from __future__ import annotations

from torch import nn


def build_projector(in_dim: int, dims: list[int], rectify: bool, batch_norm: bool = True) -> nn.Sequential:
    """The final ReLU is the whole point of the method: it produces exact zeros, which is what makes codes sparse."""
    layers: list[nn.Module] = []
    prev = in_dim
    for width in dims[:-1]:
        if batch_norm:
            layers += [nn.Linear(prev, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        else:
            layers += [nn.Linear(prev, width), nn.ReLU(inplace=True)]
        prev = width
    layers.append(nn.Linear(prev, dims[-1]))
    if rectify:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)
