"""Method wiring: which features the loss sees (rectified or raw), which loss, which target, and the fix for
dead dimensions.

Why dimensions die. The rectified projector ends in z = ReLU(h). A coordinate j whose pre-activation h_j is
negative for every sample of a batch outputs z_j = 0 for all of them; then the invariance term is zero for it,
and the sliced W2 gradient dL/dz_j, whatever it asks, is blocked by the ReLU (dz/dh = 0 for h <= 0). Nothing
can ever move h_j up again, so the coordinate is dead for good. With a sparse target (mu = -2: about 3% active)
a coordinate fires for only ~8 samples of 256, and the early transient of training (the regulariser pushing
activity down fast) switches many coordinates off entirely before they find their rate. The i.i.d. target
asks EVERY coordinate to fire at the same rate, so a dead coordinate is a failure to match the target law;
the dead ones also drag the measured l0 below the analytic rate.

The fix ("preact_upper", rectified_lpjepa's default; `method.dead_dim_fix`). Matching the product law includes
matching its 1-D marginals, the slices along the D coordinate axes. Along each axis the PRE-activation h_j is
matched to the quantiles of the un-rectified GN_p(mu, sigma) (weight `method.marginal_weight` of the RDMReg
term), and the projector's last bias starts at mu. A wrongly active sample is pushed toward its negative target
quantile with a force that does not vanish at 0+, an inactive one that should fire is pulled up, and the fixed
point is the GN law itself, so P(h_j > 0) is the designed rate even when a batch holds fewer than one expected
positive (why the bias start: `Objective.init_projector`). The default matches only the ranks from the median up
(from half the (1 - r) quantile's rank when r > 1/2, `upper_start`): the quantile that sets the rate stays
matched while the lower ranks, which the ReLU discards, are free as in the paper's objective. Measured at 600
steps (docs/results/pretrain.md) it holds the rate as the full-rank form "preact" (the previous default) does and
costs the encoder less at mu = -2 and -1. Training ends with the BatchNorm statistics re-estimated on clean
images (pretrain/bn_recalibration.py): the rate is the mass of a thin upper tail, which statistics gathered over
augmented views move. The forward pass is the exact ReLU, so exported codes stay exactly sparse.

Alternatives kept runnable for the ablation (measured in docs/results/pretrain.md): "preact" (all ranks),
"marginal" (the default before it, `marginal_w2`), "threshold", "threshold_sym" and "threshold_q"
(`threshold_marginal_w2`), "leaky" (a leaky backward for the final ReLU in every loss term), "quantile" and
"quantile_shift" (`pinball_rate`), an axis fix + a second term ("marginal+quantile"), and "none", the paper's
objective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models import rgg_law
from models.methods import METHODS
from models.rgg import Target
from pretrain.config import ConfigError, TrainConfig
from pretrain.distributed import gather_with_grad
from pretrain.losses import build_loss
from pretrain.losses.precision import fp32_region

MARGINAL_FIXES = frozenset({"marginal", "threshold", "threshold_sym", "threshold_q", "preact", "preact_upper"})
PREACT_FIXES = frozenset({"preact", "preact_upper"})
# Quantile (pinball) rate terms on the pre-activation: fixed point P(h_j > 0) = r for every dimension j.
RATE_FIXES = frozenset({"quantile", "quantile_shift"})
# Terms that may follow an axis fix after "+" (weight method.rate_weight): the rate terms and the pre-activation W2.
SECOND_TERMS = RATE_FIXES | {"preact"}


def rectifies(method: str) -> bool:
    """Whether the method's features (and hence the exported model's output) go through the final ReLU."""
    return METHODS[method].rectified


class _LeakyBackwardReLU(torch.autograd.Function):
    """Exact ReLU forward; backward passes `slope` times the gradient where the input was <= 0."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, slope: float) -> torch.Tensor:
        ctx.save_for_backward(h)
        ctx.slope = slope
        return F.relu(h)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (h,) = ctx.saved_tensors
        return torch.where(h > 0, grad, grad * ctx.slope), None


def leaky_backward_relu(h: torch.Tensor, slope: float) -> torch.Tensor:
    return _LeakyBackwardReLU.apply(h, slope)


def rep_relu(h: torch.Tensor) -> torch.Tensor:
    """RepReLU of NCL (the reference's `non_neg: rep_relu`): the value of ReLU(h), the gradient of GELU(h).

    GELU's derivative is non-zero for negative inputs, so a unit that is off still learns; the forward value
    (and hence every exported code) is the exact ReLU.
    """
    g = F.gelu(h)
    return g - g.detach() + F.relu(h).detach()


def pinball_rate(h: torch.Tensor, rate: float, shift_only: bool = False) -> torch.Tensor:
    """(1/D) sum_j mean_i rho_{1-r}(h_ij), rho_tau(u) = u (tau - 1[u < 0]): the quantile ("pinball") loss whose
    minimiser over a location puts 0 at the (1 - r) quantile of every column, i.e. P(h_j > 0) = r.

    Per column the gradient sums to (a_j - r), a_j its firing fraction: the push does not fade as h -> 0+ and
    needs no target positive in the batch, so a column firing too often is pushed down and one firing too rarely
    (a dead one included) pulled up. ``shift_only`` gives every sample of column j the column's mean gradient:
    the term then moves only each column's location (the last bias can absorb it) and leaves the shape to the
    sliced W2; the plain version also pulls every sample toward 0 from both sides.
    """
    if shift_only:
        m = h.mean(dim=0, keepdim=True)
        h = h.detach() + (m - m.detach())
    tau = 1.0 - rate
    return (h * (tau - (h < 0).to(h.dtype))).mean()


def marginal_w2(h: torch.Tensor, y: torch.Tensor, rectified: bool) -> torch.Tensor:
    """Straight-through variant ("marginal"): mean over coordinates and quantiles of
    (sorted ReLU(h_j) - sorted y_j)^2, samples ordered by h, gradient passed through the ReLU unchanged.

    A sample at zero whose target quantile is positive is pulled up, but nothing pushes inactive samples down
    and a wrongly active one is pushed with a force that vanishes as h -> 0+, which stalls l0 near 5% whatever
    mu asks. Without `rectified` this is the plain per-axis W2 of raw features.
    """
    hs = torch.sort(h, dim=0).values
    if rectified:
        hs = hs + (F.relu(hs) - hs).detach()
    ys = torch.sort(y, dim=0).values
    return (hs - ys).square().mean()


def threshold_marginal_w2(h: torch.Tensor, x: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """Per-axis matching of ReLU(h_j) to ReLU(x_j), x ~ GN_p(mu, sigma) the pre-rectification target, with the
    pre-activation standing in for the code wherever the two disagree about firing ("threshold*").

    Samples sorted by h are paired with the sorted GN draw. Where code and target agree on the sign the cost is
    the paper's rectified slice (ReLU(h) - ReLU(x))^2 (0 for two zeros: the negative side of h stays free);
    where they disagree it is (h - x)^2, the distance to the target quantile across the threshold. h <= 0 < x
    pulls a should-fire sample up (reviving a dead coordinate, where the plain ReLU passes no gradient); with
    ``symmetric``, x <= 0 < h also pushes a wrongly active sample below zero with a force that does not vanish
    as h -> 0+ (the rectified W2's 2h barely sees small positives, so l0 drifts above the target rate).
    """
    hs = torch.sort(h, dim=0).values
    xs = torch.sort(x, dim=0).values
    disagree = (hs > 0) != (xs > 0) if symmetric else (hs <= 0) & (xs > 0)
    diff = torch.where(disagree, hs - xs, F.relu(hs) - F.relu(xs))
    return diff.square().mean()


def preact_w2(h: torch.Tensor, x: torch.Tensor, start: float = 0.0) -> torch.Tensor:
    """Per-axis W2 between the PRE-activation h_j and x_j ~ GN_p(mu, sigma), the un-rectified target: mean over
    coordinates and ranks of (sorted h_j - sorted x_j)^2, on every sample, both sides of 0 ("preact").

    Its fixed point h_j ~ GN_p(mu, sigma) makes ReLU(h_j) exactly RGN-distributed, so the term agrees with the
    rectified target. The rectified W2 terms are blind to the negative side, so inactive samples pile up just
    below 0, where any drift of the weights flips a share of them back above 0 (the floor of issue 15); here
    the density just below 0 is asked to be the GN's. Needs the last bias to start near mu (`init_projector`).

    With ``start`` > 0 ("preact_upper", `upper_start`) only the ranks from floor(start * N) up are matched (mean
    over them): the lower ranks of every coordinate, which the ReLU discards, are left free as in the fix-off
    objective (the measured cost of the full term is the encoder's), while the (1 - r) quantile, hence the rate,
    stays inside the matched ranks.
    """
    hs = torch.sort(h, dim=0).values
    xs = torch.sort(x, dim=0).values
    if start > 0:
        first = int(start * hs.shape[0])
        hs, xs = hs[first:], xs[first:]
    return (hs - xs).square().mean()


def upper_start(rate: float) -> float:
    """Where "preact_upper" starts matching: the median, or half the (1 - r) quantile's rank when r > 1/2, so the
    quantile that sets the rate is always matched with room below it (at mu = 1, r = 0.88: from 6%, not 50%,
    which would leave the 12% quantile, and the rate, free)."""
    return min(0.5, (1.0 - rate) / 2.0)


class Objective(nn.Module):
    """Maps the projector pre-activations of all views to (loss, parts, codes) for the configured method."""

    def __init__(self, cfg: TrainConfig, sigma: float, embed_dim: int, generator: torch.Generator) -> None:
        super().__init__()
        m = cfg.method
        spec = METHODS[m.name]
        self.method, self.features = m.name, spec.features
        self.relu = spec.rectified
        # "axis+rate" combines an axis fix (marginal, threshold*) with a rate term (quantile, quantile_shift).
        self.fix, _, self.rate_fix = cfg.dead_dim_fix.partition("+")
        if self.fix in RATE_FIXES and not self.rate_fix:
            self.fix, self.rate_fix = "none", self.fix
        self.slope = float(m.leaky_slope)
        self.generator = generator
        self.target = self.final_target = Target(m.p, m.mu, sigma, spec.target)
        self.mu_warmup = float(m.mu_warmup)
        self._bias: torch.Tensor | None = None  # the projector's last bias, moved with the target (mu_warmup)
        self._mu_now: float | None = None
        if self.fix in MARGINAL_FIXES and not spec.sliced:
            raise ConfigError(f"method.dead_dim_fix: {self.fix!r} needs a sliced-W2 method, not {m.name!r}")
        if (self.fix.startswith("threshold") or PREACT_FIXES & {self.fix, self.rate_fix}) and not (
            self.relu and spec.target == "rgn"
        ):
            raise ConfigError(f"method.dead_dim_fix: {cfg.dead_dim_fix!r} needs rectified features and an RGN target")
        if self.fix == "leaky" and not self.relu:
            raise ConfigError(f"method.dead_dim_fix: 'leaky' needs rectified features; {m.name!r} has none")
        if self.rate_fix and (self.rate_fix not in SECOND_TERMS or self.fix not in MARGINAL_FIXES | {"none"}):
            raise ConfigError(f"method.dead_dim_fix: {cfg.dead_dim_fix!r} is not an axis fix + a rate term")
        if self.rate_fix and not spec.sliced:
            raise ConfigError(f"method.dead_dim_fix: {self.rate_fix!r} needs a target with a rate (a sliced-W2 method)")
        self.alpha = self.alpha0 = float(m.marginal_weight) if self.fix in MARGINAL_FIXES else 0.0
        self.anneal = float(m.marginal_anneal) if self.alpha0 > 0 else 0.0
        self.detach_axis = bool(m.marginal_detach) and self.alpha0 > 0
        self.w_rdm = float(m.w_rdm)
        self.rate_weight = float(m.rate_weight) if self.rate_fix else 0.0
        # The target's activation rate P(X > 0) = Phi(mu / sigma); the same for the GN and RGN cells.
        self.rate = self.target.expected_l0
        if spec.sliced:
            self.loss = build_loss(
                m.name,
                w_inv=m.w_inv,
                w_rdm=m.w_rdm * (1.0 - self.alpha),
                num_projections=m.num_projections,
                p=m.p,
                mu=m.mu,
                sigma=sigma,
                projection=m.projections,
                generator=generator,
            )
        elif spec.loss == "lejepa":
            self.loss = build_loss(
                m.name, lam=m.lejepa_lambda, num_projections=m.lejepa_projections, generator=generator
            )
        elif spec.loss == "vicreg":
            self.loss = build_loss(m.name, w_inv=m.vicreg_sim, w_var=m.vicreg_var, w_cov=m.vicreg_cov)
        else:
            self.loss = build_loss(m.name, temperature=m.temperature)

    def mu_at(self, step: int, total: int) -> float:
        """The target's location at `step` of `total`: mu, or during the `mu_warmup` share a linear slide from 0."""
        mu = self.final_target.mu
        if self.mu_warmup <= 0:
            return mu
        return mu * min(1.0, max(0.0, step / (self.mu_warmup * total)))

    @torch.no_grad()
    def set_progress(self, step: int, total: int) -> None:
        """The schedules, before `step` of `total` runs. Anneal: the axis fix at full weight until the last
        `marginal_anneal` share of training, then linearly to 0, the RDMReg term taking its share back. Warm-up:
        the target (RDMReg's draw, the axis quantiles) at `mu_at(step)`, the last bias moved by the target's move,
        so the bias keeps the offset it learned from the location (a resumed run's bias holds the moves so far)."""
        if self.anneal > 0:
            self.alpha = self.alpha0 * min(1.0, max(0.0, (1.0 - step / total) / self.anneal))
            if hasattr(self.loss, "w_rdm"):
                self.loss.w_rdm = self.w_rdm * (1.0 - self.alpha)
        if self.mu_warmup <= 0:
            return
        mu = self.mu_at(step, total)
        if self._mu_now is None:
            self._mu_now = self.mu_at(max(step - 1, 0), total)
        if mu == self._mu_now and self.target.mu == mu:
            return
        if self._bias is not None:
            self._bias.add_(mu - self._mu_now)
        self._mu_now = mu
        t = self.final_target
        self.target = Target(t.p, mu, t.sigma, t.kind)
        self.__dict__.pop("_quantile_cache", None)
        self.rate = self.target.expected_l0
        if hasattr(self.loss, "rdm"):
            self.loss.rdm.mu = mu

    @torch.no_grad()
    def init_projector(self, projector: nn.Module) -> None:
        """With the "preact" term, start the projector's last bias at the target's location mu.

        Measured in the toy (bench/diagnose_sparsity.py, mu = -3): from the default bias 0, AdamW (lr 2e-3,
        600 steps, step <= lr) moves a bias by well under 1, so the network reaches the pre-activation median
        -3 through negative weights on its non-negative (post-ReLU) hidden features; that makes h_j left-skewed
        with a light upper tail (preact fits the GN's quantiles to 0.98 and squashes the top 2% just below 0:
        l0 0.0003, 92 of 128 dimensions dead; bench/pretrain_notes.md). Started at mu, the same term lands on the
        designed rate.
        """
        if not PREACT_FIXES & {self.fix, self.rate_fix}:
            return
        last = [m for m in projector.modules() if isinstance(m, nn.Linear)]
        if not last or last[-1].bias is None:
            raise ConfigError("method.dead_dim_fix: 'preact' needs a projector ending in a Linear with a bias")
        self._bias = last[-1].bias
        self._bias.fill_(self.mu_at(0, 1))

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        """The features the loss sees; exactly the exported model's output in the forward pass."""
        if not self.relu:
            return h
        if self.fix == "leaky":
            return leaky_backward_relu(h, self.slope)
        if self.features == "rep_relu":
            return rep_relu(h)
        return F.relu(h)

    def _target(self, shape: tuple[int, int], device: torch.device, rectified: bool) -> torch.Tensor:
        sampler = self.target.sample if rectified else self.target.sample_gn
        y = sampler(shape, generator=self.generator, device=self.generator.device, dtype=torch.float32)
        return y.to(device=device, dtype=torch.float32)

    def _quantiles(self, n: int, device: torch.device) -> torch.Tensor:
        """The n mid-point quantiles of GN_p(mu, sigma), ppf((i + 1/2) / n), as an n x 1 column (cached per n):
        a draw without sampling noise, so each batch asks exactly the same number of samples to fire."""
        cache = self.__dict__.setdefault("_quantile_cache", {})
        if n not in cache:
            t = self.target
            q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
            cache[n] = torch.from_numpy(rgg_law.gn_ppf(q.numpy(), t.p, t.mu, t.sigma)).float()[:, None]
        return cache[n].to(device)

    def _axis_term(self, fix: str, h: torch.Tensor) -> torch.Tensor:
        """One view's term of the axis fix or of the second term, on its gathered fp32 pre-activations."""
        if fix in PREACT_FIXES:
            start = upper_start(self.rate) if fix == "preact_upper" else 0.0
            return preact_w2(h, self._quantiles(h.shape[0], h.device).expand_as(h), start=start)
        if fix == "threshold_q":
            return threshold_marginal_w2(h, self._quantiles(h.shape[0], h.device).expand_as(h), symmetric=True)
        if fix.startswith("threshold"):
            x = self._target(tuple(h.shape), h.device, rectified=False)
            return threshold_marginal_w2(h, x, symmetric=fix == "threshold_sym")
        if fix in RATE_FIXES:
            return pinball_rate(h, self.rate, shift_only=fix == "quantile_shift")
        # straight-through variant; raw features: plain per-axis W2
        y = self._target(tuple(h.shape), h.device, self.target.kind == "rgn")
        return marginal_w2(h, y, rectified=self.relu)

    def forward(
        self, hs: list[torch.Tensor], n_global: int, hs_axis: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, float], list]:
        """hs: per-view pre-activations (global views first). Two-view losses average over the view pairs
        (global, other); LeJEPA takes all views at once, as in its reference code. hs_axis: the same views'
        pre-activations of detached backbone features (`marginal_detach`), which the axis fix reads instead."""
        zs = [self.codes(h) for h in hs]
        if self.method == "lejepa":
            total, parts = self.loss(*zs)
        else:
            pairs = [(i, j) for i in range(n_global) for j in range(i + 1, len(zs))]
            total = torch.zeros((), device=zs[0].device)
            parts = {}
            for i, j in pairs:
                t, pp = self.loss(zs[i], zs[j])
                total = total + t / len(pairs)
                for key, val in pp.items():
                    parts[key] = parts.get(key, 0.0) + val / len(pairs)
        for fix, weight, key in ((self.fix, self.alpha, "marginal"), (self.rate_fix, self.rate_weight, "rate_term")):
            if weight <= 0:
                continue
            term = torch.zeros((), device=zs[0].device)
            for h in hs_axis if (hs_axis is not None and fix == self.fix) else hs:
                hg = gather_with_grad(h)
                with fp32_region(hg):
                    term = term + self._axis_term(fix, hg.float())
            term = term / len(hs)
            total = total + self.w_rdm * weight * term
            parts[key] = float(term.detach())
            parts["loss"] = float(total.detach())
        return total, parts, zs
