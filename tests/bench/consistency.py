"""Writes are never undone, under load: the consistency checker for two minutes.

Concurrent readers and writers (32 workers; 80 % GET over 1,000 items with Zipf
popularity and ``Vary: Accept-Language``, 20 % PUT/DELETE) through `cachegw serve` in
front of an upstream that versions every item (its own process). Fails (exit status 1)
on any read that started after a write was acknowledged (plus the visibility window
across processes) and returned an older version. Memory backend (one gateway process)
and Redis (two gateway processes sharing a redis-server started here). With
``--gateway-workers N`` the memory backend runs as one ``cachegw serve --workers N``
(issue 23: the workers relay purges and fetched entries; no window).

    .venv/bin/python tests/bench/consistency.py [--seconds 120] [--backends memory redis]
        [--gateway-workers 8]        # memory: one `cachegw serve --workers 8`
        [--cachegw-src /work/main]   # run the gateways from another checkout (before/after)
        [--ops 600]                  # a fixed number of operations per worker instead
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.consistency_check import Workload, check  # noqa: E402
from tests.gateway_process import GatewayProcess  # noqa: E402
from tests.redis_process import RedisProcess, free_port  # noqa: E402
from tests.test_consistency import WINDOW, config  # noqa: E402


def upstream_process(port: int, latency: float) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.items_upstream", str(port), str(latency)], cwd=ROOT
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/items/0", timeout=0.5)
            return proc
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the items upstream did not start")


def run(
    backend: str,
    count: int,
    workload: Workload,
    source: str | None,
    latency: float,
    serve_workers: int = 1,
) -> int:
    env = {"PYTHONPATH": source} if source else {}
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = used.ru_utime + used.ru_stime
    port = free_port()
    origin = upstream_process(port, latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # `python -m cachegw` puts its working directory first on sys.path: start the
            # gateways elsewhere than a checkout, so that --cachegw-src decides.
            os.chdir(tmp)
            path = config(Path(tmp), f"http://127.0.0.1:{port}", backend, "bench")
            args = ["--no-access-log"]
            if serve_workers > 1:
                args += ["--workers", str(serve_workers)]
            procs = [GatewayProcess(path, extra_env=env, args=args) for _ in range(count)]
            try:
                for proc in procs:
                    proc.start()
                window = WINDOW if count > 1 else 0.0
                result = check([p.base + "/api" for p in procs], workload, window=window)
            finally:
                for proc in procs:
                    output = proc.stop()
                    warnings = [line for line in output.splitlines() if "warning" in line.lower()]
                    for line in warnings[:5]:
                        print(f"  gateway: {line}")
    finally:
        origin.terminate()
        origin.wait(10)
    name = "memory" if backend == "memory" else f"redis, {count} gateway processes"
    if serve_workers > 1:
        name += f", cachegw serve --workers {serve_workers}"
    print(f"{name} (window {window * 1000:.0f} ms):")
    print(result.report(), flush=True)
    # CPU of the gateway and upstream processes (waited for: children and grandchildren).
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = used.ru_utime + used.ru_stime - cpu_before
    ops = result.reads + result.writes
    print(f"  server-side CPU: {cpu:.1f} s, {1000 * cpu / max(ops, 1):.2f} ms per operation")
    return len(result.violations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument(
        "--ops", type=int, default=None, help="operations per worker (same work in every run)"
    )
    parser.add_argument("--backends", nargs="+", default=["memory", "redis"])
    parser.add_argument(
        "--latency", type=float, default=0.02, help="mean upstream GET time (uniform 0..2x)"
    )
    parser.add_argument("--cachegw-src", default=None, help="import cachegw from this checkout")
    parser.add_argument(
        "--gateway-workers", type=int, default=1, help="memory: cachegw serve --workers N"
    )
    args = parser.parse_args()
    workload = Workload(
        items=args.items, workers=args.workers, seconds=args.seconds, ops_per_worker=args.ops
    )
    if args.cachegw_src:
        print(f"gateways run cachegw from {args.cachegw_src}")
    violations = 0
    for backend in args.backends:
        if backend == "memory":
            violations += run(
                "memory", 1, workload, args.cachegw_src, args.latency, args.gateway_workers
            )
        else:
            with RedisProcess() as server:
                violations += run(server.url, 2, workload, args.cachegw_src, args.latency)
    sys.exit(1 if violations else 0)


if __name__ == "__main__":
    main()
