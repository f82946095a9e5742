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
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from serve.ood.scores import (
    CALIBRATION_VERSION,
    SCORE_NAMES,
    CalibrationError,
    OODScorer,
    SmoothedECDF,
    activation_matrix,
    l0_fraction,
)

MIN_PART = 20  # fewest embeddings in each of the fit and threshold parts


def conformal_threshold(scores: NDArray[Any], tpr: float) -> float:
    """The ceil((n + 1) tpr)-th smallest held-out score: the split-conformal bound for a TPR of at least `tpr`."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = min(math.ceil((s.size + 1) * tpr), s.size)
    return float(s[k - 1])


def calibrate(
    embeddings: Any,
    *,
    tpr: float = 0.95,
    fit_fraction: float = 0.5,
    seed: int = 0,
    alpha: float = 1.0,
    max_knots: int = 1024,
    expected_l0: float | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit the activation scores on in-distribution embeddings; returns a JSON-serialisable, versioned dict.

    `alpha` is the Laplace pseudo-count added to both the fire and the not-fire count of each dimension, so a
    dimension that never (or always) fired during calibration gives a large but finite NLL.
    """
    if not 0.0 < tpr < 1.0:
        raise CalibrationError(f"tpr must be strictly between 0 and 1, got {tpr}")
    if not 0.0 < fit_fraction < 1.0:
        raise CalibrationError(f"fit_fraction must be strictly between 0 and 1, got {fit_fraction}")
    if not alpha > 0:
        raise CalibrationError(f"alpha (Laplace pseudo-count) must be positive, got {alpha}")
    active = activation_matrix(embeddings)
    n, dim = active.shape
    if n < 2 * MIN_PART:
        raise CalibrationError(f"calibration needs at least {2 * MIN_PART} in-distribution embeddings, got {n}")
    if dim < 1:
        raise CalibrationError("embeddings have no dimensions")
    order = np.random.default_rng(seed).permutation(n)
    n_fit = int(np.clip(round(n * fit_fraction), MIN_PART, n - MIN_PART))
    fit, held = active[order[:n_fit]], active[order[n_fit:]]

    counts = np.asarray(fit.sum(axis=0), dtype=np.float64).ravel()
    rates = (counts + alpha) / (n_fit + 2.0 * alpha)
    l0_fit = l0_fraction(fit)
    ecdf = SmoothedECDF.fit(l0_fit, max_knots=max_knots, min_bandwidth=0.5 / dim)

    raw = OODScorer(
        dim=dim,
        rates=rates,
        l0_cdf=ecdf,
        norm={"rate": (0.0, 1.0), "pattern": (0.0, 1.0)},
        thresholds=dict.fromkeys(SCORE_NAMES, math.inf),
    )
    held_scores = raw.score(held)
    norm = {
        name: (float(np.mean(held_scores.by_name(name))), float(np.std(held_scores.by_name(name))))
        for name in ("rate", "pattern")
    }
    scorer = OODScorer(dim=dim, rates=rates, l0_cdf=ecdf, norm=norm, thresholds=dict.fromkeys(SCORE_NAMES, 0.0))
    held_scores = scorer.score(held)
    thresholds = {name: conformal_threshold(held_scores.by_name(name), tpr) for name in SCORE_NAMES}
    held_tpr = {name: float(np.mean(held_scores.by_name(name) <= thresholds[name])) for name in SCORE_NAMES}

    l0_all = l0_fraction(active)
    quantile_levels = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
    cal: dict[str, Any] = {
        "version": CALIBRATION_VERSION,
        "kind": "lpjepa-ood-activation",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dim": int(dim),
        "tpr": float(tpr),
        "seed": int(seed),
        "alpha": float(alpha),
        "n": int(n),
        "n_fit": int(n_fit),
        "n_holdout": int(n - n_fit),
        "rates": rates.tolist(),
        "l0": {
            "knots": ecdf.knots.tolist(),
            "bandwidth": ecdf.bandwidth,
            "mean": float(np.mean(l0_all)),
            "std": float(np.std(l0_all)),
            "quantiles": {
                str(q): float(v) for q, v in zip(quantile_levels, np.quantile(l0_all, quantile_levels), strict=True)
            },
            "expected": None if expected_l0 is None else float(expected_l0),
        },
        "dead_dims": int(np.sum(counts == 0)),
        "normalization": {name: {"mean": m, "std": s} for name, (m, s) in norm.items()},
        "thresholds": thresholds,
        "holdout_tpr": held_tpr,
    }
    if source is not None:
        cal["source"] = dict(source)
    return cal


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
) -> dict[str, Any]:
    """Embed `data_spec` with the exported model, calibrate, and store the result with the model.

    The calibration lands in the model's ONNX metadata (or its sidecar) through export.metadata, which is where
    EmbeddingRuntime.ood_calibration and therefore `lpjepa serve` look for it.
    """
    from export.metadata import write_ood_calibration
    from serve.ood.inputs import InputError, embed_source, open_runtime, open_spec, subsample

    runtime = open_runtime(model_path)
    source = open_spec(data_spec)
    indices = subsample(len(source), limit, seed)
    embedded = embed_source(
        runtime, source, indices, batch_size=batch_size, progress=progress, desc=f"calibrate {data_spec}"
    )
    if embedded.n == 0:
        raise InputError(f"no image of {data_spec} could be decoded ({len(embedded.failed)} failed)")
    expected = runtime.metadata.get("expected_l0") if isinstance(runtime.metadata, dict) else None
    cal = calibrate(
        embedded.matrix,
        tpr=tpr,
        seed=seed,
        expected_l0=None if expected is None else float(expected),
        source={"spec": data_spec, "n_images": embedded.n, "failed": len(embedded.failed), "limit": limit},
    )
    if write:
        write_ood_calibration(str(model_path), cal)
    return cal
