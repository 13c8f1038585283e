"""Stampede on one cold key: how many requests reach the upstream, and how long the
requests that waited for another one's fetch take after the upstream answered.

    python tests/bench/stampede.py                          # 2 gateways sharing a Redis
    python tests/bench/stampede.py --backend memory --gateways 1
    python tests/bench/stampede.py --naive                  # fastapi-cache2 @cache, for comparison

All N TCP connections are opened first, then every request is written in one tight loop
(the spread is printed), split round-robin between the gateway processes. The upstream
is a raw asyncio HTTP server in this process that sleeps ``--upstream-delay`` seconds,
counts requests and records when it wrote each answer (CLOCK_MONOTONIC, shared with the
client), so "added latency" is a waiter's completion time minus the upstream's send time.
Only loopback traffic; every wait is bounded. Redis is a fresh redis-server on a free port.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.chaos import Answer, Gateway, Origin, burst, request_bytes  # noqa: E402
from tests.redis_process import RedisProcess  # noqa: E402
from tests.servers import free_port  # noqa: E402

BODY = b'{"stampede": true, "padding": "' + b"x" * 1000 + b'"}'

TOML = """
[cache]
backend = "{backend}"
prefix = "stampede"

[[services]]
name = "svc"
upstream = "{upstream}"
prefix = "/svc"
ttl = 300

  [[services.routes]]
  path = "/{{rest:path}}"
"""


def naive_app():  # type: ignore[no-untyped-def]  # uvicorn --factory target
    """FastAPI + fastapi-cache2 ``@cache`` (InMemoryBackend) proxying to the upstream."""
    from contextlib import asynccontextmanager

    import httpx
    from fastapi import FastAPI
    from fastapi_cache import FastAPICache
    from fastapi_cache.backends.inmemory import InMemoryBackend
    from fastapi_cache.decorator import cache

    upstream = os.environ["STAMPEDE_UPSTREAM"]
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        FastAPICache.init(InMemoryBackend())
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            state["client"] = client
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/svc/{rest:path}")
    @cache(expire=300)
    async def proxy(rest: str):  # type: ignore[no-untyped-def]
        response = await state["client"].get(f"{upstream}/{rest}")
        return response.json()

    return app


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(value: float) -> str:
    return f"{value * 1000:8.1f} ms"


def report(answers: list[Answer], spread: float, origin: Origin, path: str, status: str) -> dict:
    upstream_count = origin.hits[path]
    sent = origin.sent[path]
    first_answer = min(sent) if sent else float("nan")
    ok = [a for a in answers if a.status]
    statuses = Counter(a.status for a in answers)
    cache = Counter(
        f"{a.headers.get(status, '?')}{' collapsed' if 'collapsed' in a.detail else ''}" for a in ok
    )
    errors = Counter(a.error for a in answers if a.error)
    print(f"  requests sent within      {ms(spread)}")
    print(f"  upstream requests         {upstream_count}   (target: 1)")
    print(f"  HTTP statuses             {dict(statuses)}")
    print(f"  cache statuses            {dict(cache)}")
    if errors:
        print(f"  client errors             {dict(errors)}")
    latencies = [a.latency for a in ok]
    if latencies:
        print(
            f"  latency (all)             median {ms(statistics.median(latencies))}"
            f"  p90 {ms(pct(latencies, 0.9))}  max {ms(max(latencies))}"
        )
    bodies = {a.body for a in ok}
    print(f"  distinct bodies           {len(bodies)}")
    result: dict = {"upstream": upstream_count, "statuses": dict(cache)}
    if not sent:
        return result
    # The leader: the answer that left the gateway first after the upstream's first answer
    # (with one upstream request, the request that fetched it: its MISS).
    leaders = [a for a in ok if a.headers.get(status) == "MISS"] or ok
    leader = min(leaders, key=lambda a: a.done)
    print(
        f"  upstream answered at      +{ms(first_answer - answers[0].sent).strip()} "
        f"(after the first request was sent)"
    )
    print(
        f"  leader completed at       +{ms(leader.done - answers[0].sent).strip()}; "
        f"{ms(leader.done - first_answer).strip()} after the upstream's answer"
    )
    waiters = [a for a in ok if a is not leader]
    if upstream_count == 1 and waiters:
        added = [a.done - first_answer for a in waiters]
        print(
            f"  waiters' added latency    median {ms(statistics.median(added))}"
            f"  p90 {ms(pct(added, 0.9))}  max {ms(max(added))}   (target: median <= 20 ms)"
        )
        result |= {
            "median": statistics.median(added),
            "p90": pct(added, 0.9),
            "max": max(added),
        }
    return result


def run_gateway(args: argparse.Namespace, origin: Origin, tmp: Path) -> list[dict]:
    redis: RedisProcess | None = None
    gateways: list[Gateway] = []
    try:
        backend = "memory"
        if args.backend == "redis":
            redis = RedisProcess().start()
            backend = redis.url
        config = tmp / "gateway.toml"
        config.write_text(TOML.format(backend=backend, upstream=origin.base))
        gateways = [Gateway(config).start() for _ in range(args.gateways)]
        print(
            f"cachegw: {args.gateways} gateway process(es), backend {args.backend}, "
            f"{args.requests} requests, upstream delay {args.upstream_delay * 1000:.0f} ms"
        )
        results = []
        for round_ in range(args.rounds):
            path = f"/stampede/{round_}-{time.time_ns()}"
            origin.route(path, body=BODY, delay=args.upstream_delay,
                         headers=[("content-type", "application/json")])  # fmt: skip
            targets = [
                (gateways[i % len(gateways)].port, request_bytes(f"/svc{path}"))
                for i in range(args.requests)
            ]
            answers, spread = burst(targets, timeout=args.upstream_delay + 20)
            print(f"round {round_ + 1}:")
            results.append(report(answers, spread, origin, path, "x-cache-status"))
            if len(gateways) > 1 and origin.sent[path]:
                sent = min(origin.sent[path])
                for index, gateway in enumerate(gateways):
                    mine = [
                        a.done - sent
                        for i, a in enumerate(answers)
                        if i % len(gateways) == index and a.cache == "HIT"
                    ]
                    if mine:
                        print(
                            f"    gateway {index + 1} (:{gateway.port}) waiters: "
                            f"median {ms(statistics.median(mine))}  max {ms(max(mine))}"
                        )
            time.sleep(0.2)
        return results
    finally:
        for gateway in gateways:
            gateway.stop()
        if redis is not None:
            redis.close()


def run_naive(args: argparse.Namespace, origin: Origin, tmp: Path) -> list[dict]:
    port = free_port()
    log = open(tmp / "naive.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "stampede:naive_app",
         "--app-dir", str(Path(__file__).parent), "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "STAMPEDE_UPSTREAM": origin.base},
    )  # fmt: skip
    try:
        from tests.chaos import get

        deadline = time.monotonic() + 15
        while True:
            try:
                if get(port, "/docs", timeout=1).status:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError((tmp / "naive.log").read_text())
            time.sleep(0.05)
        print(
            f"fastapi-cache2 @cache (InMemoryBackend): {args.requests} requests, "
            f"upstream delay {args.upstream_delay * 1000:.0f} ms"
        )
        results = []
        for round_ in range(args.rounds):
            path = f"/stampede/naive-{round_}-{time.time_ns()}"
            origin.route(path, body=BODY, delay=args.upstream_delay,
                         headers=[("content-type", "application/json")])  # fmt: skip
            targets = [(port, request_bytes(f"/svc{path}"))] * args.requests
            answers, spread = burst(targets, timeout=args.upstream_delay * args.requests + 20)
            print(f"round {round_ + 1}:")
            results.append(report(answers, spread, origin, path, "x-fastapi-cache"))
        return results
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--requests", type=int, default=100)
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--backend", choices=["redis", "memory"], default="redis")
    parser.add_argument("--upstream-delay", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=3, help="cold keys, one after the other")
    parser.add_argument("--naive", action="store_true", help="fastapi-cache2 @cache instead")
    args = parser.parse_args()
    if args.backend == "memory" and args.gateways > 1:
        parser.error("the memory backend is per process: use --gateways 1")
    with tempfile.TemporaryDirectory(prefix="stampede-") as tmp, Origin() as origin:
        if args.naive:
            results = run_naive(args, origin, Path(tmp))
        else:
            results = run_gateway(args, origin, Path(tmp))
    medians = [r["median"] for r in results if "median" in r]
    if medians:
        print(
            f"summary: upstream requests per round {[r['upstream'] for r in results]}; "
            f"waiters' added latency median per round "
            f"{[round(m * 1000, 1) for m in medians]} ms"
        )


if __name__ == "__main__":
    main()
