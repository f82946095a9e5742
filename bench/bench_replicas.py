"""Server throughput with 1 vs 2 stateless `lpjepa serve` replicas over one Milvus (loopback, bounded).

One local Milvus (milvus-lite's server, `index.milvus_server.LocalMilvus`) holds a collection of `--items` random
sparse codes (the tiny test model's 64 dimensions, ~8 active); two `lpjepa serve --backend milvus` processes
serve it. `--clients` concurrent clients send POST /v1/search with a JSON embedding (k = 10: the model is not in
the path, so the index and the server are what is measured) for `--seconds`, either all to replica A
("1 replica") or alternately to A and B ("2 replicas"). The two configurations are interleaved round by round on
the same processes; the table reports medians over `--repeats` rounds of requests/s and of the per-round p50 and
p99 latencies, and the error count (which must be zero: the script exits 1 otherwise). `--write-share` of the
requests are PUT /v1/items of a new item instead, acknowledged only after Milvus acknowledged them.

    nice -n 10 .venv/bin/python bench/bench_replicas.py --items 20000 --clients 16 --seconds 5 --repeats 3

Results: a Markdown table on stdout and in docs/results/replicas.md. Not a test: its numbers depend on the
machine (on a shared 2-core machine, Milvus and both replicas compete for the same two cores).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import httpx
import numpy as np
from common import ROOT, md_table, wait_for_server


def start_replica(model: Path, uri: str, collection: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "cli.main", "serve", "--model", str(model), "--port", "0", "--log-level", "warning",
           "--backend", "milvus", "--milvus-uri", uri, "--collection", collection, "--max-inflight", "4096",
           "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return proc, wait_for_server(proc, 120, "replica")


def query(rng: np.random.Generator, dim: int, nnz: int) -> dict:
    dims = np.sort(rng.choice(dim, nnz, replace=False))
    return {"indices": dims.tolist(), "values": (rng.random(nnz) + 0.1).tolist()}


async def drive(urls: list[str], clients: int, seconds: float, write_share: float, dim: int, seed: int) -> dict:
    latencies: list[float] = []
    errors = 0
    next_id = [10_000_000 + seed * 1_000_000]

    async def worker(i: int) -> None:
        nonlocal errors
        rng = np.random.default_rng(seed * 1000 + i)
        url = urls[i % len(urls)]
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                if rng.random() < write_share:
                    next_id[0] += 1
                    item = {"id": next_id[0], "embedding": query(rng, dim, 8), "payload": {"bench": True}}
                    r = await client.put("/v1/items", json={"items": [item]})
                else:
                    r = await client.post("/v1/search", json={"embedding": query(rng, dim, 8), "k": 10})
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {
        "rps": len(latencies) / wall,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "errors": errors,
    }


def fill(uri: str, items: int, dim: int) -> float:
    """`items` random codes into the collection "bench" in batches of 5,000; the seconds it took."""
    from index.factory import create_index

    rng = np.random.default_rng(0)
    index = create_index("milvus", dim, "cosine", uri=uri, collection="bench", batch_rows=5000)
    t0 = time.perf_counter()
    for lo in range(0, items, 5000):
        n = min(5000, items - lo)
        rows = [query(rng, dim, 8) for _ in range(n)]
        dense = np.zeros((n, dim), np.float32)
        for r, q in enumerate(rows):
            dense[r, q["indices"]] = q["values"]
        index.add(np.arange(lo, lo + n), dense, [{"row": int(i)} for i in range(lo, lo + n)])
    index.close()
    return time.perf_counter() - t0


def measure(args: argparse.Namespace, dim: int) -> tuple[dict[str, list[dict]], float]:
    """Milvus filled, two replicas started, then 1 vs 2 replicas in interleaved rounds: every round's result."""
    from bench_serve import export_preset

    from index.milvus_server import LocalMilvus, free_port

    tmp = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    model = export_preset(tmp, "tiny")
    server = LocalMilvus(tmp / "milvus", free_port()).start()
    procs: list[subprocess.Popen] = []
    try:
        fill_s = fill(server.uri, args.items, dim)
        urls = []
        for _ in range(2):
            proc, url = start_replica(model, server.uri, "bench")
            procs.append(proc)
            urls.append(url)
        configs = {"1 replica": urls[:1], "2 replicas": urls}
        runs: dict[str, list[dict]] = {name: [] for name in configs}
        asyncio.run(drive(urls, 4, 1.0, 0.0, dim, seed=99))  # warm-up, not counted
        for rep in range(args.repeats):
            for name, targets in configs.items():  # interleaved: contention hits both alike
                runs[name].append(asyncio.run(drive(targets, args.clients, args.seconds, args.write_share, dim, rep)))
                print(f"round {rep} {name}: {runs[name][-1]}", file=sys.stderr)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.stop()
    return runs, fill_s


def report(runs: dict[str, list[dict]], fill_s: float, args: argparse.Namespace) -> str:
    base = statistics.median(r["rps"] for r in runs["1 replica"])
    rows = []
    for name, rs in runs.items():
        rps = statistics.median(r["rps"] for r in rs)
        rows.append([name, f"{rps:.0f}", f"{rps / base:.2f}x", f"{statistics.median(r['p50'] for r in rs):.1f}",
                     f"{statistics.median(r['p99'] for r in rs):.1f}", sum(r["errors"] for r in rs)])  # fmt: skip
    load = os.getloadavg()
    cmd = "nice -n 10 .venv/bin/python bench/bench_replicas.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"
    )
    return "\n".join(
        [
            "## Serving replicas over one Milvus (bench/bench_replicas.py)",
            "",
            f"`{cmd}`",
            "",
            f"{args.items} items (64-dim sparse codes, 8 active) in one collection of a local Milvus (milvus-lite "
            f"2.5.1's server on loopback; filled in {fill_s:.1f} s); {args.clients} concurrent clients, "
            f"POST /v1/search k = 10 with a JSON embedding"
            + (f", {args.write_share:.0%} PUT /v1/items" if args.write_share else "")
            + f"; {args.seconds:g} s per round, {args.repeats} interleaved rounds, medians. Machine: "
            f"{os.cpu_count()} cores ({platform.machine()}), shared with other work: load average "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end of the run. Milvus and both replicas run on "
            "these same cores.",
            "",
            *md_table(["replicas", "req/s (median)", "vs 1 replica", "p50 ms", "p99 ms", "errors"], rows, "lrrrrr"),
            "",
        ]
    )


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write-share", type=float, default=0.0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/replicas.md")
    args = ap.parse_args()
    runs, fill_s = measure(args, dim=64)
    text = report(runs, fill_s, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 1 if any(r["errors"] for rs in runs.values() for r in rs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
