"""Side-by-side HTTP benchmark suites: servers, targets, checks, rounds, tables, ratios, JSON.

``gateway.py`` and ``all.py`` declare which servers and targets they compare and which
ratios they judge; everything else (starting and pinning the servers, checking that every
cache answers HIT or MISS as it should before each measurement, interleaving the rounds,
the summary table, the PASS/FAIL ratios and the JSON document read by ``plot.py``) is
here. Lower-level machinery (wrk, CPU time, pinning) is in ``_harness.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _harness import (
    CLIENT_CPU,
    HERE,
    ROOT,
    SERVER_CPU,
    Result,
    SetupError,
    cpu_model,
    free_port,
    http_get,
    http_request,
    measure,
    median,
    pin,
    spawn,
    terminate,
    unique_path,
    uvicorn_command,
    versions,
    wait_listening,
)

STATUS = "x-cache-status"
VERSIONS = (
    "fastapi",
    "starlette",
    "pydantic",
    "uvicorn",
    "httpx",
    "aiohttp",
    "redis",
    "fastapi-cache2",
    "cachegw",
)
MEDIAN_ATTRS = ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "cpu_busy")


@dataclass
class Server:
    name: str
    command: list[str]
    cpu: int
    port: int
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    #: The process whose CPU time is measured, when it is not ``proc`` (nginx's worker).
    worker: Callable[[Server], int] | None = None
    cleanup: Callable[[], None] | None = None
    stdout: Path | None = None  # where its standard output (an access log) goes
    _pid: int = 0

    @property
    def pid(self) -> int:
        if not self._pid:
            assert self.proc is not None
            self._pid = self.worker(self) if self.worker else self.proc.pid
        return self._pid


@dataclass
class Target:
    key: str  # identifier in ratios, --only and JSON
    name: str
    server: Server
    path: str
    expect: str | None = None  # "HIT" / "MISS" every answer must carry (None: no cache)
    header: str = STATUS  # the response header carrying it
    gateway: bool = False  # a cachegw gateway: its /_cachegw/health counters are checked
    method: str = "GET"
    body: bytes | None = None  # request body (sent as JSON); the upstream must read it all
    #: Every request to a path (and so a cache key) of its own: ``path?u=<token>-<n>``.
    #: Needs wrk.
    unique: bool = False
    #: Every MISS must also be stored (``Cache-Status: ...; stored``, then a HIT).
    stored: bool = False
    #: No cache status, but every request must reach the upstream (the floor, nginx_pass).
    forwarded: bool = False
    #: The upstream counter (/__hits) its forwarded requests increase: "uncached", "cached".
    counter: str = "uncached"
    rounds: list[Result] = field(default_factory=list)
    checks: list[float] = field(default_factory=list)  # per round, see `check_label`

    @property
    def forwards(self) -> bool:
        """Every answer costs exactly one upstream request."""
        return self.expect == "MISS" or self.forwarded


@dataclass
class Ratio:
    """``num / den`` of a median. ``metric="rps"`` (higher is better; CPU per request
    inverted stands in without wrk): PASS at >= ``minimum``. ``metric="p99_ms"`` (lower
    is better; judged with wrk only): PASS at <= ``maximum``. Neither bound: information."""

    name: str
    num: str  # target keys
    den: str
    minimum: float | None  # None: shown for information
    issue: str = ""
    metric: str = "rps"
    maximum: float | None = None


# -- servers ------------------------------------------------------------------------------


def uvicorn_server(
    name: str, app: str, cpu: int = SERVER_CPU, env: dict[str, str] | None = None
) -> Server:
    """A ``uvicorn --factory`` server of ``module:factory`` under tests/bench."""
    port = free_port()
    return Server(name, uvicorn_command(app, port), cpu, port, env)


_SERVE_TOML = """\
# What a user writes: the defaults everywhere except the backend.
[cache]
backend = "{backend}"
{cache_extra}
[[services]]
name = "bench"
upstream = "{upstream}"
prefix = "/svc"

  [[services.routes]]
  path = "/cached/{{rest:path}}"
  ttl = 3600

  [[services.routes]]
  path = "/uncached/{{rest:path}}"
  ttl = 0
"""


def serve_server(
    name: str, upstream: str, backend: str, *, options: Sequence[str] = (), cache_extra: str = ""
) -> Server:
    """``cachegw serve gateway.toml`` as a user starts it: a TOML file, the CLI, its
    defaults (access log on, to a file here) unless ``options`` say otherwise."""
    tmp = Path(tempfile.mkdtemp(prefix="cachegw-bench-serve-"))
    config = tmp / "gateway.toml"
    config.write_text(
        _SERVE_TOML.format(backend=backend, upstream=upstream, cache_extra=cache_extra)
    )
    port = free_port()
    command = [
        sys.executable, "-m", "cachegw", "serve", str(config),
        "--host", "127.0.0.1", "--port", str(port), *options,
    ]  # fmt: skip
    return Server(
        name, command, SERVER_CPU, port, stdout=tmp / "access.log",
        cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True),
    )  # fmt: skip


def gateway_server(
    name: str, upstream: str, backend: str, *, l1_entries: int | None = None
) -> Server:
    """A cachegw gateway run with ``cachegw._server.uvicorn_options()`` (gateway_apps.py)."""
    port = free_port()
    command = [sys.executable, str(HERE / "gateway_apps.py"), str(port), upstream, backend]
    if l1_entries is not None:
        command.append(str(l1_entries))
    return Server(name, command, SERVER_CPU, port)


_NGINX_CONF = """\
# One worker on CPU {cpu}, nothing written outside {tmp}.
worker_processes 1;
{affinity}
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy_temp;
    fastcgi_temp_path {tmp}/fastcgi_temp;
    uwsgi_temp_path {tmp}/uwsgi_temp;
    scgi_temp_path {tmp}/scgi_temp;
    proxy_cache_path {tmp}/cache levels=1:2 keys_zone=bench:10m max_size=100m
                     inactive=10m use_temp_path=off;
    upstream origin {{ server {upstream}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_valid 200 60s;
            add_header X-Cache-Status $upstream_cache_status;
        }}
        # Pass-through, no cache: /pass/x is forwarded as /x.
        location /pass/ {{
            proxy_pass http://origin/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def _first_child(server: Server) -> int:
    """The pid of nginx's worker (the master's only child), pinned like the master."""
    assert server.proc is not None
    master = server.proc.pid
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if children:
            pin(int(children[0]), server.cpu)
            return int(children[0])
        time.sleep(0.05)
    raise SetupError("nginx started no worker process")


def nginx_server(name: str, upstream_hostport: str) -> Server | None:
    """nginx ``proxy_cache`` (one worker, cache in a temporary directory) in front of the
    upstream, and ``/pass/...`` forwarded without a cache, or None when nginx is not
    installed."""
    binary = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if binary is None:
        return None
    tmp = tempfile.mkdtemp(prefix="cachegw-bench-nginx-")
    os.chmod(tmp, 0o777)  # run as root: nginx's worker writes its cache as nobody
    port = free_port()
    affinity = f"worker_cpu_affinity {1 << SERVER_CPU:b};" if (os.cpu_count() or 1) > 1 else ""
    conf = Path(tmp) / "nginx.conf"
    conf.write_text(
        _NGINX_CONF.format(
            cpu=SERVER_CPU, tmp=tmp, affinity=affinity, upstream=upstream_hostport, port=port
        )
    )
    command = [binary, "-p", tmp, "-e", f"{tmp}/error.log", "-c", str(conf)]
    return Server(
        name, command, SERVER_CPU, port, worker=_first_child,
        cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True),
    )  # fmt: skip


def start_redis() -> Any:
    """A fresh redis-server (tests/redis_process.py) pinned to the client CPU."""
    sys.path.insert(0, str(ROOT / "tests"))
    from redis_process import RedisProcess  # type: ignore[import-not-found]

    proc = RedisProcess().start()
    pin(proc._proc.pid, CLIENT_CPU)
    return proc


def start(server: Server) -> None:
    server.proc = spawn(server.command, server.cpu, server.env, server.stdout)


def stop(server: Server) -> None:
    terminate(server.proc)
    if server.cleanup is not None:
        server.cleanup()


# -- checks -------------------------------------------------------------------------------


def upstream_counters(upstream: Server, probe: str | None = None) -> dict[str, int]:
    """The upstream's counters: requests under /uncached/ and /cached/, body bytes read
    (only of the requests whose query carried ``probe=<probe>``, when given)."""
    path = "/__hits" if probe is None else f"/__hits?probe={probe}"
    status, _, body = http_get(upstream.port, path)
    if status != 200:
        raise SetupError(f"upstream /__hits answered {status}")
    return {k: int(v) for k, v in json.loads(body).items()}


def upstream_hits(upstream: Server, counter: str = "uncached") -> int:
    return upstream_counters(upstream)[counter]


def gateway_stats(server: Server) -> dict[str, int]:
    status, _, body = http_get(server.port, "/_cachegw/health")
    if status != 200:
        raise SetupError(f"{server.name}: /_cachegw/health answered {status}")
    return dict(json.loads(body)["stats"])


def verify(target: Target, reference: bytes, upstream: Server) -> None:
    """Two requests (the target's method and body); both must carry the expected cache
    status and the reference body. A HIT must not reach the upstream; a forwarding target
    must reach it exactly once per answer with the whole request body: its two requests
    carry ``probe=<token>`` in their query (``unique`` targets: two fresh paths), which the
    upstream counts apart, exact while earlier load still drains. ``stored`` targets: both
    answers say ``stored``, then the same two paths answer HIT without the upstream."""
    # A slow target measured just before (the naive proxy) may still be working off the
    # requests queued when wrk stopped: wait until the upstream counters settle.
    counters = upstream_counters(upstream)
    for _ in range(50):
        time.sleep(0.2)
        now = upstream_counters(upstream)
        if now == counters:
            break
        counters = now
    port, what = target.server.port, f"{target.name}: {target.method}"
    token = os.urandom(6).hex()
    probed = target.forwards or target.stored
    paths = [target.path, target.path]
    if target.unique:
        paths = [unique_path(target.path, f"v{token}-{i}") for i in range(2)]
    if probed:
        paths = [f"{path}{'&' if '?' in path else '?'}probe={token}" for path in paths]
    if target.expect == "HIT":
        http_get(port, target.path)  # warm: stores the entry
        counters = upstream_counters(upstream)
    for path in paths:
        status, headers, body = http_request(port, target.method, path, target.body)
        if status != 200:
            raise SetupError(f"{what} {path} answered {status}")
        if target.expect is not None and headers.get(target.header) != target.expect:
            raise SetupError(
                f"{what} {path} answered {target.header}: "
                f"{headers.get(target.header)!r}, expected {target.expect}; headers: {headers}"
            )
        if target.stored and "; stored" not in headers.get("cache-status", ""):
            raise SetupError(f"{what} {path}: not stored (Cache-Status {headers})")
        if json.loads(body) != json.loads(reference):
            raise SetupError(f"{target.name}: body differs from the reference JSON")
    if target.expect == "HIT":
        grew = upstream_counters(upstream)[target.counter] - counters[target.counter]
        if grew != 0:
            raise SetupError(f"{target.name}: HIT answers but {grew} upstream requests")
    if not probed:
        return
    seen = upstream_counters(upstream, token)
    if seen[target.counter] != 2:
        raise SetupError(
            f"{target.name}: 2 forwarded answers but {seen[target.counter]} upstream requests"
        )
    if seen["posted"] != 2 * len(target.body or b""):
        raise SetupError(
            f"{target.name}: the upstream read {seen['posted']} request body bytes, "
            f"expected 2 x {len(target.body or b'')}"
        )
    if target.stored:
        for path in paths:
            status, headers, body = http_get(port, path)
            if status != 200 or headers.get(target.header) != "HIT":
                raise SetupError(
                    f"{target.name}: GET {path} again answered {status}, "
                    f"{target.header}: {headers.get(target.header)!r}, expected HIT (stored)"
                )
        if upstream_counters(upstream, token) != seen:
            raise SetupError(f"{target.name}: stored entries reached the upstream again")


def check_label(target: Target, value: float) -> str:
    if value != value:  # NaN: nothing checked during the window
        return ""
    if target.expect == "HIT":
        return f"HIT {value:.1%}"
    if target.forwards:
        return f"upstream {value:.2f}/req"
    return ""


def run_one(target: Target, upstream: Server, args: argparse.Namespace, wrk: str | None) -> None:
    """One measured window. Gateway hits: the share of answers its counters call HIT;
    misses: upstream requests per answer (read before and after the window)."""
    server = target.server
    before: dict[str, Any] = {}

    def on_start() -> None:  # after the warm-up, right before the measured window
        before["upstream"] = upstream_hits(upstream, target.counter)
        if target.gateway and target.expect == "HIT":
            before["stats"] = gateway_stats(server)

    result = measure(
        wrk, target.name, server.pid, server.port, target.path, args.seconds,
        args.connections, on_start,
        method=target.method, body=target.body, unique=target.unique,
    )  # fmt: skip
    # The counters also count requests in flight when wrk stopped: a few more than wrk's.
    answered = max(1, result.requests)
    check = float("nan")
    if target.gateway and target.expect == "HIT":
        stats = gateway_stats(server)
        delta = {k: stats[k] - before["stats"].get(k, 0) for k in stats}
        if delta.get("backend_errors"):
            print(f"    {target.name}: {delta['backend_errors']} backend errors (failed open)")
        check = min(1.0, delta.get("HIT", 0) / answered)
    elif target.forwards:
        check = (upstream_hits(upstream, target.counter) - before["upstream"]) / answered
    elif target.expect == "HIT" and upstream_hits(upstream) != before["upstream"]:
        raise SetupError(f"{target.name}: the upstream was asked during a HIT window")
    target.rounds.append(result)
    target.checks.append(check)
    print(
        f"  {target.name:34s} {result.rps:9.0f} req/s {result.cpu_us_per_req:6.0f} us CPU/req, "
        f"server busy {result.cpu_busy:4.0%}  {check_label(target, check)}",
        flush=True,
    )


# -- the run ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, seconds: float = 5.0, rounds: int = 3) -> None:
    parser.add_argument(
        "--seconds", type=float, default=seconds, help="measured seconds per target and round"
    )
    parser.add_argument("--connections", type=int, default=50, help="concurrent connections")
    parser.add_argument(
        "--rounds", type=int, default=rounds, help="interleaved rounds (median kept)"
    )
    parser.add_argument("--no-wrk", action="store_true", help="use the Python load generator")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")


def prologue(args: argparse.Namespace) -> tuple[str | None, str]:
    """Pin this process (and the load generator it runs) to the client CPU; print the
    machine, versions and load generator. Returns (wrk path or None, machine line)."""
    cpus = os.cpu_count() or 1
    if cpus > 1:
        pin(0, CLIENT_CPU)
    wrk = None if args.no_wrk else shutil.which("wrk")
    machine = f"{cpus} CPUs ({cpu_model()}), Python {platform.python_version()}"
    print(f"machine: {machine}")
    print(f"versions: {versions(VERSIONS)}")
    if cpus > 1:
        print(
            f"servers under test pinned to CPU {SERVER_CPU}; load generator, upstream "
            f"and redis-server to CPU {CLIENT_CPU}"
        )
    else:
        print("WARNING: one CPU: servers, upstream and load generator share it; ratios only")
    if wrk:
        print(f"load: wrk (1 thread, {args.connections} connections, keep-alive)")
    else:
        print(
            f"load: Python asyncio client ({args.connections} keep-alive connections) - "
            "wrk not found; absolute numbers are limited by the Python client, and so "
            "verdicts use server CPU per request"
        )
    return wrk, machine


def run_rounds(
    servers: list[Server],
    targets: list[Target],
    upstream: Server,
    reference: bytes,
    args: argparse.Namespace,
    wrk: str | None,
) -> None:
    """Start every server, check every target, then ``args.rounds`` interleaved rounds
    (the order rotates each round; every target is checked again before it is measured).
    Every server is stopped on the way out. Raises SetupError."""
    try:
        for server in servers:
            start(server)
        for server in servers:
            assert server.proc is not None
            wait_listening(server.proc, server.port, server.name)
            _ = server.pid  # resolve (and pin) nginx's worker now
        for target in targets:
            verify(target, reference, upstream)
        print(
            f"body: {len(reference)} bytes of JSON everywhere; every cache answers HIT, the "
            "ttl=0 route MISS and every forwarding row one upstream request per answer\n"
        )
        for round_no in range(args.rounds):
            print(f"round {round_no + 1}:")
            shift = round_no * max(1, len(targets) // args.rounds) % len(targets)
            for target in targets[shift:] + targets[:shift]:
                verify(target, reference, upstream)
                run_one(target, upstream, args, wrk)
    finally:
        for server in servers:
            stop(server)


def value(target: Target, attr: str) -> float:
    return median(target.rounds, attr)


def print_table(targets: Iterable[Target]) -> None:
    header = (
        f"{'target':34s} {'req/s':>8s} {'p50 ms':>7s} {'p99 ms':>7s} "
        f"{'CPU us/req':>10s} {'busy':>5s}  check"
    )
    print(header)
    print("-" * (len(header) + 14))
    for t in targets:
        finite = [c for c in t.checks if c == c]
        check = check_label(t, min(finite) if t.expect == "HIT" else max(finite)) if finite else ""
        print(
            f"{t.name:34s} {value(t, 'rps'):8.0f} {value(t, 'p50_ms'):7.2f} "
            f"{value(t, 'p99_ms'):7.2f} {value(t, 'cpu_us_per_req'):10.1f} "
            f"{value(t, 'cpu_busy'):5.0%}  {check}"
        )


def ratio_verdict(
    ratio: Ratio, by_key: dict[str, Target], wrk: str | None
) -> tuple[float, str, bool | None]:
    """The judged value of a ratio, its goal ("-" for information) and whether it is met
    (None: information). Req/s ratios use req/s with wrk, server CPU per request (inverted)
    without; p99 ratios (lower is better) are information without wrk, whose Python
    client makes the latency its own."""
    num, den = by_key[ratio.num], by_key[ratio.den]
    if ratio.metric == "rps":
        judged = (
            value(num, "rps") / value(den, "rps")
            if wrk
            else value(den, "cpu_us_per_req") / value(num, "cpu_us_per_req")
        )
    else:
        judged = value(num, ratio.metric) / value(den, ratio.metric)
    if ratio.minimum is not None:
        return judged, f">= {ratio.minimum:g}x", judged >= ratio.minimum
    if ratio.maximum is not None:
        return judged, f"<= {ratio.maximum:g}x", (judged <= ratio.maximum) if wrk else None
    return judged, "-", None


def judge(
    targets: list[Target], ratios: list[Ratio], wrk: str | None
) -> tuple[bool, list[dict[str, Any]]]:
    """Print the ratios (by req/s and by server CPU per request) with their verdicts.
    Verdicts use req/s with wrk, CPU per request with the Python client (which saturates
    before fast servers do); p99 ratios (lower is better) compare p99 latencies.
    Returns (any target missed, the ratios as dicts)."""
    by_key = {t.key: t for t in targets}
    header = f"{'ratio (medians)':48s} {'req/s':>7s} {'CPU':>6s}  {'target':>7s}  verdict"
    print(header)
    print("-" * (len(header) + 30))
    failed = False
    out = []
    for ratio in ratios:
        if ratio.num not in by_key or ratio.den not in by_key:
            continue
        num, den = by_key[ratio.num], by_key[ratio.den]
        by_rps = value(num, "rps") / value(den, "rps")
        # CPU per request, inverted: how many times cheaper the numerator is.
        by_cpu = value(den, "cpu_us_per_req") / value(num, "cpu_us_per_req")
        judged, goal, ok = ratio_verdict(ratio, by_key, wrk)
        failed |= ok is False
        if ratio.metric == "rps":
            columns = f"{by_rps:6.2f}x {by_cpu:5.2f}x"
            by = ", by CPU " + ("PASS" if by_cpu >= (ratio.minimum or 0) else "FAIL") if wrk else ""
        else:  # the judged latency ratio stands in the first column
            columns = f"{judged:6.2f}x {'-':>6s}"
            by = "" if wrk else ", not judged without wrk"
        if goal == "-":
            verdict, goal = "info", "-"
        else:
            verdict = ("info" if ok is None else "PASS" if ok else "FAIL") + f" ({ratio.issue}{by})"
        print(f"{ratio.name:48s} {columns}  {goal:>7s}  {verdict}")
        out.append(
            {
                "name": ratio.name,
                "numerator": ratio.num,
                "denominator": ratio.den,
                "metric": ratio.metric,
                "value": judged,
                "by_rps": by_rps,
                "by_cpu": by_cpu,
                "minimum": ratio.minimum,
                "maximum": ratio.maximum,
                "issue": ratio.issue or None,
                "pass": ok,
                "pass_by_cpu": (
                    by_cpu >= ratio.minimum
                    if ratio.minimum is not None and ratio.metric == "rps"
                    else None
                ),
            }
        )
    print(
        f"\nverdicts use {'req/s' if wrk else 'server CPU per request'} (medians). The CPU "
        "column gives the same ratio from server CPU time per request\n(higher = cheaper), "
        "which other load on the machine disturbs far less than req/s. p99 ratios: lower is "
        "better, the first column is the p99 ratio."
    )
    busy = min(r.cpu_busy for t in targets for r in t.rounds)
    if busy < 0.9:
        print(
            f"WARNING: a server was on CPU only {busy:.0%} of a measured window (the miss "
            "path and the naive proxy wait on the upstream, so below 100 % is expected "
            "there; elsewhere the load generator or other processes were the limit)."
        )
    return failed, out


def write_json(
    path: Path,
    benchmark: str,
    args: argparse.Namespace,
    wrk: str | None,
    machine: str,
    reference: bytes,
    targets: list[Target],
    ratios: list[dict[str, Any]],
    notes: list[str],
) -> None:
    doc = {
        "benchmark": benchmark,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "versions": versions(VERSIONS),
        "load": "wrk" if wrk else "python",
        "seconds": args.seconds,
        "rounds": args.rounds,
        "connections": args.connections,
        "body_bytes": len(reference),
        "notes": notes,
        "targets": [
            {
                "key": t.key,
                "name": t.name,
                "path": t.path,
                "expect": t.expect,
                "method": t.method,
                "unique": t.unique,
                "median": {attr: value(t, attr) for attr in MEDIAN_ATTRS},
                "rounds": [asdict(r) for r in t.rounds],
                "checks": [c if c == c else None for c in t.checks],
            }
            for t in targets
        ],
        "ratios": ratios,
        "verdicts_by": "rps" if wrk else "cpu",
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results written to {path}")


def run_suite(
    benchmark: str,
    args: argparse.Namespace,
    servers: list[Server],
    targets: list[Target],
    upstream: Server,
    reference: bytes,
    ratios: list[Ratio],
    wrk: str | None,
    machine: str,
    notes: list[str],
) -> int:
    """Measure, print the table and the ratios, write the JSON. Exit status: 0 when every
    judged ratio meets its target, 1 when one misses, 2 when the setup is wrong."""
    for note in notes:
        print(f"note: {note}")
    print(
        f"{args.rounds} interleaved rounds x {len(targets)} targets x "
        f"(1 s warm-up + {args.seconds:g} s)\n"
    )
    try:
        run_rounds(servers, targets, upstream, reference, args, wrk)
    except SetupError as exc:
        print(f"\nABORTED: {exc}", file=sys.stderr)
        return 2
    print()
    print_table(targets)
    print()
    failed, ratios_out = judge(targets, ratios, wrk)
    if args.json is not None:
        write_json(args.json, benchmark, args, wrk, machine, reference, targets, ratios_out, notes)
    return 1 if failed else 0
