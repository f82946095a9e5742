"""Optimisers (LARS, AdamW, SGD) with the usual SSL exclusions, and the warmup + cosine learning-rate schedule.

The schedule is a pure function of the step, so resuming needs nothing but the step number, and an interrupted
run continues on exactly the curve it would have followed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from pretrain.config import OptimConfig


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as in solo-learn.

    Each parameter's update is scaled by the trust ratio eta * ||w|| / (||g|| + wd ||w||). With `clip_lr`
    (every reference config sets it) the per-layer step is min(trust, lr) instead of lr * trust: solo-learn
    multiplies the gradient by min(trust / lr, 1) and then steps by lr. Without the clip the step on a ResNet-18
    at initialisation is ~0.03x the reference's. Parameter groups with `lars_exclude=True` (biases and
    normalisation weights) get neither the trust ratio nor weight decay: scaling a BN gain by its own norm
    stalls it, and decaying it fights the normalisation.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.02,
        eps: float = 1e-8,
        clip_lr: bool = True,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"LARS: lr must be positive, got {lr}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps, clip_lr=bool(clip_lr))
        super().__init__(params, {**defaults, "lars_exclude": False})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    wd = group["weight_decay"]
                    if wd:
                        g = g.add(p, alpha=wd)
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(p.grad)
                    trust = group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    if group.get("clip_lr", False):
                        trust = torch.clamp(trust / group["lr"], max=1.0)
                    scale = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                    g = g * scale
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights of conv/linear layers decay; biases and normalisation parameters (ndim <= 1) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "lars":
        return LARS(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.eta, clip_lr=cfg.clip_lr
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


class WarmupCosine:
    """Linear warmup from ~0 to the base lr over `warmup` steps, then cosine to `min_ratio * lr` at `total`."""

    def __init__(self, base_lr: float, total: int, warmup: int, min_ratio: float = 0.0) -> None:
        if total < 1:
            raise ValueError(f"schedule needs at least one step, got {total}")
        self.base_lr, self.total, self.min_ratio = float(base_lr), int(total), float(min_ratio)
        self.warmup = int(min(max(warmup, 0), total - 1))

    @classmethod
    def from_config(cls, cfg: OptimConfig, total: int) -> WarmupCosine:
        warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(round(cfg.warmup_fraction * total))
        return cls(cfg.lr, total, warmup, cfg.min_lr_ratio)

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * ((step + 1) / (self.warmup + 1))
        progress = min(max(step - self.warmup, 0) / max(self.total - self.warmup, 1), 1.0)
        return self.base_lr * (self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))

    def apply(self, optimizer: Optimizer, step: int) -> float:
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
