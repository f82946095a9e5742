"""Method name -> loss module, for the method names of models.config.METHODS.

The sparse baselines need no loss of their own: NVICReg-ReLU is VICReg and NCL-ReLU is SimCLR's NT-Xent
applied to ReLU-rectified projector outputs; the ablation cells are Rectified LpJEPA with a GN or RGN target.
Which methods expect rectified features is listed in RELU_FEATURE_METHODS so the trainer can set the
projector.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pretrain.losses.lejepa import LeJEPALoss
from pretrain.losses.ntxent import NTXentLoss
from pretrain.losses.rectified_lpjepa import RectifiedLpJEPALoss
from pretrain.losses.vicreg import VICRegLoss

# method -> (loss class, fixed keyword arguments)
_METHODS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "rectified_lpjepa": (RectifiedLpJEPALoss, {"rectified_target": True}),
    "ablation_gn_raw": (RectifiedLpJEPALoss, {"rectified_target": False}),
    "ablation_gn_relu": (RectifiedLpJEPALoss, {"rectified_target": False}),
    "ablation_rgn_raw": (RectifiedLpJEPALoss, {"rectified_target": True}),
    "lejepa": (LeJEPALoss, {}),
    "vicreg": (VICRegLoss, {}),
    "nvicreg_relu": (VICRegLoss, {}),
    "simclr": (NTXentLoss, {}),
    "ncl_relu": (NTXentLoss, {}),
}

LOSS_METHODS = tuple(_METHODS)
RELU_FEATURE_METHODS = frozenset({"rectified_lpjepa", "ablation_gn_relu", "nvicreg_relu", "ncl_relu"})


def build_loss(method: str, **kwargs: Any) -> nn.Module:
    """Instantiate the loss for ``method``; ``kwargs`` go to its constructor (e.g. p, mu, sigma, w_rdm)."""
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(LOSS_METHODS)}")
    cls, fixed = _METHODS[method]
    clash = sorted(set(fixed) & set(kwargs))
    if clash:
        raise ValueError(f"method {method!r} fixes {', '.join(clash)}; do not pass it")
    return cls(**fixed, **kwargs)
