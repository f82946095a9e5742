"""Offline evaluation of an encoder: linear probe and kNN on frozen features, sparsity, nHSIC.

`evaluate_checkpoint` is what `lpjepa eval` and the trainer's bench call; `extract` lets a caller that already
holds a model reuse the feature extraction.

The names are resolved lazily (PEP 562): `lpjepa --help` imports `pretrain.evaluate.cli`, which imports this
package, and must not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "evaluate_checkpoint": "pretrain.evaluate.pipeline",
    "target_expected": "pretrain.evaluate.pipeline",
    "REQUIRED_KEYS": "pretrain.evaluate.pipeline",
    "extract": "pretrain.evaluate.features",
}

__all__ = [
    "REQUIRED_KEYS",
    "evaluate_checkpoint",
    "extract",
    "target_expected",
]

if TYPE_CHECKING:
    from pretrain.evaluate.features import extract
    from pretrain.evaluate.pipeline import REQUIRED_KEYS, evaluate_checkpoint, target_expected


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
