"""Drift monitor cost per one-image request: this checkout's `DriftMonitor.observe_rows` against a baseline
revision's, in one run, on synthetic rectified codes at a dense and a sparse activation rate.

The monitor keeps the window's m principal projections up to date from the dimensions whose counts change
(O(nnz x m) per image) and rebuilds them (O(D x m)) when the leaving and entering rows cover more than D / 2;
the baseline (before that change) rebuilt on every request. Medians of `--rounds` interleaved rounds.

    .venv/bin/python bench/bench_drift.py [--baseline 91cfa18] [--dim 512] [--rounds 7]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ood import calibrate  # noqa: E402
from ood import drift as current  # noqa: E402


def baseline_module(rev: str, tmp: Path) -> ModuleType:
    """ood/drift.py as of `rev`, imported under its own name (its numba cache beside it, not in ood/)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:ood/drift.py"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    path = tmp / "drift_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("drift_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["drift_baseline"] = module
    spec.loader.exec_module(module)
    return module


def codes(rng: np.random.Generator, n: int, dim: int, loc: float) -> np.ndarray:
    """Rectified codes whose dimensions fire together through a shared latent, like a trained model's."""
    centre = rng.normal(loc, 0.3, dim)
    x = centre + 0.8 * rng.normal(size=(n, 1)) + rng.normal(0, 0.7, (n, dim))
    return np.maximum(x, 0.0).astype(np.float32)


def per_request_us(monitor, rows: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for r in rows:
        monitor.observe_rows([r])
    return 1e6 * (time.perf_counter() - start) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="91cfa18", help="git revision whose ood/drift.py is the baseline")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        base = baseline_module(args.baseline, Path(tmp))
        print(f"| activation rate | m | {args.baseline} us | this checkout us | speed-up |")
        print("|---|---|---|---|---|")
        for loc in (0.0, -2.0):
            x = codes(rng, 8000, args.dim, loc)
            cal = calibrate(x[:6000], seed=0, drift_window=64)
            rows = [np.flatnonzero(r) for r in x[6000:]]
            monitors = {
                "base": base.DriftMonitor.from_calibration(cal),
                "new": current.DriftMonitor.from_calibration(cal),
            }
            for mon in monitors.values():  # compile and fill the window
                per_request_us(mon, rows[:256])
            times: dict[str, list[float]] = {name: [] for name in monitors}
            for _ in range(args.rounds):
                for name, mon in monitors.items():
                    times[name].append(per_request_us(mon, rows))
            b, n = statistics.median(times["base"]), statistics.median(times["new"])
            m = monitors["new"]._weights.shape[0]
            print(f"| {float(np.mean(x > 0)):.3f} | {m} | {b:.1f} | {n:.1f} | {b / n:.2f}x |")


if __name__ == "__main__":
    main()
