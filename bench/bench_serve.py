"""Server ceiling benchmark of `lpjepa serve` (issue 18): ONNX Runtime alone against the server end to end, one run.

For each model, rounds interleave (so drifting background load hits every configuration alike):
  * ORT only, right before each server run: the served model through EmbeddingRuntime (same threads, no spinning,
    as the server) on already preprocessed images, images/s and CPU ms per image at batch 1, 4, 8, 16, 32 and 64 -
    the ceiling the server is compared with, at the mean batch its batcher formed (CPU efficiency = ORT CPU per
    image / server CPU per request: the share of the server's CPU that is the model itself);
  * the server end to end, batched and unbatched (--no-batching): a fresh `lpjepa serve` process per configuration
    and round, driven by `wrk` (a C load generator: Python clients cost more CPU per request than the server
    does here and measure themselves) with 16, 32 and 64 keep-alive connections on POST /v1/embed and POST
    /v1/search (one real image per request, multipart, rotating over 32 images; the search index holds 2,000
    items written through PUT /v1/items before the clock starts); and embed on `--workers 2` without an index
    (the only way one process' GIL stops bounding the HTTP work; an in-memory index cannot be shared);
  * the HTTP floor (bench/serve_floor.py, `--no-floor` skips it): the same FastAPI/uvicorn stack parsing the same
    multipart bodies, no decode, no model. Its CPU per request, plus ORT's per image and wrk's per request,
    bounds what any server on this stack can answer on these cores: printed per model as a share of the ceiling.
The tables give medians over rounds of requests/s, p50/p99 (wrk's own latency histogram), the server's mean model
batch (its Prometheus histogram), the server's CPU time per request (all its threads, /proc), the ratio to the ORT
ceiling at that batch and to unbatched, errors (non-2xx or socket errors: must be zero, else exit 1), and the load
average. The machine is shared: absolute numbers are depressed by whatever else runs; CPU time per request is
much less sensitive to that than requests/s.

    .venv/bin/python bench/bench_serve.py                      # demo + wide models, ~6 min
    .venv/bin/python bench/bench_serve.py --models demo --clients 32 --rounds 1 --seconds 3   # quick look

Models: `demo` is artifacts/demo/model.onnx when `make demo` made it (trained, OOD-calibrated: the responses carry
OOD scores), else the same architecture exported with random weights and calibrated here on 1,000 Fashion-MNIST
images; `wide` is a random-weight ResNet-18 x0.25 at 32 px RGB with the paper's 2048-2048-2048 projector; `--model
PATH` adds any exported model. Results: Markdown on stdout, a section of docs/results/serve.md, JSON beside it.
Needs `wrk` (Debian: apt-get install wrk). Not a test: minutes long, numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import httpx
import numpy as np
from common import ROOT, wait_for_server

BOUNDARY = "lpjepabench7d1f"
ORT_BATCHES = (1, 4, 8, 16, 32, 64)

PRESETS = {
    # name: (ResNet-18 width, small stem, image size, input channels, projector widths)
    "demo": (0.125, True, 28, 1, [256, 256, 256]),  # what scripts/demo.sh trains (pretrain/configs/smoke.json)
    "tiny": (
        0.125,
        False,
        28,
        1,
        [64, 64, 64],
    ),  # the test model (bench_replicas, bench_load_fault): overhead dominates
    # the paper's ImageNet projector (2048-2048-2048): at batch 1 a call is bound by reading its weights
    "wide": (0.25, False, 32, 3, [2048, 2048, 2048]),
}

FLOOR = "HTTP floor: FastAPI + multipart only"
WRK_SCRIPT = r"""
local bodies = {}
for path in string.gmatch(os.getenv("BODY_FILES"), "[^:]+") do
  local f = assert(io.open(path, "rb")); bodies[#bodies + 1] = f:read("*all"); f:close()
end
local ctype = "multipart/form-data; boundary=" .. os.getenv("BOUNDARY")
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("POST", nil, {["Content-Type"] = ctype}, bodies[(counter % #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "socket_errors": %d, "non2xx": %d, "p50_us": %d, ' ..
    '"p99_us": %d, "duration_us": %d}\n', summary.requests, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), summary.duration))
end
"""


# ------------------------------------------------------------------------------------------ models and images
def export_preset(out_dir: Path, preset: str) -> Path:
    """Export a randomly initialised encoder (the serving cost does not depend on training)."""
    from export.onnx_export import export_checkpoint
    from models.checkpoint import save_checkpoint
    from models.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
    from models.encoder import build_model as build_encoder

    width, small_stem, size, channels, dims = PRESETS[preset]
    mean, std = (list(IMAGENET_MEAN), list(IMAGENET_STD)) if channels == 3 else ([0.286], [0.353])
    kwargs = {"width": width, **({"small_stem": True} if small_stem else {})}
    config = ModelConfig(
        backbone="resnet18",
        backbone_kwargs=kwargs,
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


def resolve_model(spec: str, tmp: Path) -> tuple[Path, str]:
    if spec == "demo":
        made = ROOT / "artifacts/demo/model.onnx"
        if made.is_file():
            return made, "demo model (artifacts/demo, trained, OOD-calibrated)"
        path = export_preset(tmp, "demo")
        subprocess.run(
            [sys.executable, "-m", "cli.main", "ood", "calibrate", "--model", str(path), "--data", "fashion-mnist"]
            + ["--limit", "1000", "--no-shifts", "--no-progress"],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return path, "demo architecture, random weights, OOD-calibrated here"
    if spec in PRESETS:
        width, _, size, channels, dims = PRESETS[spec]
        return export_preset(tmp, spec), (
            f"ResNet-18 x{width}, {size}px {'RGB' if channels == 3 else 'grey'}, projector {'-'.join(map(str, dims))}"
        )
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"bench_serve: no model {spec!r} (give demo, wide or a path to an exported .onnx)")
    return path, path.name


def sample_images(channels: int, n: int = 32) -> list[bytes]:
    """Real images the model would be sent: Fashion-MNIST test PNGs for grey models, CIFAR samples for colour."""
    from data.sources import open_source, sample_image_files

    if channels == 1:
        source = open_source("fashion-mnist:test")
        out = []
        for i in range(n):
            buf = io.BytesIO()
            source[i][0].save(buf, format="PNG")
            out.append(buf.getvalue())
        return out
    return [p.read_bytes() for p in sample_image_files("cifar10")][:n]


def body_files(images: list[bytes], field: str, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        ctype = "image/jpeg" if img[:2] == b"\xff\xd8" else "image/png"
        body = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{i}.img"\r\n'
            f"Content-Type: {ctype}\r\n\r\n".encode()
            + img
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        )
        path = folder / f"{field}-{i}.body"
        path.write_bytes(body)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------ ORT only
def ort_ceiling(model: Path, images: list[bytes], threads: int | None, seconds: float) -> dict[int, dict[str, float]]:
    """Images/s and CPU ms per image (all threads) of the model alone at each batch size, on preprocessed inputs
    (the model call, nothing else)."""
    from PIL import Image

    from export.runtime import EmbeddingRuntime

    runtime = EmbeddingRuntime(str(model), batch_size=max(ORT_BATCHES), num_threads=threads, spin=False)
    pre = runtime.preprocess([Image.open(io.BytesIO(b)) for b in images])
    out = {}
    for b in ORT_BATCHES:
        x = np.ascontiguousarray(np.resize(pre, (b, *pre.shape[1:])))
        runtime.run(x)  # warm-up
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds / len(ORT_BATCHES):
            runtime.run(x)
            n += b
        out[b] = {"ips": n / (time.perf_counter() - t0), "cpu_ms": 1000 * (time.process_time() - c0) / n}
    return out


def ceiling_at(ort: dict[int, float], batch: float) -> float:
    """ORT images/s (or CPU per image) at the batch the server formed (log-linear between the measured sizes)."""
    if not math.isfinite(batch):
        return float("nan")
    sizes = sorted(ort)
    batch = min(max(batch, sizes[0]), sizes[-1])
    for lo, hi in zip(sizes, sizes[1:], strict=False):
        if lo <= batch <= hi:
            w = (math.log(batch) - math.log(lo)) / (math.log(hi) - math.log(lo))
            return ort[lo] ** (1 - w) * ort[hi] ** w
    return ort[sizes[-1]]


# ------------------------------------------------------------------------------------------ the server
def start_server(model: Path, index: Path | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "cli.main", "serve", "--model", str(model)]
    cmd += [] if index is None else ["--index", str(index)]
    cmd += ["--port", "0", "--log-level", "warning", "--max-inflight", "4096", "--max-queue", "8192", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return proc, wait_for_server(proc, 180)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def fill_index(url: str, dim: int, n: int = 2000, seed: int = 0) -> None:
    """n random sparse items (about 10% active dimensions) through the API, 250 per PUT."""
    rng = np.random.default_rng(seed)
    with httpx.Client(base_url=url, timeout=120) as c:
        for start in range(0, n, 250):
            items = []
            for i in range(start, min(n, start + 250)):
                idx = np.sort(rng.choice(dim, size=max(1, dim // 10), replace=False))
                vals = rng.random(idx.size) + 0.05
                items.append({"id": i, "embedding": {"indices": idx.tolist(), "values": vals.tolist()}})
            r = c.put("/v1/items", json={"items": items})
            r.raise_for_status()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its threads, plus its child processes' (uvicorn's --workers)."""
    total, stats = 0, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stats[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
    for p, fields in stats.items():
        if p == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def batch_stats(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    total = re.search(r"^lpjepa_model_batch_size_sum (\S+)$", text, re.M)
    count = re.search(r"^lpjepa_model_batch_size_count (\S+)$", text, re.M)
    return float(total.group(1)) if total else 0.0, float(count.group(1)) if count else 0.0


def run_wrk(url: str, path: str, bodies: list[Path], clients: int, seconds: float, script: Path) -> dict:
    env = {**os.environ, "BODY_FILES": ":".join(map(str, bodies)), "BOUNDARY": BOUNDARY}
    threads = min(2, clients)
    before = os.times()
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(clients), "-d", f"{seconds:g}s", "--timeout", "10s", "-s", str(script)]
        + [url + path],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    after = os.times()
    line = next(ln for ln in out.splitlines() if ln.startswith("WRKJSON "))
    r = json.loads(line.removeprefix("WRKJSON "))
    r["wrk_cpu_s"] = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return r


def measure_server(
    model: Path, label: str, bodies: dict[str, list[Path]], extra: list[str], dim: int, args, endpoints: list[str]
) -> list:
    """One fresh server; every (endpoint, clients) cell against it, in a fixed order. Without "search" among the
    endpoints the server runs without an index (which is what lets --workers run several processes)."""
    with tempfile.TemporaryDirectory() as index_dir:
        with_index = "search" in endpoints
        proc, url = start_server(model, Path(index_dir) / "index" if with_index else None, extra)
        try:
            if with_index:
                fill_index(url, dim)
            with httpx.Client(base_url=url, timeout=300) as c:  # first calls compile the index kernels (numba)
                for field, path in (("files", "/v1/embed"), ("file", "/v1/search?k=10"))[: 1 + with_index]:
                    data = bodies[field][0].read_bytes()
                    ctype = f"multipart/form-data; boundary={BOUNDARY}"
                    c.post(path, content=data, headers={"Content-Type": ctype}).raise_for_status()
            cells = []
            for endpoint in endpoints:
                path, field = ("/v1/embed", "files") if endpoint == "embed" else ("/v1/search?k=10", "file")
                for clients in args.clients:
                    run_wrk(url, path, bodies[field][:4], clients, 1.0, args.script)  # warm-up, not counted
                    b0, cpu0 = batch_stats(url), cpu_seconds(proc.pid)
                    r = run_wrk(url, path, bodies[field], clients, args.seconds, args.script)
                    cpu1, b1 = cpu_seconds(proc.pid), batch_stats(url)
                    seconds = r["duration_us"] / 1e6
                    ok = r["requests"] - r["non2xx"]
                    calls = b1[1] - b0[1]
                    cells.append(
                        {
                            "model": label,
                            "endpoint": endpoint,
                            "clients": clients,
                            "rps": ok / seconds,
                            "p50_ms": r["p50_us"] / 1000,
                            "p99_ms": r["p99_us"] / 1000,
                            "errors": r["non2xx"] + r["socket_errors"],
                            "requests": ok,
                            "mean_batch": (b1[0] - b0[0]) / calls if calls else float("nan"),
                            "server_cpu_ms": 1000 * (cpu1 - cpu0) / max(ok, 1),
                            "wrk_cpu_ms": 1000 * r["wrk_cpu_s"] / max(ok, 1),
                        }
                    )
            return cells
        finally:
            stop_server(proc)


# ------------------------------------------------------------------------------------------ the run
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_floor(label: str, bodies: dict[str, list[Path]], args) -> list[dict]:
    """The HTTP floor (bench/serve_floor.py: this stack's /v1/embed parsing, no decode, no model) under the same
    wrk load: its CPU per request is spent by any server on this framework before its own work."""
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "bench.serve_floor:app", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the HTTP floor server did not start") from None
                time.sleep(0.2)
        cells = []
        for clients in args.clients:
            run_wrk(url, "/v1/embed", bodies["files"][:4], clients, 1.0, args.script)
            cpu0 = cpu_seconds(proc.pid)
            r = run_wrk(url, "/v1/embed", bodies["files"], clients, args.seconds, args.script)
            ok = r["requests"] - r["non2xx"]
            cells.append(
                {
                    "model": label,
                    "endpoint": "embed",
                    "clients": clients,
                    "rps": ok / (r["duration_us"] / 1e6),
                    "p50_ms": r["p50_us"] / 1000,
                    "p99_ms": r["p99_us"] / 1000,
                    "errors": r["non2xx"] + r["socket_errors"],
                    "requests": ok,
                    "mean_batch": float("nan"),
                    "server_cpu_ms": 1000 * (cpu_seconds(proc.pid) - cpu0) / max(ok, 1),
                    "wrk_cpu_ms": 1000 * r["wrk_cpu_s"] / max(ok, 1),
                }
            )
        return cells
    finally:
        stop_server(proc)


def bench_model(spec: str, tmp: Path, args) -> dict:
    from export.runtime import EmbeddingRuntime

    model, label = resolve_model(spec, tmp)
    probe = EmbeddingRuntime(str(model))
    images = sample_images(probe.in_channels)
    bodies = {f: body_files(images, f, tmp / f"bodies-{spec}") for f in ("files", "file")}
    threads = ["--threads", str(args.threads)] if args.threads else []
    configs = {"batched": (threads, args.endpoints), "unbatched": (["--no-batching", *threads], args.endpoints)}
    if args.workers > 1 and "embed" in args.endpoints:  # no index: the processes have no state to share
        configs[f"batched, {args.workers} workers, no index"] = (["--workers", str(args.workers), *threads], ["embed"])
    if args.floor and "embed" in args.endpoints:
        configs[FLOOR] = ([], ["embed"])
    ort_runs: list[dict[int, dict[str, float]]] = []
    cells: dict[str, list[list[dict]]] = {name: [] for name in configs}
    for rnd in range(args.rounds):
        for name, (extra, endpoints) in configs.items():
            # ORT alone right before each server, so both see about the same background load
            ort_runs.append(ort_ceiling(model, images, args.threads, args.ort_seconds))
            print(
                f"{spec} round {rnd + 1}: ORT only "
                + ", ".join(f"b{b} {v['ips']:.0f}/s {v['cpu_ms']:.2f} ms" for b, v in ort_runs[-1].items())
            )
            if name == FLOOR:
                got = measure_floor(label, bodies, args)
            else:
                got = measure_server(model, label, bodies, extra, probe.dim, args, endpoints)
            cells[name].append(got)
            for c in got:
                print(
                    f"  {name} {c['endpoint']} c{c['clients']}: {c['rps']:.0f} req/s p50 {c['p50_ms']:.1f} ms "
                    f"p99 {c['p99_ms']:.1f} ms batch {c['mean_batch']:.1f} cpu {c['server_cpu_ms']:.2f} ms/req "
                    f"errors {c['errors']}  (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    ort = {b: statistics.median(r[b]["ips"] for r in ort_runs) for b in ORT_BATCHES}
    ort_cpu = {b: statistics.median(r[b]["cpu_ms"] for r in ort_runs) for b in ORT_BATCHES}
    rows = []
    for name in configs:
        for i, first in enumerate(cells[name][0]):
            runs = [rnd[i] for rnd in cells[name]]
            row = {k: first[k] for k in ("model", "endpoint", "clients")}
            row["config"] = name
            for key in ("rps", "p50_ms", "p99_ms", "mean_batch", "server_cpu_ms", "wrk_cpu_ms"):
                row[key] = statistics.median(r[key] for r in runs)
            row["errors"] = sum(r["errors"] for r in runs)
            row["requests"] = sum(r["requests"] for r in runs)
            if "workers" in name or name == FLOOR:  # no batcher there, or one /metrics per process
                row["mean_batch"] = float("nan")
            at = 1.0 if name in ("unbatched", FLOOR) else row["mean_batch"]
            row["ceiling"] = ceiling_at(ort, at)
            row["of_ceiling"] = row["rps"] / row["ceiling"] if row["ceiling"] else float("nan")
            row["ort_cpu_ms"] = ceiling_at(ort_cpu, at)
            row["cpu_efficiency"] = row["ort_cpu_ms"] / row["server_cpu_ms"] if row["server_cpu_ms"] else float("nan")
            row["runs"] = runs
            rows.append(row)
    for row in rows:
        if row["config"] not in ("unbatched", FLOOR):
            base = next(
                r
                for r in rows
                if r["config"] == "unbatched" and r["endpoint"] == row["endpoint"] and r["clients"] == row["clients"]
            )
            row["vs_unbatched"] = row["rps"] / base["rps"] if base["rps"] else float("nan")
    return {"model": label, "spec": spec, "ort": ort, "ort_cpu_ms": ort_cpu, "ort_runs": ort_runs, "rows": rows}


def render(results: list[dict], args, load: tuple[float, float], cpu_note: str) -> str:
    lines = [
        f"One run of `python bench/bench_serve.py {' '.join(sys.argv[1:])}`: {args.rounds} round(s), medians; "
        f"wrk keep-alive clients for {args.seconds:g} s per cell; a fresh `lpjepa serve` per configuration and round "
        f"(batching on with its defaults, or --no-batching); ONNX Runtime threads: {args.threads or 'all cores'}, no "
        f"spinning. Machine: {platform.machine()}, {os.cpu_count()} CPUs shared by wrk, the server and other "
        f"engineers' jobs: 1-min load average {load[0]:.1f} at the start and {load[1]:.1f} at the end, so absolute "
        f"numbers are depressed by the contention; server CPU ms per request (all its threads) is the steadier "
        f"measure. {cpu_note}",
        "",
    ]
    for res in results:
        ort = res["ort"]
        lines += [
            f"**{res['model']}** - ONNX Runtime alone, images/s (CPU ms per image) by batch: "
            + ", ".join(f"{b}: {v:,.0f} ({res['ort_cpu_ms'][b]:.2f})" for b, v in ort.items()),
            "",
            "| endpoint | clients | config | req/s | p50 ms | p99 ms | mean batch | ORT img/s at that batch "
            "| of ceiling | vs unbatched | server CPU ms/req | ORT CPU ms/img at that batch | CPU efficiency "
            "| errors |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in sorted(res["rows"], key=lambda r: (r["endpoint"], r["clients"], r["config"])):
            vs = f"{r['vs_unbatched']:.2f}x" if "vs_unbatched" in r else ""
            if "workers" in r["config"] or r["config"] == FLOOR:  # no batch size, so no ceiling at that batch
                r = {**r, "mean_batch": float("nan"), "ceiling": float("nan"), "of_ceiling": float("nan")}
                r["ort_cpu_ms"] = r["cpu_efficiency"] = float("nan")
            lines.append(
                f"| {r['endpoint']} | {r['clients']} | {r['config']} | {r['rps']:,.0f} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['mean_batch']:.1f} | {r['ceiling']:,.0f} | {r['of_ceiling']:.0%} | {vs} | "
                f"{r['server_cpu_ms']:.2f} | {r['ort_cpu_ms']:.2f} | {r['cpu_efficiency']:.0%} | {r['errors']} |"
            )
        lines.append("")
        lines += floor_bound(res)
    text = "\n".join(lines).replace("nan%", "n/a")
    while "| nan |" in text:  # adjacent cells share their "|": one pass leaves every other one
        text = text.replace("| nan |", "| n/a |")
    return text


def floor_bound(res: dict) -> list[str]:
    """What the HTTP floor leaves of the ORT-only ceiling: with the framework's CPU per request (and wrk's) on the
    same cores as the model, req/s <= cores x 1000 / (floor ms + ORT ms per image at the batch formed + wrk ms)."""
    floors = [r for r in res["rows"] if r["config"] == FLOOR]
    batched = {r["clients"]: r for r in res["rows"] if r["config"] == "batched" and r["endpoint"] == "embed"}
    out = []
    for f in sorted(floors, key=lambda r: r["clients"]):
        b = batched.get(f["clients"])
        if b is None or math.isnan(b["mean_batch"]):
            continue
        ort_ms = ceiling_at(res["ort_cpu_ms"], b["mean_batch"])
        bound = (os.cpu_count() or 1) * 1000 / (f["server_cpu_ms"] + ort_ms + b["wrk_cpu_ms"])
        ceiling = ceiling_at(res["ort"], b["mean_batch"])
        out.append(
            f"- {f['clients']} clients: HTTP floor {f['server_cpu_ms']:.2f} ms CPU/req + ORT {ort_ms:.2f} ms/img at "
            f"batch {b['mean_batch']:.1f} + wrk {b['wrk_cpu_ms']:.2f} ms/req on {os.cpu_count()} cores bound this "
            f"stack at {bound:,.0f} req/s = {bound / ceiling:.0%} of the ORT-only ceiling ({ceiling:,.0f} img/s); "
            f"the server reached {b['rps']:,.0f} req/s ({b['rps'] / bound:.0%} of that bound)."
        )
    return [*out, ""] if out else []


START, END = "<!-- bench_serve:start -->", "<!-- bench_serve:end -->"


def write_section(path: Path, text: str) -> None:
    """Replace only the benchmark's own section of the results page, so hand-written notes around it survive."""
    common.write_section(
        path, f"{START}\n{text}\n{END}", START, END, new_page="## Serve: load benchmark (bench/bench_serve.py)\n\n"
    )


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--models", default="demo,wide", help="comma-separated: demo, wide, or paths to exported models")
    ap.add_argument("--clients", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--endpoints", nargs="+", default=["embed", "search"], choices=["embed", "search"])
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per cell")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ort-seconds", type=float, default=3.0, help="seconds of ORT-only timing per server run")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (server and ORT-only alike)")
    ap.add_argument("--workers", type=int, default=2, help="also embed with this many server processes (1: skip)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/serve.md")
    ap.add_argument(
        "--floor", action=argparse.BooleanOptionalAction, default=True, help="also measure the HTTP floor (embed)"
    )
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("bench_serve: needs the wrk load generator (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    load0 = os.getloadavg()[0]
    cpu0 = os.times()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        args.script = Path(tmp) / "post.lua"
        args.script.write_text(WRK_SCRIPT)
        for spec in args.models.split(","):
            results.append(bench_model(spec.strip(), Path(tmp), args))
    cpu1 = os.times()
    child_user, child_sys = cpu1.children_user - cpu0.children_user, cpu1.children_system - cpu0.children_system
    cpu_note = (
        f"This bench's own processes (servers, wrk) used {child_user:.0f} s user + {child_sys:.0f} s system CPU and "
        f"the bench process (ORT-only timing) {cpu1.user - cpu0.user:.0f} s over "
        f"{cpu1.elapsed - cpu0.elapsed:.0f} s of wall time."
    )
    text = render(results, args, (load0, os.getloadavg()[0]), cpu_note)
    print(text)
    write_section(args.out, text)
    args.out.with_suffix(".json").write_text(
        json.dumps({"command": sys.argv, "results": results}, indent=2, default=float)
    )
    return 0 if all(r["errors"] == 0 for res in results for r in res["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
