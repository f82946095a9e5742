"""Random streams that are identical on every rank, and random unit directions drawn from them.

The sliced losses (RDMReg, SIGReg) draw fresh directions and target samples every step. Under DDP every rank
evaluates the loss on the same gathered batch; if the ranks drew different directions they would optimise
different objectives and DDP's gradient average would no longer be the gradient of any single loss.
Broadcasting K x D directions every step would cost bandwidth, so instead each loss owns a generator whose
seed is broadcast from rank 0 once; the ranks then consume the streams in lock-step because they make the
same calls with the same shapes.
"""

from __future__ import annotations

import torch

from pretrain.distributed import broadcast_seed


class SharedGenerator:
    """Lazily created per-device torch.Generator whose seed is the same on all ranks.

    A user-supplied generator is used as is (on whatever device it lives); under DDP the caller must seed it
    identically on every rank. Without one, the seed is ``seed`` or, when that is None, a draw from torch's
    global RNG (so ``torch.manual_seed`` makes runs reproducible) broadcast from rank 0.
    """

    def __init__(self, generator: torch.Generator | None = None, seed: int | None = None) -> None:
        self._user = generator
        self._seed = seed
        self._per_device: dict[str, torch.Generator] = {}

    def get(self, device: torch.device) -> torch.Generator:
        if self._user is not None:
            return self._user
        key = str(torch.device(device))
        if key not in self._per_device:
            if self._seed is None:
                self._seed = int(torch.randint(0, 2**62, (1,)).item())
            self._seed = broadcast_seed(self._seed)
            gen = torch.Generator(device=torch.device(device))
            gen.manual_seed(self._seed)
            self._per_device[key] = gen
        return self._per_device[key]


def random_unit_directions(num: int, dim: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """``num`` x ``dim`` rows uniform on the unit sphere (normalised standard normals), fp32."""
    c = torch.randn(num, dim, generator=generator, device=generator.device, dtype=torch.float32)
    c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return c.to(device)
