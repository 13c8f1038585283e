"""Every cache and baseline side by side in one run: the issue 6 ratios, PASS or FAIL.

One command, one run, this machine. Every server under test is one process pinned to
CPU 0; wrk (1 thread, keep-alive), the upstream origin and redis-server run on CPU 1, the
same for every target. All targets answer ``GET`` with the same ~1 KiB JSON:

  gw_hit_memory      cachegw gateway hit, memory backend (run with
                     ``cachegw._server.uvicorn_options()``, like ``cachegw serve``)
  gw_hit_redis_l1    gateway hit, Redis backend, in-process L1 on (the default: 4096
                     entries, 1 s copies)
  gw_hit_redis       gateway hit, Redis backend, ``l1_entries=0``: every hit reads Redis
  gw_miss            the memory gateway, a ``ttl=0`` route: every request is forwarded
  naive              FastAPI + ONE shared ``httpx.AsyncClient`` proxy, no cache (the miss
                     path's baseline)
  naive_ka           the same with ``max_keepalive_connections=100`` (reference)
  bare               bare FastAPI route returning the dict
  bare_bytes         bare FastAPI route returning the bytes (reference)
  raw_asgi           raw ASGI callable returning the same bytes (the ceiling for Python)
  fc2_memory         FastAPI + fastapi-cache2 ``@cache`` hit, InMemoryBackend
  fc2_redis          FastAPI + fastapi-cache2 ``@cache`` hit, RedisBackend (redis.asyncio)
  cached_memory      FastAPI + cachegw ``@cached`` hit, MemoryBackend
  nginx              nginx proxy_cache hit (1 worker, ``proxy_cache_valid 200 60s``, cache
                     in a temporary directory) in front of the same upstream; skipped with
                     a note when nginx is not installed

Before every measurement every cache must answer ``HIT`` (``X-Cache-Status``, or
``X-FastAPI-Cache`` for fastapi-cache2) twice without reaching the upstream, the ``ttl=0``
route ``MISS`` twice with two upstream requests, and every body must equal the reference
JSON, or the run aborts. During the window the gateway's counters and the upstream's hit
counter are read before and after ("check" column). Rounds are interleaved (the order
rotates) and medians are reported. Default: 3 rounds x 13 targets x (1 + 5) s, ~4.5 min.

    .venv/bin/python tests/bench/all.py [--seconds 5] [--rounds 3] [--connections 50]
        [--only gw_hit_memory,fc2_memory] [--json /tmp/bench.json] [--no-wrk]

Then ``.venv/bin/python tests/bench/plot.py /tmp/bench.json`` draws docs/img/performance.png.
Exit status: 0 when every issue 6 ratio meets its target, 1 when one misses, 2 when the
setup is wrong (a server does not start, a cache does not hit, a miss is not forwarded).
"""

from __future__ import annotations

import argparse
import sys

from _harness import CLIENT_CPU, SetupError
from _suite import (
    Ratio,
    Server,
    Target,
    add_arguments,
    gateway_server,
    nginx_server,
    prologue,
    run_suite,
    start_redis,
    uvicorn_server,
)
from apps import REDIS_ENV
from gateway_apps import BODY, KEEPALIVE_ENV, UPSTREAM_ENV

ISSUE = "issue 6"
RATIOS = [
    Ratio("hit memory / fastapi-cache2 in-memory hit", "gw_hit_memory", "fc2_memory", 6.0, ISSUE),
    Ratio("hit memory / raw ASGI", "gw_hit_memory", "raw_asgi", 0.5, ISSUE),
    Ratio("Redis hit (no L1) / fastapi-cache2 Redis hit", "gw_hit_redis", "fc2_redis", 4.0, ISSUE),
    Ratio("Redis hit + L1 / hit memory", "gw_hit_redis_l1", "gw_hit_memory", 0.8, ISSUE),
    Ratio("miss / naive httpx proxy", "gw_miss", "naive", 5.0, ISSUE),
    # For information.
    Ratio("Redis hit + L1 / fastapi-cache2 Redis hit", "gw_hit_redis_l1", "fc2_redis", None),
    Ratio("Redis hit (no L1) / hit memory", "gw_hit_redis", "gw_hit_memory", None),
    Ratio("hit memory / bare FastAPI (dict)", "gw_hit_memory", "bare", None),
    Ratio("hit memory / bare FastAPI bytes", "gw_hit_memory", "bare_bytes", None),
    Ratio("hit memory / nginx proxy_cache hit", "gw_hit_memory", "nginx", None),
    Ratio("@cached hit / fastapi-cache2 in-memory hit", "cached_memory", "fc2_memory", None),
    Ratio("miss / naive, keep-alive 100", "gw_miss", "naive_ka", None),
]
NOTES = [
    "naive proxy: one httpx.AsyncClient shared by all requests (default transport and "
    "limits, opened in the lifespan); 'keep-alive 100' raises max_keepalive_connections "
    "from 20 to 100 (reference)",
    "hits are all on one hot key; the three gateways share one redis-server, so the "
    "Redis gateways read the same entry",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument(
        "--only",
        metavar="KEYS",
        help="comma-separated target keys to run (see the list above), e.g. "
        "gw_hit_memory,fc2_memory",
    )
    args = parser.parse_args()

    upstream = uvicorn_server("upstream", "gateway_apps:upstream", CLIENT_CPU)
    upstream_url = f"http://127.0.0.1:{upstream.port}"
    naive_env = {UPSTREAM_ENV: upstream_url}
    hit, miss = "/svc/cached/items", "/svc/uncached/items"
    notes = list(NOTES)
    redis_proc = None
    # (target, server), in the order of the table. Servers are built lazily: Redis and
    # nginx only start when a target needs them.
    gw_memory = gateway_server("gateway (memory)", upstream_url, "memory")
    try:
        redis_url = ""

        def redis() -> str:
            nonlocal redis_proc, redis_url
            if redis_proc is None:
                redis_proc = start_redis()
                redis_url = redis_proc.url
            return redis_url

        def gw_redis(name: str, l1: int | None) -> Server:
            return gateway_server(name, upstream_url, redis(), l1_entries=l1)

        def gw(key: str, name: str, server: Server, path: str, expect: str) -> Target:
            return Target(key, name, server, path, expect, gateway=True)

        builders = {
            "gw_hit_memory": lambda: gw(
                "gw_hit_memory", "gateway hit, memory", gw_memory, hit, "HIT"
            ),
            "gw_hit_redis_l1": lambda: gw(
                "gw_hit_redis_l1",
                "gateway hit, Redis + L1 (default)",
                gw_redis("gateway (Redis, L1)", None),
                hit,
                "HIT",
            ),
            "gw_hit_redis": lambda: gw(
                "gw_hit_redis",
                "gateway hit, Redis, no L1",
                gw_redis("gateway (Redis, l1_entries=0)", 0),
                hit,
                "HIT",
            ),
            "gw_miss": lambda: gw("gw_miss", "gateway miss (ttl=0)", gw_memory, miss, "MISS"),
            "naive": lambda: Target(
                "naive",
                "naive httpx proxy (shared client)",
                uvicorn_server("naive proxy", "gateway_apps:naive_proxy", env=naive_env),
                "/uncached/items",
            ),
            "naive_ka": lambda: Target(
                "naive_ka",
                "naive proxy, keep-alive 100",
                uvicorn_server(
                    "naive proxy, keep-alive 100",
                    "gateway_apps:naive_proxy",
                    env={**naive_env, KEEPALIVE_ENV: "100"},
                ),
                "/uncached/items",
            ),
            "bare": lambda: Target(
                "bare",
                "bare FastAPI (dict)",
                uvicorn_server("bare FastAPI", "apps:bare"),
                "/items",
            ),
            "bare_bytes": lambda: Target(
                "bare_bytes",
                "bare FastAPI, bytes Response",
                uvicorn_server("bare FastAPI, bytes", "apps:bare_bytes"),
                "/items",
            ),
            "raw_asgi": lambda: Target(
                "raw_asgi",
                "raw ASGI",
                uvicorn_server("raw ASGI", "gateway_apps:raw_asgi"),
                "/items",
            ),
            "fc2_memory": lambda: Target(
                "fc2_memory",
                "fastapi-cache2 @cache hit, InMemory",
                uvicorn_server("fastapi-cache2 (memory)", "apps:fastapi_cache2"),
                "/items",
                "HIT",
                header="x-fastapi-cache",
            ),
            "fc2_redis": lambda: Target(
                "fc2_redis",
                "fastapi-cache2 @cache hit, Redis",
                uvicorn_server(
                    "fastapi-cache2 (Redis)",
                    "apps:fastapi_cache2_redis",
                    env={REDIS_ENV: redis()},
                ),
                "/items",
                "HIT",
                header="x-fastapi-cache",
            ),
            "cached_memory": lambda: Target(
                "cached_memory",
                "cachegw @cached hit, memory",
                uvicorn_server("cachegw @cached", "apps:cachegw_memory"),
                "/items",
                "HIT",
            ),
            "nginx": lambda: nginx_target(upstream, notes),
        }
        if args.only:
            keys = [k.strip() for k in args.only.split(",") if k.strip()]
            unknown = [k for k in keys if k not in builders]
            if unknown:
                parser.error(f"unknown target(s) {unknown}; known: {', '.join(builders)}")
        else:
            keys = list(builders)
        wrk, machine = prologue(args)
        targets = [t for t in (builders[k]() for k in keys) if t is not None]
        if not targets:
            print("no target to run", file=sys.stderr)
            return 2
        servers = [upstream]
        for target in targets:
            if all(target.server is not s for s in servers):
                servers.append(target.server)
        return run_suite(
            "tests/bench/all.py", args, servers, targets, upstream, BODY, RATIOS, wrk,
            machine, notes,
        )  # fmt: skip
    except (SetupError, RuntimeError) as exc:
        print(f"\nABORTED: {exc}", file=sys.stderr)
        return 2
    finally:
        if redis_proc is not None:
            redis_proc.close()


def nginx_target(upstream: Server, notes: list[str]) -> Target | None:
    server = nginx_server("nginx proxy_cache", f"127.0.0.1:{upstream.port}")
    if server is None:
        notes.append(
            "nginx is not installed: the nginx proxy_cache row is skipped "
            "(apt-get install nginx to add it)"
        )
        return None
    notes.append(
        "nginx: 1 worker (master + worker, worker_cpu_affinity CPU 0), proxy_cache_valid "
        "200 60s, upstream keepalive 32; its CPU column is the worker's"
    )
    return Target("nginx", "nginx proxy_cache hit (1 worker)", server, "/cached/items", "HIT")


if __name__ == "__main__":
    sys.exit(main())
