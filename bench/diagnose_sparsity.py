"""Why l0 stalls near 5% at sparse targets, and which fix restores the designed rate: a toy diagnostic.

The toy is the real objective (pretrain.methods.Objective, built from the fmnist-cpu recipe's method section:
w_inv 25, w_rdm 125, K = 512 random slices) on a small MLP projector (Linear-BN-ReLU x2, Linear) fed two noisy
views of a fixed non-linear latent-variable data set, batch 256, AdamW with warmup + cosine. It runs in
seconds per configuration, so it can sweep what the full recipe cannot afford: the fix, the number of steps,
the number of slices and the term's weight. Each row is measured on 8,192 fresh samples in eval mode:
l0 and its relative error against the analytic rate, l0 in train mode (BatchNorm on batch statistics),
dead and near-dead dimensions (rate < 10% of the
target), per-dimension rate percentiles, the share of active values that are tiny (< 0.05 sigma: the pile of
small positives the straight-through term leaves, against the target's own share), and l1/l0 (mean active
value over sigma; the target's is printed beside it).

    .venv/bin/python bench/diagnose_sparsity.py [--mu -3] [--steps 600] [--dim 128] [--quick] [--out DIR]

It prints one table and writes it as JSON (and, with --out, PNG histograms of the per-dimension rates over
training for the default objective and the chosen fix).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import common
import numpy as np
import torch
from torch import nn

from models.rgg import expected_l0, gn_cdf, gn_ppf, sigma_gn
from pretrain.config import load_config
from pretrain.methods import Objective
from pretrain.optim import WarmupCosine

TINY = 0.05  # "tiny" active value, in units of sigma


class ToyData:
    """x = tanh(A s + b), s ~ N(0, I_16) in R^64; a view is x + 0.25 N(0, I) (a fixed, seeded problem)."""

    def __init__(self, seed: int = 0, latent: int = 16, dim: int = 64) -> None:
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(latent, dim, generator=g) / math.sqrt(latent) * 2.0
        self.b = torch.randn(dim, generator=g) * 0.5
        self.latent = latent

    def batch(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.clean(n, g)
        return x + 0.25 * torch.randn(x.shape, generator=g), x + 0.25 * torch.randn(x.shape, generator=g)

    def clean(self, n: int, g: torch.Generator) -> torch.Tensor:
        """Inputs without the view noise: the toy's stand-in for un-augmented test images."""
        return torch.tanh(torch.randn(n, self.latent, generator=g) @ self.a + self.b)


def projector(dim: int, width: int = 256, in_dim: int = 64) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, width, bias=False),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, width, bias=False),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, dim),
    )


def rates_of(net: nn.Module, data: ToyData, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-dimension rates, pre-activations) on n fresh samples, eval mode."""
    net.eval()
    with torch.no_grad():
        x, _ = data.batch(n, torch.Generator().manual_seed(seed))
        h = net(x)
    net.train()
    return (h > 0).double().mean(0), h


def train_mode_l0(net: nn.Module, data: ToyData, seed: int, batches: int = 16) -> float:
    """l0 with BatchNorm on batch statistics (batches of 256, as in training), on a copy of the network."""
    import copy

    twin = copy.deepcopy(net).train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return float(torch.stack([(twin(data.batch(256, g)[0]) > 0).double().mean() for _ in range(batches)]).mean())


def train_toy(net: nn.Module, objective: Objective, data: ToyData, steps: int, seed: int, snapshots: int) -> tuple:
    """AdamW on the toy for `steps`; returns the training batches' l0 over the last 10% of steps (train mode, as
    the loss saw them), the eval-mode rate snapshots, the wall time and the last training batch."""
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = WarmupCosine(2e-3, steps, int(0.05 * steps))
    g = torch.Generator().manual_seed(seed + 2)
    history = []
    every = max(steps // snapshots, 1) if snapshots else 0
    t0 = time.perf_counter()
    batch_rates = []  # l0 of the training batch as the loss saw it (train mode), over the last 10% of steps
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = schedule.lr(step)
        x1, x2 = data.batch(256, g)
        h = net(torch.cat([x1, x2]))
        loss, _, _ = objective([h[:256], h[256:]], 2)
        if step >= steps - max(steps // 10, 1):
            batch_rates.append(float((h.detach() > 0).double().mean()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if every and (step + 1) % every == 0:
            history.append((step + 1, rates_of(net, data, 4096, 99)[0].numpy()))
    wall = time.perf_counter() - t0
    return batch_rates, history, wall, torch.cat([x1, x2])


def run(sets: list[str], args: argparse.Namespace, snapshots: int = 0) -> dict:
    bias_init = next((float(s.split("=")[1]) for s in sets if s.startswith("bias=")), None)
    sets = [s for s in sets if not s.startswith("bias=")]
    overrides = [s for s in sets if not s.startswith("steps=")]
    cfg = load_config("fmnist-cpu", [f"method.mu={args.mu}", f"method.num_projections={args.k}", *overrides])
    torch.manual_seed(args.seed)
    sigma = sigma_gn(1.0)
    data = ToyData(args.seed)
    net = projector(args.dim)
    objective = Objective(cfg, sigma, args.dim, torch.Generator().manual_seed(args.seed + 1))
    objective.init_projector(net)  # the last bias at mu for "preact"; a no-op for the other fixes
    if bias_init is not None:  # "bias=B": the last bias starts at B whatever the fix
        with torch.no_grad():
            net[-1].bias.fill_(bias_init)
    steps = int(next((s.split("=")[1] for s in sets if s.startswith("steps=")), args.steps))
    batch_rates, history, wall, last = train_toy(net, objective, data, steps, args.seed, snapshots)
    # The last training batch again, after the last step: train mode (batch statistics) vs eval mode (running ones).
    with torch.no_grad():
        same_train = float((net(last) > 0).double().mean())
        net.eval()
        same_eval = float((net(last) > 0).double().mean())
        net.train()
    rates, h = rates_of(net, data, 8192, 123)
    net.eval()
    with torch.no_grad():
        clean_rates = (net(data.clean(8192, torch.Generator().manual_seed(124))) > 0).double().mean(0)
    net.train()
    target = expected_l0(1.0, args.mu, sigma)
    z = torch.relu(h)
    active = z[z > 0]
    # The target's share of tiny values among its positives, and its mean positive value (both in sigma units).
    q = np.linspace(0.5 / 20000, 1 - 0.5 / 20000, 20000)
    xt = gn_ppf(q, 1.0, args.mu, sigma)
    xt = xt[xt > 0]
    # The pile just below / above 0: mass of h in (-0.05 sigma, 0] and (0, 0.05 sigma) over the GN's own mass there.
    band, mu = TINY * sigma, args.mu
    lo, mid, hi = gn_cdf(np.array([-band, 0.0, band]), 1.0, args.mu, sigma)
    gn_band, gn_band_up = float(mid - lo), float(hi - mid)
    return {
        "sets": [s for s in sets if not s.startswith("steps=")],
        "l0_train_batch": float(np.mean(batch_rates)),
        # Eval mode on noise-free inputs (the shift between augmented training views and clean test images).
        "l0_clean": float(clean_rates.mean()),
        "dead_clean": int((clean_rates == 0).sum()),
        "near_dead_clean": int((clean_rates < 0.1 * target).sum()),
        # Per-dimension pre-activation quantiles (median over dimensions) against the GN's, in sigma units.
        "h_quantiles": {
            str(lv): [
                round(float(h.quantile(lv, dim=0).median()) / sigma, 3),
                round(float(gn_ppf(lv, 1.0, mu, sigma)) / sigma, 3),
            ]
            for lv in (0.002, 0.007, 0.02, 0.1, 0.5, 0.9, 0.95, 0.98, 0.993, 0.998)
        },
        "l0_same_batch_train": same_train,
        "l0_same_batch_eval": same_eval,
        "pile_below": float(((h > -band) & (h <= 0)).double().mean()) / gn_band,
        "pile_above": float(((h > 0) & (h < band)).double().mean()) / gn_band_up,
        "steps": steps,
        "l0": float(rates.mean()),
        "target_l0": target,
        "rel_err": float(rates.mean()) / target - 1.0,
        "l0_train_mode": train_mode_l0(net, data, 321),
        "dead": int((rates == 0).sum()),
        "near_dead": int((rates < 0.1 * target).sum()),
        "rate_p05": float(rates.quantile(0.05)),
        "rate_p50": float(rates.quantile(0.5)),
        "rate_p95": float(rates.quantile(0.95)),
        "tiny_share": float((active < TINY * sigma).double().mean()) if active.numel() else float("nan"),
        "target_tiny_share": float((xt < TINY * sigma).mean()),
        "mean_active": float(active.mean() / sigma) if active.numel() else float("nan"),
        "target_mean_active": float(xt.mean() / sigma),
        "wall_s": round(wall, 1),
        "history": [(s, r.tolist()) for s, r in history],
    }


def plan(quick: bool) -> list[tuple[str, list[str]]]:
    """(label, overrides): the fix, then for the default and the candidate the effect of steps, slices and weight."""
    rows = [
        ("no fix (paper)", ["method.dead_dim_fix=none"]),
        ("marginal 0.2 (old default)", ["method.dead_dim_fix=marginal"]),
        ("threshold_sym 0.2", ["method.dead_dim_fix=threshold_sym"]),
        ("quantile 0.2 (pinball, per sample)", ["method.dead_dim_fix=quantile"]),
        ("quantile_shift 0.2 (pinball, location only)", ["method.dead_dim_fix=quantile_shift"]),
    ]
    if quick:
        return rows
    rows += [
        ("marginal 0.2, 4x steps", ["method.dead_dim_fix=marginal", "steps=4x"]),
        ("quantile_shift 0.2, 4x steps", ["method.dead_dim_fix=quantile_shift", "steps=4x"]),
        ("marginal 0.2, K=128", ["method.dead_dim_fix=marginal", "method.num_projections=128"]),
        ("marginal 0.2, K=2048", ["method.dead_dim_fix=marginal", "method.num_projections=2048"]),
        ("no fix, K=2048", ["method.dead_dim_fix=none", "method.num_projections=2048"]),
        ("marginal 0.5", ["method.dead_dim_fix=marginal", "method.marginal_weight=0.5"]),
        ("marginal 0.05", ["method.dead_dim_fix=marginal", "method.marginal_weight=0.05"]),
        ("quantile_shift 0.05", ["method.dead_dim_fix=quantile_shift", "method.rate_weight=0.05"]),
        ("quantile_shift 1.0", ["method.dead_dim_fix=quantile_shift", "method.rate_weight=1.0"]),
        ("quantile 0.05", ["method.dead_dim_fix=quantile", "method.rate_weight=0.05"]),
        ("quantile 1.0", ["method.dead_dim_fix=quantile", "method.rate_weight=1.0"]),
        ("quantile 3.0", ["method.dead_dim_fix=quantile", "method.rate_weight=3.0"]),
        ("quantile_shift 5.0", ["method.dead_dim_fix=quantile_shift", "method.rate_weight=5.0"]),
        ("quantile_shift 25", ["method.dead_dim_fix=quantile_shift", "method.rate_weight=25.0"]),
        ("threshold_q 0.2 (deterministic quantiles)", ["method.dead_dim_fix=threshold_q"]),
        ("threshold_q 0.5", ["method.dead_dim_fix=threshold_q", "method.marginal_weight=0.5"]),
        ("marginal 1.0 (axes only, no random slices)", ["method.dead_dim_fix=marginal", "method.marginal_weight=1.0"]),
        ("threshold_q 1.0 (axes only)", ["method.dead_dim_fix=threshold_q", "method.marginal_weight=1.0"]),
        ("marginal 0.2, w_inv=0", ["method.dead_dim_fix=marginal", "method.w_inv=0.0"]),
        ("marginal+quantile 0.2/1.0", ["method.dead_dim_fix=marginal+quantile", "method.rate_weight=1.0"]),
        ("marginal+quantile_shift 0.2/5", ["method.dead_dim_fix=marginal+quantile_shift", "method.rate_weight=5.0"]),
        ("threshold_q+quantile 0.2/1.0", ["method.dead_dim_fix=threshold_q+quantile", "method.rate_weight=1.0"]),
    ]
    return rows


def write_histograms(results: dict[str, dict], out: Path, target: float) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for label, res in results.items():
        hist = res["history"]
        if not hist:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        bins = np.logspace(-4, 0, 41)
        for i, (step, rates) in enumerate(hist):
            r = np.clip(np.asarray(rates), 1e-4, 1)
            ax.hist(
                r, bins=bins, histtype="step", color=plt.cm.viridis(i / max(len(hist) - 1, 1)), label=f"step {step}"
            )
        ax.axvline(target, color="k", ls="--", label=f"target {target:.4f}")
        ax.set_xscale("log")
        ax.set_xlabel("per-dimension activation rate (eval mode; 0 drawn at 1e-4)")
        ax.set_ylabel("dimensions")
        ax.set_title(f"toy, {label}", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = out / f"toy_rates_{label.split()[0]}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--mu", type=float, default=-3.0)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=512, help="random slices (the recipe's num_projections)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="only the five objectives, no steps/slices/weight rows")
    ap.add_argument("--only", nargs="*", default=None, help="labels (prefix match) to run")
    ap.add_argument(
        "--row", action="append", default=[], help="an extra row LABEL=SET1,SET2 (config overrides, steps=N)"
    )
    ap.add_argument("--out", default=None, help="folder for the JSON and the rate-histogram PNGs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results: dict[str, dict] = {}
    header = (
        f"{'objective (mu=' + format(args.mu, 'g') + ', D=' + str(args.dim) + ')':46s} {'steps':>5s} {'l0':>7s} "
        f"{'rel err':>8s} {'train':>7s} {'dead':>4s} {'near':>4s} {'p05':>7s} {'p50':>7s} {'p95':>7s} "
        f"{'tiny':>5s} {'tgt':>5s} {'act/s':>5s} {'tgt':>5s} {'batch':>7s} {'sameT':>7s} {'sameE':>7s} "
        f"{'pile-':>5s} {'pile+':>5s} {'s':>5s}"
    )
    print(header)
    extra = [(r.split("=", 1)[0], r.split("=", 1)[1].split(",")) for r in args.row]
    rows = extra if extra and args.only is None else plan(args.quick) + extra
    for label, sets in rows:
        if args.only and not any(label.startswith(o) for o in args.only):
            continue
        sets = [f"steps={4 * args.steps}" if s == "steps=4x" else s for s in sets]
        snaps = 6 if label.startswith(("marginal 0.2 (old", "quantile_shift 0.2 (", "no fix (paper)")) else 0
        r = run(sets, args, snapshots=snaps if args.out else 0)
        results[label] = r
        print(
            f"{label:46s} {r['steps']:5d} {r['l0']:7.4f} {r['rel_err']:+8.2f} {r['l0_train_mode']:7.4f} "
            f"{r['dead']:4d} {r['near_dead']:4d} "
            f"{r['rate_p05']:7.4f} {r['rate_p50']:7.4f} {r['rate_p95']:7.4f} {r['tiny_share']:5.2f} "
            f"{r['target_tiny_share']:5.2f} {r['mean_active']:5.2f} {r['target_mean_active']:5.2f} "
            f"{r['l0_train_batch']:7.4f} {r['l0_same_batch_train']:7.4f} {r['l0_same_batch_eval']:7.4f} "
            f"{r['pile_below']:5.1f} {r['pile_above']:5.1f} {r['wall_s']:5.0f}",
            flush=True,
        )
        print("    h quantiles / sigma (median over dims) vs GN:", r["h_quantiles"], flush=True)
        print(f"    clean inputs, eval mode: l0 {r['l0_clean']:.4f} dead {r['dead_clean']} near {r['near_dead_clean']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"toy_mu{args.mu:g}.json").write_text(json.dumps({"args": vars(args), "rows": results}, indent=1))
        for p in write_histograms(results, out, expected_l0(1.0, args.mu, sigma_gn(1.0))):
            print(f"wrote {p}")


if __name__ == "__main__":
    main()
