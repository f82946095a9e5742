"""The run folder: which files a run owns, when it may touch them, and how --resume reads them back.

Files (rank 0 writes them): config.json (the resolved TrainConfig), model.safetensors (weights + ModelConfig, what
export and eval read), train_state.pt (for --resume), metrics.jsonl and dim_rates.jsonl (one JSON line per log
step) and summary.json at the end. Every write but the append-only logs is atomic (core/atomic_io); the logs are
cut back to the resumed step, so a crash between a log line and its checkpoint cannot leave a step logged twice.
train_state.pt adds to the weights the optimiser moments, the probes, the step, and the random streams that are
not a pure function of the step (the loss's shared generator, the global RNGs), so a resumed run follows the
uninterrupted one exactly.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.atomic_io import atomic_path, atomic_write_text
from core.errors import InvalidError
from models.checkpoint import MODEL_FILENAME, save_checkpoint
from models.encoder import Encoder
from pretrain.config import TrainConfig

CONFIG_FILENAME = "config.json"
METRICS_FILENAME = "metrics.jsonl"
# One line per log step: the per-dimension activation rate of the projector output over that log window (train
# mode, local batch), so the histogram of rates can be followed through training (bench/diagnose_sparsity.py).
RATES_FILENAME = "dim_rates.jsonl"
SUMMARY_FILENAME = "summary.json"
STATE_FILENAME = "train_state.pt"
STATE_FORMAT = "lpjepa-train-state/1"
RUN_FILES = (CONFIG_FILENAME, MODEL_FILENAME, STATE_FILENAME, METRICS_FILENAME, RATES_FILENAME, SUMMARY_FILENAME)
# Keys that may differ between the original run and its --resume: they change speed or logging, not the result.
RUNTIME_KEYS = frozenset(
    {"train.progress", "train.log_every", "train.checkpoint_every", "train.threads", "train.device"}
    | {"data.num_workers", "description"}
)


class TrainError(InvalidError):
    """A training request that cannot start (run folder conflict, resume mismatch, absent device); the CLI exits 2."""


class StateError(InvalidError):
    """A train_state.pt that is missing, unreadable or from another run; the message names the file."""


@dataclass
class TrainState:
    step: int
    total_steps: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    probe: dict[str, torch.Tensor] | None = None
    probe_optimizer: dict[str, Any] | None = None
    loss_generator: torch.Tensor | None = None
    rng: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0


def capture_rng() -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    for key, restore in (("torch", torch.set_rng_state), ("numpy", np.random.set_state), ("python", random.setstate)):
        if key in state:
            restore(state[key])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(path: str | Path) -> TrainState:
    p = Path(path)
    if not p.is_file():
        raise StateError(f"no training state at {p}; nothing to resume")
    try:
        # weights_only=False: the payload holds numpy/python RNG states, and the file is our own.
        payload = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a corrupt pickle
        raise StateError(f"{p} is not a readable training state: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise StateError(f"{p} is not an lpjepa training state")
    payload.pop("format")
    try:
        return TrainState(**payload)
    except TypeError as err:
        raise StateError(f"{p} has unexpected fields: {err}") from err


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "backbone_kwargs":
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def config_diff(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Keys whose values differ, ignoring RUNTIME_KEYS."""
    fa, fb = _flatten(a.to_dict()), _flatten(b.to_dict())
    return sorted(k for k in set(fa) | set(fb) if k not in RUNTIME_KEYS and fa.get(k) != fb.get(k))


def read_run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / CONFIG_FILENAME
    if not path.is_file():
        raise TrainError(f"{run_dir} is not a run folder (no {CONFIG_FILENAME}); nothing to resume")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, json.JSONDecodeError) as err:
        raise TrainError(f"{path} is not a valid training config: {err}") from err


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, last_step: int) -> None:
    """On resume, drop lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a crash
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


class RunDir:
    """One run folder as seen by one rank: every rank checks and reads it, only the `writer` (rank 0) writes it,
    so the trainer calls the write methods on every rank without asking which rank it is."""

    def __init__(self, path: str | Path, *, writer: bool = True) -> None:
        self.path, self.writer = Path(path), writer

    def check(self, resume: bool, force: bool) -> list[str]:
        """Refuse a run folder we must not touch; no side effects. Returns the run files that --force will replace."""
        existing = [name for name in RUN_FILES if (self.path / name).exists()]
        if resume:
            if not (self.path / STATE_FILENAME).is_file():
                raise TrainError(f"cannot resume: {self.path / STATE_FILENAME} does not exist")
            return []
        if self.path.exists() and not self.path.is_dir():
            raise TrainError(f"{self.path} exists and is not a directory")
        if existing and not force:
            raise TrainError(
                f"{self.path} already holds a run ({', '.join(existing)}); use --resume to continue it "
                "or --force to overwrite it"
            )
        return existing

    def check_resumable(self, cfg: TrainConfig) -> None:
        """A --resume must train the run it continues: only RUNTIME_KEYS may differ from the stored config."""
        diff = config_diff(read_run_config(self.path), cfg)
        if diff:
            raise TrainError(f"cannot resume {self.path}: the config differs from the run's in {', '.join(diff)}")

    def claim(self, cfg: TrainConfig, replace: list[str] | None) -> None:
        """Once everything that could fail on bad input has been built: clear the files a --force replaces (None:
        a resume, nothing to clear), create the folder, write the resolved config."""
        if not self.writer:
            return
        for name in replace or ():
            (self.path / name).unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / CONFIG_FILENAME, cfg.to_json() + "\n")

    def load_state(self) -> TrainState:
        return load_state(self.path / STATE_FILENAME)

    def finished_summary(self) -> dict[str, Any] | None:
        """The summary of a run that already ended, read on resume so that a finished run is left as it is."""
        path = self.path / SUMMARY_FILENAME
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def rewind_logs(self, step: int) -> None:
        if self.writer:
            _truncate_log(self.path / METRICS_FILENAME, step)
            _truncate_log(self.path / RATES_FILENAME, step)

    def log(self, record: dict[str, Any], rates: list[float]) -> None:
        """One log step: the metrics line and, when the window measured them, the per-dimension rates."""
        if self.writer:
            _append_line(self.path / METRICS_FILENAME, record)
            if rates:
                _append_line(self.path / RATES_FILENAME, {"step": record["step"], "rates": rates})

    def save(self, state: TrainState, encoder: Encoder, extra: dict[str, Any]) -> None:
        """A checkpoint: train_state.pt first, then model.safetensors, each atomic."""
        if self.writer:
            with atomic_path(self.path / STATE_FILENAME) as tmp:
                torch.save({"format": STATE_FORMAT, **state.__dict__}, tmp)
            save_checkpoint(self.path / MODEL_FILENAME, encoder, extra=extra)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.writer:
            atomic_write_text(self.path / SUMMARY_FILENAME, json.dumps(summary, indent=2) + "\n")
