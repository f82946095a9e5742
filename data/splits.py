"""Which split of a data set a stage fits on, and seeded subsets: shared by the probes (pretrain/evaluate) and ood.

A detector or probe must never be scored on the images it was fitted to, so a stage that is handed an evaluation
split looks for the data set's train split here. `train_spec_for` follows `data.sources.open_source`'s grammar.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from core.errors import InvalidError

# Data sets whose spec can name a different split (see data.sources.open_source).
FASHION_NAMES = ("fashion-mnist", "fashion_mnist", "fmnist")
ROOTED_WITH_TRAIN = ("cifar10", "cifar100", "stl10", "imagenet100")


def train_spec_for(spec: str) -> str | None:
    """Spec of the train split of the data set `spec` names; None when it has none or `spec` is that split.

    Follows open_source's grammar: `name[:split][@root]` for built-ins, otherwise a folder path.
    """
    spec = spec.strip()
    head, _, root = spec.partition("@")
    name, _, split = head.partition(":")
    lname = name.lower()
    if root:
        if lname in ROOTED_WITH_TRAIN and (split or "train") != "train":
            return f"{name}:train@{root}"
        return None
    if lname in FASHION_NAMES and (split or "train") != "train":
        return f"{name}:train"
    return None


def subsample(indices: int | NDArray[Any], limit: int | None, seed: int) -> NDArray[np.int64]:
    """At most `limit` of `indices` (or of range(indices) for a count), uniformly without replacement and seeded,
    in ascending order (which keeps file reads sequential)."""
    idx = np.arange(indices, dtype=np.int64) if isinstance(indices, int | np.integer) else np.asarray(indices)
    if limit is not None and limit < 1:
        raise InvalidError(f"a subsample needs at least 1 image, got {limit}")
    if limit is None or limit >= len(idx):
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, size=limit, replace=False))
