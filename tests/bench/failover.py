"""Writes are never undone through Redis failures (issue 23): the mixed read/write
consistency workload (tests/consistency_check.py: Zipf GETs with Vary, 20 % PUT/DELETE)
through two `cachegw serve` processes while Redis fails, judged read by read.

Scenarios (each on real servers started here, on loopback ports):

* ``restart``: one redis-server with AOF, stopped for 2 s and started again with its data;
* ``sentinel-kill``: master + replica + three sentinels, the master killed (SIGKILL);
* ``sentinel-graceful``: the same, ``SENTINEL FAILOVER``;
* ``cluster-shard``: a 3-master cluster (``cluster-require-full-coverage no``), one master
  that holds neither the purge record nor the landing channel killed for good;
* ``cluster-failover``: 3 masters with a replica each (``cluster-require-full-coverage
  no``), such a master killed; the event lasts until its replica serves its slots. This
  one reads ``/items/{n}`` (no Vary: an item is one key), so that each read is known to
  belong to the dead shard or to a live one.

For each: reads older than an acknowledged write beyond the 200 ms window (violations),
non-2xx answers, hit ratio before / during-and-after the event, and the slowest request
once the event has been over for 1 s. ``cluster-failover`` adds a second table: the hit
ratio of reads of the live shards' keys, healthy (before) and during the outage, and the
slowest request that started after the recovery.

    .venv/bin/python tests/bench/failover.py [--seconds 15] [--workers 8]
        [--scenarios restart sentinel-kill sentinel-graceful cluster-shard cluster-failover]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.consistency import upstream_process  # noqa: E402
from tests.cluster_process import RedisCluster3  # noqa: E402
from tests.consistency_check import LANGS, Op, Workload, judge  # noqa: E402
from tests.gateway_process import GatewayProcess  # noqa: E402
from tests.redis_process import RedisProcess, free_port  # noqa: E402
from tests.sentinel_process import SentinelSetup  # noqa: E402
from tests.test_consistency import WINDOW, config  # noqa: E402


async def workload_ops(
    bases: list[str], workload: Workload, resource: str = "vitems"
) -> tuple[list[Op], list[float]]:
    """The consistency workload; every completed op, and the start times of failures."""
    weights = list(
        itertools.accumulate(1 / (k**workload.zipf) for k in range(1, workload.items + 1))
    )
    ops: list[Op] = []
    failures: list[float] = []
    deadline = time.monotonic() + workload.seconds
    rng = random.Random(workload.seed)

    async def worker(session: aiohttp.ClientSession, seed: int) -> None:
        r = random.Random(seed)
        while time.monotonic() < deadline:
            item = bisect.bisect_left(weights, r.random() * weights[-1]) + 1
            roll = r.random()
            write = roll < workload.write_share
            method = ("PUT" if roll < workload.write_share * 0.75 else "DELETE") if write else "GET"
            start = time.monotonic()
            try:
                async with session.request(
                    method,
                    f"{r.choice(bases)}/{resource}/{item}",
                    headers={"accept-language": r.choice(LANGS)},
                ) as response:
                    await response.read()
                    status, version = response.status, int(response.headers.get("x-version", -1))
                    cache = response.headers.get("x-cache-status", "")
            except (aiohttp.ClientError, TimeoutError, ValueError):
                failures.append(start)
                continue
            if status not in (200, 404) or version < 0:
                failures.append(start)
                continue
            ops.append(Op(write, item, start, time.monotonic(), version, cache))

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        seeds = [rng.randrange(1 << 30) for _ in range(workload.workers)]
        await asyncio.gather(*(worker(session, seed) for seed in seeds))
    return ops, failures


def run(
    name: str,
    backend: str,
    event: Callable[[], None],
    workload: Workload,
    *,
    resource: str = "vitems",
    live: Callable[[int], bool] | None = None,
    extra: list[str] | None = None,
) -> str:
    """One scenario's row. ``live(item)``: whether the item's key is on a shard that
    stays up (then a row of the live-shard table is appended to ``extra``)."""
    port = free_port()
    origin = upstream_process(port, 0.02)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            path = config(Path(tmp), f"http://127.0.0.1:{port}", backend, "fo")
            procs = [GatewayProcess(path, args=["--no-access-log"]) for _ in range(2)]
            try:
                for proc in procs:
                    proc.start()
                times: dict[str, float] = {}

                def disrupt() -> None:
                    time.sleep(workload.seconds / 3)
                    times["start"] = time.monotonic()
                    event()
                    times["end"] = time.monotonic()

                thread = threading.Thread(target=disrupt)
                thread.start()
                ops, failures = asyncio.run(
                    workload_ops([p.base + "/api" for p in procs], workload, resource)
                )
                thread.join()
            finally:
                for proc in procs:
                    proc.stop()
    finally:
        origin.terminate()
        origin.wait(10)
    result = judge(ops, WINDOW)
    start, end = times["start"], times["end"]

    def ratio(selected: list[Op]) -> str:
        reads = [op for op in selected if not op.write]
        hits = sum(op.cache == "HIT" for op in reads)
        return f"{100 * hits / len(reads):.0f} %" if reads else "-"

    before = [op for op in ops if op.start < start]
    after = [op for op in ops if op.start >= start]
    settled = [op.end - op.start for op in ops if op.start >= end + 1.0]
    if live is not None and extra is not None:
        alive = [op for op in ops if live(op.item)]
        outage = [op for op in alive if start <= op.start < end]
        recovered = [op.end - op.start for op in ops if op.start >= end]
        extra.append(
            f"| {name} | {ratio([op for op in alive if op.start < start])} | {ratio(outage)} "
            f"({sum(not op.write for op in outage)} reads) | "
            f"{max(recovered) * 1000 if recovered else 0:.0f} ms |"
        )
    return (
        f"| {name} | {end - start:.1f} s | {len(ops)} | {len(result.violations)} | "
        f"{len(failures)} | {ratio(before)} | {ratio(after)} | "
        f"{max(settled) * 1000 if settled else 0:.0f} ms |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["restart", "sentinel-kill", "sentinel-graceful", "cluster-shard"],
    )
    args = parser.parse_args()
    workload = Workload(items=args.items, workers=args.workers, seconds=args.seconds)
    rows: list[str] = []
    extra: list[str] = []
    for scenario in args.scenarios:
        if scenario == "restart":
            with RedisProcess("--appendonly", "yes", "--appendfsync", "everysec") as redis:

                def restart(redis: RedisProcess = redis) -> None:
                    redis.stop()
                    time.sleep(2)
                    redis.start()

                rows.append(run(scenario, redis.url, restart, workload))
        elif scenario.startswith("sentinel"):
            with SentinelSetup() as setup:

                def failover(setup: SentinelSetup = setup, kind: str = scenario) -> None:
                    if kind == "sentinel-graceful":
                        setup.failover()
                        return
                    old = setup.master_port()
                    victim = next(s for s in setup.servers() if s.port == old)
                    assert victim._proc is not None
                    victim._proc.send_signal(signal.SIGKILL)
                    setup.wait_for_new_master(old, timeout=30)

                rows.append(run(scenario, setup.url, failover, workload))
        elif scenario == "cluster-shard":
            with RedisCluster3("--cluster-require-full-coverage", "no") as cluster:
                share = -(-16384 // 3)
                with cluster.client(cluster.nodes[0]) as node:
                    busy = {
                        int(node.cluster("KEYSLOT", key)) // share
                        for key in ("{fo:purge}:times", "fo:landed")
                    }
                victim = cluster.nodes[next(i for i in range(3) if i not in busy)]
                rows.append(
                    run(scenario, cluster.url, lambda v=victim: cluster.kill(v), workload)  # type: ignore[misc]
                )
        elif scenario == "cluster-failover":
            rows.append(cluster_failover(workload, extra))
        else:
            parser.error(f"unknown scenario {scenario!r}")
    print(
        "| scenario | event took | operations | reads older than an acknowledged write "
        "(beyond 200 ms) | non-2xx / errors | hits before | hits during and after | "
        "slowest request 1 s after the event |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(row)
    if extra:
        print()
        print(
            "| scenario | hits on the live shards' keys, healthy | during the outage | "
            "slowest request after the recovery |"
        )
        print("|---|---:|---:|---:|")
        for row in extra:
            print(row)


def cluster_failover(workload: Workload, extra: list[str]) -> str:
    """3 masters + 3 replicas; one master (holding neither the purge record nor the
    landing channel) killed until its replica takes over."""
    from cachegw._keys import hash_parts

    with RedisCluster3("--cluster-require-full-coverage", "no", replicas=1) as cluster:
        share = -(-16384 // 3)
        with cluster.client(cluster.nodes[0]) as node:

            def shard(key: str) -> int:
                return int(node.cluster("KEYSLOT", key)) // share

            busy = {shard(key) for key in ("{fo:purge}:times", "fo:landed")}
            victim = next(i for i in range(3) if i not in busy)
            # The gateway's key of GET /api/items/{n} (service, path, query, key extra,
            # scheme, host: see cachegw._app): which shard each item lives on.
            dead = {
                item
                for item in range(1, workload.items + 1)
                if shard(hash_parts("fo", ("api", f"/items/{item}", "", "", "http", ""))) == victim
            }

        def failover() -> None:
            cluster.kill(cluster.nodes[victim])
            cluster.wait_until_ok()

        row = run(
            "cluster-failover",
            cluster.url,
            failover,
            workload,
            resource="items",
            live=lambda item: item not in dead,
            extra=extra,
        )
        # The keys were what we said: most items' keys hold an entry at the end.
        from redis.cluster import RedisCluster

        client = RedisCluster(host="127.0.0.1", port=cluster.masters()[0])
        try:
            held = sum(
                bool(client.exists(hash_parts("fo", ("api", f"/items/{n}", "", "", "http", ""))))
                for n in range(1, workload.items + 1)
            )
        finally:
            client.close()
        print(
            f"cluster-failover: {len(dead)} of {workload.items} items on the killed shard; "
            f"{held} items' keys hold an entry at the end",
            flush=True,
        )
        return row


if __name__ == "__main__":
    main()
