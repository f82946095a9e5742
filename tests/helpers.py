"""Plain helpers shared by the test modules (no tests here; the fixtures built on them are in conftest.py): a tiny
model config and its ONNX export, real images, the `lpjepa` CLI as a subprocess, a server process.

conftest.py exports the tiny model once per session (``model_path``): export is the slowest part of the set-up and
every serve, index and OOD test module needs the same model.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

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
