"""Per-dimension rate calibration of the deployed code: each dimension's last bias moved so that it fires on
exactly the designed share r of clean train images.

Why. The objective matches the rate on what training sees, augmented views in train-mode BatchNorm; the
deployed model sees clean images. At the sparse end a dimension's rate is the mass of a thin upper tail (1.8
positives per 256-image batch at mu = -3), and which inputs reach that tail shifts between the two
distributions: the shipped recipe at mu = -3 ends at the designed 0.0072 on its training views (0 near-dead
dimensions in the last log window) yet fires at 0.0062 on clean test images with 13 dimensions never firing and
55 near-dead (bench/pretrain_notes.md, session 9). Re-estimating BatchNorm on clean images
(pretrain/bn_recalibration.py) fixes the statistics, not the tail. Moving each dimension's bias by its clean
(1 - r) quantile does: the test split then lands at -1.1% with no dead or near-dead dimension (mu = -2: -0.2%).

Only the last Linear's bias changes, after the backbone is final: the encoder's features (every linear / kNN
number on them) are untouched, the forward pass stays an exact ReLU, and the step is deterministic (seeded
images, eval mode), so every DDP rank computes the same shift and `lpjepa calibrate` on a finished run gives what
training would have.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import InvalidError
from data.sources import ImageSource
from models.config import ModelConfig
from pretrain.evaluate.features import clean_batches


def calibration_indices(size: int, images: int, seed: int) -> np.ndarray:
    """A seeded subset of the training source, not the BatchNorm recalibration's (another stream of the seed)."""
    rng = np.random.default_rng([seed, 0xCA1])
    return np.sort(rng.permutation(size)[: min(images, size)])


def last_linear(encoder: nn.Module) -> nn.Linear:
    """The projector's last Linear: its output is the pre-activation the final ReLU cuts at 0."""
    linears = [m for m in getattr(encoder, "module", encoder).projector.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1].bias is None:
        raise ValueError("rate calibration needs a projector ending in a Linear with a bias")
    return linears[-1]


@torch.no_grad()
def calibrate_rates(
    encoder: nn.Module,
    source: ImageSource,
    config: ModelConfig,
    *,
    rate: float | None,
    images: int,
    seed: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """Shift every dimension's last bias by the (1 - rate) quantile of its pre-activation over `images` clean train
    images (eval transform, eval mode, fp32). Returns what it did ({"images": 0} when off or not applicable: no
    designed rate, no images); the encoder's mode is restored."""
    if rate is None or not 0.0 < rate < 1.0 or images <= 0 or len(source) == 0:
        return {"images": 0}
    idx = calibration_indices(len(source), images, seed)
    last = last_linear(encoder)
    rows: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda _m, _i, out: rows.append(out.detach().float().cpu()))
    was_training = encoder.training
    encoder.eval()
    try:
        for batch in clean_batches(source, idx, config, batch_size):
            encoder(batch.to(device, non_blocking=True))
    finally:
        hook.remove()
        encoder.train(was_training)
    h = torch.cat(rows).numpy()
    before = (h > 0).mean(axis=0)
    shift = np.quantile(h, 1.0 - rate, axis=0)  # numpy: no size limit (torch.quantile stops at 2**24 elements)
    last.bias.sub_(torch.from_numpy(shift).to(last.bias.device, last.bias.dtype))
    return {
        "images": int(len(idx)),
        "rate": rate,
        "l0_before": round(float(before.mean()), 6),
        "dead_before": int((before == 0).sum()),
        "shift_abs_mean": round(float(np.abs(shift).mean()), 6),
        "shift_abs_max": round(float(np.abs(shift).max()), 6),
    }


class CalibrationError(InvalidError):
    """A run folder `lpjepa calibrate` cannot calibrate; the message says why."""


def calibrate_run(run_dir: str, *, images: int | None = None, force: bool = False) -> dict[str, Any]:
    """`lpjepa calibrate RUN`: the step training ends with, applied to a finished run (one trained before it
    existed, or with train.rate_calibration = 0). Rewrites model.safetensors and config.json atomically and adds
    the record to summary.json; train_state.pt is left as training wrote it. Refuses a run that is not finished,
    one already calibrated (unless `force`), and a model without a designed rate."""
    import json
    from pathlib import Path

    from core.atomic_io import atomic_write_text
    from data.sources import open_source
    from models.checkpoint import load_checkpoint, save_checkpoint
    from pretrain.rundir import CONFIG_FILENAME, MODEL_FILENAME, SUMMARY_FILENAME, read_run_config

    run = Path(run_dir)
    cfg = read_run_config(run)
    summary_path = run / SUMMARY_FILENAME
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    if summary.get("status") != "completed":
        raise CalibrationError(f"{run}: the run has not finished (summary.json status {summary.get('status')!r})")
    done = (summary.get("rate_calibration") or {}).get("images", 0)
    if done and not force:
        raise CalibrationError(f"{run}: already calibrated on {done} images (--force calibrates again)")
    encoder, extra = load_checkpoint(run / MODEL_FILENAME)
    rate = encoder.config.expected_l0
    if rate is None:
        raise CalibrationError(f"{run}: the code of {cfg.method.name} has no designed rate; nothing to calibrate")
    n = cfg.train.rate_calibration if images is None else images
    if n <= 0:
        raise CalibrationError(f"{run}: --images must be positive (got {n})")
    result = calibrate_rates(
        encoder,
        open_source(cfg.data.spec),
        encoder.config,
        rate=rate,
        images=n,
        seed=cfg.train.seed,
        batch_size=cfg.train.batch_size,
        device=torch.device("cpu"),
    )
    cfg.train.rate_calibration = n
    extra = {**extra, "train_config": cfg.to_dict()}
    save_checkpoint(run / MODEL_FILENAME, encoder, extra=extra)
    atomic_write_text(run / CONFIG_FILENAME, cfg.to_json() + "\n")
    atomic_write_text(summary_path, json.dumps({**summary, "rate_calibration": result}, indent=2) + "\n")
    return result
