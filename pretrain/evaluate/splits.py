"""Which images the probes train on and which they are scored on.

A probe must never be scored on the images it was fitted to. So the probe trains on the data set's own train
split and is scored on the split the user named; when there is no separate train split (a folder, the 5,000
MNIST images) or the named split IS the train split, a seeded stratified 80/20 hold-out of the named data is
used instead, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from core.errors import InvalidError
from data.sources import ImageSource, open_source
from data.splits import FASHION_NAMES, ROOTED_WITH_TRAIN, subsample, train_spec_for

HOLDOUT_FRACTION = 0.2


class EvalError(InvalidError):
    """Data that cannot be evaluated (no labels, too few images or classes, unusable device)."""


def stratified_holdout(
    labels: np.ndarray, fraction: float = HOLDOUT_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): `fraction` of each class, rounded, held out; a class with a single
    image stays in train (it could not be both learned and scored)."""
    if not 0 < fraction < 1:
        raise ValueError(f"hold-out fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    train, held = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_held = int(round(fraction * len(members))) if len(members) > 1 else 0
        n_held = min(max(n_held, 1 if len(members) > 1 else 0), len(members) - 1)
        held.append(members[:n_held])
        train.append(members[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


@dataclass
class EvalSplits:
    train_source: ImageSource
    train_indices: np.ndarray
    eval_source: ImageSource
    eval_indices: np.ndarray
    train_desc: str
    eval_desc: str
    holdout: bool
    notes: list[str] = field(default_factory=list)


def _require_labels(source: ImageSource, what: str) -> np.ndarray:
    if source.labels is None:
        raise EvalError(
            f"{source.name} has no labels; the {what} needs labelled images "
            "(a folder with one subfolder per class, or a labelled built-in split)"
        )
    return np.asarray(source.labels)


def resolve_splits(
    data_spec: str, *, max_train: int | None = 20000, limit: int | None = None, seed: int = 0
) -> EvalSplits:
    """Open the named data and its train split (or a hold-out), then apply --max-train and --limit.

    Raises DataSpecError (from open_source) for a spec naming nothing, EvalError for unusable data.
    """
    eval_source = open_source(data_spec)
    eval_labels = _require_labels(eval_source, "probe's evaluation split")
    notes: list[str] = []
    train_spec = train_spec_for(data_spec)
    if train_spec is None:
        train_idx, eval_idx = stratified_holdout(eval_labels, HOLDOUT_FRACTION, seed)
        train_source = eval_source
        reason = "is itself the train split" if _names_train_split(data_spec) else "has no separate train split"
        notes.append(
            f"{eval_source.name} {reason}: probes train on a seeded stratified "
            f"{100 - 100 * HOLDOUT_FRACTION:.0f}/{100 * HOLDOUT_FRACTION:.0f} split of it (seed {seed})"
        )
        train_desc = f"{eval_source.name} ({100 - 100 * HOLDOUT_FRACTION:.0f}% hold-in)"
        eval_desc = f"{eval_source.name} ({100 * HOLDOUT_FRACTION:.0f}% hold-out)"
    else:
        train_source = open_source(train_spec)
        _require_labels(train_source, "probe's train split")
        train_idx, eval_idx = np.arange(len(train_source)), np.arange(len(eval_source))
        train_desc, eval_desc = train_source.name, eval_source.name
    n_train_all, n_eval_all = len(train_idx), len(eval_idx)
    train_idx = subsample(train_idx, max_train, seed)
    eval_idx = subsample(eval_idx, limit, seed + 1)
    if len(train_idx) < n_train_all:
        notes.append(f"probe train set: {len(train_idx)} of {n_train_all} images (--max-train)")
    if len(eval_idx) < n_eval_all:
        notes.append(f"evaluation set: {len(eval_idx)} of {n_eval_all} images (--limit)")
    if len(eval_idx) == 0:
        raise EvalError(f"{eval_source.name}: no images left to evaluate on")
    train_labels = np.asarray(train_source.labels)[train_idx]
    if len(np.unique(train_labels)) < 2:
        raise EvalError(f"{train_desc}: the probe train set has fewer than two classes")
    return EvalSplits(
        train_source, train_idx, eval_source, eval_idx, train_desc, eval_desc, holdout=train_spec is None, notes=notes
    )


def _names_train_split(spec: str) -> bool:
    head, _, root = spec.strip().partition("@")
    name, _, split = head.partition(":")
    lname = name.lower()
    named = lname in FASHION_NAMES or (bool(root) and lname in ROOTED_WITH_TRAIN)
    return named and (split or "train") == "train"
