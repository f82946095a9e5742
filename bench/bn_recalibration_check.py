"""Does the sparse-end rate on the test split come back when BatchNorm's running statistics are recomputed on
clean images? (issue 15; bench/pretrain_notes.md, "BatchNorm recalibration").

Training accumulates every BatchNorm's running statistics over augmented views; evaluation and export apply
them to clean images. For a fix whose rate is the mass of a fitted upper tail (preact) that shift moves the
test-split rate a lot. This prints the eval-mode l0, dead and near-dead dimensions (rate < 10% of the target)
and per-dimension rate percentiles of a checkpoint on the test split, before and after resetting the running
statistics and re-estimating them (cumulative average) from N clean train images in train mode. It changes
nothing on disk.

    .venv/bin/python bench/bn_recalibration_check.py RUN_DIR [--images 10240]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from data.sources import load_fashion_mnist
from models.checkpoint import load_checkpoint
from models.rgg import expected_l0
from pretrain.evaluate.features import _array_batches, extract  # the evaluation's own preprocessing


def report(model: nn.Module, test, target: float, tag: str, t0: float) -> None:
    _, z, _ = extract(model, test, model.config, 256)
    rates = (z > 0).double().mean(0)
    q = [float(rates.quantile(v)) for v in (0.25, 0.5, 0.95)]
    print(
        f"{tag}: l0 {float(rates.mean()):.5f} (target {target:.5f}) dead {int((rates == 0).sum())} "
        f"near-dead {int((rates < 0.1 * target).sum())} rate p25/p50/p95 {q[0]:.4f}/{q[1]:.4f}/{q[2]:.4f} "
        f"all-zero rows {int(((z > 0).sum(1) == 0).sum())} ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run folder or checkpoint (fashion-mnist runs)")
    ap.add_argument("--images", type=int, default=10240, help="clean train images for the recalibration")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = load_checkpoint(args.run, device="cpu")[0]
    c = model.config
    target = expected_l0(c.target_p, c.target_mu, c.target_sigma)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    report(model, test, target, "running statistics from training", t0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the recalibration batches
    model.train()
    idx = np.random.default_rng(0).permutation(len(train))[: args.images]
    with torch.no_grad():
        for batch in _array_batches(train, idx, c, 256):
            model.forward_features(batch)
    model.eval()
    report(model, test, target, f"recalibrated on {args.images} clean train images", t0)


if __name__ == "__main__":
    main()
