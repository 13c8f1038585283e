"""The caching engine shared by `@cached` and the gateway router.

key -> lookup -> `_core.decide` -> (fresh | stale | 504: answered here) or (fetch: alone,
or one per key for every request coalesced on it, in `cachegw._fetcher`) -> the rules
after the fetch (`cachegw._outcome`) -> store (`cachegw._writer`) -> answer
(`cachegw._answers`). The rules are pure functions; the engine and its parts do the I/O
around them: backend calls with deadlines that fail open, coalescing of concurrent
misses, background refreshes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi_cache.types import Backend
from redis.asyncio import RedisCluster

from cachegw._answers import COUNTERS, Answers
from cachegw._backends import OP_TIMEOUT, CacheBackend, RedisBackend, cache_backend
from cachegw._core import NO_DIRECTIVES, UNSTORED, Decision, decide, directives
from cachegw._entry import Entry, Item, VaryMarker
from cachegw._fetcher import LANDING_SLOTS, Fetcher
from cachegw._flight import Coordinator, RedisCoordinator
from cachegw._job import Job
from cachegw._models import Fetch, Fetched, RequestInfo, Served
from cachegw._policy import CachePolicy
from cachegw._purge import STORE_WINDOW, LocalPurges, Purges, RedisPurges
from cachegw._store import L1, READ_BUDGET, Store, end_read_budget, read_budget
from cachegw._writer import Writer, entry_life, variant_key

if TYPE_CHECKING:
    from cachegw._metrics import Metrics

__all__ = ["CacheEngine", "entry_life"]

_L1_SLACK = 60.0  # in-process copies outlive their backend entry by at most l1_ttl
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Tags an upstream gives its response for purging (Fastly / Varnish xkey, Cloudflare).
_TAG_HEADERS = frozenset({b"surrogate-key", b"cache-tag"})

logger = logging.getLogger("cachegw")


class CacheEngine(Answers):
    """Serves requests from a cache backend (a `CacheBackend`, or any fastapi-cache2
    ``Backend``), fetching and storing on misses.

    Every backend operation fails open: on an error the request is answered as if the
    cache were empty, and the failure counted. A request's reads share one budget
    (``read_budget``, see `cachegw._store.read_budget`); on a backend with I/O its writes
    run after its answer (see `cachegw._writer`), each bounded by ``op_timeout``.

    It renders and counts its answers as an `Answers` (`render`, `hit`): every hit path
    renders through these (methods of its class, so the protocol-level hit path calls
    them at the cost of a method call).
    """

    def __init__(
        self,
        backend: Backend | CacheBackend,
        *,
        status_header: str = "X-Cache-Status",
        cache_name: str = "cachegw",
        op_timeout: float | None = None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        purges: Purges | None = None,
        coordinator: Coordinator | None = None,
        expose_tag_headers: bool = False,
        lock_timeout: float = 5.0,
        lock_ttl: float = 30.0,
        l1: L1 | None = None,
        compress_min: int | None = None,
    ) -> None:
        self.backend = backend = cache_backend(backend, op_timeout=op_timeout or OP_TIMEOUT)
        # Stored bodies of at least this many bytes are compressed (see `_encoding`);
        # None: bodies are stored as they came and served as stored.
        self.compress_min = compress_min
        # Unless given, the backend's own deadline (RedisBackend.from_url(op_timeout=...)),
        # so the decorator and the gateway honour it; OP_TIMEOUT for any other backend.
        if op_timeout is None:
            op_timeout = float(getattr(self.backend, "op_timeout", OP_TIMEOUT))
        self.op_timeout = op_timeout
        self.clock = clock
        # Surrogate-Key / Cache-Tag are for this cache: stripped unless asked otherwise.
        hidden = (frozenset() if expose_tag_headers else _TAG_HEADERS) | {b"surrogate-control"}
        super().__init__(
            status_header=status_header.lower().encode("latin-1"),
            cache_name=cache_name,
            unpassed=frozenset({b"x-cache-status", b"cache-status"}) | hidden,
            stats=dict.fromkeys(COUNTERS, 0),
            metrics=metrics,
        )
        self.purges = purges or LocalPurges(clock)
        self.coordinator = coordinator or Coordinator()
        # Waiters give up on another process's fetch after lock_timeout (nginx's
        # proxy_cache_lock_timeout, 5 s) and fetch without storing; a crashed holder's
        # lock expires after lock_ttl. `recheck` backs up the landing message.
        self.lock_timeout = lock_timeout
        self.lock_ttl = lock_ttl
        # All of one request's reads: never less than one operation's deadline.
        self.read_budget = max(READ_BUDGET, op_timeout)
        self.recheck = 0.1
        self.store = Store(backend, op_timeout=op_timeout, on_error=self._backend_failed, l1=l1)
        self._share_breaker()
        self.writer = Writer(
            self.store,
            self.purges,
            clock=clock,
            stats=self.stats,
            unstored=UNSTORED | hidden,
            compress_min=compress_min,
        )
        self.fetcher = Fetcher(self, self)
        self._flights = self.fetcher.flights
        self._landings = self.fetcher.landings

    def _share_breaker(self) -> None:
        """Coordination and purges through the same backend trip the store's breaker."""
        if isinstance(self.coordinator, RedisCoordinator):
            # Keys other processes store or invalidate leave this process's L1 at once.
            self.coordinator.on_landed = self.store.forget
            self.coordinator.breaker = self.store.breaker
        if isinstance(self.purges, RedisPurges):
            self.purges.breaker = self.store.breaker
        backend = self.store.backend
        if isinstance(backend, RedisBackend) and isinstance(backend.client, RedisCluster):
            # A breaker per cluster node: a dead shard leaves the live ones serving
            # (issue 23); locks and the purge record are judged by their own node's.
            if isinstance(self.coordinator, RedisCoordinator):
                self.coordinator.breaker_for = self.store.breaker_for
            if isinstance(self.purges, RedisPurges):
                purges = self.purges
                purges.breaker_for = self.store.breaker_for
                # Entries are only as good as the record that judges them: none are read
                # while the record's node cannot be read.
                self.store.gate = lambda: purges.trusted
        if isinstance(self.purges, RedisPurges):
            # What this process copied from Redis is not served while the record that
            # says whether it is still valid cannot be read (issue 23).
            self.purges.on_unreachable = self.store.forget_all
        if self.metrics is not None:
            self.store.breaker.on_change = self.metrics.circuit

    def _backend_failed(self, op: str, exc: BaseException) -> None:
        self.stats["backend_errors"] += 1
        if self.metrics is not None:
            self.metrics.backend_error(op)

    def bypass(self, fetched: Fetched) -> Served:
        """Answer with ``fetched`` without reading or writing the cache."""
        return self.counted(fetched, "BYPASS", "fwd=bypass")

    def passed(self, fetched: Fetched) -> Served:
        """Answer a ``GET``/``HEAD`` of a route that stores nothing (``stores_nothing``)
        with ``fetched``: a miss, as the cache would have answered it, without a lookup, a
        lock or a write."""
        return self.counted(fetched, "MISS", "fwd=uri-miss")

    async def invalidate(self, scopes: list[str], policy: CachePolicy) -> None:
        """Invalidate every entry of ``scopes`` whose fetch started before now, for every
        Vary variant and principal, including answers still in flight (RFC 9111 §4.4; the
        contract's "writes are never undone"). A hard purge, remembered as long as an
        entry of a route with ``policy`` can be found (see `_purge`)."""
        keep = entry_life(policy) + STORE_WINDOW + _L1_SLACK
        try:
            # (A backend in the process has no deadline, 0: relaying the purge to the
            # other workers bounds itself, see `_relay`.)
            async with asyncio.timeout(self.op_timeout or None):
                await self.purges.purge(scopes, keep=keep)
        except Exception as exc:
            # This process applied it already; other processes sharing the backend will
            # not see it (fail open, like every backend error).
            self._backend_failed("invalidate", exc)
            logger.warning("cachegw: recording an invalidation failed: %r", exc)

    # -- the request path -----------------------------------------------------------

    async def purge(self, scopes: list[str], *, soft: bool = False) -> None:
        """Purge every entry answering to one of ``scopes`` (see `_purge`)."""
        await self.purges.purge(scopes, soft=soft)

    async def serve(self, request: RequestInfo, policy: CachePolicy, fetch: Fetch) -> Served:
        if self.store.inline:
            return await self._serve(request, policy, fetch)
        # One budget for all of this request's backend reads (or what is left of it).
        _, token = read_budget(self.read_budget, until=request.read_deadline)
        try:
            return await self._serve(request, policy, fetch)
        finally:
            end_read_budget(token)

    async def _serve(self, request: RequestInfo, policy: CachePolicy, fetch: Fetch) -> Served:
        if self.purges.due():
            await self.purges.refresh()
        request.started = self.clock()
        method = request.method
        if method not in ("GET", "HEAD"):
            fetched = await fetch()
            if method not in _SAFE_METHODS and 200 <= fetched.status < 400:
                # RFC 9111 §4.4: a non-error response to an unsafe method invalidates
                # the target URI's stored responses.
                await self.invalidate([request.target_scope], policy)
                # Also gone from the shared backend at once (and from other processes'
                # in-process copies as soon as they hear of it): the common case is seen
                # everywhere without waiting for the record's visibility window.
                await self.store.delete(request.key)
                if self.coordinator.shared:
                    await self.coordinator.landed(request.key)
            return self.counted(fetched, "BYPASS", "fwd=method")

        return await self._cached(request, policy, fetch, again=True)

    async def _cached(
        self, request: RequestInfo, policy: CachePolicy, fetch: Fetch, *, again: bool
    ) -> Served:
        """A GET or HEAD: look up, decide, act. ``again``: a miss that finds no flight to
        join looks up once more if a flight for its key ended meanwhile."""
        asked = directives(request.headers, policy)
        # Credentials make a request private unless the route keys on the principal.
        shared_only = request.authorized and not request.per_principal
        slot = hash(request.key) % LANDING_SLOTS
        landings = self._landings[slot]
        found, primary = await self.lookup(request)
        verdict = self.purges.verdict(found.tags, found.fetched_at) if found is not None else None
        now = self.clock()
        decision = decide(
            found,
            method="GET" if request.head_as_get else request.method,
            directives=asked,
            shared_only=shared_only,
            verdict=verdict,
            policy=policy,
            now=now,
            primary=primary,
            draw=random.random() if policy.early_refresh else 0.0,
        )
        if decision.action != "fetch":
            return self._reuse(decision, request, policy, fetch, now)
        job = Job(request, policy, fetch, asked.cc, decision.entry, primary is None)
        if not decision.coalesce:
            return await self.fetcher.alone(job, bypass_read=asked.bypass_read)
        # Coalesced, also for a client asking for an answer checked with the origin
        # (no-cache, Pragma, max-age=0): it shares the one upstream request in flight
        # for the key (RFC 9111 §4: a response obtained from the origin after the
        # request arrived satisfies it), so such requests cannot turn the cache off
        # (issue 10).
        request.forced = asked.bypass_read
        if again and request.key not in self._flights and self._landings[slot] != landings:
            return await self._cached(request, policy, fetch, again=False)
        return await self.fetcher.miss(job)

    def plain_hit(
        self, entry: Entry, method: str, policy: CachePolicy, now: float
    ) -> Decision | None:
        """The decision for a request without directives, credentials or body (both
        protocol-level hit paths: the gateway's fast path and `cachegw.CachedHits`): the
        same `decide` the ordinary path asks, so a rule added there holds on every path.
        The decision when the entry is a plain fresh hit with nothing to start (no early
        refresh), else None (the ordinary path decides)."""
        decision = decide(
            entry,
            method=method,
            directives=NO_DIRECTIVES,
            shared_only=False,
            verdict=self.purges.verdict(entry.tags, entry.fetched_at),
            policy=policy,
            now=now,
        )
        if decision.action != "fresh" or decision.refresh:
            return None
        return decision

    def _reuse(
        self,
        decision: Decision,
        request: RequestInfo,
        policy: CachePolicy,
        fetch: Fetch,
        now: float,
    ) -> Served:
        """Answer from the cache as ``decision`` says: fresh, stale, or 504."""
        entry = decision.entry
        if entry is None:  # "unavailable": only-if-cached and nothing usable
            return self.unavailable()
        if decision.refresh:
            self.fetcher.refresh(request, policy, fetch, entry)
        if decision.action == "fresh":
            return self.hit(entry, request, now, decision.left)
        assert decision.reason is not None
        return self.stale(entry, request, now, decision.left, decision.reason)

    async def lookup(self, request: RequestInfo) -> tuple[Entry | None, Item | None]:
        """The entry for the request (Vary resolved) and what the primary key holds."""
        item = request.primary = await self.store.get(request.key)
        if isinstance(item, VaryMarker):
            variant = await self.store.get(variant_key(request.key, item, request.headers))
            return (variant if isinstance(variant, Entry) else None), item
        return (item if isinstance(item, Entry) else None), item

    def in_flight(self) -> dict[str, int]:
        """Fetches under way in this process (misses and refreshes) and the requests
        waiting for them (each miss's own request included): for the health endpoint."""
        return self.fetcher.in_flight()

    def start(self) -> None:
        """Start listening for other processes (call from a running event loop)."""
        self.coordinator.start()
        self.purges.start()

    async def aclose(self, grace: float = 5.0) -> None:
        """Wait (bounded) for fetches and refreshes in flight, then cancel the rest."""
        await self.writer.aclose(grace)
        await self.coordinator.aclose()
        await self.purges.aclose(grace)
        await self.fetcher.aclose(grace)
