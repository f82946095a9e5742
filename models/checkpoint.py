"""Model checkpoints: safetensors weights with the whole ModelConfig (and so the Target) in the header, atomic.

One self-describing file is what lets `lpjepa export` and `lpjepa serve` work from a checkpoint alone. Training
state for `--resume` (optimizer, schedule, RNG) lives in a separate file owned by pretrain/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from core.atomic_io import atomic_path
from core.errors import InvalidError
from models.config import ModelConfig, one_line
from models.encoder import Encoder, build_model

FORMAT = "lpjepa-checkpoint/1"
MODEL_FILENAME = "model.safetensors"


class CheckpointError(InvalidError):
    """A checkpoint that is missing, unreadable or not ours; the message names the file and the problem."""


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint file or a run directory holding `model.safetensors`."""
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILENAME
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {path} (expected a .safetensors file or a run directory)")
    return p


def save_checkpoint(path: str | Path, model: Encoder, extra: dict[str, Any] | None = None) -> Path:
    """Write weights + config atomically; `extra` (step, metrics, ...) goes into the header as JSON."""
    module = getattr(model, "module", model)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    meta = {"format": FORMAT, "config": module.config.to_json(), "extra": json.dumps(extra or {})}
    target = Path(path)
    with atomic_path(target) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return target


def read_header(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    ckpt = resolve_checkpoint(path)
    try:
        with safe_open(str(ckpt), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{ckpt} is not a readable safetensors checkpoint: {err}") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} is not an lpjepa checkpoint (format {meta.get('format')!r})")
    try:
        config = ModelConfig.from_dict(json.loads(meta["config"]))
    except ValidationError as err:
        raise CheckpointError(f"{ckpt} has an invalid model config: {one_line(err)}") from err
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{ckpt} has an invalid model config: {err}") from err
    return config, json.loads(meta.get("extra", "{}"))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Encoder, dict[str, Any]]:
    """Rebuild the encoder from the header's config and load its weights; returns (model in eval mode, extra)."""
    ckpt = resolve_checkpoint(path)
    config, extra = read_header(ckpt)
    model = build_model(config)
    try:
        state = load_file(str(ckpt), device=str(device))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{ckpt}: weights do not match the config: {err}") from err
    return model.to(device).eval(), extra
