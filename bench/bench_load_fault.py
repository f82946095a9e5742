"""Load + fault benchmark of `lpjepa serve` with its SQLite store: N clients x T seconds of mixed traffic, with a
SIGKILL and a restart in the middle of one of the two rounds.

Each client loops over a mix of requests (weights below): PUT /v1/items (one item, embedding + payload, unique
id), POST /v1/search (a stored item's code as the query), POST /v1/embed (one 28x28 PNG), GET /v1/items/{id}.
Two rounds run on the same index directory, one after the other: "steady" (no fault: the baseline) and "fault"
(at T/2 the server gets SIGKILL, a new server is started on the same directory, the clients carry on against it
for another T/2 once it is ready).
Requests that fail at the connection level while the server is down are counted as "conn_error", not as
statuses. A write counts as acknowledged only when its reply (200) arrived.

At the end the server is stopped gracefully and a fresh one is started; every acknowledged write must read
back with its payload: the number that does not is "acked writes lost" and must be 0 (exit 1 otherwise, also
on any 5xx). RSS of the serving process is sampled every 0.25 s from /proc.

    .venv/bin/python bench/bench_load_fault.py --clients 8 --seconds 20

Results: docs/results/load-fault.md (table), load-fault.json (all numbers), load-fault-rss.png (RSS over time).
Not a test: it takes about a minute and its latencies depend on the machine (loopback only, bounded in time).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import common
import httpx
import numpy as np
from bench_serve import export_preset, start_server, stop_server
from common import ROOT

KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MIX = {"write": 3, "search": 4, "embed": 2, "get": 1}
DIM = 64  # the tiny preset's embedding dimension


class Server:
    """The current serving process; replaced (same index directory) after a kill."""

    def __init__(self, model: Path, index: Path) -> None:
        self.model, self.index = model, index
        self.lock = threading.Lock()
        self.proc, self.url = start_server(model, None, self._args())
        self.down = False

    def _args(self) -> list[str]:
        return ["--index", str(self.index), "--api-key", KEY, "--compact-every", "500"]

    def kill_and_restart(self) -> float:
        with self.lock:
            self.down = True
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        t0 = time.monotonic()
        proc, url = start_server(self.model, None, self._args())
        with self.lock:
            self.proc, self.url, self.down = proc, url, False
        return time.monotonic() - t0

    def rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None


def tiny_png(rng: random.Random) -> bytes:
    from PIL import Image

    arr = np.frombuffer(rng.randbytes(28 * 28), np.uint8).reshape(28, 28)
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()


def random_code(rng: random.Random) -> dict:
    idx = sorted(rng.sample(range(DIM), 8))
    return {"indices": idx, "values": [round(rng.uniform(0.1, 3.0), 4) for _ in idx]}


def client_loop(
    worker: int, server: Server, stop: threading.Event, log: list, acked: dict, known: list, seed: int
) -> None:
    rng = random.Random(seed * 1000 + worker)
    kinds = [k for k, w in MIX.items() for _ in range(w)]
    counter = 0
    http = httpx.Client(timeout=30)
    while not stop.is_set():
        kind = rng.choice(kinds)
        with server.lock:
            url = server.url
        t0 = time.perf_counter()
        status: str
        item_id = None
        try:
            if kind == "write":
                counter += 1
                item_id = (seed * 100 + worker) * 1_000_000 + counter
                code = random_code(rng)
                body = {"items": [{"id": item_id, "embedding": code, "payload": {"id": item_id, "w": worker}}]}
                r = http.put(f"{url}/v1/items", json=body, headers=AUTH)
                if r.status_code == 200:
                    acked[item_id] = code
                    known.append(item_id)
            elif kind == "search":
                query = acked.get(rng.choice(known)) if known else None
                r = http.post(f"{url}/v1/search", json={"embedding": query or random_code(rng), "k": 10})
            elif kind == "embed":
                r = http.post(f"{url}/v1/embed", files={"files": ("x.png", tiny_png(rng), "image/png")})
            else:
                target = rng.choice(known) if known else 0
                r = http.get(f"{url}/v1/items/{target}", params={"thumbnail": "false"})
            status = str(r.status_code)
        except httpx.HTTPError:
            status = "conn_error"
            http.close()
            http = httpx.Client(timeout=30)
            time.sleep(0.02)
        log.append((time.monotonic(), kind, status, time.perf_counter() - t0))
    http.close()


def run_round(name: str, server: Server, clients: int, seconds: float, kill: bool, seed: int) -> dict:
    stop = threading.Event()
    log: list = []
    acked: dict[int, dict] = {}
    known: list[int] = []
    rss: list[tuple[float, float]] = []
    start = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            value = server.rss_mb()
            if value is not None:
                rss.append((time.monotonic() - start, value))
            time.sleep(0.25)

    threads = [
        threading.Thread(target=client_loop, args=(w, server, stop, log, acked, known, seed)) for w in range(clients)
    ]
    sampler = threading.Thread(target=sample)
    for t in [*threads, sampler]:
        t.start()
    restart_s = None
    kill_at = None
    if kill:
        time.sleep(seconds / 2)
        kill_at = time.monotonic() - start
        restart_s = server.kill_and_restart()
        time.sleep(seconds / 2)  # as long again under load on the new server
    else:
        time.sleep(seconds)
    stop.set()
    for t in [*threads, sampler]:
        t.join(60)
    elapsed = time.monotonic() - start
    ok = [lat for _, _, status, lat in log if status.startswith("2")]
    statuses = Counter(status for _, _, status, _ in log)
    by_kind = {
        kind: {
            "n": sum(1 for _, k, _, _ in log if k == kind),
            "p50_ms": _pct([lat for _, k, s, lat in log if k == kind and s.startswith("2")], 50),
            "p99_ms": _pct([lat for _, k, s, lat in log if k == kind and s.startswith("2")], 99),
        }
        for kind in MIX
    }
    return {
        "round": name,
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": len(log),
        "ok": len(ok),
        "req_per_s": round(len(ok) / elapsed, 1),
        "p50_ms": _pct(ok, 50),
        "p99_ms": _pct(ok, 99),
        "statuses": dict(sorted(statuses.items())),
        "by_kind": by_kind,
        "acked_writes": len(acked),
        "kill_at_s": None if kill_at is None else round(kill_at, 2),
        "restart_s": None if restart_s is None else round(restart_s, 2),
        "rss_mb": rss,
        "acked": acked,
    }


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


def verify(model: Path, index: Path, acked: dict[int, dict]) -> tuple[int, int]:
    """Fresh server on the same directory: (acked writes that do not read back, 5xx seen while checking)."""
    proc, url = start_server(model, index, ["--api-key", KEY])
    lost = 0
    errors = 0
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            for item_id, code in acked.items():
                r = c.get(f"/v1/items/{item_id}", params={"thumbnail": "false"})
                if r.status_code >= 500:
                    errors += 1
                if r.status_code != 200 or (r.json()["payload"] or {}).get("id") != item_id:
                    lost += 1
                    continue
                got = dict(zip(r.json()["embedding"]["indices"], r.json()["embedding"]["values"], strict=True))
                if sorted(got) != code["indices"] or not np.allclose(
                    [got[i] for i in code["indices"]], code["values"], rtol=1e-5
                ):
                    lost += 1
    finally:
        stop_server(proc)
    return lost, errors


def plot_rss(rounds: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for r in rounds:
        if r["rss_mb"]:
            t, v = zip(*r["rss_mb"], strict=True)
            ax.plot(t, v, label=r["round"])
        if r["kill_at_s"] is not None:
            ax.axvline(r["kill_at_s"], color="red", linestyle="--", linewidth=1, label="SIGKILL + restart")
    ax.set_xlabel("seconds into the round")
    ax.set_ylabel("server RSS (MB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def write_report(rounds: list[dict], lost: int, verify_5xx: int, args: argparse.Namespace, out_dir: Path) -> str:
    load = os.getloadavg()
    lines = [
        "## Load + fault: mixed traffic with SIGKILL and restart (bench/bench_load_fault.py)",
        "",
        f"Command: `.venv/bin/python bench/bench_load_fault.py --clients {args.clients} --seconds {args.seconds}`. "
        f"{args.clients} client threads on loopback, mix (weights) {MIX}; tiny random-weight model (64-d), csr index "
        "on the SQLite store (`--compact-every 500`). Round `steady` is the baseline; in round `fault` the server "
        "gets SIGKILL at T/2 and a new one is started on the same directory, then loaded for another T/2 (its req/s "
        "counts the downtime). Latencies are of 2xx replies. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end of the run).",
        "",
        "| round | req/s (2xx) | p50 ms | p99 ms | requests | statuses | acked writes | restart s | RSS MB min-max |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rounds:
        rss = [v for _, v in r["rss_mb"]]
        status = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
        restart = "-" if r["restart_s"] is None else f"{r['restart_s']:.1f}"
        rss_text = f"{min(rss):.0f}-{max(rss):.0f}" if rss else "-"
        lines.append(
            f"| {r['round']} | {r['req_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['requests']} | {status} | "
            f"{r['acked_writes']} | {restart} | {rss_text} |"
        )
    total = sum(r["acked_writes"] for r in rounds)
    lines += [
        "",
        "| round | kind | requests | p50 ms | p99 ms |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rounds:
        for kind, k in r["by_kind"].items():
            lines.append(f"| {r['round']} | {kind} | {k['n']} | {k['p50_ms']} | {k['p99_ms']} |")
    lines += [
        "",
        f"**Acknowledged writes lost: {lost} of {total}** (every acknowledged write of both rounds read back, payload "
        f"and code, from a fresh server after a graceful stop); 5xx while checking: {verify_5xx}. `conn_error` "
        "counts requests that reached no server (the seconds between the kill and the new server's readiness). "
        "`restart s` runs from the SIGKILL to the new server answering /readyz: process start, model load, snapshot "
        "load and replay of the database rows written after it, kernel warm-up.",
        "",
        "![server RSS over time](load-fault-rss.png)",
    ]
    text = "\n".join(lines) + "\n"
    (out_dir / "load-fault.md").write_text(text, encoding="utf-8")
    return text


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--model", type=Path, default=None, help="exported model (default: a tiny random one)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lpjepa-loadfault-") as tmp:
        work = Path(tmp)
        model = args.model or export_preset(work, "tiny")
        index = work / "index"
        server = Server(model, index)
        try:
            steady = run_round("steady", server, args.clients, args.seconds, kill=False, seed=1)
            fault = run_round("fault", server, args.clients, args.seconds, kill=True, seed=2)
        finally:
            stop_server(server.proc)
        rounds = [steady, fault]
        acked = {**steady["acked"], **fault["acked"]}
        lost, verify_5xx = verify(model, index, acked)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_rss(rounds, args.out / "load-fault-rss.png")
    for r in rounds:
        r.pop("acked")
    payload = {"rounds": rounds, "acked_writes_lost": lost, "verify_5xx": verify_5xx, "mix": MIX}
    (args.out / "load-fault.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    print(write_report(rounds, lost, verify_5xx, args, args.out))
    server_errors = sum(v for r in rounds for k, v in r["statuses"].items() if k.startswith("5")) + verify_5xx
    return 1 if lost or server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
