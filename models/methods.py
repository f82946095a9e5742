"""The method registry (solo-learn's `METHODS`): every training method's facts, declared once.

A method here is a loss over projector features plus the law it matches them to. Everything else asks this
table instead of keeping its own set of names: the trainer (which loss, rectified features or not, the reference
projector of a baseline, the default dead-dimension fix), evaluation and export (whether the target's activation
rate describes the served embedding: `models.rgg.Target.embedding_l0`). It lives in models/, below pretrain,
because a checkpoint's reader (export, serve) must understand a method without importing the trainer; the loss
classes themselves stay in pretrain.losses, keyed by `MethodSpec.loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The law the loss matches the features to: RGN_p(mu, sigma) = ReLU(GN_p), GN_p itself (the ablation's
# support mismatch), LeJEPA's isotropic Gaussian (SIGReg), or none (VICReg's and SimCLR's moment/contrastive terms).
TargetKind = Literal["rgn", "gn", "gaussian", "none"]
TARGET_KINDS: tuple[str, ...] = ("rgn", "gn", "gaussian", "none")
# What the loss sees of the projector output: raw, ReLU, or RepReLU (NCL: ReLU's value, GELU's gradient).
Features = Literal["raw", "relu", "rep_relu"]


@dataclass(frozen=True)
class MethodSpec:
    """One method: its loss (a module of pretrain.losses), its features, its target and its training defaults."""

    loss: Literal["rectified_lpjepa", "lejepa", "vicreg", "ntxent"]
    features: Features
    target: TargetKind
    # The baseline's own projector in the reference (solo-learn configs): (widths, BatchNorm in the hidden
    # layers); None = `model.projector_dims` (the rectified MLP, with BN).
    projector: tuple[tuple[int, ...], bool] | None = None
    # `method.dead_dim_fix: null` means this (see pretrain/methods.py).
    dead_dim_fix: str = "none"

    @property
    def rectified(self) -> bool:
        """Whether the features (and hence the exported model's output) go through the final ReLU."""
        return self.features != "raw"

    @property
    def sliced(self) -> bool:
        """Whether the loss is the sliced-W2 RDMReg (the Rectified LpJEPA family and its ablation cells)."""
        return self.loss == "rectified_lpjepa"


_VICREG_PROJECTOR = ((2048, 2048, 2048), True)
_SIMCLR_PROJECTOR = ((2048, 256), False)  # Linear-ReLU-Linear 2048 -> 256 without BN

METHODS: dict[str, MethodSpec] = {
    "rectified_lpjepa": MethodSpec("rectified_lpjepa", "relu", "rgn", dead_dim_fix="preact_upper"),
    "lejepa": MethodSpec("lejepa", "raw", "gaussian"),
    "vicreg": MethodSpec("vicreg", "raw", "none", _VICREG_PROJECTOR),
    "simclr": MethodSpec("ntxent", "raw", "none", _SIMCLR_PROJECTOR),
    "nvicreg_relu": MethodSpec("vicreg", "relu", "none", _VICREG_PROJECTOR),
    "ncl_relu": MethodSpec("ntxent", "rep_relu", "none", _SIMCLR_PROJECTOR),
    "ablation_gn_raw": MethodSpec("rectified_lpjepa", "raw", "gn"),
    "ablation_gn_relu": MethodSpec("rectified_lpjepa", "relu", "gn"),
    "ablation_rgn_raw": MethodSpec("rectified_lpjepa", "raw", "rgn"),
}


def method_spec(name: str) -> MethodSpec:
    """The registry entry, or a ValueError naming the known methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
