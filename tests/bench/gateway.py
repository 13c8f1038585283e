"""Gateway hit and miss paths against a naive FastAPI + httpx proxy, bare FastAPI and raw ASGI.

Side by side in one run. Every server under test is one uvicorn worker pinned to CPU 0;
the load generator (wrk, 1 thread, keep-alive) runs on CPU 1, and so do the upstream
origin and redis-server: the same for every target, so it is fair. All targets answer
``GET`` with the same ~1 KiB JSON (servers in ``gateway_apps.py``; machinery shared with
``decorator_hit.py`` in ``_harness.py``):

  gateway hit, memory   cachegw gateway (`Gateway`/`Service` + `create_app`, run with
                        `cachegw._server.uvicorn_options()`), memory backend, one warm key
  gateway hit, Redis    the same on the Redis backend (skipped with ``--no-redis``)
  gateway miss          the memory gateway, a route with ``ttl = 0`` in front of an upstream
                        sending no freshness: every request is forwarded
  naive httpx proxy     FastAPI ``/{path:path}`` + ONE shared ``httpx.AsyncClient`` (default
                        transport) opened in the lifespan, ``Response(r.content, ...)``:
                        no cache, so it is compared with the gateway's miss path
  naive, keep-alive 100 the same with ``max_keepalive_connections=100`` instead of httpx's
                        default 20: with 50 connections the default closes and reopens
                        upstream connections all the time (reference: a tuned baseline)
  bare FastAPI          a FastAPI route returning the payload as a dict
  bare FastAPI, bytes   the same returning pre-serialized bytes (reference)
  raw ASGI              a bare ASGI callable returning the bytes (reference)

Before every measurement each gateway target must answer as expected (``X-Cache-Status:
HIT`` twice, or ``MISS`` twice with the upstream's hit counter growing by two) and every
body must equal the bare route's, or the script aborts. During the measurement the
gateway's own counters (``/_cachegw/health``) and the upstream's hit counter are read
before and after: the "check" column shows the share of answers that were HITs, or the
upstream requests per gateway request on the miss path. Rounds are interleaved and the
median is reported.

    .venv/bin/python tests/bench/gateway.py [--seconds 5] [--rounds 3] [--connections 50]
                                            [--no-redis] [--json out.json]

Exit status: 0 when every ratio meets its target, 1 when one misses, 2 when the setup
is wrong (a server does not start, a cache does not hit, a miss is not forwarded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
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
    measure,
    median,
    pin,
    spawn,
    terminate,
    uvicorn_command,
    versions,
    wait_listening,
)

STATUS = "x-cache-status"
# Read by gateway_apps.naive_proxy.
UPSTREAM_ENV = "CACHEGW_BENCH_UPSTREAM"
KEEPALIVE_ENV = "CACHEGW_BENCH_NAIVE_KEEPALIVE"


@dataclass
class Server:
    name: str
    command: list[str]
    cpu: int
    port: int
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@dataclass
class Target:
    key: str  # identifier in ratios and JSON
    name: str
    server: Server
    path: str
    expect: str | None  # X-Cache-Status every answer must carry (None: not a gateway)
    rounds: list[Result] = field(default_factory=list)
    checks: list[float] = field(default_factory=list)  # per round, see `check_label`

    @property
    def gateway(self) -> bool:
        return self.expect is not None


@dataclass
class Ratio:
    name: str
    num: str  # target keys
    den: str
    minimum: float | None  # None: shown for information
    issue: str


RATIOS = [
    Ratio("gateway miss / naive httpx proxy", "gw_miss", "naive", 3.0, "issue 3"),
    Ratio("gateway miss / naive httpx proxy", "gw_miss", "naive", 5.0, "issue 6"),
    Ratio("gateway hit (memory) / bare FastAPI", "gw_hit_memory", "bare", 1.0, "issue 3"),
    Ratio("gateway hit (memory) / raw ASGI", "gw_hit_memory", "raw_asgi", 0.5, "issue 6"),
    Ratio("gateway hit (memory) / bare FastAPI bytes", "gw_hit_memory", "bare_bytes", None, ""),
    Ratio("gateway hit (Redis) / gateway hit (memory)", "gw_hit_redis", "gw_hit_memory", None, ""),
    Ratio("gateway miss / naive, keep-alive 100", "gw_miss", "naive_ka", None, ""),
    Ratio("naive httpx proxy / bare FastAPI", "naive", "bare", None, ""),
]


def _uvicorn(
    name: str, app: str, cpu: int = SERVER_CPU, env: dict[str, str] | None = None
) -> Server:
    port = free_port()
    return Server(name, uvicorn_command(app, port), cpu, port, env)


def _gateway(name: str, upstream: str, backend: str) -> Server:
    port = free_port()
    command = [sys.executable, str(HERE / "gateway_apps.py"), str(port), upstream, backend]
    return Server(name, command, SERVER_CPU, port)


def start(server: Server) -> None:
    server.proc = spawn(server.command, server.cpu, server.env)


def upstream_hits(upstream: Server) -> int:
    status, _, body = http_get(upstream.port, "/__hits")
    if status != 200:
        raise SetupError(f"upstream /__hits answered {status}")
    return int(json.loads(body)["uncached"])


def gateway_stats(server: Server) -> dict[str, int]:
    status, _, body = http_get(server.port, "/_cachegw/health")
    if status != 200:
        raise SetupError(f"{server.name}: /_cachegw/health answered {status}")
    return dict(json.loads(body)["stats"])


def verify(target: Target, reference: bytes, upstream: Server) -> None:
    """Two requests; both must carry the expected cache status and the reference body."""
    before = upstream_hits(upstream)
    if target.expect == "HIT":
        http_get(target.server.port, target.path)  # warm: stores the entry
    for _ in range(2):
        status, headers, body = http_get(target.server.port, target.path)
        if status != 200:
            raise SetupError(f"{target.name}: GET {target.path} answered {status}")
        if target.expect is not None and headers.get(STATUS) != target.expect:
            raise SetupError(
                f"{target.name}: GET {target.path} answered {STATUS}: "
                f"{headers.get(STATUS)!r}, expected {target.expect}; headers: {headers}"
            )
        if json.loads(body) != json.loads(reference):
            raise SetupError(f"{target.name}: body differs from the bare FastAPI route's")
    grew = upstream_hits(upstream) - before
    if target.expect == "MISS" and grew != 2:
        raise SetupError(f"{target.name}: 2 MISS answers but {grew} upstream requests")
    if target.expect == "HIT" and grew != 0:
        raise SetupError(f"{target.name}: HIT answers but {grew} upstream requests")


def run_one(target: Target, upstream: Server, args: argparse.Namespace, wrk: str | None) -> None:
    server = target.server
    before: dict[str, Any] = {}

    def on_start() -> None:  # after the warm-up, right before the measured window
        before["upstream"] = upstream_hits(upstream)
        if target.gateway:
            before["stats"] = gateway_stats(server)

    result = measure(
        wrk, target.name, server.pid, server.port, target.path, args.seconds,
        args.connections, on_start,
    )  # fmt: skip
    # The counters also count requests in flight when wrk stopped: a few more than wrk's.
    answered = max(1, result.requests)
    if target.expect == "HIT":
        stats = gateway_stats(server)
        delta = {k: stats[k] - before["stats"].get(k, 0) for k in stats}
        if delta.get("backend_errors"):
            print(f"    {target.name}: {delta['backend_errors']} backend errors (failed open)")
        check = min(1.0, delta.get("HIT", 0) / answered)
    elif target.expect == "MISS":
        check = (upstream_hits(upstream) - before["upstream"]) / answered
    else:
        check = float("nan")
    target.rounds.append(result)
    target.checks.append(check)
    print(
        f"  {target.name:30s} {result.rps:9.0f} req/s {result.cpu_us_per_req:6.0f} us CPU/req, "
        f"server busy {result.cpu_busy:4.0%}  {check_label(target, check)}",
        flush=True,
    )


def check_label(target: Target, value: float) -> str:
    if target.expect == "HIT":
        return f"HIT {value:.1%}"
    if target.expect == "MISS":
        return f"upstream {value:.2f}/req"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per target")
    parser.add_argument("--connections", type=int, default=50, help="concurrent connections")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median kept)")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis backend target")
    parser.add_argument("--no-wrk", action="store_true", help="use the Python load generator")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    args = parser.parse_args()

    cpus = os.cpu_count() or 1
    if cpus > 1:
        pin(0, CLIENT_CPU)  # this process and the load generator it runs
    wrk = None if args.no_wrk else shutil.which("wrk")
    machine = f"{cpus} CPUs ({cpu_model()}), Python {platform.python_version()}"
    names = ("fastapi", "starlette", "uvicorn", "httpx", "aiohttp", "redis", "cachegw")
    print(f"machine: {machine}")
    print(f"versions: {versions(names)}")
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

    redis_proc: Any = None
    upstream = _uvicorn("upstream", "gateway_apps:upstream", CLIENT_CPU)
    upstream_url = f"http://127.0.0.1:{upstream.port}"
    gw_memory = _gateway("gateway (memory)", upstream_url, "memory")
    naive = _uvicorn("naive proxy", "gateway_apps:naive_proxy", env={UPSTREAM_ENV: upstream_url})
    naive_ka = _uvicorn(
        "naive proxy, keep-alive 100",
        "gateway_apps:naive_proxy",
        env={UPSTREAM_ENV: upstream_url, KEEPALIVE_ENV: "100"},
    )
    bare = _uvicorn("bare FastAPI", "apps:bare")
    bare_bytes = _uvicorn("bare FastAPI, bytes", "apps:bare_bytes")
    raw = _uvicorn("raw ASGI", "gateway_apps:raw_asgi")
    servers = [upstream, gw_memory, naive, naive_ka, bare, bare_bytes, raw]
    targets = [
        Target("gw_hit_memory", "gateway hit, memory", gw_memory, "/svc/cached/items", "HIT"),
        Target("gw_miss", "gateway miss (ttl=0)", gw_memory, "/svc/uncached/items", "MISS"),
        Target("naive", "naive httpx proxy (shared)", naive, "/uncached/items", None),
        Target("naive_ka", "naive proxy, keep-alive 100", naive_ka, "/uncached/items", None),
        Target("bare", "bare FastAPI (dict)", bare, "/items", None),
        Target("bare_bytes", "bare FastAPI, bytes Response", bare_bytes, "/items", None),
        Target("raw_asgi", "raw ASGI", raw, "/items", None),
    ]
    try:
        if not args.no_redis:
            sys.path.insert(0, str(ROOT / "tests"))
            from redis_process import RedisProcess  # type: ignore[import-not-found]

            redis_proc = RedisProcess().start()
            pin(redis_proc._proc.pid, CLIENT_CPU)
            gw_redis = _gateway("gateway (Redis)", upstream_url, redis_proc.url)
            servers.append(gw_redis)
            targets.insert(
                1,
                Target("gw_hit_redis", "gateway hit, Redis", gw_redis, "/svc/cached/items", "HIT"),
            )
        print(
            f"{args.rounds} interleaved rounds x {len(targets)} targets x "
            f"(1 s warm-up + {args.seconds:g} s)\n"
            "naive proxy: one httpx.AsyncClient shared by all requests (default transport "
            "and limits, opened in the lifespan), the stronger baseline than a client per "
            "request;\n'keep-alive 100' also raises max_keepalive_connections from 20 to "
            "100 (reference)\n"
        )
        for server in servers:
            start(server)
        for server in servers:
            wait_listening(server.proc, server.port, server.name)  # type: ignore[arg-type]
        _, _, reference = http_get(bare.port, "/items")
        for target in targets:
            verify(target, reference, upstream)
        print(
            f"body: {len(reference)} bytes of JSON everywhere; gateway hits answer HIT, "
            "the ttl=0 route MISS with one upstream request each\n"
        )
        for round_no in range(args.rounds):
            print(f"round {round_no + 1}:")
            order = targets[round_no % len(targets) :] + targets[: round_no % len(targets)]
            for target in order:
                verify(target, reference, upstream)
                run_one(target, upstream, args, wrk)
    except SetupError as exc:
        print(f"\nABORTED: {exc}", file=sys.stderr)
        return 2
    finally:
        for server in servers:
            terminate(server.proc)
        if redis_proc is not None:
            redis_proc.close()

    by_key = {t.key: t for t in targets}
    judge_attr = "rps" if wrk else "cpu"

    def value(key: str, attr: str) -> float:
        return median(by_key[key].rounds, attr)

    print()
    header = (
        f"{'target':30s} {'req/s':>8s} {'p50 ms':>7s} {'p99 ms':>7s} "
        f"{'CPU us/req':>10s} {'busy':>5s}  check"
    )
    print(header)
    print("-" * (len(header) + 14))
    for t in targets:
        finite = [c for c in t.checks if c == c]
        check = check_label(t, min(finite) if t.expect == "HIT" else max(finite)) if finite else ""
        print(
            f"{t.name:30s} {value(t.key, 'rps'):8.0f} {value(t.key, 'p50_ms'):7.2f} "
            f"{value(t.key, 'p99_ms'):7.2f} {value(t.key, 'cpu_us_per_req'):10.0f} "
            f"{median(t.rounds, 'cpu_busy'):5.0%}  {check}"
        )

    print()
    header = f"{'ratio (medians)':44s} {'req/s':>7s} {'CPU':>6s}  {'target':>7s}  verdict"
    print(header)
    print("-" * len(header))
    failed = False
    ratios_out = []
    for ratio in RATIOS:
        if ratio.num not in by_key or ratio.den not in by_key:
            continue
        by_rps = value(ratio.num, "rps") / value(ratio.den, "rps")
        # CPU per request, inverted: how many times cheaper the numerator is.
        by_cpu = value(ratio.den, "cpu_us_per_req") / value(ratio.num, "cpu_us_per_req")
        judged = by_rps if judge_attr == "rps" else by_cpu
        if ratio.minimum is None:
            verdict, goal = "info", "-"
        else:
            ok = judged >= ratio.minimum
            failed |= not ok
            verdict = ("PASS" if ok else "FAIL") + f" ({ratio.issue})"
            goal = f">= {ratio.minimum:g}x"
        print(f"{ratio.name:44s} {by_rps:6.2f}x {by_cpu:5.2f}x  {goal:>7s}  {verdict}")
        ratios_out.append(
            {
                "name": ratio.name,
                "numerator": ratio.num,
                "denominator": ratio.den,
                "by_rps": by_rps,
                "by_cpu": by_cpu,
                "minimum": ratio.minimum,
                "issue": ratio.issue or None,
                "pass": None if ratio.minimum is None else judged >= ratio.minimum,
            }
        )
    print(
        f"\nverdicts use {'req/s' if wrk else 'server CPU per request'} (medians of "
        f"{args.rounds} rounds). The CPU column gives the same ratio from server CPU time per\n"
        "request (higher = cheaper), which other load on the machine disturbs far less."
    )
    busy = min(r.cpu_busy for t in targets for r in t.rounds)
    if busy < 0.9:
        print(
            f"WARNING: a server was on CPU only {busy:.0%} of a measured window (the miss "
            "path and the naive proxy wait on the upstream, so below 100 % is expected "
            "there; elsewhere it means other processes competed for the core)."
        )

    if args.json is not None:
        doc = {
            "benchmark": "tests/bench/gateway.py",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine,
            "versions": versions(names),
            "load": "wrk" if wrk else "python",
            "seconds": args.seconds,
            "rounds": args.rounds,
            "connections": args.connections,
            "body_bytes": len(reference),
            "targets": [
                {
                    "key": t.key,
                    "name": t.name,
                    "path": t.path,
                    "expect": t.expect,
                    "median": {
                        attr: value(t.key, attr)
                        for attr in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "cpu_busy")
                    },
                    "rounds": [asdict(r) for r in t.rounds],
                    "checks": [c if c == c else None for c in t.checks],
                }
                for t in targets
            ],
            "ratios": ratios_out,
            "verdicts_by": "rps" if wrk else "cpu",
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
