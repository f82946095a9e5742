"""A local Milvus server: milvus-lite's engine serving one database file over gRPC on a TCP port.

A Milvus Lite ``*.db`` file can be opened by one process only (the embedded engine takes a lock on it). Serving it
on a port is how several processes on one machine (``lpjepa serve`` replicas, shard builders, the tests) share one
database: each connects with ``--milvus-uri http://127.0.0.1:PORT``, the same code path as a Milvus cluster. This is
``lpjepa milvus serve``; for more than one machine use Milvus standalone or distributed (docs/DEPLOY.md).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import warnings
from pathlib import Path

from index.errors import BackendUnavailableError, InvalidInputError

DB_NAME = "milvus.db"


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
    """milvus-lite's server process for ``data_dir/milvus.db`` on ``host:port``; ``start()`` waits until it answers."""

    def __init__(self, data_dir: str | os.PathLike[str], port: int, host: str = "127.0.0.1") -> None:
        if not 0 < int(port) < 65536:
            raise InvalidInputError(f"port must be in 1..65535, got {port}")
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = int(port)
        self._server = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        proc = getattr(self._server, "_p", None)
        return None if proc is None else int(proc.pid)

    def start(self, timeout_s: float = 60.0) -> LocalMilvus:
        if port_open(self.host, self.port):
            raise BackendUnavailableError(f"{self.host}:{self.port} is already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # milvus-lite imports pkg_resources: setuptools<81 (pyproject.toml)
            warnings.simplefilter("ignore", UserWarning)
            from milvus_lite.server import Server

        self._server = Server(str(self.data_dir / DB_NAME), address=f"{self.host}:{self.port}")
        if not self._server.init() or not self._server.start():
            self._server = None
            raise BackendUnavailableError(
                f"milvus-lite did not start on {self.host}:{self.port} for {self.data_dir / DB_NAME}"
                " (is another process using that database?)"
            )
        deadline = time.monotonic() + timeout_s
        while not port_open(self.host, self.port):
            if self._server._p.poll() is not None:
                self._server = None
                raise BackendUnavailableError(f"milvus-lite exited while starting on {self.host}:{self.port}")
            if time.monotonic() > deadline:
                self.stop()
                raise BackendUnavailableError(f"milvus-lite did not listen on {self.host}:{self.port} in {timeout_s}s")
            time.sleep(0.05)
        return self

    def wait(self) -> int:
        """Block until the server process ends; returns its exit status."""
        assert self._server is not None and self._server._p is not None
        return int(self._server._p.wait())

    def stop(self) -> None:
        """SIGTERM and wait (up to 10 s, then milvus-lite's own stop: SIGKILL); a server on a port does not watch
        the file lock that stops an embedded one."""
        if self._server is not None:
            proc = self._server._p
            if proc is not None and proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            self._server.stop()
            self._server = None

    def kill(self) -> None:
        """SIGKILL, no clean shutdown (failure tests); the lock file is cleaned up so a restart works."""
        if self._server is not None and self._server._p is not None:
            self._server._p.kill()
            self._server._p.wait()
        self.stop()

    def __enter__(self) -> LocalMilvus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
