"""Start `cachegw serve FILE` as a real process on a free loopback port (for tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.servers import free_port


class GatewayProcess:
    """A `cachegw serve` subprocess; `base` is its URL once started."""

    def __init__(
        self,
        config: Path,
        *,
        extra_env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.config = config
        self.args = args or []
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        # A deadline for a start that hangs, not a speed test: on a loaded machine the
        # imports alone can take many seconds (issue 28).
        env = {**os.environ, **self.extra_env}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cachegw",
                "serve",
                str(self.config),
                "--port",
                str(self.port),
                *self.args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.proc.stdout.read().decode() if self.proc.stdout else ""
                raise RuntimeError(f"cachegw serve exited with {self.proc.returncode}:\n{output}")
            try:
                if httpx.get(f"{self.base}/_cachegw/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("cachegw serve did not become healthy in time")

    def stop(self) -> str:
        """Stop the process; its output."""
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        output = self.proc.stdout.read().decode() if self.proc.stdout else ""
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None
        return output


@contextmanager
def gateway_processes(
    config: Path, count: int = 1, *, args: list[str] | None = None
) -> Iterator[list[GatewayProcess]]:
    """``count`` processes; output is read only when they stop, so a long run passes
    ``args=["--no-access-log"]`` (else a full pipe blocks the gateway on its log)."""
    procs = [GatewayProcess(config, args=args) for _ in range(count)]
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        for proc in procs:
            proc.stop()
