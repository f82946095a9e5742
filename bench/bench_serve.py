"""Load benchmark of `lpjepa serve`: N concurrent clients for T seconds on loopback, with and without batching.

Each configuration starts a real server process (`lpjepa serve`, uvicorn) and drives POST /v1/embed with one
real image per request (CIFAR-10 samples from foolbox), which is the case dynamic batching exists for. The
configurations (batching with each --waits value, and --no-batching) are interleaved run by run, each run on a
fresh server; the table reports medians over `--repeats` runs of requests/s and of the per-run p50 and p99
latencies, the mean model batch (from the server's own Prometheus histogram), and the total error count (which
must be zero: the script exits 1 otherwise).

    .venv/bin/python bench/bench_serve.py --clients 32 --seconds 8 --repeats 3
    .venv/bin/python bench/bench_serve.py --model path/to/model.onnx --waits 0 2 5

Results: a Markdown table on stdout, docs/results/serve.md, and JSON beside it (docs/results/serve.json).
Not a test: it takes minutes and its numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


PRESETS = {
    # name: (ResNet-18 width, image size, input channels, projector widths)
    "tiny": (0.125, 28, 1, [64, 64, 64]),  # the test model: per-call overhead dominates
    "small": (0.5, 32, 3, [512, 512, 512]),  # CIFAR-sized: convolution compute per image dominates
    # the paper's ImageNet projector (2048-2048-2048): at batch 1 a call is bound by reading its weights
    "wide": (0.25, 32, 3, [2048, 2048, 2048]),
}


def build_model(out_dir: Path, preset: str) -> Path:
    """Export a randomly initialised ResNet-18 encoder (the serving cost does not depend on training)."""
    from export.onnx_export import export_checkpoint
    from models.checkpoint import save_checkpoint
    from models.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
    from models.encoder import build_model as build_encoder

    width, size, channels, dims = PRESETS[preset]
    mean, std = (list(IMAGENET_MEAN), list(IMAGENET_STD)) if channels == 3 else ([0.286], [0.353])
    config = ModelConfig(
        backbone="resnet18",
        backbone_kwargs={"width": width},
        in_channels=channels,
        image_size=size,
        mean=mean,
        std=std,
        projector_dims=dims,
    )
    folder = out_dir / preset
    ckpt = save_checkpoint(folder / "model.safetensors", build_encoder(config))
    onnx_path = folder / "model.onnx"
    export_checkpoint(ckpt, onnx_path, parity=False)
    return onnx_path


def describe(preset: str) -> str:
    width, size, channels, dims = PRESETS[preset]
    return f"ResNet-18 x{width}, {size}px {'RGB' if channels == 3 else 'grey'}, projector {'-'.join(map(str, dims))}"


def start_server(model: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "cli.main",
        "serve",
        "--model",
        str(model),
        "--port",
        "0",
        "--log-level",
        "warning",
        "--max-inflight",
        "4096",
        "--max-queue",
        "8192",
        *extra,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server exited with code {proc.wait()} before listening")
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            url = match.group(1)
            for _ in range(400):
                try:
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        return proc, url
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def encode_request(host: str, image: bytes, name: str) -> bytes:
    """One complete keep-alive POST /v1/embed with a multipart body, encoded once before the clock starts."""
    boundary = "lpjepabench7d1f"
    ctype = "image/jpeg" if image[:2] == b"\xff\xd8" else "image/png"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        f"Content-Type: {ctype}\r\n\r\n".encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/embed HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(v) for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.lower() == "content-length")
    return status, await reader.readexactly(length)


async def drive(url: str, images: list[bytes], clients: int, seconds: float) -> dict[str, float]:
    """Closed-loop clients on raw keep-alive connections.

    A lean client on purpose: httpx spends several ms of CPU per request, and on a small machine the clients share
    the CPUs with the server, so a heavy client would measure itself. Every response's status is checked and its
    body parsed as JSON with one embedding (parsing happens after the latency is taken).
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    requests = [encode_request(f"{host}:{port}", img, f"{i}.png") for i, img in enumerate(images)]
    latencies: list[float] = []
    errors = 0
    bodies: list[bytes] = []
    stop_at = 0.0

    ready = 0
    all_ready = asyncio.Event()  # (asyncio.Barrier needs Python 3.11)
    go = asyncio.Event()

    async def worker(i: int) -> None:
        nonlocal errors, ready
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(requests[i % len(requests)])  # warm-up request, not timed
            await read_response(reader)
            ready += 1
            if ready == clients:
                all_ready.set()
            await go.wait()
            j = i
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    writer.write(requests[j % len(requests)])
                    status, body = await read_response(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    errors += 1
                    return
                j += clients
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                    if len(bodies) < 64:
                        bodies.append(body)
                else:
                    errors += 1
        finally:
            writer.close()

    tasks = [asyncio.create_task(worker(i)) for i in range(clients)]
    await asyncio.wait_for(all_ready.wait(), 120)
    stop_at = time.perf_counter() + seconds
    go.set()
    started = time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    for body in bodies:  # the answers are real embeddings, not just 200s
        if len(json.loads(body)["embeddings"]) != 1:
            errors += 1
    lat = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
    }


def metric_value(url: str, name: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram, e.g. the model batch size."""
    text = httpx.get(url + "/metrics", timeout=10).text
    total = re.search(rf"^{name}_sum (\S+)$", text, re.M)
    count = re.search(rf"^{name}_count (\S+)$", text, re.M)
    return float(total.group(1)) if total else 0.0, float(count.group(1)) if count else 0.0


def configs(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    threads = ["--threads", str(args.threads)] if args.threads else []
    out = [(f"batching, max wait {w:g} ms", ["--max-wait-ms", str(w), *threads]) for w in args.waits]
    return [*out, ("no batching", ["--no-batching", *threads])]


def bench_model(model: Path, label: str, images: list[bytes], args: argparse.Namespace) -> list[dict]:
    """Runs interleave the configurations (A B C A B C ...) so drifting background load hits all of them alike."""
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs(args)}
    for rep in range(args.repeats):
        for name, extra in configs(args):
            proc, url = start_server(model, extra)
            try:
                before = metric_value(url, "lpjepa_model_batch_size")
                result = asyncio.run(drive(url, images, args.clients, args.seconds))
                after = metric_value(url, "lpjepa_model_batch_size")
                calls = after[1] - before[1]
                result["mean_batch"] = (after[0] - before[0]) / calls if calls else float("nan")
            finally:
                stop_server(proc)
            runs[name].append(result)
            print(
                f"{label} / {name} run {rep + 1}: {result['rps']:.1f} req/s, p50 {result['p50_ms']:.1f} ms, "
                f"p99 {result['p99_ms']:.1f} ms, errors {result['errors']}, mean batch {result['mean_batch']:.1f}",
                file=sys.stderr,
            )
    return [
        {
            "model": label,
            "config": name,
            "rps": statistics.median(r["rps"] for r in rs),
            "p50_ms": statistics.median(r["p50_ms"] for r in rs),
            "p99_ms": statistics.median(r["p99_ms"] for r in rs),
            "mean_batch": statistics.median(r["mean_batch"] for r in rs),
            "requests": sum(r["requests"] for r in rs),
            "errors": sum(r["errors"] for r in rs),
            "runs": rs,
        }
        for name, rs in runs.items()
    ]


START, END = "<!-- bench_serve:start -->", "<!-- bench_serve:end -->"


def write_section(path: Path, text: str) -> None:
    """Replace only the benchmark's own section of the results page, so hand-written notes around it survive."""
    block = f"{START}\n{text}\n{END}"
    old = path.read_text() if path.exists() else ""
    if START in old and END in old:
        new = old[: old.index(START)] + block + old[old.index(END) + len(END) :]
    else:
        new = (old.rstrip() + "\n\n" if old else "## Serve: load benchmark (bench/bench_serve.py)\n\n") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="an exported ONNX model (default: export the --presets)")
    ap.add_argument("--presets", default="tiny,wide", help=f"random models to export: {', '.join(PRESETS)}")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--waits", type=float, nargs="+", default=[0.0, 5.0], help="max wait values (ms) to compare")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of the server")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/serve.md")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from pretrain.data.sources import sample_image_files

    images = [p.read_bytes() for p in sample_image_files("cifar10")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            rows += bench_model(args.model, args.model.name, images, args)
        else:
            for preset in args.presets.split(","):
                model = build_model(Path(tmp), preset)
                rows += bench_model(model, describe(preset), images, args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (
        f"POST /v1/embed with one CIFAR-10 sample image (PNG/JPEG, foolbox) per request; {args.clients} "
        f"concurrent clients for {args.seconds:g} s on loopback; medians of {args.repeats} runs, each on a "
        f"fresh `lpjepa serve` process, configurations interleaved; random-weight models; max batch 64; "
        f"ONNX Runtime threads: {args.threads or 'all cores'}. Machine: {platform.machine()}, {os.cpu_count()} "
        "CPUs shared by clients, "
        f"server and other work (1-min load average at the end: {load:.1f})."
    )
    table = [
        "| model | config | requests/s | p50 ms | p99 ms | mean model batch | requests | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        table.append(
            f"| {r['model']} | {r['config']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['mean_batch']:.1f} | {r['requests']} | {r['errors']} |"
        )
    notes = []
    for model_name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model_name]
        base = next(r for r in mine if r["config"] == "no batching")
        for r in mine:
            if r is not base and base["rps"]:
                notes.append(
                    f"- {model_name}, {r['config']}: {r['rps'] / base['rps']:.2f}x the throughput of "
                    "one model call per request."
                )
    text = "\n".join([header, "", *table, "", *notes])
    print(text)
    write_section(args.out, text)
    args.out.with_suffix(".json").write_text(json.dumps({"setup": header, "rows": rows}, indent=2))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
