"""RDMReg: sliced 2-Wasserstein distance between the embedding batch and samples of the (rectified) GN target.

Matching every 1-D projection of the feature law to the same projection of RGN_p(mu, sigma)^D pulls the joint
law towards the product target (Cramer-Wold), which is what gives Rectified LpJEPA its controlled sparsity and
near-independent coordinates. Sorting gives the exact 1-D optimal coupling, so no density estimate is needed.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from pretrain.distributed import broadcast_, gather_with_grad
from pretrain.losses.precision import fp32_region
from pretrain.losses.randomness import SharedGenerator, random_unit_directions
from pretrain.losses.validation import check_embeddings

PROJECTIONS = ("random", "eigen")


def sliced_wasserstein2(x: torch.Tensor, y: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """mean over directions and quantiles of (sorted x.c - sorted y.c)^2: the two-sample sliced W2^2.

    ``x`` and ``y`` are n x D with the same n (equal sample sizes make the sorted pairing the optimal
    coupling); ``directions`` is K x D.
    """
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein2: x and y must have one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    # K x n layout: each direction's projections are contiguous, so the sort runs along the last dimension
    # (several times faster than a strided sort along dim 0 on CPU at K = 8192).
    px = torch.sort(directions @ x.T, dim=1).values
    py = torch.sort(directions @ y.T, dim=1).values
    return (px - py).square().mean()


@torch.no_grad()
def eigen_directions(z: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """The bottom half of the right singular vectors of the centred batch, topped up with random unit vectors.

    Low-variance directions are where a collapsing or correlated code differs most from the isotropic product
    target, so slicing along them removes second-order dependence faster than random slices alone. They are
    taken from the SVD of the centred n x D batch, i.e. inside its row space (as the reference's
    "torch_svd_bottom_half_eigen_and_random"): of the min(n, D) singular vectors, the bottom half. The
    eigenvectors of Cov(z) with the smallest eigenvalues are NOT the same when n <= D/2: they are then null-space
    directions along which every sample projects to the same value, which adds nothing but rank noise.
    The SVD runs in fp32 without autograd (the directions are constants of the step) and is broadcast from
    rank 0 because it is not guaranteed bitwise-identical across devices.
    """
    rows = _bottom_singular(z, num)
    return torch.cat([rows, random_unit_directions(num - rows.shape[0], z.shape[1], generator, z.device)], dim=0)


def _bottom_singular(z: torch.Tensor, num: int) -> torch.Tensor:
    n, d = z.shape
    zf = z.detach().float()
    zc = zf - zf.mean(dim=0, keepdim=True)
    k = min(n, d)
    try:
        _, svals, vt = torch.linalg.svd(zc, full_matrices=False)  # k x D, descending singular values
    except torch.linalg.LinAlgError:
        warnings.warn("RDMReg(eigen): the SVD did not converge; using random directions this step", stacklevel=3)
        return torch.empty(0, d, device=z.device)
    # Singular values ~0 (the centring removes one; a collapsed batch more) leave the row space: every sample
    # projects alike there, so those vectors are dropped and random ones take their place.
    rows = vt[k // 2 :][svals[k // 2 :] > 1e-6 * svals[0].clamp_min(1e-30)]
    rows = rows[-num:].contiguous()  # never more than num directions
    broadcast_(rows)
    return rows


class RDMReg(nn.Module):
    """Rectified Distribution Matching regulariser for ONE view; average the two views' values yourself.

    Each call draws K fresh directions and a fresh target sample Y (same shape as the GLOBAL batch) from the
    loss's own rank-synchronised generator, and returns sliced W2^2(Z, Y) as an fp32 scalar.

    Args:
        num_projections: K, directions per call (reference 8192; 512 is enough at small scale).
        p, mu, sigma: the target GN_p(mu, sigma) before rectification.
        rectified_target: True -> RGN (ReLU of GN samples); False -> plain GN (the ablation cells).
        projection: "random" (unit Gaussian directions) or "eigen" (the bottom half of the batch's right
            singular vectors, filled up with random ones).
        generator, seed: the loss's random stream (pretrain.losses.randomness.SharedGenerator).
    """

    def __init__(
        self,
        num_projections: int = 8192,
        p: float = 1.0,
        mu: float = 0.0,
        sigma: float = 1.0 / math.sqrt(2.0),
        rectified_target: bool = True,
        projection: str = "random",
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if int(num_projections) < 1:
            raise ValueError(f"RDMReg: num_projections must be >= 1, got {num_projections}")
        if not (math.isfinite(p) and p > 0):
            raise ValueError(f"RDMReg: p must be a positive number, got {p}")
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"RDMReg: sigma must be a positive number, got {sigma}")
        if not math.isfinite(mu):
            raise ValueError(f"RDMReg: mu must be finite, got {mu}")
        if projection not in PROJECTIONS:
            raise ValueError(f"RDMReg: projection must be one of {PROJECTIONS}, got {projection!r}")
        self.num_projections = int(num_projections)
        self.p, self.mu, self.sigma = float(p), float(mu), float(sigma)
        self.rectified_target = bool(rectified_target)
        self.projection = projection
        self._rng = SharedGenerator(generator, seed)

    def sample_target(self, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Fresh target draw Y from models.rgg (imported lazily so the losses import without the models)."""
        from models import rgg

        gen = self._rng.get(device)
        sampler = rgg.sample_rgn if self.rectified_target else rgg.sample_gn
        y = sampler(shape, self.p, self.mu, self.sigma, generator=gen, device=gen.device, dtype=torch.float32)
        return y.to(device=device, dtype=torch.float32)

    def directions(self, z: torch.Tensor) -> torch.Tensor:
        """K unit directions for one view (random ones are independent of ``z``)."""
        gen = self._rng.get(z.device)
        if self.projection == "eigen":
            return eigen_directions(z, self.num_projections, gen)
        return random_unit_directions(self.num_projections, z.shape[1], gen, z.device)

    def view_directions(self, zs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Directions for each view of one step, the random ones SHARED by the views (as in the reference):
        "random" gives every view the same K directions; "eigen" gives each view its own singular vectors
        (they are a property of that view's batch) completed by one shared random set."""
        gen = self._rng.get(zs[0].device)
        if self.projection == "random":
            c = random_unit_directions(self.num_projections, zs[0].shape[1], gen, zs[0].device)
            return [c] * len(zs)
        with torch.no_grad():
            rows = [_bottom_singular(z, self.num_projections) for z in zs]
        fill = random_unit_directions(self.num_projections - rows[0].shape[0], zs[0].shape[1], gen, zs[0].device)
        out = []
        for r in rows:
            extra = self.num_projections - r.shape[0] - fill.shape[0]
            parts = [r, fill] if extra <= 0 else [r, fill, random_unit_directions(extra, r.shape[1], gen, r.device)]
            out.append(torch.cat(parts, dim=0)[: self.num_projections])
        return out

    def forward(
        self, z: torch.Tensor, *, gathered: bool = False, directions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sliced W2^2 of the global batch of ``z`` vs a fresh target draw; ``gathered`` skips the gather;
        ``directions`` (K x D) are used instead of a fresh draw (the two views of a step share them)."""
        check_embeddings("RDMReg", z)
        zg = z if gathered else gather_with_grad(z)
        with fp32_region(zg):
            zg = zg.float()
            c = self.directions(zg) if directions is None else directions
            y = self.sample_target(tuple(zg.shape), zg.device)
            return sliced_wasserstein2(zg, y, c)
