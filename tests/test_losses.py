"""Single-process tests of pretrain.losses against independent numpy/scipy references and known properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from pretrain.losses import (
    LOSS_METHODS,
    LeJEPALoss,
    NTXentLoss,
    RDMReg,
    RectifiedLpJEPALoss,
    SIGReg,
    VICRegLoss,
    build_loss,
    eigen_directions,
    epps_pulley,
    epps_pulley_quadrature,
    sliced_wasserstein2,
)

SIGMA_GN_P1 = 1.0 / math.sqrt(2.0)


def gennorm(p: float, mu: float, sigma: float):
    """The method's GN_p(mu, sigma) as scipy's gennorm: the independent reference for the target law."""
    return stats.gennorm(beta=p, loc=mu, scale=sigma * p ** (1.0 / p))


def scipy_rgn(shape: tuple[int, int], p: float, mu: float, sigma: float, seed: int) -> torch.Tensor:
    x = gennorm(p, mu, sigma).rvs(size=shape, random_state=np.random.default_rng(seed))
    return torch.from_numpy(np.maximum(x, 0.0)).float()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- RDMReg


def test_sliced_w2_matches_numpy_loop():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 5)), rng.laplace(size=(50, 5))
    c = rng.normal(size=(7, 5))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    ref = np.mean([np.mean((np.sort(x @ ck) - np.sort(y @ ck)) ** 2) for ck in c])
    got = sliced_wasserstein2(*(torch.from_numpy(a) for a in (x, y, c)))
    assert got.item() == pytest.approx(ref, rel=1e-10)


def test_sliced_w2_of_a_shift_is_the_projected_shift_squared():
    x = torch.randn(64, 6, generator=gen(0), dtype=torch.float64)
    a = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.3, -0.7], dtype=torch.float64)
    c = torch.randn(20, 6, generator=gen(1), dtype=torch.float64)
    c = c / c.norm(dim=1, keepdim=True)
    assert sliced_wasserstein2(x, x + a, c).item() == pytest.approx(((c @ a) ** 2).mean().item(), rel=1e-9)


def test_rdmreg_small_for_target_samples_large_for_mismatched_laws():
    loss = RDMReg(512, p=1.0, mu=-0.5, sigma=SIGMA_GN_P1, generator=gen(0))
    same = loss(scipy_rgn((512, 32), 1.0, -0.5, SIGMA_GN_P1, seed=1)).item()
    dense = loss(torch.randn(512, 32, generator=gen(2))).item()
    wrong_mu = loss(scipy_rgn((512, 32), 1.0, 0.5, SIGMA_GN_P1, seed=3)).item()
    assert same < 0.02
    assert dense > 10 * same and wrong_mu > 10 * same


@pytest.mark.parametrize(
    ("relu", "mu", "projection"),
    [(True, -0.5, "random"), (True, -1.0, "eigen"), (False, 0.25, "eigen")],
    ids=["rgn-relu-random", "rgn-relu-eigen", "gn-raw-eigen"],
)
def test_adam_on_rdmreg_moves_activation_rate_to_target(relu, mu, projection):
    """A free 512 x 4 tensor reaches the analytic rate P(X > 0) of the target (scipy gennorm).

    D = 4 keeps the test fast: in high D every random 1-D slice of the code is close to Gaussian (CLT), so the
    marginal shape, and with it the exact-zero rate, is pinned only after many more steps.
    """
    torch.manual_seed(1)
    start = torch.randn(512, 4) + (1.0 if relu else 0.0)  # ReLU case starts denser than every target
    w = start.clone().requires_grad_(True)
    loss = RDMReg(32, p=1.0, mu=mu, sigma=SIGMA_GN_P1, rectified_target=relu, projection=projection, generator=gen(1))
    opt = torch.optim.Adam([w], lr=0.05)
    steps = 300
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        z = torch.relu(w) if relu else w
        value = loss(z)
        opt.zero_grad()
        value.backward()
        opt.step()
        sched.step()
    expected = gennorm(1.0, mu, SIGMA_GN_P1).sf(0.0)
    assert abs((start > 0).float().mean().item() - expected) > 0.1  # the test starts far from the answer
    assert (w > 0).float().mean().item() == pytest.approx(expected, abs=0.03)
    assert torch.isfinite(value)


def test_eigen_directions_are_bottom_singular_vectors_then_unit_random():
    z = torch.randn(400, 6, generator=gen(0)) * torch.tensor([3.0, 0.2, 1.0, 0.5, 2.0, 0.1])
    c = eigen_directions(z, 10, gen(1))
    assert c.shape == (10, 6)
    cov = np.cov(z.numpy().astype(np.float64), rowvar=False)
    vals, vecs = np.linalg.eigh(cov)
    for k in range(3):  # bottom half = 3 eigenvectors (N > D: the row space is all of R^D), descending, up to sign
        assert abs(float(np.dot(c[k].numpy(), vecs[:, 2 - k]))) == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(c.norm(dim=1).numpy(), 1.0, atol=1e-5)
    assert c[3:].abs().sum() > 0
    assert vals[0] < vals[3]


def test_eigen_directions_lie_in_the_batch_row_space_when_the_batch_is_small():
    """N = 8 <= D/2 = 16: the bottom eigenvectors of Cov(z) would be null-space directions (every sample
    projects to the same value); the SVD directions are numpy's bottom-half right singular vectors instead."""
    z = torch.randn(8, 32, generator=gen(3)) * torch.linspace(0.2, 3.0, 32)
    c = eigen_directions(z, 20, gen(4))
    zc = z.double().numpy() - z.double().numpy().mean(0)
    _, svals, vt = np.linalg.svd(zc, full_matrices=False)
    k = min(z.shape)
    bottom = vt[k // 2 : -1]  # bottom half of 8 without the last: the centring made its singular value 0
    assert svals[-1] < 1e-8 * svals[0] and len(bottom) == 3
    assert c.shape == (20, 32)
    for row, ref in zip(c[: len(bottom)].double().numpy(), bottom, strict=True):
        assert abs(float(row @ ref)) == pytest.approx(1.0, abs=1e-4)
    assert abs(float(c[3].double().numpy() @ vt[-1])) < 0.9  # the null direction was replaced by a random one
    proj = zc @ c[: len(bottom)].double().numpy().T  # inside the row space the samples are spread out
    assert (proj.std(axis=0) > 1e-3).all()
    cov_vecs = np.linalg.eigh(np.cov(zc, rowvar=False))[1][:, :4]  # what the old eigen variant took
    assert np.allclose(zc @ cov_vecs, 0.0, atol=1e-4)  # ... and there every sample projects to the same value


def test_rectified_loss_shares_the_random_directions_between_views():
    """The value equals the reference's formula with ONE set of directions for both views: rebuild it from a
    twin generator in the loss's draw order (directions, then view 1's target, then view 2's)."""
    from models import rgg

    z1 = torch.relu(torch.randn(64, 8, generator=gen(0)))
    z2 = torch.relu(torch.randn(64, 8, generator=gen(1)))
    loss = RectifiedLpJEPALoss(w_inv=0.0, w_rdm=1.0, num_projections=32, mu=-0.5, generator=gen(5))
    total, _ = loss(z1, z2)
    twin = gen(5)
    c = torch.randn(32, 8, generator=twin)
    c = (c / c.norm(dim=1, keepdim=True)).numpy().astype(np.float64)
    ys = [rgg.sample_rgn((64, 8), 1.0, -0.5, SIGMA_GN_P1, generator=twin).double().numpy() for _ in range(2)]

    def sw(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean((np.sort(x @ c.T, axis=0) - np.sort(y @ c.T, axis=0)) ** 2))

    expected = 0.5 * (sw(z1.double().numpy(), ys[0]) + sw(z2.double().numpy(), ys[1]))
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_eigen_rdmreg_is_finite_and_differentiable():
    z = torch.relu(torch.randn(128, 16, generator=gen(0))).requires_grad_(True)
    value = RDMReg(64, projection="eigen", generator=gen(1))(z)
    value.backward()
    assert torch.isfinite(value) and value.item() > 0
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    collapsed = torch.zeros(64, 8, requires_grad=True)  # degenerate covariance must not break eigh
    assert torch.isfinite(RDMReg(16, projection="eigen", generator=gen(2))(collapsed))


def test_rdmreg_reproducible_with_generator_or_seed():
    z = torch.relu(torch.randn(64, 8, generator=gen(0)))
    a = [RDMReg(128, mu=-0.5, generator=gen(7))(z).item() for _ in range(2)]
    b = [RDMReg(128, mu=-0.5, seed=7)(z).item() for _ in range(2)]
    assert a[0] == a[1] and b[0] == b[1]
    assert RDMReg(128, mu=-0.5, generator=gen(8))(z).item() != a[0]
    loss = RDMReg(128, mu=-0.5, seed=7)
    assert loss(z).item() != loss(z).item()  # fresh directions and targets on every call


def test_rdmreg_targets_rgn_or_gn():
    rgn = RDMReg(8, p=2.0, mu=-1.0, sigma=1.0, rectified_target=True, seed=0).sample_target((4000, 5), "cpu")
    gn = RDMReg(8, p=2.0, mu=-1.0, sigma=1.0, rectified_target=False, seed=0).sample_target((4000, 5), "cpu")
    assert rgn.min().item() == 0.0 and gn.min().item() < -1.0
    assert (rgn > 0).float().mean().item() == pytest.approx(stats.norm.sf(1.0), abs=0.02)


def test_losses_compute_fp32_under_bf16_autocast():
    z1 = torch.relu(torch.randn(64, 16, generator=gen(0)))
    z2 = torch.relu(z1 + 0.1 * torch.randn(64, 16, generator=gen(1)))
    makers = {
        "rdmreg": lambda: RectifiedLpJEPALoss(num_projections=64, seed=3),
        "lejepa": lambda: LeJEPALoss(num_projections=64, seed=3),
        "vicreg": VICRegLoss,
        "ntxent": NTXentLoss,
    }
    for name, make in makers.items():
        ref, _ = make()(z1.bfloat16().float(), z2.bfloat16().float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w = torch.nn.Linear(16, 16)
            assert w(z1).dtype == torch.bfloat16  # autocast is really active
            got, _ = make()(z1.bfloat16(), z2.bfloat16())
        assert got.dtype == torch.float32, name
        assert got.item() == pytest.approx(ref.item(), rel=1e-5), name


def test_rectified_lpjepa_total_is_weighted_sum_of_parts():
    z1 = torch.relu(torch.randn(32, 8, generator=gen(0)))
    z2 = torch.relu(torch.randn(32, 8, generator=gen(1)))
    total, parts = RectifiedLpJEPALoss(w_inv=25.0, w_rdm=125.0, num_projections=64, seed=5)(z1, z2)
    rdm = RDMReg(64, seed=5)
    c = rdm.directions(z1)  # one set for both views, drawn before the targets
    expected_rdm = 0.5 * (rdm(z1, directions=c) + rdm(z2, directions=c)).item()
    expected_inv = float(((z1 - z2) ** 2).mean())
    assert parts["rdmreg"] == pytest.approx(expected_rdm, rel=1e-6)
    assert parts["invariance"] == pytest.approx(expected_inv, rel=1e-6)
    assert total.item() == pytest.approx(25 * expected_inv + 125 * expected_rdm, rel=1e-6)
    assert all(isinstance(v, float) for v in parts.values())
    _, same = RectifiedLpJEPALoss(num_projections=16, seed=0)(z1, z1.clone())
    assert same["invariance"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"projection": "pca"}, "projection"),
        ({"num_projections": 0}, "num_projections"),
        ({"sigma": 0.0}, "sigma"),
        ({"p": -1.0}, "p must"),
        ({"mu": float("nan")}, "mu"),
    ],
)
def test_rdmreg_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RDMReg(**kwargs)


def test_losses_reject_bad_embeddings():
    with pytest.raises(ValueError, match="2-D"):
        RDMReg(8, seed=0)(torch.zeros(8))
    with pytest.raises(ValueError, match="at least 2"):
        RDMReg(8, seed=0)(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="one shape"):
        VICRegLoss()(torch.zeros(8, 4), torch.zeros(8, 5))
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="lambda"):
        LeJEPALoss(lam=1.5)


# ----------------------------------------------------------------------------------------------- SIGReg


def epps_pulley_quad(x: np.ndarray, t_max: float = 3.0) -> float:
    """N * integral over [-t_max, t_max] of |ECF - exp(-t^2/2)|^2 exp(-t^2/2), by adaptive quadrature."""

    def integrand(t: float) -> float:
        err = (np.cos(t * x).mean() - np.exp(-t * t / 2)) ** 2 + np.sin(t * x).mean() ** 2
        return err * np.exp(-t * t / 2)

    return len(x) * integrate.quad(integrand, -t_max, t_max, epsabs=1e-12, epsrel=1e-10, limit=200)[0]


@pytest.mark.parametrize(("knots", "rtol"), [(17, 2e-3), (1001, 1e-5)])
def test_epps_pulley_matches_scipy_quad(knots, rtol):
    rng = np.random.default_rng(0)
    for x in (rng.standard_t(5, size=300), rng.uniform(-1.7, 1.7, size=300), rng.normal(0.3, 1.0, size=300)):
        t, w, phi = epps_pulley_quadrature(knots)
        got = epps_pulley(torch.from_numpy(x).float()[:, None], t, w, phi).item()
        assert got == pytest.approx(epps_pulley_quad(x), rel=rtol)


def test_sigreg_small_for_standard_normal_large_for_uniform_and_shifted():
    sig = SIGReg(256, generator=gen(0))
    g = gen(1)
    normal = torch.randn(2048, 2, generator=g)
    uniform = (torch.rand(2048, 2, generator=g) * 2 - 1) * math.sqrt(3.0)  # same variance, wrong shape
    values = {name: sig(x).item() for name, x in [("normal", normal), ("uniform", uniform), ("shift", normal + 0.5)]}
    assert values["normal"] < 3.0
    assert values["uniform"] > 3 * values["normal"] + 5
    assert values["shift"] > 30 * values["normal"]


def test_sigreg_averages_views_with_shared_directions():
    z = torch.randn(2, 128, 8, generator=gen(0))
    both = SIGReg(32, seed=4)(z).item()
    first, second = SIGReg(32, seed=4), SIGReg(32, seed=4)
    assert both == pytest.approx(0.5 * (first(z[0]).item() + second(z[1]).item()), rel=1e-6)


def test_lejepa_loss_matches_manual_formula():
    z1, z2, z3 = (torch.randn(64, 8, generator=gen(s)) for s in range(3))
    total, parts = LeJEPALoss(lam=0.05, num_projections=64, seed=9)(z1, z2, z3)
    stacked = torch.stack([z1, z2, z3])
    inv = ((stacked.mean(0) - stacked) ** 2).mean().item()
    sig = SIGReg(64, seed=9)(stacked).item()
    assert parts["invariance"] == pytest.approx(inv, rel=1e-6)
    assert parts["sigreg"] == pytest.approx(sig, rel=1e-6)
    assert total.item() == pytest.approx(0.95 * inv + 0.05 * sig, rel=1e-6)
    _, same = LeJEPALoss(num_projections=8, seed=0)(z1, z1.clone())
    assert same["invariance"] == 0.0


# ----------------------------------------------------------------------------------------------- VICReg, NT-Xent


def vicreg_numpy(x: np.ndarray, y: np.ndarray, eps: float = 1e-4) -> tuple[float, float, float]:
    inv = float(np.mean((x - y) ** 2))
    n, d = x.shape
    var = 0.0
    cov = 0.0
    for z in (x, y):
        var += 0.5 * float(np.mean(np.maximum(0.0, 1.0 - np.sqrt(z.var(axis=0, ddof=1) + eps))))
        c = np.cov(z, rowvar=False)
        cov += float((c**2).sum() - (np.diag(c) ** 2).sum()) / d
    return inv, var, cov


def test_vicreg_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 6)) * np.array([0.3, 2.0, 1.0, 0.1, 0.8, 1.5])
    y = x + 0.5 * rng.normal(size=(20, 6))
    total, parts = VICRegLoss()(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    inv, var, cov = vicreg_numpy(x, y)
    assert parts["invariance"] == pytest.approx(inv, rel=1e-5)
    assert parts["variance"] == pytest.approx(var, rel=1e-5)
    assert parts["covariance"] == pytest.approx(cov, rel=1e-5)
    assert total.item() == pytest.approx(25 * inv + 25 * var + cov, rel=1e-5)


def test_vicreg_properties():
    x = torch.randn(256, 4, generator=gen(0), dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))  # orthonormal, zero-mean columns: exactly uncorrelated
    z = (q * 3.0 * math.sqrt(255)).float()  # per-dimension std 3 > 1
    _, parts = VICRegLoss()(z, z.clone())
    assert parts["invariance"] == 0.0 and parts["variance"] == 0.0
    assert parts["covariance"] < 1e-8
    _, correlated = VICRegLoss()(z, z.clone() + z[:, :1])  # adds a shared component to view 2
    assert correlated["covariance"] > 1.0
    _, collapsed = VICRegLoss()(torch.zeros(16, 4), torch.zeros(16, 4))
    assert collapsed["variance"] == pytest.approx(1.0 - math.sqrt(1e-4), rel=1e-6)


def nt_xent_loop(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / denom)
    return total / n2


@pytest.mark.parametrize("tau", [0.1, 0.2, 1.0])
def test_nt_xent_matches_loop(tau):
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    total, parts = NTXentLoss(temperature=tau)(torch.from_numpy(z1).float(), torch.from_numpy(z2).float())
    assert total.item() == pytest.approx(nt_xent_loop(z1, z2, tau), rel=1e-5)
    assert parts["ntxent"] == pytest.approx(total.item())


def test_nt_xent_prefers_aligned_views():
    z = torch.eye(8)  # orthogonal samples: identical views are the best case
    aligned, _ = NTXentLoss(0.1)(z, z.clone())
    swapped, _ = NTXentLoss(0.1)(z, z.roll(1, dims=0))
    assert aligned.item() < 0.01 < swapped.item()


def test_build_loss_covers_model_methods():
    from models.config import METHODS

    assert set(LOSS_METHODS) == set(METHODS)
    assert isinstance(build_loss("ncl_relu", temperature=0.1), NTXentLoss)
    assert build_loss("ablation_gn_relu", num_projections=8).rdm.rectified_target is False
    assert build_loss("rectified_lpjepa", num_projections=8).rdm.rectified_target is True
    with pytest.raises(ValueError, match="unknown method"):
        build_loss("byol")
    with pytest.raises(ValueError, match="fixes rectified_target"):
        build_loss("rectified_lpjepa", rectified_target=False)
