"""The train metrics: running sums over one log window, turned into one metrics.jsonl line (and one dim_rates.jsonl
line) per log step, plus the progress bar.

Everything is measured on the local batch of the step that trained on it (train mode, no extra forward), so
logging costs next to nothing; the offline numbers come from `lpjepa eval`.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pretrain.evaluate.sparsity import NEAR_DEAD_FRACTION
from pretrain.rundir import RunDir


class MetricsLog:
    """Running sums over the current log window; each `flush` turns them into the log step's lines in the run
    folder (rank 0) and the progress bar's numbers, and starts the next window."""

    def __init__(self, run: RunDir, *, name: str, start: int, total: int, target_l0: float | None, show: bool) -> None:
        self.run, self.target_l0 = run, target_l0
        self.bar = None
        if show and run.writer:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"train {name}", unit="step", dynamic_ncols=True)
        self.reset()
        self.last: dict[str, Any] = {}

    def reset(self) -> None:
        self.steps = self.images = self.probe_n = self.samples = 0
        self.l0 = self.probe_hits = self.probe_code_hits = 0.0
        self.parts: dict[str, float] = {}
        self.fired: torch.Tensor | None = None  # per dimension: how many samples were non-zero (0: dead)
        self.start = time.perf_counter()

    @torch.no_grad()
    def add(self, z0: torch.Tensor, parts: dict[str, float], images: int, probes: tuple | None) -> None:
        """One step: `z0` the first view's codes, `probes` (feature logits, code logits, labels) or None."""
        z0 = z0.detach()
        fired = (z0 > 0).sum(dim=0)
        self.fired = fired if self.fired is None else self.fired + fired
        self.samples += int(z0.shape[0])
        self.l0 += float((z0 > 0).float().mean())
        if probes is not None:
            logits_f, logits_c, labels = probes
            self.probe_hits += float((logits_f.argmax(1) == labels).sum())
            self.probe_code_hits += float((logits_c.argmax(1) == labels).sum())
            self.probe_n += int(labels.numel())
        self.steps += 1
        self.images += images
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v

    def rate_record(self) -> tuple[dict[str, Any], list[float]]:
        """Percentiles of the per-dimension rates of this window, near-dead count, and the rates themselves."""
        if self.fired is None or not self.samples:
            return {}, []
        rates = (self.fired.double() / self.samples).cpu()
        q = torch.quantile(rates, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
        rec: dict[str, Any] = {"rate_p05": round(q[0], 6), "rate_p50": round(q[1], 6), "rate_p95": round(q[2], 6)}
        if self.target_l0:
            rec["near_dead_dims"] = int((rates < NEAR_DEAD_FRACTION * self.target_l0).sum())
        return rec, [round(float(r), 5) for r in rates]

    def flush(self, step: int, epoch: float, lr: float, elapsed_s: float) -> None:
        """End the window: write its lines (rank 0), show them on the bar, start the next window."""
        dt = max(time.perf_counter() - self.start, 1e-9)
        record = {
            "step": step,
            "epoch": round(epoch, 4),
            "lr": lr,
            **{k: round(v / max(self.steps, 1), 6) for k, v in self.parts.items()},
            "l0": round(self.l0 / self.steps, 6),
            "dead_dims": int((self.fired == 0).sum()) if self.fired is not None else None,
            "images_per_s": round(self.images / dt, 2),
        }
        if self.target_l0 is not None:
            record["target_l0"] = round(self.target_l0, 6)
        rate_stats, rates = self.rate_record()
        record.update(rate_stats)
        if self.probe_n:
            record["probe_acc"] = round(self.probe_hits / self.probe_n, 4)
            record["probe_code_acc"] = round(self.probe_code_hits / self.probe_n, 4)
        record["elapsed_s"] = round(elapsed_s, 2)
        self.last = record
        self.run.log(record, rates)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.3g}",
                l0=f"{record['l0']:.3f}",
                img_s=f"{record['images_per_s']:.0f}",
                **({"probe": f"{record['probe_acc']:.3f}"} if "probe_acc" in record else {}),
            )
        self.reset()

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
