"""Machinery shared by the side-by-side benchmarks in ``tests/bench/``.

Servers are single uvicorn workers started as child processes and pinned to a CPU; load
comes from ``wrk`` (1 thread, keep-alive) or, without it, from a small asyncio HTTP/1.1
client in this file. A measurement records req/s, p50/p99 latency and the server's CPU
time per request (user + sys from ``/proc``), which other load on a shared machine
disturbs far less than req/s. Rounds are interleaved by the callers; `median` summarises.

Used by ``decorator_hit.py`` and ``gateway.py``; not a benchmark itself.
"""

from __future__ import annotations

import asyncio
import http.client
import importlib.metadata
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SERVER_CPU = 0
CLIENT_CPU = 1


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int = 0
    cpu_us_per_req: float = 0.0  # server CPU time (user + sys) per request
    cpu_busy: float = 0.0  # share of the window the server spent on CPU


class SetupError(Exception):
    pass


# -- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin(pid: int, cpu: int) -> None:
    """Pin a process (0 = this one) to one CPU, when there is more than one."""
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(pid, {cpu})


def uvicorn_command(app: str, port: int, *, factory: bool = True) -> list[str]:
    """``python -m uvicorn`` serving ``app`` (``module:attr`` under ``tests/bench``) the way
    every reference server is run: one worker, httptools, uvloop, no access log, no
    ``Server`` header."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        *(["--factory"] if factory else []),
        app,
        "--app-dir",
        str(HERE),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
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
    ]


def spawn(
    command: Sequence[str],
    cpu: int,
    env: dict[str, str] | None = None,
    stdout: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server process (cwd = the repository root) pinned to ``cpu``; its standard
    output goes to the file ``stdout`` (an access log), else nowhere."""
    out: Any = subprocess.DEVNULL if stdout is None else stdout.open("ab")
    proc = subprocess.Popen(
        list(command),
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.PIPE,
        env=None if env is None else {**os.environ, **env},
    )
    if stdout is not None:
        out.close()  # the child has its own descriptor
    pin(proc.pid, cpu)
    return proc


def wait_listening(
    proc: subprocess.Popen[bytes], port: int, name: str, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise SetupError(f"{name} server exited with {proc.returncode}:\n{err}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SetupError(f"{name} server did not listen on port {port} in {timeout}s")


def terminate(proc: subprocess.Popen[bytes] | None) -> None:
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


def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """One GET on a fresh connection: status, lower-cased headers, body."""
    return http_request(port, "GET", path)


def http_request(
    port: int, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection (a body is sent as JSON): status, lower-cased
    headers, body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = {} if body is None else {"Content-Type": "application/json"}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def unique_path(path: str, token: str) -> str:
    """``path`` with a query parameter making it (and its cache key) unique per token."""
    return f"{path}{'&' if '?' in path else '?'}u={token}"


# -- load generators ---------------------------------------------------------------------

_WRK_RPS = re.compile(r"Requests/sec:\s*([\d.]+)")
_WRK_TOTAL = re.compile(r"(\d+) requests in")
_WRK_PCT = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s*(\d+)")
_WRK_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _lua_string(data: bytes) -> str:
    """A Lua string literal holding ``data`` exactly (decimal escapes outside ASCII)."""
    out = []
    for byte in data:
        char = chr(byte)
        if 32 <= byte < 127 and char not in '"\\':
            out.append(char)
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def wrk_script(method: str = "GET", body: bytes | None = None, unique: bool = False) -> str | None:
    """A wrk Lua script sending ``method`` with ``body`` (JSON), each request to a path of
    its own when ``unique`` (the URL's path plus ``u=<token>-<n>``, the token being the
    argument after ``--``, different for each wrk run); None for a plain GET."""
    if method == "GET" and body is None and not unique:
        return None
    lines = [f'wrk.method = "{method}"']
    if body is not None:
        lines += [
            f"wrk.body = {_lua_string(body)}",
            'wrk.headers["Content-Type"] = "application/json"',
        ]
    if unique:
        lines += [
            'local token, n, sep = "", 0, "?"',
            "function init(args)",
            "  token = args[1]",
            '  if wrk.path:find("?", 1, true) then sep = "&" end',
            "end",
            "request = function()",
            "  n = n + 1",
            '  return wrk.format(nil, wrk.path .. sep .. "u=" .. token .. "-" .. n)',
            "end",
        ]
    return "\n".join(lines) + "\n"


def run_wrk(
    wrk: str,
    name: str,
    url: str,
    seconds: float,
    connections: int,
    on_start: Callable[[], None],
    script: str | None = None,
) -> Result:
    """1 s of warm-up, ``on_start()``, then ``seconds`` of measured load on ``url``;
    ``script`` (Lua text, see `wrk_script`) shapes the requests."""
    base = [wrk, "-t1", f"-c{connections}", "--timeout", "5s"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="cachegw-bench-") as lua:
        if script is not None:
            lua.write(script)
            lua.flush()
            base += ["-s", lua.name]

        def tail() -> list[str]:  # the URL, and a token of its own for each run
            return [url, "--", os.urandom(6).hex()] if script is not None else [url]

        subprocess.run([*base, "-d1s", *tail()], check=True, capture_output=True)  # warm-up
        on_start()
        out = subprocess.run(
            [*base, f"-d{max(1, round(seconds))}s", "--latency", *tail()],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    rps = _WRK_RPS.search(out)
    total = _WRK_TOTAL.search(out)
    pcts = {p: float(v) * _UNIT_MS[u] for p, v, u in _WRK_PCT.findall(out)}
    if rps is None or total is None or set(pcts) != {"50", "99"}:
        raise SetupError(f"could not parse wrk output for {name}:\n{out}")
    non2xx = _WRK_NON2XX.search(out)
    errors = _WRK_ERRORS.search(out)
    if non2xx or (errors and any(int(n) for n in errors.groups())):
        raise SetupError(f"{name}: wrk saw errors or non-2xx answers:\n{out}")
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
    port: int,
    path: str,
    seconds: float,
    warmup: float,
    connections: int,
    on_start: Callable[[], None],
    method: str = "GET",
    body: bytes | None = None,
) -> Result:
    loop = asyncio.get_running_loop()
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    request = (head + "\r\n").encode() + (body or b"")
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
    port: int,
    path: str,
    seconds: float,
    connections: int,
    on_start: Callable[[], None],
    method: str = "GET",
    body: bytes | None = None,
) -> Result:
    """The asyncio load generator: 1 s of warm-up, ``on_start()``, ``seconds`` measured.
    Every request is the same ``method path`` (with ``body`` as JSON)."""
    runner: Callable[[Coroutine[Any, Any, Result]], Result] = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        pass
    return runner(_python_load(port, path, seconds, 1.0, connections, on_start, method, body))


def measure(
    wrk: str | None,
    name: str,
    pid: int,
    port: int,
    path: str,
    seconds: float,
    connections: int,
    on_start: Callable[[], None] | None = None,
    *,
    method: str = "GET",
    body: bytes | None = None,
    unique: bool = False,
) -> Result:
    """Load ``method path`` (``body`` as JSON) on ``port`` and fill in the CPU columns
    from server ``pid``; with ``unique``, every request goes to a path of its own (wrk only:
    a SetupError without it).

    ``on_start`` (optional) runs right after the warm-up, when the measured window opens.
    """
    mark: list[float] = []

    def start() -> None:
        mark[:] = [cpu_seconds(pid), time.monotonic()]
        if on_start is not None:
            on_start()

    if wrk:
        url = f"http://127.0.0.1:{port}{path}"
        script = wrk_script(method, body, unique)
        result = run_wrk(wrk, name, url, seconds, connections, start, script)
    elif unique:
        raise SetupError(f"{name}: a different path per request needs wrk")
    else:
        result = run_python(port, path, seconds, connections, start, method, body)
    # Server CPU per request barely moves when other processes steal the core; req/s
    # does. Both are kept; busy < 90 % means a noisy machine.
    cpu = cpu_seconds(pid) - mark[0]
    result.cpu_busy = cpu / (time.monotonic() - mark[1])
    result.cpu_us_per_req = cpu * 1e6 / max(1, result.requests)
    return result


def median(results: Iterable[Result], attr: str) -> float:
    return float(statistics.median(getattr(r, attr) for r in results))


# -- reporting ----------------------------------------------------------------------------


def versions(names: Iterable[str]) -> str:
    out = []
    for name in names:
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} ?")
    return ", ".join(out)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
