"""Purging a service takes the same time with 1,000 or 100,000 entries in it.

Fills a backend with N entries of one service through the engine's own store, purges the
service, checks that an entry now misses and another service's entry still hits, and
prints the purge time. Memory backend and a real redis-server (started here).

    .venv/bin/python tests/bench/purge.py [--sizes 1000 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cachegw import CachePolicy, MemoryBackend, RedisBackend
from cachegw._engine import CacheEngine
from cachegw._job import Job
from cachegw._models import Fetched, RequestInfo
from cachegw._policy import CacheControl
from cachegw._purge import purges_for, scopes_for
from tests.redis_process import RedisProcess

POLICY = CachePolicy(ttl=600)


def request(service: str, n: int) -> RequestInfo:
    path = f"/items/{n}"
    return RequestInfo(
        method="GET",
        key=f"bench:{service}:{n}",
        headers={},
        scopes=scopes_for(service, path, [f"item:{n}"]),
        service=service,
    )


async def fill(engine: CacheEngine, service: str, count: int) -> None:
    fetched = Fetched(200, [(b"content-type", b"application/json")], b'{"x": 1}' * 16)

    async def fetch(validators: object = ()) -> Fetched:
        return fetched

    batch = []
    for n in range(count):
        info = request(service, n)
        info.started = time.time()
        batch.append(engine.writer.store_entry(Job(info, POLICY, fetch, engine_cc), fetched))
        if len(batch) == 50:
            await asyncio.gather(*batch)
            batch = []
    await asyncio.gather(*batch)


async def status(engine: CacheEngine, service: str, n: int) -> str:
    async def fetch() -> Fetched:
        return Fetched(200, [], b"fresh")

    return (await engine.serve(request(service, n), POLICY, fetch)).cache_status


async def measure(backend_name: str, count: int, url: str | None) -> float:
    backend = (
        RedisBackend.from_url(url, op_timeout=2.0)
        if url
        else MemoryBackend(max_entries=count + 10, max_bytes="1GiB")
    )
    engine = CacheEngine(backend, op_timeout=2.0, purges=purges_for(backend, f"bench{count}"))
    await fill(engine, "catalog", count)
    await fill(engine, "other", 1)
    assert await status(engine, "catalog", count // 2) == "HIT"
    times = []
    for _ in range(5):
        started = time.perf_counter()
        await engine.purge(["svc:catalog"])
        times.append(time.perf_counter() - started)
    assert await status(engine, "catalog", count // 2) == "MISS"
    assert await status(engine, "other", 0) == "HIT"
    if isinstance(backend, RedisBackend):
        await backend.client.flushall()
        await backend.aclose()
    return statistics.median(times)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    args = parser.parse_args()
    print(f"{'backend':8} {'entries':>9} {'purge (median of 5)':>20}")
    with RedisProcess() as redis:
        for name, url in (("memory", None), ("redis", redis.url)):
            for count in args.sizes:
                seconds = await measure(name, count, url)
                print(f"{name:8} {count:>9,} {seconds * 1e3:>17.3f} ms")


engine_cc = CacheControl({})

if __name__ == "__main__":
    asyncio.run(main())
