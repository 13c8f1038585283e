"""Writing entries: what a fetched response is stored as and where, and when.

`Writer.store` stores a response if the rules allow (`cachegw._storing.build_entry`,
`cachegw._outcome.keep`), under the request's key or, when it varies, under a variant key
named by a `VaryMarker`; `Writer.merge` does the same for a stale entry a ``304``
confirmed. On a backend with I/O a request's writes are collected in a `Writes` list and
run after its answer, in a task of their own (`Writer.behind`): a stalled backend does not
hold the answer.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cachegw._core import Storing, build_entry, merge_not_modified
from cachegw._entry import Entry, Item, VaryMarker
from cachegw._job import Job, Writes
from cachegw._keys import hash_parts, vary_values
from cachegw._models import Fetched, RequestInfo
from cachegw._outcome import keep
from cachegw._policy import CacheControl, CachePolicy
from cachegw._purge import RECORD_TTL, STORE_WINDOW, Purges
from cachegw._store import Store

__all__ = [
    "MAX_STORAGE_TTL",
    "WRITE_GRACE",
    "Writer",
    "entry_life",
    "superseded",
    "variant_key",
]

MAX_STORAGE_TTL = RECORD_TTL - 86400  # 30 days
#: How long an answer waits for its writes before it is sent without them: a healthy
#: backend takes well under a millisecond (the answer is then as before: the entry is in
#: the backend, and ``stored`` is said), a stalled one does not hold the answer.
WRITE_GRACE = 0.01
_NO_DIRECTIVES = CacheControl({})

logger = logging.getLogger("cachegw")


class Writer:
    """Stores entries for the engine, at once or after the answer."""

    def __init__(
        self,
        store: Store,
        purges: Purges,
        *,
        clock: Callable[[], float],
        stats: dict[str, int],
        unstored: frozenset[bytes],
        compress_min: int | None,
    ) -> None:
        self.store = store
        self.purges = purges
        self.clock = clock
        self.stats = stats
        self.unstored = unstored  # response headers never stored
        self.compress_min = compress_min
        # Writes done after the answer was sent (see `behind`), at most this many
        # requests' worth at a time: a stalled backend cannot make them pile up.
        self.max_in_flight = 512
        self.writing: set[asyncio.Task[None]] = set()
        self.dropped_at = 0.0

    # -- storing ------------------------------------------------------------------------

    async def merge(self, job: Job, fetched: Fetched) -> Entry:
        """The stale entry updated from a 304 to our conditional request (RFC 9111 §4.3.4);
        freshness is computed again from the merged headers."""
        stale = job.stale
        assert stale is not None
        updated = merge_not_modified(stale, fetched, unstored=self.unstored)
        entry = await self.store_entry(job, updated, _NO_DIRECTIVES, revalidated=stale)
        return entry if entry is not None else stale

    async def store_entry(
        self,
        job: Job,
        fetched: Fetched,
        request_cc: CacheControl | None = None,
        *,
        revalidated: Entry | None = None,
    ) -> Entry | None:
        """Store ``fetched`` if the rules allow (`_core.build_entry`); the entry, or None.

        ``revalidated`` is the entry a 304 just confirmed: its policy-derived settings
        (tags, stale windows, sharing) carry over. With ``job.writes``, the backend writes
        are queued there (see `behind`) and the entry does not claim to be stored.
        """
        request, policy = job.request, job.policy
        now = self.clock()
        # Ordered against the start of the upstream request: a request that waited for
        # another fetch and then fetched itself is as new as its own fetch.
        started = request.fetch_started or request.started
        storing = Storing(
            authorized=request.authorized,
            per_principal=request.per_principal,
            scopes=request.scopes,
            target_scope=None if request.target else request.target_scope,
            started=started,
            request_cc=job.cc if request_cc is None else request_cc,
            unstored=self.unstored,
            compress_min=self.compress_min,
        )
        entry, names = build_entry(fetched, storing, policy, now, revalidated=revalidated)
        if entry is None:
            return None
        # Never kept longer than an invalidation of it is remembered (see `invalidate`).
        ttl = min(entry.storage_ttl(now), entry_life(policy))
        gone = ttl > 0 and superseded(self.purges, entry.tags, request, started)
        verdict = keep(ttl, started, now, STORE_WINDOW, gone)
        if verdict == "drop":
            return None
        if verdict == "serve":
            entry.stored = False
            return entry
        await self._write_entry(job, entry, names, ttl, now)
        return entry

    async def _write_entry(
        self, job: Job, entry: Entry, names: list[str], ttl: float, now: float
    ) -> None:
        request, policy, writes = job.request, job.policy, job.writes
        target = request.key
        if names:
            # Responses here vary on request headers (the upstream's Vary and the route's
            # `vary`): the primary key holds a marker naming them, the response lives
            # under a key that includes their values.
            marker = request.primary
            if not isinstance(marker, VaryMarker) or marker.names != names:
                marker = VaryMarker(names=names, stored_at=now, gen=secrets.token_hex(8))
                request.primary = marker  # for requests sharing this fetch
            # The marker outlives this variant: other variants may be kept longer.
            assert policy.max_ttl is not None
            life = policy.max_ttl + policy.stale_window + entry.keep
            await self.put(writes, request.key, marker, max(ttl, min(MAX_STORAGE_TTL, life)))
            target = variant_key(request.key, marker, request.headers)
        if writes is None:
            entry.stored = await self.store.set(target, entry, ttl)
            return
        entry.stored = False  # until the write lands

        async def write() -> None:
            entry.stored = await self.store.set(target, entry, ttl)

        writes.append(write)

    async def put(self, writes: Writes | None, key: str, item: Item, ttl: float) -> None:
        """``store.set`` now, or queued in ``writes``."""
        if writes is None:
            await self.store.set(key, item, ttl)
        else:
            writes.append(lambda: self.store.set(key, item, ttl))

    # -- writes after the answer ----------------------------------------------------------

    def batch(self) -> Writes | None:
        """A list collecting a request's writes to send them after its answer, or None
        to write at once (a backend in the process: nothing to wait for)."""
        return None if self.store.inline else []

    @staticmethod
    async def later(writes: Writes | None, op: Callable[[], Awaitable[Any]]) -> None:
        """``op`` now, or queued in ``writes``."""
        if writes is None:
            await op()
        else:
            writes.append(op)

    def behind(self, writes: Writes | None) -> asyncio.Task[None] | None:
        """Run ``writes`` in order in a task of their own (issue 12: a stalled backend
        must not hold the answer). At most `max_in_flight` such tasks: beyond, the writes
        are dropped (the entry is not stored, the lock expires by itself). Returns their
        task, if scheduled: the caller gives it `WRITE_GRACE` to finish (`grace`)."""
        if not writes:
            return None
        if len(self.writing) >= self.max_in_flight:
            self.stats["writes_dropped"] += 1
            now = time.monotonic()
            if now >= self.dropped_at:
                self.dropped_at = now + 1.0
                logger.warning(
                    "cachegw: %d cache writes in flight; dropping new ones until the "
                    "backend keeps up",
                    len(self.writing),
                )
            return None

        async def run() -> None:
            for op in writes:
                try:
                    await op()
                except Exception:  # every op fails open by itself; this is a bug
                    logger.exception("cachegw: a cache write failed")

        task = asyncio.get_running_loop().create_task(run())
        self.writing.add(task)
        task.add_done_callback(self.writing.discard)
        return task

    @staticmethod
    async def grace(task: asyncio.Task[None] | None) -> None:
        """Wait (briefly) for a request's writes: see `WRITE_GRACE`."""
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=WRITE_GRACE)

    async def aclose(self, grace: float) -> None:
        """Wait (bounded) for the writes under way."""
        if self.writing:
            await asyncio.wait(set(self.writing), timeout=grace)


def entry_life(policy: CachePolicy) -> float:
    """The longest an entry of a route with ``policy`` is kept: freshness up to
    ``max_ttl``, then the longest of its stale windows and the time kept for revalidation
    (``max_ttl``). Stale windows an upstream asks for beyond that are cut to it."""
    assert policy.max_ttl is not None
    return min(MAX_STORAGE_TTL, policy.max_ttl + max(policy.max_ttl, policy.stale_window))


def superseded(purges: Purges, scopes: list[str], request: RequestInfo, started: float) -> bool:
    """Whether a fetch that started at ``started`` began before an invalidation (a hard
    purge) of the request's entries: its answer must not be stored nor shared."""
    verdict = purges.verdict(scopes, started)
    if verdict is None and not request.target:
        verdict = purges.verdict((request.target_scope,), started)
    return verdict is not None and verdict[0] == "hard"


def variant_key(primary: str, marker: VaryMarker, headers: Mapping[str, str]) -> str:
    """The key of the variant of ``primary`` that requests with ``headers`` get."""
    return hash_parts(primary, (marker.gen, *vary_values(marker.names, headers)))
