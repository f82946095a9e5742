"""Self-supervised losses: Rectified LpJEPA (RDMReg + invariance) and the LeJEPA, VICReg and SimCLR baselines.

All losses compute in fp32 under autocast and gather embeddings across DDP ranks themselves; the composite
losses take two views and return (total, parts) where parts holds detached floats for logging.
"""

from pretrain.losses.factory import LOSS_METHODS, build_loss
from pretrain.losses.lejepa import LeJEPALoss
from pretrain.losses.ntxent import NTXentLoss
from pretrain.losses.rdmreg import RDMReg, eigen_directions, sliced_wasserstein2
from pretrain.losses.rectified_lpjepa import RectifiedLpJEPALoss
from pretrain.losses.sigreg import SIGReg, epps_pulley, epps_pulley_quadrature
from pretrain.losses.vicreg import VICRegLoss

__all__ = [
    "LOSS_METHODS",
    "LeJEPALoss",
    "NTXentLoss",
    "RDMReg",
    "RectifiedLpJEPALoss",
    "SIGReg",
    "VICRegLoss",
    "build_loss",
    "eigen_directions",
    "epps_pulley",
    "epps_pulley_quadrature",
    "sliced_wasserstein2",
]
