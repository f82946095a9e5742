"""Input checks and logged parts shared by the losses: a wrong call should fail with a message, not broadcast
silently."""

from __future__ import annotations

import torch


def check_embeddings(name: str, *views: torch.Tensor) -> None:
    """Fail early and clearly on shapes the losses cannot use (a wrong call could broadcast silently)."""
    if not views:
        raise ValueError(f"{name}: needs at least one embedding tensor")
    first = views[0]
    for v in views:
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name}: embeddings must be torch.Tensor, got {type(v).__name__}")
        if v.dim() != 2:
            raise ValueError(f"{name}: embeddings must be 2-D (batch x dim), got shape {tuple(v.shape)}")
        if v.shape != first.shape:
            raise ValueError(f"{name}: all views must share one shape, got {tuple(first.shape)} and {tuple(v.shape)}")
    if first.shape[0] < 2:
        raise ValueError(f"{name}: a distribution loss needs a batch of at least 2, got {first.shape[0]}")
    if first.shape[1] < 1:
        raise ValueError(f"{name}: embedding dimension must be positive")


def logged(**terms: torch.Tensor) -> dict[str, float]:
    """The parts a loss returns beside its total: each term as a detached float, for the metrics log."""
    return {key: float(value.detach()) for key, value in terms.items()}
