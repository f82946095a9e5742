"""Inference speed of the exported model on this CPU: PyTorch eager (baseline) vs ONNX Runtime fp32 vs int8.

One run exports the checkpoint twice (fp32 and int8, both parity-checked on real images), then times all three
backends on the same preprocessed Fashion-MNIST test images at batch 1, 32 and 256. Rounds are interleaved
(each round calls every backend once per batch size) so background load hits all backends alike; the table
reports the median over rounds. Preprocessing is excluded: this measures the network.

    .venv/bin/python bench/bench_export.py [--checkpoint RUN_OR_FILE] [--threads 2] [--json out.json]

Without --checkpoint it builds the fmnist-cpu recipe's architecture (quarter-width ResNet-18, small stem,
28 px, 512-512-512 projector) with BatchNorm statistics from real images; speed does not depend on training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
from common import md_table

BATCHES = (1, 32, 256)


def build_default_checkpoint(path: Path) -> Path:
    import torch

    from data.sources import open_source
    from models.checkpoint import save_checkpoint
    from models.config import FASHION_MNIST_MEAN, FASHION_MNIST_STD, ModelConfig
    from models.encoder import build_model

    torch.manual_seed(0)
    config = ModelConfig(
        backbone="resnet18",
        backbone_kwargs={"width": 0.25, "small_stem": True},
        projector_dims=[512, 512, 512],
        in_channels=1,
        image_size=28,
        mean=list(FASHION_MNIST_MEAN),
        std=list(FASHION_MNIST_STD),
    )
    model = build_model(config)
    x = torch.from_numpy(np.array(open_source("fashion-mnist:train").array[:512])).float().div(255).unsqueeze(1)
    model.train()
    with torch.no_grad():
        for chunk in ((x - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]).split(128):
            model(chunk)
    return save_checkpoint(path, model.eval())


def time_rounds(backends: dict[str, callable], batch: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """Interleaved timing: every round runs each backend once, after one warm-up call each."""
    for fn in backends.values():
        fn(batch)
    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(rounds):
        for name, fn in backends.items():
            t0 = time.perf_counter()
            fn(batch)
            times[name].append(time.perf_counter() - t0)
    return times


def measure(args: argparse.Namespace, tmp: Path) -> tuple[Any, dict, list[dict]]:
    """Export fp32 and int8 (parity-checked), then time the three backends at every batch size."""
    import torch

    from data.sources import open_source
    from export.onnx_export import export_checkpoint
    from export.runtime import EmbeddingRuntime
    from models.checkpoint import load_checkpoint

    ckpt = args.checkpoint or build_default_checkpoint(tmp / "model.safetensors")
    reports = {}
    for precision in ("fp32", "int8"):
        reports[precision] = export_checkpoint(
            ckpt, tmp / f"{precision}.onnx", precision=precision, exporter=args.exporter, parity_images=512
        )
        print(reports[precision].format(), file=sys.stderr)
    model, _ = load_checkpoint(ckpt)
    runtimes = {
        p: EmbeddingRuntime(
            tmp / f"{p}.onnx", providers=["CPUExecutionProvider"], batch_size=256, num_threads=args.threads
        )
        for p in ("fp32", "int8")
    }
    src = open_source("fashion-mnist:test")
    images = runtimes["fp32"].preprocess([src.image(i) for i in range(max(BATCHES))])

    def torch_eager(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    backends = {
        "PyTorch eager fp32": torch_eager,
        "ONNX Runtime fp32": runtimes["fp32"].run,
        "ONNX Runtime int8": runtimes["int8"].run,
    }
    results = []
    for batch_size, rounds in zip(BATCHES, args.rounds, strict=True):
        for name, ts in time_rounds(backends, images[:batch_size], rounds).items():
            p50 = statistics.median(ts)
            results.append(
                {"backend": name, "batch": batch_size, "rounds": rounds, "p50_ms": 1e3 * p50,
                 "images_per_s": batch_size / p50}
            )  # fmt: skip
    return model, reports, results


def report(model, reports: dict, results: list[dict], threads: int) -> str:
    import onnxruntime
    import torch

    config = model.config
    int8 = reports["int8"].checks[-1]
    eager = {r["batch"]: r["images_per_s"] for r in results if r["backend"].startswith("PyTorch")}
    rows = [[r["backend"], r["batch"], f"{r['p50_ms']:.2f}", f"{r['images_per_s']:.0f}",
             f"{r['images_per_s'] / eager[r['batch']]:.2f}x"] for r in results]  # fmt: skip
    lines = [
        f"model: {config.backbone} {config.backbone_kwargs}, {config.in_channels}x{config.image_size}px, "
        f"projector {config.projector_dims}; {threads} threads; torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}; CPU: {cpu_name()}",
        "",
        *md_table(["backend", "batch", "p50 latency (ms)", "images/s", "speed-up vs eager"], rows, align="lrrrr"),
        "",
        f"int8 vs PyTorch fp32 on 512 Fashion-MNIST test images: l0 drift {int8.l0_drift:.4f}, "
        f"top-10 overlap {int8.topk_overlap:.3f}, max |err| {int8.max_abs_err:.3f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--rounds",
        type=int,
        nargs=3,
        default=(40, 10, 5),
        metavar=("B1", "B32", "B256"),
        help="timed rounds per batch size (median reported)",
    )
    parser.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp_dir:
        model, reports, results = measure(args, Path(tmp_dir))
    print(report(model, reports, results, args.threads))
    if args.json:
        parity = {p: r.to_dict() for p, r in reports.items()}
        args.json.write_text(json.dumps({"results": results, "threads": args.threads, "parity": parity}, indent=2))
    return 0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
