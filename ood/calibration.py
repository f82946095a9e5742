"""Calibration: what the activation scores need from in-distribution data, fitted so the threshold holds up.

The in-distribution embeddings are split in two: per-dimension rates and the l0 distribution are fitted on one
part, while the normalisation of each score and the thresholds are set on the other. Setting the threshold on
the data the rates were fitted on would make in-distribution inputs look more typical than fresh ones and the
true positive rate would fall short of its target on new data; on a held-out part the split-conformal quantile
gives P(score <= threshold) >= tpr for a fresh exchangeable input.
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from data.splits import subsample
from ood.detectors import Inputs, fit_detectors
from ood.drift import DEFAULT_WINDOW, fit_drift_null
from ood.schema import CALIBRATION_VERSION, CalibrationError, CalibrationV2, L0Section
from ood.scores import SCORE_NAMES, OODScorer, SmoothedECDF, l0_fraction
from ood.selection import select_served
from ood.shifts import SHIFT_NAMES, shifted_loaders
from ood.suite import NEEDS, ScoreSuite

MIN_PART = 20  # fewest embeddings in each of the fit and threshold parts
QUANTILE_LEVELS = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def conformal_threshold(scores: NDArray[Any], tpr: float) -> float:
    """The ceil((n + 1) tpr)-th smallest held-out score: the split-conformal bound for a TPR of at least `tpr`."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = min(math.ceil((s.size + 1) * tpr), s.size)
    return float(s[k - 1])


def calibrate(
    embeddings: Any,
    *,
    features: Any = None,
    tpr: float = 0.95,
    fit_fraction: float = 0.5,
    seed: int = 0,
    alpha: float = 1.0,
    max_knots: int = 1024,
    expected_l0: float | None = None,
    source: dict[str, Any] | None = None,
    validation: dict[str, Any] | None = None,
    mixture_k: int = 16,
    rank: int = 32,
    drift_window: int = DEFAULT_WINDOW,
) -> dict[str, Any]:
    """Fit every OOD score on in-distribution embeddings; returns a JSON-serialisable, versioned dict.

    `alpha` is the Laplace pseudo-count added to both the fire and the not-fire count of each dimension, so a
    dimension that never (or always) fired during calibration gives a large but finite NLL. `features` are the
    encoder features of the same inputs (enables feature_mahalanobis). `validation` maps names to OOD inputs
    (`detectors.Inputs`, or codes) on which every score is evaluated against the held-out ID part; the score to
    serve is chosen from that table (selection.select_served).
    """
    for name, value, ok in (("tpr", tpr, 0.0 < tpr < 1.0), ("fit_fraction", fit_fraction, 0.0 < fit_fraction < 1.0)):
        if not ok:
            raise CalibrationError(f"{name} must be strictly between 0 and 1, got {value}")
    if not alpha > 0:
        raise CalibrationError(f"alpha (Laplace pseudo-count) must be positive, got {alpha}")
    inputs = embeddings if isinstance(embeddings, Inputs) else Inputs.from_arrays(embeddings, features)
    fit_rows, held_rows = split_rows(inputs.active.shape, fit_fraction, seed)
    fit, held = inputs.take(fit_rows), inputs.take(held_rows)
    scorer, fitted = fit_activation(fit.active, held.active, tpr=tpr, alpha=alpha, max_knots=max_knots)
    detectors = fit_detectors(fit, seed=seed, mixture_k=mixture_k, rank=rank, alpha=alpha)
    suite = ScoreSuite(scorer, detectors, scorer.thresholds, "combined", expected_l0=expected_l0)
    held_all = suite.score_all(held)
    selection = select_served(held_all, _validation_scores(suite, validation, inputs), tpr=tpr)
    l0_all = l0_fraction(inputs.active)
    quantiles = dict(zip(map(str, QUANTILE_LEVELS), np.quantile(l0_all, QUANTILE_LEVELS).tolist(), strict=True))
    cal = CalibrationV2(
        version=CALIBRATION_VERSION,
        kind="lpjepa-ood-activation",
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        dim=scorer.dim,
        tpr=float(tpr),
        seed=int(seed),
        alpha=float(alpha),
        n=len(inputs),
        n_fit=len(fit),
        n_holdout=len(held),
        rates=scorer.rates.tolist(),
        l0=L0Section(
            knots=scorer.l0_cdf.knots.tolist(),
            bandwidth=scorer.l0_cdf.bandwidth,
            mean=float(np.mean(l0_all)),
            std=float(np.std(l0_all)),
            quantiles=quantiles,
            expected=None if expected_l0 is None else float(expected_l0),
        ),
        **fitted,
        feature_dim=None if inputs.features is None else int(inputs.features.shape[1]),
        detectors={name: det.state() for name, det in detectors.items()},
        scores={name: _score_entry(name, values, tpr) for name, values in held_all.items()},
        served=selection["served"],
        selection=selection,
        drift=fit_drift_null(fit.active, held.active, scorer.rates, scorer.l0_cdf, window=drift_window, seed=seed),
        **({} if source is None else {"source": dict(source)}),
    )
    return cal.to_dict()


def split_rows(shape: tuple[int, int], fit_fraction: float, seed: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(fit rows, held-out rows), a seeded random split with at least MIN_PART rows on each side, each sorted."""
    n, dim = shape
    if n < 2 * MIN_PART:
        raise CalibrationError(f"calibration needs at least {2 * MIN_PART} in-distribution embeddings, got {n}")
    if dim < 1:
        raise CalibrationError("embeddings have no dimensions")
    order = np.random.default_rng(seed).permutation(n)
    n_fit = int(np.clip(round(n * fit_fraction), MIN_PART, n - MIN_PART))
    return np.sort(order[:n_fit]), np.sort(order[n_fit:])


def fit_activation(fit: Any, held: Any, *, tpr: float, alpha: float, max_knots: int) -> tuple[OODScorer, dict]:
    """The activation scorer with its thresholds, and the calibration fields that record how it was fitted.

    Rates and the l0 distribution come from the fit part; the normalisation of each score and the thresholds
    from the held-out part (the module docstring says why)."""
    n_fit, dim = fit.shape
    counts = np.asarray(fit.sum(axis=0), dtype=np.float64).ravel()
    rates = (counts + alpha) / (n_fit + 2.0 * alpha)
    ecdf = SmoothedECDF.fit(l0_fraction(fit), max_knots=max_knots, min_bandwidth=0.5 / dim)
    unit = {"rate": (0.0, 1.0), "pattern": (0.0, 1.0)}
    raw = OODScorer(dim=dim, rates=rates, l0_cdf=ecdf, norm=unit, thresholds=dict.fromkeys(SCORE_NAMES, math.inf))
    held_scores = raw.score(held)
    norm = {
        name: (float(np.mean(held_scores.by_name(name))), float(np.std(held_scores.by_name(name))))
        for name in ("rate", "pattern")
    }
    scorer = OODScorer(dim=dim, rates=rates, l0_cdf=ecdf, norm=norm, thresholds=dict.fromkeys(SCORE_NAMES, 0.0))
    held_scores = scorer.score(held)
    scorer.thresholds = {name: conformal_threshold(held_scores.by_name(name), tpr) for name in SCORE_NAMES}
    held_tpr = {name: float(np.mean(held_scores.by_name(name) <= scorer.thresholds[name])) for name in SCORE_NAMES}
    return scorer, {
        "dead_dims": int(np.sum(counts == 0)),
        "normalization": {name: {"mean": m, "std": s} for name, (m, s) in norm.items()},
        "thresholds": scorer.thresholds,
        "holdout_tpr": held_tpr,
    }


def _score_entry(name: str, held: NDArray[Any], tpr: float) -> dict[str, Any]:
    thr = conformal_threshold(held, tpr)
    return {"threshold": thr, "holdout_tpr": float(np.mean(held <= thr)), "needs": NEEDS[name]}


def _validation_scores(suite: ScoreSuite, validation: dict[str, Any] | None, inputs: Inputs) -> dict[str, Any]:
    """Every score of `suite` on each non-empty validation set."""
    out = {}
    for set_name, val in (validation or {}).items():
        val_inputs = val if isinstance(val, Inputs) else Inputs.from_arrays(val)
        if len(val_inputs) == 0:
            continue
        if val_inputs.features is None and inputs.features is not None:
            raise CalibrationError(f"validation set {set_name!r} has no encoder features but the ID data has")
        out[set_name] = suite.score_all(val_inputs)
    return out


def calibrate_model(
    model_path: str | Path,
    data_spec: str,
    *,
    limit: int | None = None,
    tpr: float = 0.95,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
    write: bool = True,
    validate_ood: list[str] | tuple[str, ...] = (),
    validate_limit: int | None = 2000,
    shifts: list[str] | tuple[str, ...] = SHIFT_NAMES,
    shift_limit: int = 1000,
    drift_window: int = DEFAULT_WINDOW,
) -> dict[str, Any]:
    """Embed `data_spec` with the exported model, fit every score, choose the served one, store the result.

    The served score is chosen on the held-out part of `data_spec` against each `validate_ood` spec (a seeded
    subset of `validate_limit` images) and each synthetic shift of `shift_limit` images of `data_spec`.
    The calibration lands in the model's ONNX metadata (or its sidecar) through export.metadata, which is where
    EmbeddingRuntime.ood_calibration and therefore `lpjepa serve` look for it.
    """
    from data.sources import open_source
    from export.metadata import write_ood_calibration
    from ood.inputs import InputError, embed_images, embed_source, open_runtime

    unknown = [name for name in shifts if name not in SHIFT_NAMES]
    if unknown:
        raise InputError(f"unknown synthetic shift {', '.join(unknown)}; choose from {', '.join(SHIFT_NAMES)}")
    runtime = open_runtime(model_path)
    source = open_source(data_spec)
    val_sources = {spec: open_source(spec) for spec in dict.fromkeys(validate_ood)}  # bad spec: fail before work
    embed = partial(embed_source, runtime, batch_size=batch_size, progress=progress)
    embedded = embed(source, subsample(len(source), limit, seed), desc=f"calibrate {data_spec}", what=data_spec)
    validation = {}
    for spec, val in val_sources.items():
        idx = subsample(len(val), validate_limit, seed + 3)
        validation[spec] = embed(val, idx, desc=f"validate {spec}", what=f"the validation set {spec}").inputs()
    shift_idx = subsample(len(source), shift_limit, seed + 4)
    for shift in shifts:  # `shift:<name>`: the images shift_idx of the ID source under each synthetic shift
        loaders = shifted_loaders(source, shift_idx, shift, seed=seed)
        val = embed_images(runtime, loaders, batch_size=batch_size, progress=progress, desc=f"shift {shift}")
        if val.n:
            validation[f"shift:{shift}"] = val.inputs()
    expected = runtime.metadata.get("expected_l0") if isinstance(runtime.metadata, dict) else None
    cal = calibrate(
        embedded.inputs(),
        tpr=tpr,
        seed=seed,
        expected_l0=None if expected is None else float(expected),
        validation=validation,
        drift_window=drift_window,
        source={
            "spec": data_spec,
            "n_images": embedded.n,
            "failed": len(embedded.failed),
            "limit": limit,
            "validate_ood": list(val_sources),
            "validate_limit": validate_limit,
            "shifts": list(shifts),
            "shift_limit": shift_limit,
        },
    )
    if write:
        write_ood_calibration(str(model_path), cal)
    return cal
