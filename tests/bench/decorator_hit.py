"""Cache-hit throughput of ``@cached`` against bare FastAPI and fastapi-cache2's ``@cache``.

Side by side in one run: each target is one uvicorn worker (httptools, uvloop, no access
log, no ``Server`` header) pinned to CPU 0; the load generator runs on CPU 1. Targets
(factories in ``apps.py``), all answering ``GET /items`` with the same ~1 KiB JSON:

  bare             a bare FastAPI route
  bare bytes       a bare FastAPI route returning the JSON pre-serialized (a ceiling;
                   reference only)
  fastapi-cache2   fastapi-cache2 ``@cache(expire=60)`` on its InMemoryBackend, hit path
  cachegw          cachegw ``@cached(ttl=60)`` on cachegw's MemoryBackend, hit path, with
                   ``CachedHits`` (hits answered before routing)
  cachegw routed   the same without ``CachedHits`` (hits pay FastAPI's request handling)
  cachegw+fc2-mem  cachegw ``@cached(ttl=60)`` on fastapi-cache2's InMemoryBackend

``--baseline-src DIR`` adds both cachegw targets again, served by the ``cachegw`` package of
another checkout (``git worktree add DIR <commit>``), and prints the CPU cost per hit of this
tree relative to it: a change's cost measured side by side in one run.

Each cached target is warmed with one request and must answer HIT (``X-Cache-Status`` /
``X-FastAPI-Cache``) before every measurement, or the script aborts. Load comes from
``wrk`` (1 thread, keep-alive) when it is on PATH, else from a small asyncio HTTP/1.1
client (machinery shared with ``gateway.py`` in ``_harness.py``), whose own cost then
caps the absolute numbers and squeezes req/s ratios, so verdicts then use server CPU time
per request. Rounds are interleaved and the median is reported.

    .venv/bin/python tests/bench/decorator_hit.py [--seconds 5] [--connections 50]

Exit status: 0 when every cachegw target meets both targets, 1 when one misses,
2 when the setup is wrong (a server does not start, a cache does not hit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from _harness import (
    CLIENT_CPU,
    SERVER_CPU,
    Result,
    SetupError,
    cpu_model,
    free_port,
    http_get,
    measure,
    pin,
    spawn,
    terminate,
    uvicorn_command,
    wait_listening,
)
from _harness import median as _median
from _harness import versions as _harness_versions

PATH = "/items"

#: Targets the decorator must meet (DESIGN.md, REFERENCE.md "Numbers to beat").
MIN_VS_FASTAPI_CACHE2 = 2.0
MIN_VS_BARE = 0.9


@dataclass
class Target:
    name: str
    factory: str
    hit_header: str | None  # response header that must say HIT on the second request
    checked: bool  # gets PASS/FAIL against the targets (the others are references)
    env: dict[str, str] | None = None  # e.g. PYTHONPATH of a baseline checkout
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    rounds: list[Result] = field(default_factory=list)


TARGETS = [
    Target("bare FastAPI", "bare", None, checked=False),
    Target("bare FastAPI, bytes Response", "bare_bytes", None, checked=False),
    Target("fastapi-cache2 @cache", "fastapi_cache2", "x-fastapi-cache", checked=False),
    Target("cachegw @cached", "cachegw_memory", "x-cache-status", checked=True),
    Target("cachegw @cached, no CachedHits", "cachegw_memory_routed", "x-cache-status", False),
    Target("cachegw @cached, fc2 InMemory", "cachegw_fc2_memory", "x-cache-status", checked=True),
]


# -- servers (machinery in _harness.py) ---------------------------------------------------


def start(target: Target) -> None:
    target.port = free_port()
    target.proc = spawn(
        uvicorn_command(f"apps:{target.factory}", target.port), SERVER_CPU, env=target.env
    )


def wait_ready(target: Target, timeout: float = 30.0) -> None:
    assert target.proc is not None
    wait_listening(target.proc, target.port, target.name, timeout)


def stop(target: Target) -> None:
    terminate(target.proc)


def get(target: Target) -> tuple[int, dict[str, str], bytes]:
    return http_get(target.port, PATH)


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


# -- main ------------------------------------------------------------------------------


def _versions() -> str:
    return _harness_versions(
        ("fastapi", "starlette", "pydantic", "uvicorn", "fastapi-cache2", "cachegw")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per target")
    parser.add_argument("--connections", type=int, default=50, help="concurrent connections")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median kept)")
    parser.add_argument("--no-wrk", action="store_true", help="use the Python load generator")
    parser.add_argument(
        "--baseline-src",
        metavar="DIR",
        help="a checkout whose cachegw package serves two extra targets, for comparison",
    )
    args = parser.parse_args()
    if args.baseline_src:
        # PYTHONSAFEPATH: no current directory (this tree) ahead of PYTHONPATH.
        env = {"PYTHONPATH": os.path.abspath(args.baseline_src), "PYTHONSAFEPATH": "1"}
        TARGETS.extend(
            [
                Target("baseline @cached", "cachegw_memory", "x-cache-status", False, env),
                Target(
                    "baseline @cached, no CachedHits",
                    "cachegw_memory_routed",
                    "x-cache-status",
                    False,
                    env,
                ),
            ]
        )

    cpus = os.cpu_count() or 1
    if cpus > 1:
        pin(0, CLIENT_CPU)  # this process and the load generator it runs
    wrk = None if args.no_wrk else shutil.which("wrk")
    print(f"machine: {cpus} CPUs ({cpu_model()}), Python {platform.python_version()}")
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
                result = measure(
                    wrk, target.name, pid, target.port, PATH, args.seconds, args.connections
                )
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
        return _median(target.rounds, attr)

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
    if args.baseline_src:
        names = {t.name: t for t in TARGETS}
        print(f"\nthis tree vs {args.baseline_src} (server CPU per hit; < 1.05 = within 5 %):")
        for ours, theirs in (
            ("cachegw @cached", "baseline @cached"),
            ("cachegw @cached, no CachedHits", "baseline @cached, no CachedHits"),
        ):
            ratio = median(names[ours], "cpu_us_per_req") / median(names[theirs], "cpu_us_per_req")
            print(f"  {ours:31s} {ratio:5.2f}x the baseline's CPU per hit")
    busy = min(r.cpu_busy for t in TARGETS for r in t.rounds)
    if busy < 0.9:
        print(
            f"WARNING: a server was on CPU only {busy:.0%} of a measured window: other "
            "processes competed for its core; trust the CPU columns over req/s."
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
