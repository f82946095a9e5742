"""A local Milvus server: milvus-lite's engine serving one database file over gRPC on a TCP port.

A Milvus Lite ``*.db`` file can be opened by one process only (the embedded engine takes a lock on it). Serving it
on a port is how several processes on one machine (``lpjepa serve`` replicas, shard builders, the tests) share one
database: each connects with ``--milvus-uri http://127.0.0.1:PORT``, the same code path as a Milvus cluster. This is
``lpjepa milvus serve``; for more than one machine use Milvus standalone or distributed (docs/DEPLOY.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path

from index.errors import BackendUnavailableError, InvalidInputError

DB_NAME = "milvus.db"


def _prctl():
    """libc's prctl, resolved in the parent (the child between fork and exec must not load libraries)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _prctl()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (PR_SET_PDEATHSIG = 1; a no-op off Linux)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class LocalMilvus:
    """milvus-lite's server process for ``data_dir/milvus.db`` on ``host:port``; ``start()`` waits until it answers.

    The engine binary is started here rather than through ``milvus_lite.server.Server`` (same arguments and
    library path) for one reason: on Linux the child is told to die with its parent (PR_SET_PDEATHSIG), since a
    milvus-lite server on a port outlives a parent that was killed (a test run stopped by a timeout left them
    running). Like milvus-lite, an exclusive lock on ``.milvus.db.lock`` keeps a second server off the file.
    """

    def __init__(self, data_dir: str | os.PathLike[str], port: int, host: str = "127.0.0.1") -> None:
        if not 0 < int(port) < 65536:
            raise InvalidInputError(f"port must be in 1..65535, got {port}")
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = int(port)
        self._proc: subprocess.Popen | None = None
        self._lock = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else int(self._proc.pid)

    def start(self, timeout_s: float = 60.0) -> LocalMilvus:
        if port_open(self.host, self.port):
            raise BackendUnavailableError(f"{self.host}:{self.port} is already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # milvus-lite imports pkg_resources: setuptools<81 (pyproject.toml)
            warnings.simplefilter("ignore", UserWarning)
            from milvus_lite.server import BIN_PATH

        db = (self.data_dir / DB_NAME).absolute()
        self._lock = open(self.data_dir / f".{DB_NAME}.lock", "a")  # noqa: SIM115 - held while the server runs
        try:
            fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._release_lock()
            raise BackendUnavailableError(f"{db} is in use by another Milvus process") from None
        libs = str(Path(BIN_PATH).absolute())
        env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH")}
        extra = os.environ.get("LD_LIBRARY_PATH", "")
        env["LD_LIBRARY_PATH"] = env["DYLD_LIBRARY_PATH"] = f"{libs}:{extra}"
        log_level = os.environ.get("LOG_LEVEL", "ERROR")
        self._proc = subprocess.Popen(
            [str(Path(libs) / "milvus"), str(db), f"{self.host}:{self.port}", log_level],
            env=env,
            cwd=str(self.data_dir),
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while not port_open(self.host, self.port):
            if self._proc.poll() is not None:
                self._proc = None
                self._release_lock()
                raise BackendUnavailableError(f"milvus-lite exited while starting on {self.host}:{self.port}")
            if time.monotonic() > deadline:
                self.stop()
                raise BackendUnavailableError(f"milvus-lite did not listen on {self.host}:{self.port} in {timeout_s}s")
            time.sleep(0.05)
        return self

    def wait(self) -> int:
        """Block until the server process ends; returns its exit status."""
        assert self._proc is not None
        return int(self._proc.wait())

    def stop(self) -> None:
        """SIGTERM and wait (up to 10 s, then SIGKILL); then release the database lock."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=10)
            self._proc = None
        self._release_lock()

    def kill(self) -> None:
        """SIGKILL, no clean shutdown (failure tests); the lock is released so a restart works."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.stop()

    def _release_lock(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                fcntl.lockf(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __enter__(self) -> LocalMilvus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
