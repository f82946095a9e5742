"""Method name -> loss module, for the methods of the registry (models.methods.METHODS).

The registry names each method's loss module; the sparse baselines need no loss of their own: NVICReg-ReLU is
VICReg and NCL-ReLU is SimCLR's NT-Xent applied to rectified projector outputs; the ablation cells are
Rectified LpJEPA with a GN or RGN target (the registry's target kind fixes `rectified_target`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from models.methods import METHODS, method_spec
from pretrain.losses.lejepa import LeJEPALoss
from pretrain.losses.ntxent import NTXentLoss
from pretrain.losses.rectified_lpjepa import RectifiedLpJEPALoss
from pretrain.losses.vicreg import VICRegLoss

LOSSES: dict[str, type[nn.Module]] = {
    "rectified_lpjepa": RectifiedLpJEPALoss,
    "lejepa": LeJEPALoss,
    "vicreg": VICRegLoss,
    "ntxent": NTXentLoss,
}
LOSS_METHODS = tuple(METHODS)


def build_loss(method: str, **kwargs: Any) -> nn.Module:
    """Instantiate the loss for ``method``; ``kwargs`` go to its constructor (e.g. p, mu, sigma, w_rdm)."""
    spec = method_spec(method)
    fixed = {"rectified_target": spec.target == "rgn"} if spec.sliced else {}
    clash = sorted(set(fixed) & set(kwargs))
    if clash:
        raise ValueError(f"method {method!r} fixes {', '.join(clash)}; do not pass it")
    return LOSSES[spec.loss](**fixed, **kwargs)
