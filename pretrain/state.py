"""Resumable training state (RUN_DIR/train_state.pt): everything `--resume` needs beyond the model weights.

The model's own checkpoint (model.safetensors) is what export and evaluation read; this file adds the
optimiser moments, the probes, the step, and the random streams that are not a pure function of the step (the
loss's shared generator and torch's global RNG), so a resumed run follows the uninterrupted one exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.atomic_io import atomic_path
from core.errors import InvalidError

STATE_FILENAME = "train_state.pt"
STATE_FORMAT = "lpjepa-train-state/1"


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
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "python" in state:
        random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: str | Path, state: TrainState) -> Path:
    payload = {"format": STATE_FORMAT, **state.__dict__}
    target = Path(path)
    with atomic_path(target) as tmp:
        torch.save(payload, tmp)
    return target


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
