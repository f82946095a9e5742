"""Evaluation: the activation scores beside KNN, Mahalanobis and analytic-l0 deviation, on the same embeddings.

Baselines that need in-distribution training data (KNN, Mahalanobis, and our calibration when the model carries
none) are fitted on an ID *train* split that never overlaps the ID evaluation set: the data set's train split when
the ID spec names its test split, otherwise a seeded split of the ID source itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from data.splits import subsample, train_spec_for
from ood.baselines import KNNDistance, l0_deviation
from ood.calibration import calibrate
from ood.detectors import GaussianMahalanobis, Inputs
from ood.metrics import auroc, ood_metrics
from ood.scores import l0_fraction
from ood.suite import ACTIVATION_STATISTICS, NEEDS, ScoreSuite

REPORT_VERSION = 2


@dataclass
class EvalResult:
    """The JSON report plus the per-input arrays a plot or further analysis needs."""

    report: dict[str, Any]
    l0_id: NDArray[np.float64]
    l0_ood: NDArray[np.float64]
    scores_id: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    scores_ood: dict[str, NDArray[np.float64]] = field(default_factory=dict)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def batch_l0_shift(
    l0_id: Any,
    l0_ood: Any,
    ref_mean: float,
    *,
    seed: int = 0,
    sizes: tuple[int, ...] = (16, 64, 256),
    n_batches: int = 1000,
) -> dict[str, float]:
    """AUROC of |batch mean l0 - ID mean| over random batches (drawn with replacement) of each size.

    This is the data-set-level rate shift the paper reports; it can be strong even when a per-input test is blind
    because OOD inputs sit inside the in-distribution l0 band, and it is the cheapest drift monitor a server has.
    """
    rng = np.random.default_rng(seed)
    a_all, b_all = np.asarray(l0_id, dtype=np.float64), np.asarray(l0_ood, dtype=np.float64)
    out = {}
    for m in sizes:
        a = np.abs(rng.choice(a_all, (n_batches, m)).mean(axis=1) - ref_mean)
        b = np.abs(rng.choice(b_all, (n_batches, m)).mean(axis=1) - ref_mean)
        out[str(m)] = auroc(a, b)
    return out


def evaluate_embeddings(
    id_emb: Any,
    ood_emb: Any,
    train_emb: Any,
    *,
    calibration: dict[str, Any],
    expected_l0: float | None = None,
    k: int = 50,
    tpr: float = 0.95,
) -> EvalResult:
    """Metrics of every score of the calibration plus KNN and Mahalanobis fitted on `train_emb`.

    The inputs may be `detectors.Inputs` (codes + encoder features) or plain code matrices; `report["served"]`
    names the score the calibration serves (what a server's flag uses) and its method entry has served=True.
    """
    suite = ScoreSuite.from_calibration(calibration)
    id_in, ood_in = _as_inputs(id_emb), _as_inputs(ood_emb)
    train_codes = train_emb.codes if isinstance(train_emb, Inputs) else train_emb
    run = _Runs(len(id_in) + len(ood_in))
    for name in suite.names:
        if not (suite.needs_features(name) and (id_in.features is None or ood_in.features is None)):
            run(name, lambda name=name: (suite.score_named(name, id_in), suite.score_named(name, ood_in)))
    k_used = min(k, int(train_codes.shape[0]))
    knn, fit_s = _timed(lambda: KNNDistance(k_used).fit(train_codes))
    run("knn", lambda: (knn.score(id_in.codes), knn.score(ood_in.codes)), fit_s=fit_s, k=k_used)
    maha, fit_s = _timed(lambda: GaussianMahalanobis.fit(train_codes, input_name="codes"))
    run("mahalanobis", lambda: (maha.score(id_in), maha.score(ood_in)), fit_s, shrinkage=maha.shrinkage)
    l0_id, l0_ood = l0_fraction(id_in.active), l0_fraction(ood_in.active)
    cal_l0 = calibration.get("l0", {})
    if expected_l0 is None:
        expected_l0 = cal_l0.get("expected")
    if expected_l0 is not None and "l0_deviation" not in run.methods:
        run("l0_deviation", lambda: (l0_deviation(l0_id, expected_l0), l0_deviation(l0_ood, expected_l0)))
    for name, entry in run.methods.items():
        metrics = ood_metrics(run.s_id[name], run.s_ood[name], tpr)
        entry.update(metrics, needs=NEEDS[name], activation_statistics=name in ACTIVATION_STATISTICS)
        entry["served"] = name == suite.served
    served_id, served_ood = run.s_id.get(suite.served), run.s_ood.get(suite.served)
    report = {
        "version": REPORT_VERSION,
        "metric_notes": "OOD is the positive class; fpr95 = FPR on ID at 95% TPR on OOD; aupr = AUPR-Out",
        "served": suite.served,
        "selection": {key: (calibration.get("selection") or {}).get(key) for key in ("rule", "reason")},
        "methods": run.methods,
        "operating_point": {
            "score": suite.served,
            "threshold": suite.threshold,
            "calibrated_tpr": suite.tpr,
            "id_tpr": None if served_id is None else float(np.mean(served_id <= suite.threshold)),
            "ood_detected": None if served_ood is None else float(np.mean(served_ood > suite.threshold)),
        },
        "l0": {
            "expected": None if expected_l0 is None else float(expected_l0),
            "id_mean": float(np.mean(l0_id)),
            "id_std": float(np.std(l0_id)),
            "ood_mean": float(np.mean(l0_ood)),
            "ood_std": float(np.std(l0_ood)),
            "calibration_mean": cal_l0.get("mean"),
        },
        "batch_l0_auroc": batch_l0_shift(l0_id, l0_ood, float(cal_l0.get("mean", np.mean(l0_id)))),
        "dim": suite.dim,
    }
    return EvalResult(report=report, l0_id=l0_id, l0_ood=l0_ood, scores_id=run.s_id, scores_ood=run.s_ood)


class _Runs:
    """Each method's (ID, OOD) scores and its report entry: fit time, scoring time per input, its settings."""

    def __init__(self, n_total: int) -> None:
        self.n_total = n_total
        self.methods: dict[str, dict[str, Any]] = {}
        self.s_id: dict[str, NDArray[np.float64]] = {}
        self.s_ood: dict[str, NDArray[np.float64]] = {}

    def __call__(self, name: str, score: Callable[[], Any], fit_s: float = 0.0, **settings: Any) -> None:
        (self.s_id[name], self.s_ood[name]), secs = _timed(score)
        self.methods[name] = {"fit_s": fit_s, "score_us": 1e6 * secs / self.n_total, **settings}


def _as_inputs(x: Any) -> Inputs:
    return x if isinstance(x, Inputs) else Inputs.from_arrays(x)


def evaluate_model(
    model_path: str | Path,
    id_spec: str,
    ood_spec: str,
    *,
    limit: int | None = None,
    train_limit: int = 10000,
    k: int = 50,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
    recalibrate: bool = False,
    tpr: float = 0.95,
) -> EvalResult:
    """Embed the ID train split, the ID evaluation set and the OOD set with the model, then evaluate.

    The model's stored calibration is used when it has one (that is what `serve` uses); otherwise, or with
    `recalibrate`, the scores are calibrated on the same ID train split the baselines are fitted on.
    """
    from data.sources import open_source
    from ood.inputs import embed_source, open_runtime

    runtime = open_runtime(model_path)
    id_source = open_source(id_spec)
    ood_source = open_source(ood_spec)
    train_spec, train_source, train_idx, id_idx, train_how = _train_split(id_spec, id_source, limit, train_limit, seed)
    embed = partial(embed_source, runtime, batch_size=batch_size, progress=progress)
    train = embed(train_source, train_idx, desc=f"embed {train_spec} (ID train)", what=f"{train_spec} (ID train)")
    id_eval = embed(id_source, id_idx, desc=f"embed {id_spec} (ID)", what=f"{id_spec} (ID)")
    ood_idx = subsample(len(ood_source), limit, seed + 2)
    ood_eval = embed(ood_source, ood_idx, desc=f"embed {ood_spec} (OOD)", what=f"{ood_spec} (OOD)")
    stored = None if recalibrate else runtime.ood_calibration
    if stored is not None:
        calibration, cal_from = stored, "model"
    else:
        calibration = calibrate(train.inputs(), tpr=tpr, seed=seed, source={"spec": train_spec, "n": train.n})
        cal_from = f"fitted at eval time on the ID train split ({train.n} embeddings)"
    meta = runtime.metadata if isinstance(runtime.metadata, dict) else {}
    expected_l0 = None if meta.get("expected_l0") is None else float(meta["expected_l0"])
    result = evaluate_embeddings(
        id_eval.inputs(), ood_eval.inputs(), train.inputs(), calibration=calibration, expected_l0=expected_l0, k=k
    )
    result.report.update(
        model=str(model_path),
        target={key: meta.get(key) for key in ("target_p", "target_mu", "target_sigma", "expected_l0")},
        id={"spec": id_spec, "n": id_eval.n, "failed": len(id_eval.failed)},
        ood={"spec": ood_spec, "n": ood_eval.n, "failed": len(ood_eval.failed)},
        train={"spec": train_spec, "n": train.n, "how": train_how, "failed": len(train.failed)},
        calibration={"from": cal_from, "n": calibration.get("n"), "source": calibration.get("source")},
        seed=seed,
    )
    return result


def _train_split(
    id_spec: str, id_source: Any, limit: int | None, train_limit: int, seed: int
) -> tuple[str, Any, NDArray[np.int64], NDArray[np.int64], str]:
    """(train spec, train source, train indices, ID evaluation indices, how the split was made): the data set's
    train split when `id_spec` names another one, otherwise a seeded half of the ID source, disjoint from the
    evaluated half."""
    from data.sources import open_source
    from ood.inputs import InputError

    train_spec = train_spec_for(id_spec)
    if train_spec is not None:
        train_source = open_source(train_spec)
        train_idx, id_idx = subsample(len(train_source), train_limit, seed), subsample(len(id_source), limit, seed + 1)
        return train_spec, train_source, train_idx, id_idx, f"{train_spec}, {len(train_idx)} sampled (seed {seed})"
    order = np.random.default_rng(seed).permutation(len(id_source))
    half = len(order) // 2
    if half < 2:
        raise InputError(f"{id_spec} has {len(id_source)} images; the ID train/eval split needs at least 4")
    train_idx, rest = np.sort(order[:half][:train_limit]), order[half:]
    id_idx = np.sort(rest if limit is None else rest[:limit])
    how = f"seeded split of {id_spec}: {len(train_idx)} to fit, disjoint from the {len(id_idx)} evaluated"
    return id_spec, id_source, train_idx, id_idx, how
