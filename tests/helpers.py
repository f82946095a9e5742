"""Plain helpers shared by the test modules (no tests here; the fixtures built on them are in conftest.py): a tiny
model config and its ONNX export, real images, the `lpjepa` CLI as a subprocess, a server process, the serve API
tests' settings and error check, and the durable store's test data.

conftest.py exports the tiny model once per session (``model_path``): export is the slowest part of the set-up and
every serve, index and OOD test module needs the same model.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from scipy import sparse

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**over):
    """The tests' small encoder: a ResNet-18 at width 0.125 on 28 px grey images with Fashion-MNIST's statistics
    (``over`` replaces any field: projector_dims, in_channels, backbone_kwargs, target_mu, ...)."""
    from models.config import FASHION_MNIST_MEAN, FASHION_MNIST_STD, ModelConfig

    fields = dict(
        backbone="resnet18",
        backbone_kwargs={"width": 0.125},
        in_channels=1,
        image_size=28,
        mean=list(FASHION_MNIST_MEAN),
        std=list(FASHION_MNIST_STD),
        projector_dims=[64, 64, 64],
    )
    return ModelConfig(**{**fields, **over})


def grey_batch(n: int, split: str = "train"):
    """The first `n` Fashion-MNIST images of `split` as a normalised (n, 1, 28, 28) float tensor."""
    import torch

    from data.sources import load_fashion_mnist
    from models.config import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    x = torch.from_numpy(np.array(load_fashion_mnist(split).array[:n])).float().div(255).unsqueeze(1)
    return (x - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]


def export_tiny_model(out: Path, config=None) -> Path:
    """A randomly initialised (seed 0) encoder (default: tiny_config()) saved to `out`/model.safetensors and
    exported to ONNX without the parity check."""
    import torch

    from export.onnx_export import export_checkpoint
    from models.checkpoint import save_checkpoint
    from models.encoder import build_model

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ckpt = save_checkpoint(out / "model.safetensors", build_model(config or tiny_config()).eval())
    export_checkpoint(ckpt, out / "model.onnx", parity=False)  # parity is export's own test; this compares to torch
    return out / "model.onnx"


def checkpoint_of(onnx_path: Path) -> Path:
    return onnx_path.parent / "model.safetensors"


def calibrated_copy(onnx_path: Path, out: Path, n_images: int = 200) -> tuple[Path, dict]:
    """A copy of the model in `out` carrying an OOD calibration fitted on real Fashion-MNIST test images."""
    import shutil

    from export.metadata import write_ood_calibration
    from export.runtime import EmbeddingRuntime
    from ood import calibrate

    target = out / "model.onnx"
    out.mkdir(parents=True, exist_ok=True)
    for f in onnx_path.parent.iterdir():
        if f.name.startswith("model.onnx"):
            shutil.copy(f, out / f.name)
    rt = EmbeddingRuntime(str(target))
    images = fashion_images(n_images, offset=1000)
    codes, feats = rt.embed_with_features(images)  # no validation set: serves feature_mahalanobis
    cal = calibrate(codes, features=feats, tpr=0.95, seed=0)
    write_ood_calibration(str(target), cal)
    rt = EmbeddingRuntime(str(target))
    assert rt.ood_calibration is not None
    return target, rt.ood_calibration


def fashion_images(n: int, offset: int = 0) -> list[Image.Image]:
    from data.sources import open_source

    source = open_source("fashion-mnist:test")
    return [source.image(offset + i) for i in range(n)]


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def fashion_pngs(n: int, offset: int = 0) -> list[bytes]:
    return [png_bytes(img) for img in fashion_images(n, offset)]


def cifar_files() -> list[Path]:
    from data.sources import sample_image_files

    return sample_image_files("cifar10")


def reference_embeddings(onnx_path: Path, images: list[Image.Image]) -> np.ndarray:
    """The embedding computed independently of the server: the torch encoder on the evaluation transform."""
    import torch

    from models.checkpoint import load_checkpoint
    from models.preprocess import eval_transform

    model, _ = load_checkpoint(checkpoint_of(onnx_path))
    transform = eval_transform(model.config)
    with torch.no_grad():
        batch = torch.stack([transform(img) for img in images])
        return model(batch).numpy()


# ------------------------------------------------------------------------------------------ server process
class ServerProcess:
    """`lpjepa serve` as a real subprocess on a free loopback port (--port 0; the port is read from stdout)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> None:
        cmd = [*lpjepa_command(), "serve", "--port", "0", "--log-level", "warning", *args]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        # stderr goes to a file: an unread pipe would fill up and block the server on its own logging.
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.url = self._wait_listening(timeout)
        self._wait_ready(timeout)

    def _wait_listening(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        lines: list[str] = []
        box: dict[str, str] = {}

        def reader() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.append(line)
                match = re.search(r"listening on (http://\S+)", line)
                if match:
                    box["url"] = match.group(1)
                    return

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(timeout)
        if "url" not in box:
            self.kill()
            raise RuntimeError(f"server did not start (rc={self.proc.returncode}): {''.join(lines)} {self.logs()}")
        return box["url"]

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server never became ready: {self.logs()}")

    def logs(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM: uvicorn's graceful shutdown (the lifespan snapshots the index)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        self._close_pipes()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_pipes()

    def _close_pipes(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def lpjepa_command() -> list[str]:
    """The installed `lpjepa` console script (what users run); `python -m cli.main` when it is missing."""
    script = Path(sys.executable).parent / "lpjepa"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cli.main"]


def run_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([*lpjepa_command(), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def run_in_session(
    cmd: Sequence[str], what: str, *, timeout: float = 420.0, merge_stderr: bool = False, env: dict | None = None
) -> tuple[int, str, str]:
    """Run `cmd` (one OMP thread) in its own session and return (returncode, stdout, stderr); on a timeout the
    whole process group (torchrun and its workers, a script's children) is killed and the test fails, so nothing
    can hang on after it."""
    import pytest

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    stderr = subprocess.STDOUT if merge_stderr else subprocess.PIPE
    proc = subprocess.Popen(
        list(cmd), cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{what} did not finish within {timeout:.0f} s")
    return proc.returncode, out, err or ""


# ------------------------------------------------------------------------------------------ the serve API in process
API_KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
DIM = 64  # the tiny model's embedding dimension


def serve_settings(model_path, tmp_path, **overrides):
    """Settings of a test app: a local index, an API key and small limits the tests can reach."""
    from serve.settings import ServeSettings

    base = dict(
        model_path=model_path,
        index_dir=tmp_path / "index",
        api_key=API_KEY,
        max_images_per_request=8,
        max_body_bytes=2 * 1024 * 1024,
        max_image_pixels=1_000_000,
        max_k=50,
        max_wait_ms=2.0,
        max_payload_bytes=512,
    )
    base.update(overrides)
    return ServeSettings(**base)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def multipart(images: list[bytes], name: str = "files") -> list:
    return [(name, (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


# ------------------------------------------------------------------------------------------ the durable store
def thumb_png(tag: bytes) -> bytes:
    """What the index accepts as a thumbnail (it checks the PNG signature and the size)."""
    return b"\x89PNG\r\n\x1a\n" + tag


def sparse_rows(n: int, dim: int = 16, seed: int = 0) -> sparse.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.random((n, dim)).astype(np.float32)
    dense[dense < 0.6] = 0
    return sparse.csr_matrix(dense)


def store_state(store) -> dict:
    ids = store.index.ids().tolist()
    return {
        i: (store.index.payload(i), store.index.reconstruct([i]).toarray().round(6).tolist(), store.get(i).thumbnail)
        for i in ids
    }


def abandon_store(store) -> None:
    """What SIGKILL leaves: no snapshot; the database (and its journal) hold the writes."""
    store.db._conn.close()  # noqa: SLF001 - a kill closes the file descriptors and nothing else
    os.close(store.db._lock_fd)  # noqa: SLF001 - (the kernel drops the flock with them)


def filled_store(tmp_path, n: int = 120) -> tuple[dict, bytes]:
    """A store of `n` items closed cleanly; returns its state and the bytes of its database."""
    from serve.durable_log import DB_NAME
    from serve.store import ItemStore

    store = ItemStore.open(tmp_path / "idx", dim=16, compact_every=10**6)
    for start in range(0, n, 10):
        ids = np.arange(start, start + 10)
        store.upsert(
            ids, sparse_rows(10, seed=start), [{"i": int(i), "text": "x" * 40} for i in ids], [thumb_png(b"png")] * 10
        )
    expected = store_state(store)
    store.db.close()  # checkpointed: every row lives in serve.sqlite3 itself, no snapshot holds them
    return expected, (tmp_path / "idx" / DB_NAME).read_bytes()


def legacy_record(seq: int, body: bytes) -> bytes:
    crc = zlib.crc32(body, zlib.crc32(struct.pack("<Q", seq))) & 0xFFFFFFFF
    return struct.pack("<4sIQI", b"LPW1", len(body), seq, crc) + body


def legacy_upsert(ids, matrix, payloads, thumbs) -> bytes:
    head = {
        "op": "upsert",
        "n": len(ids),
        "dim": matrix.shape[1],
        "nnz": int(matrix.nnz),
        "payloads": payloads,
        "thumbs": [None if t is None else base64.b64encode(t).decode() for t in thumbs],
    }
    h = json.dumps(head).encode()
    return b"".join(
        [
            struct.pack("<I", len(h)),
            h,
            np.asarray(ids).astype("<i8").tobytes(),
            matrix.indptr.astype("<i8").tobytes(),
            matrix.indices.astype("<i4").tobytes(),
            matrix.data.astype("<f4").tobytes(),
        ]
    )


def legacy_dir(tmp_path):
    """An index directory as the previous server left it: snapshot + serve-wal.log + side files."""
    from index.factory import create_index

    directory = tmp_path / "old"
    index = create_index("csr", 16, "cosine")
    index.add([100, 101], sparse_rows(2, seed=3), payloads=[{"snap": 0}, {"snap": 1}])
    index.save(directory)
    (directory / "serve-state.json").write_text(json.dumps({"format": "lpjepa-serve-state/1", "applied_seq": 0}))
    (directory / "serve-thumbnails.json").write_text(json.dumps({"100": base64.b64encode(thumb_png(b"old")).decode()}))
    delete = json.dumps({"op": "delete", "ids": [101]}).encode()
    records = [
        legacy_record(1, legacy_upsert([1, 2], sparse_rows(2), [{"n": 1}, None], [thumb_png(b"t1"), None])),
        legacy_record(2, legacy_upsert([2], sparse_rows(1, seed=7), [{"n": 2}], [thumb_png(b"t2")])),
        legacy_record(3, struct.pack("<I", len(delete)) + delete),
    ]
    (directory / "serve-wal.log").write_bytes(b"".join(records))
    return directory, records
