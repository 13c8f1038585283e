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
median is reported. The machinery is shared with ``all.py`` (``_suite.py``), which runs
these targets and more (Redis without L1, fastapi-cache2, nginx) side by side.

    .venv/bin/python tests/bench/gateway.py [--seconds 5] [--rounds 3] [--connections 50]
                                            [--no-redis] [--json out.json]

Exit status: 0 when every ratio meets its target, 1 when one misses, 2 when the setup
is wrong (a server does not start, a cache does not hit, a miss is not forwarded).
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
    prologue,
    run_suite,
    start_redis,
    uvicorn_server,
)
from gateway_apps import BODY, KEEPALIVE_ENV, UPSTREAM_ENV

RATIOS = [
    Ratio("gateway miss / naive httpx proxy", "gw_miss", "naive", 3.0, "issue 3"),
    Ratio("gateway miss / naive httpx proxy", "gw_miss", "naive", 5.0, "issue 6"),
    Ratio("gateway hit (memory) / bare FastAPI", "gw_hit_memory", "bare", 1.0, "issue 3"),
    Ratio("gateway hit (memory) / raw ASGI", "gw_hit_memory", "raw_asgi", 0.5, "issue 6"),
    Ratio("gateway hit (memory) / bare FastAPI bytes", "gw_hit_memory", "bare_bytes", None),
    Ratio("gateway hit (Redis) / gateway hit (memory)", "gw_hit_redis", "gw_hit_memory", None),
    Ratio("gateway miss / naive, keep-alive 100", "gw_miss", "naive_ka", None),
    Ratio("naive httpx proxy / bare FastAPI", "naive", "bare", None),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis backend target")
    args = parser.parse_args()
    wrk, machine = prologue(args)

    upstream = uvicorn_server("upstream", "gateway_apps:upstream", CLIENT_CPU)
    upstream_url = f"http://127.0.0.1:{upstream.port}"
    gw_memory = gateway_server("gateway (memory)", upstream_url, "memory")
    naive_env = {UPSTREAM_ENV: upstream_url}
    naive = uvicorn_server("naive proxy", "gateway_apps:naive_proxy", env=naive_env)
    naive_ka = uvicorn_server(
        "naive proxy, keep-alive 100",
        "gateway_apps:naive_proxy",
        env={**naive_env, KEEPALIVE_ENV: "100"},
    )
    bare = uvicorn_server("bare FastAPI", "apps:bare")
    bare_bytes = uvicorn_server("bare FastAPI, bytes", "apps:bare_bytes")
    raw = uvicorn_server("raw ASGI", "gateway_apps:raw_asgi")
    servers = [upstream, gw_memory, naive, naive_ka, bare, bare_bytes, raw]
    hit, miss = "/svc/cached/items", "/svc/uncached/items"
    targets = [
        Target("gw_hit_memory", "gateway hit, memory", gw_memory, hit, "HIT", gateway=True),
        Target("gw_miss", "gateway miss (ttl=0)", gw_memory, miss, "MISS", gateway=True),
        Target("naive", "naive httpx proxy (shared)", naive, "/uncached/items"),
        Target("naive_ka", "naive proxy, keep-alive 100", naive_ka, "/uncached/items"),
        Target("bare", "bare FastAPI (dict)", bare, "/items"),
        Target("bare_bytes", "bare FastAPI, bytes Response", bare_bytes, "/items"),
        Target("raw_asgi", "raw ASGI", raw, "/items"),
    ]
    redis_proc = None
    try:
        if not args.no_redis:
            redis_proc = start_redis()
            gw_redis: Server = gateway_server("gateway (Redis)", upstream_url, redis_proc.url)
            servers.append(gw_redis)
            targets.insert(
                1, Target("gw_hit_redis", "gateway hit, Redis", gw_redis, hit, "HIT", gateway=True)
            )
        notes = [
            "naive proxy: one httpx.AsyncClient shared by all requests (default transport "
            "and limits, opened in the lifespan); 'keep-alive 100' also raises "
            "max_keepalive_connections from 20 to 100 (reference)"
        ]
        return run_suite(
            "tests/bench/gateway.py", args, servers, targets, upstream, BODY, RATIOS, wrk,
            machine, notes,
        )  # fmt: skip
    except (SetupError, RuntimeError) as exc:
        print(f"\nABORTED: {exc}", file=sys.stderr)
        return 2
    finally:
        if redis_proc is not None:
            redis_proc.close()


if __name__ == "__main__":
    sys.exit(main())
