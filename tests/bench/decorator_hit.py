"""Cache-hit throughput of ``@cached`` against bare FastAPI and fastapi-cache2's ``@cache``.

Side by side in one run: each target is one uvicorn worker (httptools, uvloop, no access
log, no ``Server`` header) pinned to CPU 0; the load generator runs on CPU 1. Targets
(factories in ``apps.py``), all answering ``GET /items`` with the same ~1 KiB JSON:

  bare             a bare FastAPI route
  bare bytes       a bare FastAPI route returning the JSON pre-serialized (a ceiling;
                   reference only)
  fastapi-cache2   fastapi-cache2 ``@cache(expire=60)`` on its InMemoryBackend, hit path
  cachegw          cachegw ``@cached(ttl=60)`` on cachegw's MemoryBackend, hit path
  cachegw+fc2-mem  cachegw ``@cached(ttl=60)`` on fastapi-cache2's InMemoryBackend

Each cached target is warmed with one request and must answer HIT (``X-Cache-Status`` /
``X-FastAPI-Cache``) before every measurement, or the script aborts. Load comes from
``wrk`` (1 thread, keep-alive) when it is on PATH, else from a small asyncio HTTP/1.1
client in this file, whose own cost then caps the absolute numbers and squeezes req/s
ratios, so verdicts then use server CPU time per request. Rounds are interleaved and the
median is reported.

    .venv/bin/python tests/bench/decorator_hit.py [--seconds 5] [--connections 50]

Exit status: 0 when every cachegw target meets both targets, 1 when one misses,
2 when the setup is wrong (a server does not start, a cache does not hit).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PATH = "/items"
SERVER_CPU = 0
CLIENT_CPU = 1

#: Targets the decorator must meet (DESIGN.md, REFERENCE.md "Numbers to beat").
MIN_VS_FASTAPI_CACHE2 = 2.0
MIN_VS_BARE = 0.9


@dataclass
class Target:
    name: str
    factory: str
    hit_header: str | None  # response header that must say HIT on the second request
    checked: bool  # gets PASS/FAIL against the targets (the others are references)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    rounds: list[Result] = field(default_factory=list)


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int = 0
    cpu_us_per_req: float = 0.0  # server CPU time (user + sys) per request
    cpu_busy: float = 0.0  # share of the window the server spent on CPU


TARGETS = [
    Target("bare FastAPI", "bare", None, checked=False),
    Target("bare FastAPI, bytes Response", "bare_bytes", None, checked=False),
    Target("fastapi-cache2 @cache", "fastapi_cache2", "x-fastapi-cache", checked=False),
    Target("cachegw @cached", "cachegw_memory", "x-cache-status", checked=True),
    Target("cachegw @cached, fc2 InMemory", "cachegw_fc2_memory", "x-cache-status", checked=True),
]


class SetupError(Exception):
    pass


# -- servers ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pin(pid: int, cpu: int) -> None:
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(pid, {cpu})


def start(target: Target) -> None:
    target.port = _free_port()
    target.proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            f"apps:{target.factory}",
            "--app-dir",
            str(HERE),
            "--host",
            "127.0.0.1",
            "--port",
            str(target.port),
            "--workers",
            "1",
            "--http",
            "httptools",
            "--loop",
            "uvloop",
            "--no-access-log",
            "--no-server-header",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _pin(target.proc.pid, SERVER_CPU)


def wait_ready(target: Target, timeout: float = 30.0) -> None:
    assert target.proc is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if target.proc.poll() is not None:
            err = target.proc.stderr.read().decode(errors="replace") if target.proc.stderr else ""
            raise SetupError(f"{target.name} server exited with {target.proc.returncode}:\n{err}")
        try:
            with socket.create_connection(("127.0.0.1", target.port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SetupError(f"{target.name} server did not listen on port {target.port} in {timeout}s")


def stop(target: Target) -> None:
    proc = target.proc
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get(target: Target) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=5)
    try:
        conn.request("GET", PATH)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def verify_hit(target: Target, reference_body: bytes | None) -> bytes:
    """Warm the target, then check that it answers 200 (and HIT, for caches) with the
    reference body. Returns the body."""
    get(target)  # warm (the first request populates the cache)
    status, headers, body = get(target)
    if status != 200:
        raise SetupError(f"{target.name}: GET {PATH} answered {status}, expected 200")
    if target.hit_header is not None and headers.get(target.hit_header) != "HIT":
        raise SetupError(
            f"{target.name}: the second GET {PATH} was not a cache hit "
            f"({target.hit_header}: {headers.get(target.hit_header)!r}); headers: {headers}"
        )
    if reference_body is not None and json.loads(body) != json.loads(reference_body):
        raise SetupError(f"{target.name}: body differs from the bare FastAPI route's")
    return body


# -- load generators ---------------------------------------------------------------------

_WRK_RPS = re.compile(r"Requests/sec:\s*([\d.]+)")
_WRK_TOTAL = re.compile(r"(\d+) requests in")
_WRK_PCT = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s*(\d+)")
_WRK_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(
    wrk: str, target: Target, seconds: float, connections: int, on_start: Callable[[], None]
) -> Result:
    url = f"http://127.0.0.1:{target.port}{PATH}"
    base = [wrk, "-t1", f"-c{connections}", "--timeout", "5s"]
    subprocess.run([*base, "-d1s", url], check=True, capture_output=True)  # warm-up
    on_start()
    out = subprocess.run(
        [*base, f"-d{max(1, round(seconds))}s", "--latency", url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rps = _WRK_RPS.search(out)
    total = _WRK_TOTAL.search(out)
    pcts = {p: float(v) * _UNIT_MS[u] for p, v, u in _WRK_PCT.findall(out)}
    if rps is None or total is None or set(pcts) != {"50", "99"}:
        raise SetupError(f"could not parse wrk output for {target.name}:\n{out}")
    non2xx = _WRK_NON2XX.search(out)
    errors = _WRK_ERRORS.search(out)
    if non2xx or (errors and any(int(n) for n in errors.groups())):
        raise SetupError(f"{target.name}: wrk saw errors or non-2xx answers:\n{out}")
    return Result(float(rps.group(1)), pcts["50"], pcts["99"], int(total.group(1)))


class _Conn(asyncio.Protocol):
    """One keep-alive connection sending the next GET when the previous answer is in."""

    def __init__(self, request: bytes, latencies: list[int], state: dict[str, Any]) -> None:
        self.request = request
        self.latencies = latencies
        self.state = state
        self.buffer = b""
        self.sent = 0
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.sent = time.perf_counter_ns()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            marker = head.find(b"content-length:")
            if not head.startswith(b"http/1.1 200") or marker < 0:
                # Raising here would only reach the loop's exception handler.
                self.state["error"] = f"unexpected response: {head[:200]!r}"
                self.state["running"] = False
                assert self.transport is not None
                self.transport.close()
                return
            line_end = head.find(b"\r\n", marker)
            length = int(head[marker + 15 : line_end if line_end >= 0 else len(head)])
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            self.buffer = self.buffer[total:]
            if self.state["recording"]:
                self.latencies.append(time.perf_counter_ns() - self.sent)
            if self.state["running"]:
                self._send()
            else:
                assert self.transport is not None
                self.transport.close()
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def _python_load(
    port: int, seconds: float, warmup: float, connections: int, on_start: Callable[[], None]
) -> Result:
    loop = asyncio.get_running_loop()
    request = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    latencies: list[int] = []
    state: dict[str, Any] = {"running": True, "recording": False, "error": None}
    conns = []
    for _ in range(connections):
        _, proto = await loop.create_connection(
            lambda: _Conn(request, latencies, state), "127.0.0.1", port
        )
        conns.append(proto)
    await asyncio.sleep(warmup)
    on_start()
    state["recording"] = True
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    state["recording"] = False
    elapsed = time.perf_counter() - start
    state["running"] = False
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in conns)), timeout=10)
    if state["error"]:
        raise SetupError(state["error"])
    if not latencies:
        raise SetupError("the Python load generator completed no request")
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1e6

    return Result(len(latencies) / elapsed, pct(0.50), pct(0.99), len(latencies))


def run_python(
    target: Target, seconds: float, connections: int, on_start: Callable[[], None]
) -> Result:
    runner: Callable[[Coroutine[Any, Any, Result]], Result] = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        pass
    return runner(_python_load(target.port, seconds, 1.0, connections, on_start))


# -- main ------------------------------------------------------------------------------


def _versions() -> str:
    names = ("fastapi", "starlette", "pydantic", "uvicorn", "fastapi-cache2", "cachegw")
    out = []
    for name in names:
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} ?")
    return ", ".join(out)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per target")
    parser.add_argument("--connections", type=int, default=50, help="concurrent connections")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median kept)")
    parser.add_argument("--no-wrk", action="store_true", help="use the Python load generator")
    args = parser.parse_args()

    cpus = os.cpu_count() or 1
    if cpus > 1:
        _pin(0, CLIENT_CPU)  # this process and the load generator it runs
    wrk = None if args.no_wrk else shutil.which("wrk")
    print(f"machine: {cpus} CPUs ({_cpu_model()}), Python {platform.python_version()}")
    print(f"versions: {_versions()}")
    if cpus > 1:
        print(f"servers pinned to CPU {SERVER_CPU}, load generator to CPU {CLIENT_CPU}")
    else:
        print("WARNING: one CPU: server and load generator share it; ratios only")
    if wrk:
        print(f"load: wrk (1 thread, {args.connections} connections, keep-alive)")
    else:
        print(
            f"load: Python asyncio client ({args.connections} keep-alive connections, no "
            "pipelining) - wrk not found; absolute numbers are limited by the Python client"
        )
    print(
        f"{args.rounds} interleaved rounds x {len(TARGETS)} targets x "
        f"(1 s warm-up + {args.seconds:g} s); GET {PATH}, same JSON body everywhere\n"
    )

    try:
        for target in TARGETS:
            start(target)
        for target in TARGETS:
            wait_ready(target)
        reference = verify_hit(TARGETS[0], None)
        for target in TARGETS[1:]:
            verify_hit(target, reference)
        print(f"body: {len(reference)} bytes of JSON; every cached target answers HIT\n")
        for round_no in range(args.rounds):
            # Rotate the order so no target always runs first (or after the same one).
            order = TARGETS[round_no % len(TARGETS) :] + TARGETS[: round_no % len(TARGETS)]
            for target in order:
                verify_hit(target, reference)
                pid = target.proc.pid if target.proc else 0
                mark: list[float] = []

                def on_start(pid: int = pid, mark: list[float] = mark) -> None:
                    mark[:] = [cpu_seconds(pid), time.monotonic()]

                if wrk:
                    result = run_wrk(wrk, target, args.seconds, args.connections, on_start)
                else:
                    result = run_python(target, args.seconds, args.connections, on_start)
                # Server CPU per request barely moves when other processes steal the
                # core; req/s does. Both are shown; busy < 90 % means a noisy machine.
                cpu = cpu_seconds(pid) - mark[0]
                result.cpu_busy = cpu / (time.monotonic() - mark[1])
                result.cpu_us_per_req = cpu * 1e6 / max(1, result.requests)
                target.rounds.append(result)
                print(
                    f"  round {round_no + 1}: {target.name:31s} {result.rps:9.0f} req/s "
                    f"{result.cpu_us_per_req:6.0f} us CPU/req, server busy "
                    f"{result.cpu_busy:4.0%}",
                    flush=True,
                )
    except SetupError as exc:
        print(f"\nABORTED: {exc}", file=sys.stderr)
        return 2
    finally:
        for target in TARGETS:
            stop(target)

    def median(target: Target, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in target.rounds))

    by_factory = {t.factory: t for t in TARGETS}
    bare = median(by_factory["bare"], "rps")
    fc2 = median(by_factory["fastapi_cache2"], "rps")
    print()
    bare_cpu = median(by_factory["bare"], "cpu_us_per_req")
    fc2_cpu = median(by_factory["fastapi_cache2"], "cpu_us_per_req")
    header = (
        f"{'target':31s} {'req/s':>8s} {'p50 ms':>7s} {'p99 ms':>7s} "
        f"{'x fc2':>6s} {'x bare':>6s}  verdict   {'CPU us/req':>10s} {'x fc2':>6s} {'x bare':>6s}"
    )
    print(header)
    print("-" * len(header))
    failed = False
    for target in TARGETS:
        rps = median(target, "rps")
        vs_fc2, vs_bare = rps / fc2, rps / bare
        cpu = median(target, "cpu_us_per_req")
        if target.checked:
            # The Python client saturates before the server does, which squeezes req/s
            # ratios towards 1: judge by server CPU per request then.
            judged = (vs_fc2, vs_bare) if wrk else (fc2_cpu / cpu, bare_cpu / cpu)
            ok = judged[0] >= MIN_VS_FASTAPI_CACHE2 and judged[1] >= MIN_VS_BARE
            failed |= not ok
            verdict = "PASS" if ok else "FAIL"
        else:
            verdict = "reference"
        print(
            f"{target.name:31s} {rps:8.0f} {median(target, 'p50_ms'):7.2f} "
            f"{median(target, 'p99_ms'):7.2f} {vs_fc2:6.2f} {vs_bare:6.2f}  {verdict:9s} "
            f"{cpu:10.0f} {fc2_cpu / cpu:6.2f} {bare_cpu / cpu:6.2f}"
        )
    print(
        f"\ntargets for @cached hits: >= {MIN_VS_FASTAPI_CACHE2:g}x fastapi-cache2 hit "
        f"and >= {MIN_VS_BARE:g}x bare FastAPI (medians of {args.rounds} rounds); verdicts "
        f"use {'req/s' if wrk else 'CPU per request (Python client)'}.\nThe CPU columns give "
        "the same ratios from server CPU time per request (higher = cheaper), which other\n"
        "load on the machine disturbs far less than req/s."
    )
    busy = min(r.cpu_busy for t in TARGETS for r in t.rounds)
    if busy < 0.9:
        print(
            f"WARNING: a server was on CPU only {busy:.0%} of a measured window: other "
            "processes competed for its core; trust the CPU columns over req/s."
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
