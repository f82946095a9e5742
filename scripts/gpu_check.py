"""The GPU check behind scripts/gpu_check.sh: one command that proves the CUDA half of the product.

Steps (each one's result lands in ONE JSON file, rewritten after every step so a run cut short still says how
far it got):

    train_smoke          the `smoke` recipe on the chosen device (bf16 autocast where supported, channels_last)
    train_cifar10_shaped the `cifar10-gpu` recipe (full-width ResNet-18, 512-512-512 projector, LARS, K = 8192)
                         for a few hundred steps on Fashion-MNIST turned to 3 channels at 32 x 32
    compile              eager vs torch.compile images/s of the same network's train step (CUDA only): whether
                         compiling would pay, since the trainer does not compile
    ddp                  the same short run twice, as one plain process and under `torchrun --nproc_per_node 1`
                         (NCCL on CUDA, gloo on CPU); the per-step losses and final weights must match
    export_onnx          the CUDA-trained cifar10-shaped checkpoint -> ONNX with the product's parity gate, then
                         onnxruntime (CUDA provider when present, else CPU) against PyTorch fp32, zeros entry by
                         entry (gate: no flip beyond 1e-5; an exact zero pattern is reported)
    tensorrt             `export_tensorrt` with its parity check when `tensorrt` imports, else "not available"
    faiss_gpu            the FAISS backend (GPU copy when faiss-gpu and a GPU are present) against exact top-k

Images/s counts source images (each yields two augmented views), as the trainer's metrics do; the steady value
is the median over log windows after the first (which holds the warm-up).

Packages: the check needs only what the device machine's image holds (torch, torchvision, numpy, scipy,
Pillow, safetensors, tqdm, onnx, onnxscript, onnxruntime) plus pydantic, whose wheels gpu_check.sh carries.
It blocks the modules that image lacks or that only [dev] provides (see ABSENT_ON_DEVICE) before importing
the project, so a CPU run here proves the check does not need them; faiss and numba are unblocked only for
the optional faiss step (index/'s top-k uses numba).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gzip
import importlib
import importlib.util
import json
import math
import os
import pkgutil
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "lpjepa-gpu-check/1"
JSON_NAME = "gpu_check.json"
# Absent from the device machine's image (KINDS.md, package list of 2026-11-17) or needed only by [dev]: the
# check must run without them. pydantic (the configs' and metadata's schemas) is absent there too, but models/,
# pretrain/ and export/ need it: gpu_check.sh carries its wheels (GPU_CHECK_WHEELS), so it is not blocked here.
# faiss and numba (which the image does have; index/ uses it) are lifted again for the optional faiss step.
ABSENT_ON_DEVICE = (
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic_settings",
    "multipart",
    "python_multipart",
    "faiss",
    "numba",
    "pymilvus",
    "milvus_lite",
    "pytest",
    "hypothesis",
    "httpx",
    "schemathesis",
)
PROJECT_PACKAGES = ("models", "pretrain", "export", "index", "serve", "cli")
# The modules the check imports must all load on the device machine; the rest is reported, not required.
REQUIRED_PACKAGES = ("models", "pretrain", "export", "cli")
NOT_AVAILABLE = "not available"


def block_absent_modules(names: tuple[str, ...] = ABSENT_ON_DEVICE) -> None:
    """Make `import name` fail (and importlib.util.find_spec return None) as on a machine without it."""
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]


def unblock(name: str) -> None:
    if name in sys.modules and sys.modules[name] is None:
        del sys.modules[name]


# ------------------------------------------------------------------------------------------------ results
class Report:
    """The one JSON document; written atomically after every step."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.doc: dict[str, Any] = {"schema": SCHEMA, **meta, "steps": {}, "passed": None}

    def step(self, name: str, result: dict[str, Any]) -> None:
        self.doc["steps"][name] = result
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def run_step(report: Report, name: str, fn: Any, *args: Any) -> dict[str, Any]:
    """Run one step; an exception becomes status 'failed' with its message, so later steps still run."""
    print(f"[gpu_check] {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as err:  # a check reports every failure instead of stopping at the first
        result = {
            "status": "failed",
            "error": f"{type(err).__name__}: {err}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
    result.setdefault("seconds", round(time.perf_counter() - t0, 2))
    report.step(name, result)
    brief = {k: v for k, v in result.items() if k in ("status", "seconds", "images_per_s", "error", "reason")}
    print(f"[gpu_check] {name}: {json.dumps(brief, default=str)}", flush=True)
    return result


# ------------------------------------------------------------------------------------------- environment
def environment(device: str) -> dict[str, Any]:
    import numpy
    import onnx
    import onnxruntime
    import torch
    import torchvision

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "cuda_available": torch.cuda.is_available(),
        "device": device,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        with contextlib.suppress(Exception):  # a tuple in current torch, an int in old ones
            version = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return env


def import_survey() -> dict[str, Any]:
    """Import every project module with the device machine's missing packages blocked; the check's own
    packages must all load, the others (serve needs fastapi, the csr kernels numba) are listed with the cause."""
    failed: dict[str, str] = {}
    count = 0
    for pkg in PROJECT_PACKAGES:
        # walk_packages imports each subpackage to list it; one that fails is still tried (and recorded) below
        found = pkgutil.walk_packages([str(REPO / pkg)], prefix=f"{pkg}.", onerror=lambda _name: None)
        names = [pkg] + [m.name for m in found]
        for name in names:
            count += 1
            try:
                importlib.import_module(name)
            except Exception as err:
                failed[name] = f"{type(err).__name__}: {err}"[:300]
    required_failed = {k: v for k, v in failed.items() if k.split(".")[0] in REQUIRED_PACKAGES}
    return {
        "status": "failed" if required_failed else "ok",
        "blocked": list(ABSENT_ON_DEVICE),
        "modules": count,
        "required_packages": list(REQUIRED_PACKAGES),
        "required_failed": required_failed,
        "unavailable_without_blocked": {k: v for k, v in failed.items() if k not in required_failed},
    }


# --------------------------------------------------------------------------------------------------- data
def _write_idx(path: Path, array: Any) -> None:
    """IDX (the Fashion-MNIST file format): magic (0, 0, uint8 code 8, ndim), big-endian uint32 sizes, bytes."""
    import numpy as np

    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def synthetic_fashion_mnist(root: Path, n_train: int = 8192, n_test: int = 1024) -> Path:
    """Class-structured 28 x 28 images in Fashion-MNIST's own files, used only when the real data is neither
    installed nor carried: each class is a bright rectangle at its own place, plus noise."""
    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for c in range(10):
            r, q = divmod(c, 4)
            images[labels == c, 2 + 8 * r : 10 + 8 * r, 2 + 6 * q : 10 + 6 * q] = 230
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def prepare_data(work: Path) -> dict[str, Any]:
    """Real Fashion-MNIST when installed or carried (LPJEPA_FASHION_MNIST_DIR), else synthetic files."""
    from data.sources import DataSpecError, fashion_mnist_dir

    try:
        root = fashion_mnist_dir()
        return {"spec": "fashion-mnist", "real": True, "root": str(root)}
    except DataSpecError:
        root = synthetic_fashion_mnist(work / "synthetic-fashion-mnist")
        os.environ["LPJEPA_FASHION_MNIST_DIR"] = str(root)  # children (torchrun workers) inherit it
        return {"spec": "fashion-mnist", "real": False, "root": str(root), "note": "synthetic: no real data found"}


# ------------------------------------------------------------------------------------------------ training
def _cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_run(recipe: str, overrides: list[str], out: Path, device: str) -> dict[str, Any]:
    """Train one recipe in this process and report speed, memory and what precision/layout it ran with."""
    import torch

    from pretrain.config import load_config
    from pretrain.trainer import train

    cfg = load_config(recipe, [*overrides, f"train.device={device}"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    threads = torch.get_num_threads()  # a recipe's train.threads (smoke: 1) must not slow the later CPU steps
    t0 = time.perf_counter()
    try:
        result = train(cfg, out, force=True, progress=False)
        _cuda_sync()
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    rates = [r["images_per_s"] for r in rows]
    steady = statistics.median(rates[1:]) if len(rates) > 1 else rates[0]
    last = result.summary["last"]
    out_d: dict[str, Any] = {
        "status": "ok" if result.status == "completed" and math.isfinite(last["loss"]) else "failed",
        "recipe": recipe,
        "overrides": overrides,
        "device": result.summary["device"],
        "precision": result.summary["precision"],
        "channels_last": cfg.model.channels_last,
        "batch_size": cfg.train.batch_size,
        "steps": result.step,
        "images_per_s": round(steady, 1),
        "images_per_s_windows": rates,
        "wall_s": round(wall, 2),
        "first_loss": rows[0]["loss"],
        "final_loss": last["loss"],
        "final_l0": last.get("l0"),
        "target_l0": last.get("target_l0"),
        "run_dir": str(out),
    }
    if device == "cuda":
        out_d["peak_gpu_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out_d["peak_gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    else:
        out_d["peak_gpu_mem_mib"] = None
    return out_d


def compile_probe(device: str, quick: bool, overrides: list[str]) -> dict[str, Any]:
    """Eager vs torch.compile images/s of the cifar10-shaped network's forward + backward under bf16 autocast
    and channels_last (the trainer's layout). The trainer does not compile; this says whether it should."""
    if device != "cuda":
        return {"status": "skipped", "reason": "CUDA only (inductor's CPU build is minutes on 2 cores)"}
    import torch

    from models.encoder import build_model
    from pretrain.config import load_config
    from pretrain.trainer import model_config

    stats = ["model.in_channels=3", "model.mean=[0.5,0.5,0.5]", "model.std=[0.25,0.25,0.25]"]
    cfg = load_config("cifar10-gpu", [*overrides, *stats])
    net = build_model(model_config(cfg)).cuda().to(memory_format=torch.channels_last).train()
    batch = 2 * cfg.train.batch_size  # both views go through as one batch, as in TrainNet
    x = torch.randn(batch, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    steps = 10 if quick else 30

    def step(model: Any) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            z = model(x)
        z.float().square().mean().backward()

    def rate(model: Any) -> float:
        for _ in range(3):
            step(model)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step(model)
        torch.cuda.synchronize()
        return batch / 2 * steps / (time.perf_counter() - t0)

    eager = rate(net)
    compiled = torch.compile(net)
    t0 = time.perf_counter()
    step(compiled)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    fast = rate(compiled)
    return {
        "status": "ok",
        "what": "encoder forward + backward, bf16 autocast, channels_last, batch of 2 views",
        "images_per_s_eager": round(eager, 1),
        "images_per_s_compiled": round(fast, 1),
        "speedup": round(fast / eager, 3),
        "compile_s": round(compile_s, 1),
        "helps": fast / eager > 1.05,
    }


# ----------------------------------------------------------------------------------------------------- DDP
def deterministic(device: str) -> None:
    """Same algorithms in both DDP-check processes, so equal inputs give equal losses bit for bit."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    if device == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def ddp_worker(args: argparse.Namespace) -> int:
    """One training process of the DDP check (plain, or a torchrun rank); the trainer decides which."""
    block_absent_modules()
    deterministic(args.device)
    from pretrain.config import load_config
    from pretrain.trainer import train

    cfg = load_config(args.recipe, [*args.set, f"train.device={args.device}"])
    train(cfg, Path(args.out), force=True, progress=False)
    return 0


def _run_all(cmds: dict[str, list[str]], env: dict[str, str], timeout: float) -> dict[str, tuple[int, str]]:
    """Start every command at once (each in its own session, logs to files) and wait; 124 = killed at timeout."""
    results = {}
    with contextlib.ExitStack() as stack:
        procs = {}
        for name, cmd in cmds.items():
            log = stack.enter_context(tempfile.TemporaryFile(mode="w+"))
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            procs[name] = (proc, log)
        deadline = time.monotonic() + timeout
        for name, (proc, log) in procs.items():
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                code = 124
            log.seek(0)
            results[name] = (code, log.read())
    return results


def ddp_check(device: str, overrides: list[str], work: Path, timeout: float) -> dict[str, Any]:
    """The same run as one plain process and as a one-rank torchrun job; losses and weights must agree."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # cuBLAS's deterministic mode
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    sets = [a for s in [*overrides, "train.log_every=1", "train.checkpoint_every=0"] for a in ("--set", s)]
    worker = [str(Path(__file__).resolve()), "--ddp-worker", "--device", device, "--recipe", "smoke", *sets]
    runs = {
        "single": [sys.executable, *worker, "--out", str(work / "single")],
        "torchrun": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "1",
            *worker,
            "--out",
            str(work / "torchrun"),
        ],
    }
    summaries, losses = {}, {}
    # Both at once: independent processes (one GPU or one thread each), so the check costs one run's wall time.
    for name, (code, log) in _run_all(runs, env, timeout).items():
        if code != 0:
            return {"status": "failed", "error": f"{name} run exited {code}", "log_tail": log[-3000:]}
        summaries[name] = json.loads((work / name / "summary.json").read_text(encoding="utf-8"))
        rows = (work / name / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        losses[name] = [json.loads(line)["loss"] for line in rows]
    a, b = losses["single"], losses["torchrun"]
    diffs = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True)]
    identical = a == b
    weights_identical = summaries["single"]["weight_digests"] == summaries["torchrun"]["weight_digests"]
    backend = summaries["torchrun"].get("ddp_backend")
    want_backend = "nccl" if device == "cuda" else "gloo"
    # CPU: gloo's one-rank all-reduce is a copy and every kernel is deterministic, so equality is exact. CUDA:
    # deterministic mode covers cuDNN and cuBLAS, but an op without a deterministic kernel may remain (a warning,
    # not an error), so a relative 1e-3 over these few steps is accepted and the exact verdict reported beside.
    tolerance = 0.0 if device == "cpu" else 1e-3
    problems = []
    if backend != want_backend:
        problems.append(f"torchrun run used backend {backend!r}, expected {want_backend!r} (DDP path not taken)")
    if summaries["single"].get("ddp_backend") is not None:
        problems.append("the plain run unexpectedly joined a process group")
    if max(diffs, default=0.0) > tolerance:
        problems.append(f"losses differ: max relative difference {max(diffs):.3g} > {tolerance:g}")
    if device == "cpu" and not weights_identical:
        problems.append("final weights differ between the plain and the DDP run")
    if len(a) != summaries["single"]["step"] or not a:
        problems.append(f"expected one logged loss per step, got {len(a)}")
    return {
        "status": "failed" if problems else "ok",
        "problems": problems,
        "backend": backend,
        "world_size": summaries["torchrun"]["world_size"],
        "steps": len(a),
        "losses_single": a,
        "losses_torchrun": b,
        "losses_identical": identical,
        "loss_max_rel_diff": max(diffs, default=0.0),
        "tolerance": tolerance,
        "weights_identical": weights_identical,
    }


# -------------------------------------------------------------------------------------------------- export
def export_check(run_dir: str, out: Path, device: str, parity_images: int, exporter: str) -> dict[str, Any]:
    """Export with the product's parity gate (CPU provider), then embed with the runtime's default providers
    (CUDA first when this onnxruntime has it) and compare with PyTorch fp32: no zero may flip beyond
    1e-5 (the product gate), and whether the zero pattern is exact entry for entry is reported."""
    import numpy as np

    from export.onnx_export import export_checkpoint, load_images, torch_reference
    from export.parity import compare
    from export.runtime import EmbeddingRuntime, default_providers
    from models.checkpoint import load_checkpoint

    onnx_path = out / "model.onnx"
    report = export_checkpoint(
        run_dir, onnx_path, parity_source="fashion-mnist:test", parity_images=parity_images, exporter=exporter
    )
    model, extra = load_checkpoint(run_dir)
    images = load_images("fashion-mnist:test", model.config.in_channels, parity_images, purpose="parity").images
    _, reference = torch_reference(model, model.config, images)
    providers = default_providers()
    runtime = EmbeddingRuntime(onnx_path, providers=providers, batch_size=128)
    got = runtime.embed_dense(images)
    check = compare(reference, got, "fp32", backend="+".join(runtime.providers))
    zero_flips = int(np.count_nonzero((reference == 0) != (got == 0)))
    flipped = np.abs(np.where((reference == 0) != (got == 0), reference + got, 0.0))
    zeros_exact = zero_flips == 0
    # Pass: the product's fp32 gate (max |err| <= 1e-4, no zero/non-zero flip beyond |z| <= 1e-5). A flip of a
    # value that close to 0 is summation-order noise (a ReLU input of ~1e-7), so it is reported (zeros_exact,
    # zero_pattern_flips, max_abs_of_flipped) rather than failed: among 512 x 512 outputs one such flip is
    # plausible by chance, and failing on it would send a GPU session chasing noise.
    ok = report.passed and check.passed
    return {
        "status": "ok" if ok else "failed",
        "checkpoint_device": extra.get("train_config", {}).get("train", {}).get("device"),
        "exporter": exporter,
        "onnx_bytes": onnx_path.stat().st_size,
        "export_parity": report.summary(),
        "export_seconds": {k: round(v, 2) for k, v in report.seconds.items()},
        "runtime_providers": runtime.providers,
        "cuda_provider": "CUDAExecutionProvider" in runtime.providers,
        "n_images": len(images),
        "max_abs_err": check.max_abs_err,
        "support_mismatches": check.support_mismatches,
        "zero_pattern_flips": zero_flips,
        "max_abs_of_flipped": float(flipped.max()) if flipped.size else 0.0,
        "zeros_exact": zeros_exact,
        "zeros_rule": "strict: the zero pattern equals PyTorch's entry for entry; the gate allows flips within 1e-5",
        "l0_torch": check.l0_reference,
        "l0_onnx": check.l0_exported,
        "runtime_failures": check.failures,
        "onnx_path": str(onnx_path),
        "_embeddings": got,  # for the faiss step; dropped before writing
    }


def tensorrt_check(run_dir: str, out: Path, parity_images: int) -> dict[str, Any]:
    if importlib.util.find_spec("tensorrt") is None:
        return {"status": NOT_AVAILABLE, "reason": "the tensorrt package is not installed"}
    from export.backends import missing_requirements
    from export.tensorrt import export_tensorrt

    missing = missing_requirements()
    if missing:
        return {"status": NOT_AVAILABLE, "reason": "; ".join(missing)}
    import tensorrt

    report = export_tensorrt(
        run_dir, out / "model.engine", parity_source="fashion-mnist:test", parity_images=parity_images
    )
    return {"status": "ok" if report.passed else "failed", "tensorrt": tensorrt.__version__, **report.summary()}


def faiss_check(embeddings: Any, device: str) -> dict[str, Any]:
    """The product's FAISS backend on the exported embeddings, against exact inner-product top-10 by numpy."""
    unblock("faiss")
    unblock("numba")  # index/ ranks results with numba kernels; the device image has numba, only fastapi is missing
    if importlib.util.find_spec("faiss") is None:
        return {"status": NOT_AVAILABLE, "reason": "the faiss package is not installed"}
    import faiss
    import numpy as np

    from index.faiss_index import FaissIndex

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    gpu_build = hasattr(faiss, "StandardGpuResources")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    k = min(10, len(x))
    index = FaissIndex(x.shape[1], "ip", spec="Flat", use_gpu=None if device == "cuda" else False)
    index.add(np.arange(len(x)), x)
    scores, _ids = index.search(x, k)
    used_gpu = index._gpu_index is not None  # the backend's own GPU copy, made only when faiss-gpu can
    exact = np.sort(x @ x.T, axis=1)[:, ::-1][:, :k]
    err = float(np.abs(np.asarray(scores, dtype=np.float64) - exact).max())
    ok = err <= 1e-3 * max(1.0, float(np.abs(exact).max()))
    result = {
        "status": "ok" if ok else "failed",
        "faiss": getattr(faiss, "__version__", "?"),
        "gpu_build": gpu_build,
        "num_gpus": gpus,
        "searched_on_gpu": used_gpu,
        "n": len(x),
        "k": k,
        "max_score_err_vs_numpy": err,
    }
    if not used_gpu:
        result["gpu"] = f"{NOT_AVAILABLE}: " + (
            "faiss has no GPU support (faiss-cpu)" if not gpu_build else "no GPU visible to faiss or --device cpu"
        )
    return result


# ---------------------------------------------------------------------------------------------------- main
def plan(quick: bool, device: str) -> dict[str, Any]:
    """Step sizes: --quick keeps the CPU smoke test under a minute on 2 cores; the full plan fits 8 GPU minutes."""
    threads = ["train.threads=1"] if device == "cpu" else []
    if quick:
        tiny = ["model.backbone_kwargs.width=0.125", "model.projector_dims=[64,64,64]", "method.num_projections=128"]
        return {
            "smoke": ["train.steps=6", "train.batch_size=32", "train.log_every=2", "data.subset=1024", *threads],
            "cifar": [
                "data.spec=fashion-mnist",
                "model.in_channels=3",
                *tiny,
                "train.steps=4",
                "train.batch_size=16",
                "train.log_every=2",
                "train.checkpoint_every=0",
                "data.subset=1024",
                *threads,
            ],
            "ddp": [*tiny, "train.steps=3", "train.batch_size=16", "data.subset=512", "train.threads=1"],
            "parity_images": 64,
        }
    return {
        "smoke": [*threads],  # the packaged recipe as shipped: 120 steps of 128
        "cifar": [
            "data.spec=fashion-mnist",
            "model.in_channels=3",
            "train.steps=300",
            "train.log_every=50",
            "train.checkpoint_every=0",
            *threads,
        ],
        "ddp": ["train.steps=8", "train.batch_size=128", *threads],
        "parity_images": 512,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke test well under a minute")
    parser.add_argument("--out", default="runs/gpu-check", help=f"folder for {JSON_NAME} (created)")
    parser.add_argument("--work", default=None, help="folder for run folders and the ONNX file (default: a temp dir)")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile probe")
    parser.add_argument("--ddp-timeout", type=float, default=240.0, help="seconds per DDP-check process")
    # internal: one process of the DDP check
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", default="smoke", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    return parser


def run_steps(report: Report, args: argparse.Namespace, work: Path) -> None:
    """Every step in order, each recorded (and the report rewritten) as it ends; a failed step skips only the
    steps that need its output."""
    report.doc["environment"] = environment(args.device)
    report.write()
    run_step(report, "imports", import_survey)
    report.doc["data"] = prepare_data(work)
    sizes = plan(args.quick, args.device)
    run_step(report, "train_smoke", train_run, "smoke", sizes["smoke"], work / "smoke", args.device)
    cifar = run_step(
        report, "train_cifar10_shaped", train_run, "cifar10-gpu", sizes["cifar"], work / "cifar", args.device
    )
    run_step(report, "ddp", ddp_check, args.device, sizes["ddp"], work / "ddp", args.ddp_timeout)
    export = {"status": "skipped", "reason": "the cifar10-shaped run failed"}
    if cifar.get("status") == "ok":
        export = run_step(
            report, "export_onnx", export_check, cifar["run_dir"], work, args.device, sizes["parity_images"],
            args.exporter,
        )  # fmt: skip
    else:
        report.step("export_onnx", export)
    embeddings = export.pop("_embeddings", None)
    report.write()
    if cifar.get("status") == "ok":
        run_step(report, "tensorrt", tensorrt_check, cifar["run_dir"], work, sizes["parity_images"])
    if embeddings is not None:
        run_step(report, "faiss_gpu", faiss_check, embeddings, args.device)
    if args.no_compile:
        report.step("compile", {"status": "skipped", "reason": "--no-compile"})
    else:  # last: the slowest step and the likeliest to misbehave on a new stack
        run_step(report, "compile", compile_probe, args.device, args.quick, sizes["cifar"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.ddp_worker:
        return ddp_worker(args)

    block_absent_modules()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("gpu_check: error: --device cuda but no CUDA device is visible; use --device cpu\n")
        return 2
    if args.device == "cpu" and args.quick:
        torch.set_num_threads(1)
    own_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="lpjepa-gpu-check-")) if own_work else Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now(_dt.timezone.utc)
    report = Report(
        Path(args.out) / JSON_NAME,
        {
            "started_at": started.isoformat(timespec="seconds"),
            "device_requested": args.device,
            "quick": args.quick,
            "argv": sys.argv[1:] if argv is None else list(argv),
        },
    )
    t_start = time.perf_counter()
    try:
        run_steps(report, args, work)
    finally:
        steps = report.doc["steps"]
        report.doc["failed_steps"] = [k for k, v in steps.items() if v.get("status") == "failed"]
        report.doc["passed"] = not report.doc["failed_steps"]
        report.doc["total_s"] = round(time.perf_counter() - t_start, 1)
        report.doc["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        report.write()
        if own_work:
            with contextlib.suppress(OSError):
                shutil.rmtree(work)
    print(summary_table(report.doc), flush=True)
    print(f"[gpu_check] wrote {report.path}", flush=True)
    return 0 if report.doc["passed"] else 1


def summary_table(doc: dict[str, Any]) -> str:
    lines = [f"{'step':<22} {'status':<14} {'seconds':>8}  facts"]
    keys = (
        "images_per_s",
        "peak_gpu_mem_mib",
        "precision",
        "backend",
        "losses_identical",
        "loss_max_rel_diff",
        "runtime_providers",
        "zeros_exact",
        "max_abs_err",
        "speedup",
        "reason",
        "error",
    )
    for name, res in doc["steps"].items():
        facts = ", ".join(f"{k}={res[k]}" for k in keys if k in res and res[k] is not None)
        lines.append(f"{name:<22} {res.get('status', '?'):<14} {res.get('seconds', 0):>8}  {facts[:200]}")
    lines.append(f"passed={doc['passed']} total_s={doc.get('total_s')}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
