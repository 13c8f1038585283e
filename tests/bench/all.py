"""Every cache and baseline side by side in one run, with the issue 12 and issue 6
targets judged PASS or FAIL, and a markdown table ready for docs/performance.md.

One command, one run, this machine. Every server under test is one process pinned to
CPU 0; wrk (1 thread, keep-alive), the upstream origin and redis-server run on CPU 1, the
same for every target. All targets answer with the same ~1 KiB JSON (to ``GET``, and to
a ``POST`` of 1 KiB of JSON for the POST rows).

Headline rows measure what a user runs: ``cachegw serve gateway.toml`` started from a
TOML file with the CLI's defaults (access log on, written to a file; in-process L1 in
front of Redis):

  serve_memory        hit, ``backend = "memory"``
  serve_redis         hit, ``backend = "redis://..."``
  serve_pass          the memory gateway, a ``ttl = 0`` route: every request forwarded
                      (``--only serve_miss``, its former key, still selects it)
  serve_post          the memory gateway, ``POST`` of 1 KiB to the ``ttl = 0`` route:
                      forwarded (``BYPASS``), the upstream reads the whole body
  serve_stored_miss   a second memory gateway, every request a new key (``?u=<n>``,
                      wrk only) on a ``ttl = 3600`` route: each one forwarded and stored
                      (``MISS``, ``Cache-Status: ...; stored``); the memory backend's
                      bounds evict

Other configurations, labelled in the table:

  serve_memory_nolog  ``cachegw serve --no-access-log``, memory hit
  serve_redis_nol1    ``l1_entries = 0``: every hit reads Redis
  cached_memory       FastAPI + cachegw ``@cached`` hit, MemoryBackend, with
                      ``app.add_middleware(CachedHits)`` (the documented setup)
  cached_redis        the same on RedisBackend
  cached_memory_routed  ``@cached`` hit without ``CachedHits`` (hits pay FastAPI's routing)
  serve_post_cached   ``POST`` of 1 KiB to the ``ttl = 3600`` route (forwarded, and its
                      URI invalidated), on the same second gateway as serve_stored_miss

Baselines: ``raw_asgi`` (a raw ASGI callable returning the bytes: the ceiling for Python),
``bare`` / ``bare_bytes`` (a bare FastAPI route returning the dict / the bytes),
``fc2_memory`` / ``fc2_redis`` (fastapi-cache2 ``@cache`` hits), ``naive`` / ``naive_ka``
(FastAPI + one shared ``httpx.AsyncClient``, no cache; keep-alive 20 / 100), ``nginx``
(proxy_cache hit, 1 worker; skipped with a note when nginx is not installed),
``nginx_pass`` / ``nginx_post`` (the same nginx, ``proxy_pass`` without a cache: GET /
POST 1 KiB) and the Python floor of pass-through, ``floor_get`` / ``floor_post`` (a raw
ASGI callable + ONE shared aiohttp session forwarding the request, nothing else).

Before every measurement every cache must answer ``HIT`` (``X-Cache-Status``, or
``X-FastAPI-Cache`` for fastapi-cache2) twice without reaching the upstream, the ``ttl=0``
route ``MISS`` twice with two upstream requests (every forwarding row: one upstream
request per answer, the whole POST body read; stored misses then answer ``HIT``), and
every body must equal the reference JSON, or the run aborts. Rounds are interleaved (the
order rotates) and medians reported.

    .venv/bin/python tests/bench/all.py [--seconds 5] [--rounds 3] [--connections 50]
        [--only serve_memory,fc2_memory] [--json /tmp/bench.json] [--no-wrk]

Then ``.venv/bin/python tests/bench/plot.py /tmp/bench.json`` draws docs/img/performance.png.
Exit status: 0 when every judged ratio meets its target, 1 when one misses, 2 when the
setup is wrong (a server does not start, a cache does not hit, a miss is not forwarded).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import Any

from _harness import CLIENT_CPU, SetupError
from _suite import (
    Ratio,
    Server,
    Target,
    add_arguments,
    nginx_server,
    prologue,
    ratio_verdict,
    run_suite,
    serve_server,
    start_redis,
    uvicorn_server,
    value,
)
from apps import REDIS_ENV
from gateway_apps import BODY, KEEPALIVE_ENV, POST_BODY, UPSTREAM_ENV
from stall import StallResult, run_stall

RATIOS = [
    # Issue 12: the defaults are the fast configuration.
    Ratio("access log on / off (memory hit)", "serve_memory", "serve_memory_nolog", 0.9, "#12"),
    Ratio("access log on / raw ASGI (memory hit)", "serve_memory", "raw_asgi", 0.9, "#12"),
    Ratio("@cached memory hit / bare FastAPI bytes", "cached_memory", "bare_bytes", 1.5, "#12"),
    Ratio("@cached memory hit / fastapi-cache2 memory", "cached_memory", "fc2_memory", 4.0, "#12"),
    Ratio("@cached Redis hit / fastapi-cache2 Redis hit", "cached_redis", "fc2_redis", 4.0, "#12"),
    # Issue 6, measured on `cachegw serve` with its defaults.
    Ratio("serve memory hit / fastapi-cache2 memory hit", "serve_memory", "fc2_memory", 6.0, "#6"),
    Ratio("serve memory hit / raw ASGI", "serve_memory", "raw_asgi", 0.5, "#6"),
    Ratio("Redis hit, no L1 / fastapi-cache2 Redis", "serve_redis_nol1", "fc2_redis", 4.0, "#6"),
    Ratio("serve Redis hit (L1) / serve memory hit", "serve_redis", "serve_memory", 0.8, "#6"),
    Ratio("serve miss / naive httpx proxy", "serve_pass", "naive", 5.0, "#6"),
    # Issue 26: pass-through at the Python floor (raw ASGI + one aiohttp session).
    Ratio("serve pass-through GET / floor GET", "serve_pass", "floor_get", 0.8, "#26"),
    Ratio("serve POST 1 KiB / floor POST", "serve_post", "floor_post", 0.8, "#26"),
    Ratio("serve stored miss / floor GET", "serve_stored_miss", "floor_get", 0.6, "#26"),
    Ratio(
        "p99: serve pass-through GET / floor GET",
        "serve_pass",
        "floor_get",
        None,
        "#26",
        metric="p99_ms",
        maximum=2.0,
    ),
    # For information.
    Ratio("serve Redis hit (L1) / fastapi-cache2 Redis hit", "serve_redis", "fc2_redis", None),
    Ratio("serve memory hit / bare FastAPI bytes", "serve_memory", "bare_bytes", None),
    Ratio("serve memory hit / nginx proxy_cache hit", "serve_memory", "nginx", None),
    Ratio("@cached memory hit / raw ASGI", "cached_memory", "raw_asgi", None),
    Ratio("@cached, routed / bare FastAPI bytes", "cached_memory_routed", "bare_bytes", None),
    Ratio("serve miss / naive, keep-alive 100", "serve_pass", "naive_ka", None),
    Ratio("serve pass-through GET / nginx proxy_pass", "serve_pass", "nginx_pass", None),
    Ratio("serve POST / nginx proxy_pass POST", "serve_post", "nginx_post", None),
    Ratio("floor GET / nginx proxy_pass", "floor_get", "nginx_pass", None),
    Ratio("p99: serve POST / floor POST", "serve_post", "floor_post", None, metric="p99_ms"),
    Ratio("serve POST, ttl>0 route / floor POST", "serve_post_cached", "floor_post", None),
    Ratio(
        "p99: serve stored miss / floor GET",
        "serve_stored_miss",
        "floor_get",
        None,
        metric="p99_ms",
    ),
]
#: Former target keys --only still accepts.
ALIASES = {"serve_miss": "serve_pass"}
NOTES = [
    "naive proxy: one httpx.AsyncClient shared by all requests (default transport and "
    "limits, opened in the lifespan); 'keep-alive 100' raises max_keepalive_connections "
    "from 20 to 100 (reference)",
    "hits are all on one hot key; the three gateways share one redis-server, so the "
    "Redis gateways read the same entry",
    "pass-through rows (issue 26): serve_pass and serve_post run on the memory hit "
    "gateway, serve_stored_miss and serve_post_cached on a second memory gateway (its "
    "cache fills up; a POST invalidates the URI it is sent to); the "
    "floor is a raw ASGI callable + one aiohttp.ClientSession (default connector: "
    "keep-alive pool of 100) forwarding method, path, query, body and headers minus "
    "hop-by-hop; POST bodies are 1 KiB of JSON",
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
    serve_memory = serve_server("cachegw serve (memory)", upstream_url, "memory")
    try:
        redis_url = ""

        def redis() -> str:
            nonlocal redis_proc, redis_url
            if redis_proc is None:
                redis_proc = start_redis()
                redis_url = redis_proc.url
            return redis_url

        def gw(key: str, name: str, server: Server, path: str, expect: str) -> Target:
            return Target(key, name, server, path, expect, gateway=True)

        shared: dict[str, Server | None] = {}

        def floor() -> Server:
            if "floor" not in shared:
                shared["floor"] = uvicorn_server(
                    "Python floor (raw ASGI + aiohttp)", "gateway_apps:floor", env=naive_env
                )
            server = shared["floor"]
            assert server is not None
            return server

        def second() -> Server:
            """A memory gateway of its own for rows that fill or invalidate its cache."""
            if "second" not in shared:
                shared["second"] = serve_server(
                    "cachegw serve (memory, second)", upstream_url, "memory"
                )
            server = shared["second"]
            assert server is not None
            return server

        def nginx() -> Server | None:
            if "nginx" not in shared:
                shared["nginx"] = nginx_server("nginx", f"127.0.0.1:{upstream.port}")
                notes.append(
                    "nginx is not installed: the nginx rows are skipped (apt-get install "
                    "nginx to add them)"
                    if shared["nginx"] is None
                    else "nginx: 1 worker (master + worker, worker_cpu_affinity CPU 0), "
                    "proxy_cache_valid 200 60s (nginx_pass / nginx_post: no cache), upstream "
                    "keepalive 32; its CPU column is the worker's"
                )
            return shared["nginx"]

        def app(key: str, name: str, factory: str, expect: str | None = None, **kw: Any) -> Target:
            env = {REDIS_ENV: redis()} if "redis" in key else None
            server = uvicorn_server(name, factory, env=env)
            return Target(key, name, server, "/items", expect, **kw)

        builders: dict[str, Callable[[], Target | None]] = {
            # Headline rows: `cachegw serve gateway.toml`, defaults (access log on).
            "serve_memory": lambda: gw(
                "serve_memory", "cachegw serve: hit, memory", serve_memory, hit, "HIT"
            ),
            "serve_redis": lambda: gw(
                "serve_redis",
                "cachegw serve: hit, Redis",
                serve_server("cachegw serve (Redis)", upstream_url, redis()),
                hit,
                "HIT",
            ),
            "serve_pass": lambda: gw(
                "serve_pass", "cachegw serve: pass-through, ttl=0", serve_memory, miss, "MISS"
            ),
            "serve_post": lambda: Target(
                "serve_post",
                "cachegw serve: POST 1 KiB, ttl=0",
                serve_memory,
                miss,
                "BYPASS",
                gateway=True,
                forwarded=True,
                method="POST",
                body=POST_BODY,
            ),
            "serve_stored_miss": lambda: stored_miss_target(wrk, second, hit, notes),
            "serve_post_cached": lambda: Target(
                "serve_post_cached",
                "[POST to a ttl>0 route] serve",
                second(),
                hit,
                "BYPASS",
                gateway=True,
                forwarded=True,
                method="POST",
                body=POST_BODY,
                counter="cached",
            ),
            # Other configurations, labelled.
            "serve_memory_nolog": lambda: gw(
                "serve_memory_nolog",
                "[--no-access-log] hit, memory",
                serve_server(
                    "cachegw serve --no-access-log",
                    upstream_url,
                    "memory",
                    options=["--no-access-log"],
                ),
                hit,
                "HIT",
            ),
            "serve_redis_nol1": lambda: gw(
                "serve_redis_nol1",
                "[l1_entries = 0] hit, Redis",
                serve_server(
                    "cachegw serve (Redis, l1_entries = 0)",
                    upstream_url,
                    redis(),
                    cache_extra="l1_entries = 0\n",
                ),
                hit,
                "HIT",
            ),
            "cached_memory": lambda: app(
                "cached_memory", "@cached hit, memory", "apps:cachegw_memory", "HIT"
            ),
            "cached_redis": lambda: app(
                "cached_redis", "@cached hit, Redis", "apps:cachegw_redis", "HIT"
            ),
            "cached_memory_routed": lambda: app(
                "cached_memory_routed",
                "[no CachedHits] @cached hit, memory",
                "apps:cachegw_memory_routed",
                "HIT",
            ),
            # Baselines.
            "raw_asgi": lambda: app("raw_asgi", "raw ASGI", "gateway_apps:raw_asgi"),
            "bare": lambda: app("bare", "bare FastAPI (dict)", "apps:bare"),
            "bare_bytes": lambda: app("bare_bytes", "bare FastAPI, bytes", "apps:bare_bytes"),
            "fc2_memory": lambda: app(
                "fc2_memory",
                "fastapi-cache2 hit, memory",
                "apps:fastapi_cache2",
                "HIT",
                header="x-fastapi-cache",
            ),
            "fc2_redis": lambda: app(
                "fc2_redis",
                "fastapi-cache2 hit, Redis",
                "apps:fastapi_cache2_redis",
                "HIT",
                header="x-fastapi-cache",
            ),
            "naive": lambda: Target(
                "naive",
                "naive httpx proxy",
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
            "floor_get": lambda: Target(
                "floor_get",
                "Python floor: ASGI + aiohttp, GET",
                floor(),
                "/uncached/items",
                forwarded=True,
            ),
            "floor_post": lambda: Target(
                "floor_post",
                "Python floor: POST 1 KiB",
                floor(),
                "/uncached/items",
                forwarded=True,
                method="POST",
                body=POST_BODY,
            ),
            "nginx": lambda: nginx_target(nginx(), "nginx"),
            "nginx_pass": lambda: nginx_target(nginx(), "nginx_pass"),
            "nginx_post": lambda: nginx_target(nginx(), "nginx_post"),
        }
        if args.only:
            keys = [k.strip() for k in args.only.split(",") if k.strip()]
            unknown = [k for k in keys if k not in builders and k not in ALIASES and k != "stall"]
            if unknown:
                parser.error(f"unknown target(s) {unknown}; known: {', '.join(builders)}")
            keys = list(dict.fromkeys(ALIASES.get(k, k) for k in keys))
        else:
            keys = [*builders, "stall"]
        if "stall" in keys:
            keys = [k for k in keys if k != "stall"] + ["stall"]
        wrk, machine = prologue(args)
        with_stall = "stall" in keys
        targets = [t for t in (builders[k]() for k in keys if k != "stall") if t is not None]
        if not targets and not with_stall:
            print("no target to run", file=sys.stderr)
            return 2
        servers = [upstream]
        for target in targets:
            if all(target.server is not s for s in servers):
                servers.append(target.server)
        code = 0
        if targets:
            code = run_suite(
                "tests/bench/all.py", args, servers, targets, upstream, BODY, RATIOS, wrk,
                machine, notes,
            )  # fmt: skip
            if code == 2:
                return code
        stall = None
        if with_stall:
            print("\nstalled Redis (CLIENT PAUSE), cachegw serve defaults:")
            stall = run_stall(max(args.seconds, 5.0))
            for line in stall.lines():
                print(f"  {line}")
            if args.json is not None:
                doc = json.loads(args.json.read_text()) if args.json.exists() else {}
                doc["stall"] = stall.as_dict()
                args.json.write_text(json.dumps(doc, indent=2) + "\n")
        failed = report(targets, stall, wrk, machine)
        return 1 if code == 1 or failed else 0
    except (SetupError, RuntimeError) as exc:
        print(f"\nABORTED: {exc}", file=sys.stderr)
        return 2
    finally:
        if redis_proc is not None:
            redis_proc.close()


# The issue 12 targets: (label, numerator, denominator, minimum) on req/s (CPU without wrk).
ISSUE_12 = [
    ("1. access log on / off, memory hit", "serve_memory", "serve_memory_nolog", 0.9),
    ("1. access log on / raw ASGI, memory hit", "serve_memory", "raw_asgi", 0.9),
    ("5. @cached memory hit / bare FastAPI bytes", "cached_memory", "bare_bytes", 1.5),
    ("5. @cached memory hit / fastapi-cache2 memory hit", "cached_memory", "fc2_memory", 4.0),
    ("5. @cached Redis hit / fastapi-cache2 Redis hit", "cached_redis", "fc2_redis", 4.0),
]


def _ratio(by_key: dict[str, Target], num: str, den: str, wrk: str | None) -> float:
    if num not in by_key or den not in by_key:
        return math.nan
    if wrk:
        return value(by_key[num], "rps") / value(by_key[den], "rps")
    return value(by_key[den], "cpu_us_per_req") / value(by_key[num], "cpu_us_per_req")


def report(targets: list[Target], stall: StallResult | None, wrk: str | None, machine: str) -> bool:
    """Print the issue 12 and issue 26 targets with PASS/FAIL and a markdown table for
    docs/performance.md; whether a target was missed."""
    by_key = {t.key: t for t in targets}
    basis = "req/s" if wrk else "server CPU per request"
    print(f"\nissue 12 targets (same run, by {basis}):")
    failed = False
    rows = []
    for label, num, den, minimum in ISSUE_12:
        got = _ratio(by_key, num, den, wrk)
        verdict = "not run" if math.isnan(got) else "PASS" if got >= minimum else "FAIL"
        failed |= verdict == "FAIL"
        print(f"  {label:52s} {got:6.2f}x  >= {minimum:g}x  {verdict}")
        rows.append((label, f"{got:.2f}x", f">= {minimum:g}x", verdict))
    issue_26 = [r for r in RATIOS if r.issue == "#26"]
    print(f"\nissue 26 targets (same run, by {basis}; p99 ratios: lower is better):")
    for ratio in issue_26:
        label = ratio.name
        if ratio.num not in by_key or ratio.den not in by_key:
            bound = f">= {ratio.minimum:g}x" if ratio.minimum else f"<= {ratio.maximum:g}x"
            got, goal, ok, verdict = math.nan, bound, None, "not run"
        else:
            got, goal, ok = ratio_verdict(ratio, by_key, wrk)
            verdict = "info (needs wrk)" if ok is None else "PASS" if ok else "FAIL"
        failed |= ok is False
        print(f"  {label:52s} {got:6.2f}x  {goal:>7s}  {verdict}")
        rows.append((f"26. {label}", f"{got:.2f}x", goal, verdict))
    if stall is not None:
        verdict = "PASS" if stall.ok else "FAIL"
        failed |= not stall.ok
        label = "4. stalled Redis: cold p99 - upstream p99, 0 x 5xx"
        got = stall.cold_p99_ms - stall.upstream_p99_ms
        print(f"  {label:52s} {got:6.0f} ms <= 150 ms, {stall.errors} x 5xx  {verdict}")
        rows.append((label, f"{got:.0f} ms, {stall.errors} x 5xx", "<= 150 ms, 0", verdict))
    print("\nmarkdown (docs/performance.md):\n")
    print(f"Machine: {machine}; load: {'wrk' if wrk else 'Python client'}.\n")
    print("| what runs | req/s | p99 ms | server CPU µs/req |")
    print("|---|---:|---:|---:|")
    for t in targets:
        print(
            f"| {t.name} | {value(t, 'rps'):,.0f} | {value(t, 'p99_ms'):.1f} | "
            f"{value(t, 'cpu_us_per_req'):.1f} |"
        )
    print("\n| target | measured | goal | verdict |")
    print("|---|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if stall is not None:
        print(
            f"\nStalled Redis: upstream alone p99 {stall.upstream_p99_ms:.1f} ms; cold requests "
            f"during the pause p50 {_pct(stall.cold_ms, 0.5):.1f} ms, p99 "
            f"{stall.cold_p99_ms:.1f} ms; warm (L1) hits p99 {_pct(stall.warm_ms, 0.99):.1f} ms; "
            f"statuses {dict(sorted(stall.statuses.items()))}."
        )
    return failed


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def nginx_target(server: Server | None, key: str) -> Target | None:
    """The nginx rows, on one nginx (None when it is not installed)."""
    if server is None:
        return None
    if key == "nginx":
        return Target(key, "nginx proxy_cache hit (1 worker)", server, "/cached/items", "HIT")
    post = {"method": "POST", "body": POST_BODY} if key == "nginx_post" else {}
    name = "nginx proxy_pass: POST 1 KiB" if post else "nginx proxy_pass, no cache"
    return Target(key, name, server, "/pass/uncached/items", forwarded=True, **post)


def stored_miss_target(
    wrk: str | None, server: Callable[[], Server], path: str, notes: list[str]
) -> Target | None:
    """Misses that are stored, on the second memory gateway; None without wrk."""
    if not wrk:
        notes.append(
            "serve_stored_miss is skipped: a different key per request needs wrk's Lua "
            "scripts (apt-get install wrk), which the Python client does not replace"
        )
        return None
    return Target(
        "serve_stored_miss", "cachegw serve: miss, stored", server(), path, "MISS",
        gateway=True, unique=True, stored=True, counter="cached",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
