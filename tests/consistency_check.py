"""A consistency checker: concurrent readers and writers through gateways in front of a
`VersionedItems` upstream (issue 11).

Every operation's start and end are recorded (the checker's monotonic clock). A read
*violates* the rule when it started more than ``window`` seconds after a write of its item
was acknowledged and returned a version older than that write's. Reads that overlap a
write may see either version.

The workload: ``workers`` concurrent clients; ``1 - write_share`` of operations are GETs
of ``/vitems/{n}`` (Zipf popularity over ``items`` items, a random ``Accept-Language``,
which the upstream varies on), the rest PUT (3/4) or DELETE (1/4). Each operation goes to
one of the gateways at random.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random
import time
from dataclasses import dataclass, field

import aiohttp

__all__ = ["Result", "Workload", "check"]

LANGS = ("en", "fr", "de")


@dataclass(frozen=True, kw_only=True)
class Workload:
    items: int = 1000
    workers: int = 32
    seconds: float = 120.0
    write_share: float = 0.2
    zipf: float = 1.0
    seed: int = 11
    #: Stop each worker after this many operations (None: run for ``seconds``). The same
    #: operations for two runs compare hit ratios whatever the machine's speed.
    ops_per_worker: int | None = None


@dataclass(slots=True)
class Op:
    write: bool
    item: int
    start: float
    end: float
    version: int
    cache: str


@dataclass
class Result:
    reads: int = 0
    writes: int = 0
    hits: int = 0
    #: Hits older than a write acknowledged before the read started, window or not: what
    #: to take out of the hit ratio of a cache that undoes writes to compare it fairly.
    outdated_hits: int = 0
    errors: int = 0
    seconds: float = 0.0
    #: (item, read start after the first newer acknowledged write, version read, newer)
    violations: list[tuple[int, float, int, int]] = field(default_factory=list)

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.reads if self.reads else 0.0

    @property
    def up_to_date_hit_ratio(self) -> float:
        return (self.hits - self.outdated_hits) / self.reads if self.reads else 0.0

    @property
    def throughput(self) -> float:
        return (self.reads + self.writes) / self.seconds if self.seconds else 0.0

    def report(self) -> str:
        lines = [
            f"{self.reads} reads, {self.writes} writes, {self.errors} errors in "
            f"{self.seconds:.1f} s ({self.throughput:.0f} ops/s), hit ratio "
            f"{100 * self.hit_ratio:.1f} % ({100 * self.up_to_date_hit_ratio:.1f} % counting "
            f"only hits as new as every write acknowledged before they started), "
            f"{len(self.violations)} violations"
        ]
        worst = sorted(self.violations, key=lambda v: -v[1])[:10]
        for item, late, seen, newer in worst:
            lines.append(
                f"  item {item}: read version {seen} {late:.3f} s after version {newer} "
                "was acknowledged"
            )
        return "\n".join(lines)


def check(bases: list[str], workload: Workload, *, window: float) -> Result:
    """Run ``workload`` against gateways at ``bases`` (each ending with the service
    prefix, e.g. ``http://127.0.0.1:8080/api``) and judge every read."""
    return asyncio.run(_run(bases, workload, window))


async def _run(bases: list[str], workload: Workload, window: float) -> Result:
    rng = random.Random(workload.seed)
    weights = list(
        itertools.accumulate(1 / (k**workload.zipf) for k in range(1, workload.items + 1))
    )
    ops: list[Op] = []
    errors = 0
    deadline = time.monotonic() + workload.seconds
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)

    async def worker(session: aiohttp.ClientSession, seed: int) -> None:
        nonlocal errors
        r = random.Random(seed)
        limit = workload.ops_per_worker
        done = 0
        while time.monotonic() < deadline and (limit is None or done < limit):
            done += 1
            item = bisect.bisect_left(weights, r.random() * weights[-1]) + 1
            base = r.choice(bases)
            url = f"{base}/vitems/{item}"
            roll = r.random()
            write = roll < workload.write_share
            method = "GET"
            if write:
                method = "PUT" if roll < workload.write_share * 0.75 else "DELETE"
            headers = {"accept-language": r.choice(LANGS)}
            start = time.monotonic()
            try:
                async with session.request(method, url, headers=headers) as response:
                    await response.read()
                    status = response.status
                    version = int(response.headers.get("x-version", "-1"))
                    cache = response.headers.get("x-cache-status", "")
            except (aiohttp.ClientError, TimeoutError, ValueError):
                errors += 1
                continue
            end = time.monotonic()
            if status not in (200, 404) or version < 0:
                errors += 1
                continue
            ops.append(Op(write, item, start, end, version, cache))

    began = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        seeds = [rng.randrange(1 << 30) for _ in range(workload.workers)]
        await asyncio.gather(*(worker(session, seed) for seed in seeds))
    result = judge(ops, window)
    result.errors = errors
    result.seconds = time.monotonic() - began
    return result


def judge(ops: list[Op], window: float) -> Result:
    """Counts, and the reads that returned a version older than a write acknowledged more
    than ``window`` seconds before they started."""
    result = Result()
    writes: dict[int, list[tuple[float, int]]] = {}
    for op in ops:
        if op.write:
            result.writes += 1
            writes.setdefault(op.item, []).append((op.end, op.version))
    # Per item: acknowledgement times, and the highest version acknowledged by then.
    acked: dict[int, tuple[list[float], list[int]]] = {}
    for item, done in writes.items():
        done.sort()
        acked[item] = (
            [end for end, _ in done],
            list(itertools.accumulate((v for _, v in done), max)),
        )
    for op in ops:
        if op.write:
            continue
        result.reads += 1
        if op.cache in ("HIT", "STALE"):
            result.hits += 1
        if op.item not in acked:
            continue
        ends, highest = acked[op.item]
        before = bisect.bisect_left(ends, op.start)
        if before and highest[before - 1] > op.version and op.cache in ("HIT", "STALE"):
            result.outdated_hits += 1
        known = bisect.bisect_left(ends, op.start - window)  # writes acked before the window
        if known and highest[known - 1] > op.version:
            # How long before the read the first newer version was acknowledged.
            first = bisect.bisect_right(highest, op.version)
            late = op.start - ends[first]
            result.violations.append((op.item, late, op.version, highest[known - 1]))
    return result
