"""Offline evaluation of an encoder: linear probe and kNN on frozen features, sparsity, nHSIC.

`evaluate_checkpoint` is what `lpjepa eval` and the trainer's bench call; `extract` and `evaluate_embeddings`
let a caller that already holds a model or features reuse the pieces.

The names are resolved lazily (PEP 562): `lpjepa --help` imports `pretrain.evaluate.cli`, which imports this
package, and must not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "evaluate_checkpoint": "pretrain.evaluate.pipeline",
    "evaluate_embeddings": "pretrain.evaluate.pipeline",
    "target_expected": "pretrain.evaluate.pipeline",
    "REQUIRED_KEYS": "pretrain.evaluate.pipeline",
    "extract": "pretrain.evaluate.features",
    "transform_array_batch": "pretrain.evaluate.features",
    "EvalError": "pretrain.evaluate.splits",
}

__all__ = [
    "REQUIRED_KEYS",
    "EvalError",
    "evaluate_checkpoint",
    "evaluate_embeddings",
    "extract",
    "target_expected",
    "transform_array_batch",
]

if TYPE_CHECKING:
    from pretrain.evaluate.features import extract, transform_array_batch
    from pretrain.evaluate.pipeline import REQUIRED_KEYS, evaluate_checkpoint, evaluate_embeddings, target_expected
    from pretrain.evaluate.splits import EvalError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
