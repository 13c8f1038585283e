"""The caching engine shared by `@cached` and the gateway router.

key -> lookup -> (fresh hit | stale | miss) -> single-flight fetch -> storability -> store
-> respond. The rules it applies live in `_policy` (pure); this module does the I/O
around them: backend calls with deadlines that fail open, coalescing of concurrent
misses, background refreshes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi_cache.types import Backend
from redis.asyncio import RedisCluster

from cachegw._backends import OP_TIMEOUT, CacheBackend, RedisBackend, cache_backend
from cachegw._core import (
    NO_DIRECTIVES,
    UNSTORED,
    Decision,
    Directives,
    StaleReason,
    Storing,
    build_entry,
    decide,
    directives,
    merge_not_modified,
    stale_if_error_ok,
    validators,
    vary_names,
)
from cachegw._encoding import for_client, valid_etag
from cachegw._entry import Entry, Headers, HitForMiss, Item, VaryMarker
from cachegw._flight import UNLOCKED, Coordinator, RedisCoordinator
from cachegw._keys import hash_parts, vary_values
from cachegw._models import Fetch, Fetched, RequestInfo, Served
from cachegw._policy import (
    CacheControl,
    CachePolicy,
    parse_http_date,
    split_header_list,
)
from cachegw._purge import (
    RECORD_TTL,
    STORE_WINDOW,
    LocalPurges,
    Purges,
    RedisPurges,
)
from cachegw._store import L1, READ_BUDGET, Store, end_read_budget, read_budget

if TYPE_CHECKING:
    from cachegw._metrics import Metrics

__all__ = ["CacheEngine", "entry_life"]

MAX_STORAGE_TTL = RECORD_TTL - 86400  # 30 days
HIT_FOR_MISS_TTL = 10.0  # how long an uncacheable answer keeps a key out of coalescing
_L1_SLACK = 60.0  # in-process copies outlive their backend entry by at most l1_ttl
_COUNTERS = (
    "HIT",
    "MISS",
    "STALE",
    "BYPASS",
    "EXPIRED",
    "coalesced",
    "backend_errors",
    "writes_dropped",
    "abandoned",
)
_TIMED_OUT = "timed-out"  # a "token" meaning: fetch without the lock, and don't store


# A request's backend writes, queued to run in order after its answer (_write_behind).
_Writes = list[Callable[[], Awaitable[Any]]]
#: How long an answer waits for its writes before it is sent without them: a healthy
#: backend takes well under a millisecond (the answer is then as before: the entry is in
#: the backend, and ``stored`` is said), a stalled one does not hold the answer.
WRITE_GRACE = 0.01
# Ended flights are counted per slot of the key's hash (see `CacheEngine._landings`).
_LANDING_SLOTS = 256

logger = logging.getLogger("cachegw")

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Headers kept on a 304 built from a stored response (RFC 9110 §15.4.5).
_NOT_MODIFIED_KEEP = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary", b"last-modified"}
)
# Never stored: computed per hit, or belonging to one connection / one caller.
_UNSTORED = UNSTORED
# Tags an upstream gives its response for purging (Fastly / Varnish xkey, Cloudflare).
_TAG_HEADERS = frozenset({b"surrogate-key", b"cache-tag"})


@dataclass(slots=True)
class _Flight:
    """One in-process fetch for a key that other requests may wait on."""

    # When the leader's upstream request started (inf until it does): what invalidations
    # are compared with before joining.
    started: float = math.inf
    done: asyncio.Event = field(default_factory=asyncio.Event)
    entry: Entry | None = None
    vary: list[str] | None = None  # vary values of the leader's request, if it varied
    marker: VaryMarker | None = None  # the Vary marker the leader's entry is stored under
    failed: bool = False  # the upstream failed: waiters holding a stale entry serve it
    # The requests waiting for this fetch (its leader included) and, for a miss, the
    # task fetching: when the last of them leaves (its client went away), the fetch is
    # let go (see `CacheEngine._leave`). A background refresh has no task: it runs on.
    waiters: int = 0
    task: asyncio.Task[Served] | None = None
    fetching: bool = False  # its upstream request is under way
    abandoned: bool = False


def _conditional(fetch: Fetch, validators: Headers) -> Awaitable[Fetched]:
    return fetch(validators) if validators else fetch()


class CacheEngine:
    """Serves requests from a cache backend (a `CacheBackend`, or any fastapi-cache2
    ``Backend``), fetching and storing on misses.

    Every backend operation fails open: on an error the request is answered as if the
    cache were empty, and the failure counted. A request's reads share one budget
    (``read_budget``, see `cachegw._store.read_budget`); on a backend with I/O its writes
    run after its answer (see `_write_behind`), each bounded by ``op_timeout``.
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
        self.status_header = status_header.lower().encode("latin-1")
        self.cache_name = cache_name
        # Unless given, the backend's own deadline (RedisBackend.from_url(op_timeout=...)),
        # so the decorator and the gateway honour it; OP_TIMEOUT for any other backend.
        if op_timeout is None:
            op_timeout = float(getattr(self.backend, "op_timeout", OP_TIMEOUT))
        self.op_timeout = op_timeout
        self.clock = clock
        self.stats: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.metrics = metrics
        # Surrogate-Key / Cache-Tag are for this cache: stripped unless asked otherwise.
        hidden = (frozenset() if expose_tag_headers else _TAG_HEADERS) | {b"surrogate-control"}
        self._unstored = _UNSTORED | hidden
        self._unpassed = frozenset({b"x-cache-status", b"cache-status"}) | hidden
        self._passed_headers: dict[tuple[str, str], Headers] = {}
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
        self._flights: dict[str, _Flight] = {}
        # How many flights ended, per slot of the key's hash. A request whose lookup
        # missed while its key's flight was ending (the answer given, its entry not yet
        # readable) finds no flight to join; the count having moved since its lookup
        # began, it looks again instead of fetching a second time (issue 28: one
        # upstream request per key did not hold on a slow machine).
        self._landings = [0] * _LANDING_SLOTS
        self._background: set[asyncio.Task[Any]] = set()
        # Writes done after the answer was sent (see _write_behind), at most this many
        # requests' worth at a time: a stalled backend cannot make them pile up.
        self.max_writes_in_flight = 512
        self._writing: set[asyncio.Task[None]] = set()
        self._dropped_at = 0.0

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

    def _stale(self, request: RequestInfo, reason: StaleReason) -> None:
        self.stats["STALE"] += 1
        if self.metrics is not None:
            self.metrics.stale(request.service, reason)

    def bypass(self, fetched: Fetched) -> Served:
        """Answer with ``fetched`` without reading or writing the cache."""
        self.stats["BYPASS"] += 1
        return self._passed(fetched, "BYPASS", "fwd=bypass")

    def passed(self, fetched: Fetched) -> Served:
        """Answer a ``GET``/``HEAD`` of a route that stores nothing (``stores_nothing``)
        with ``fetched``: a miss, as the cache would have answered it, without a lookup, a
        lock or a write."""
        self.stats["MISS"] += 1
        return self._passed(fetched, "MISS", "fwd=uri-miss")

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
            self.stats["BYPASS"] += 1
            return self._passed(fetched, "BYPASS", "fwd=method")

        return await self._cached(request, policy, fetch, again=True)

    async def _cached(
        self, request: RequestInfo, policy: CachePolicy, fetch: Fetch, *, again: bool
    ) -> Served:
        """A GET or HEAD: look up, decide, act. ``again``: a miss that finds no flight to
        join looks up once more if a flight for its key ended meanwhile."""
        asked = directives(request.headers, policy)
        # Credentials make a request private unless the route keys on the principal.
        shared_only = request.authorized and not request.per_principal
        slot = hash(request.key) % _LANDING_SLOTS
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
        if decision.action == "fetch":
            if not decision.coalesce:
                return await self._fetch_alone(request, policy, fetch, asked, decision.entry)
            # Coalesced, also for a client asking for an answer checked with the origin
            # (no-cache, Pragma, max-age=0): it shares the one upstream request in flight
            # for the key (RFC 9111 §4: a response obtained from the origin after the
            # request arrived satisfies it), so such requests cannot turn the cache off
            # (issue 10).
            request.forced = asked.bypass_read
            if again and request.key not in self._flights and self._landings[slot] != landings:
                return await self._cached(request, policy, fetch, again=False)
            return await self._miss(
                request, policy, fetch, asked.cc, decision.entry, primary is None
            )
        return self._reuse(decision, request, policy, fetch, now)

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

    def hit(self, entry: Entry, request: RequestInfo, now: float, left: float) -> Served:
        """A fresh hit's answer (counted), on every path."""
        self.stats["HIT"] += 1
        return self.render(entry, request, now, "HIT", f"hit; ttl={int(left)}")

    def _reuse(
        self,
        decision: Decision,
        request: RequestInfo,
        policy: CachePolicy,
        fetch: Fetch,
        now: float,
    ) -> Served:
        """Answer from the cache as ``decision`` says: fresh, stale, or 504."""
        entry, left = decision.entry, int(decision.left)
        if entry is None:  # "unavailable": only-if-cached and nothing usable
            # RFC 9111 §5.2.1.7: nothing usable in cache -> 504.
            headers = [(b"content-length", b"0"), *self._cache_headers("MISS", "fwd=miss")]
            return Served(504, headers, b"", cache_status="MISS")
        if decision.refresh:
            self._refresh_in_background(request, policy, fetch, entry)
        if decision.action == "fresh":
            return self.hit(entry, request, now, left)
        assert decision.reason is not None
        self._stale(request, decision.reason)
        if decision.reason == "stale-while-revalidate":
            detail = f"hit; ttl={left}; fwd=stale; fwd-status=0"
        else:
            detail = f"hit; ttl={left}"
        return self.render(entry, request, now, "STALE", detail)

    async def _fetch_alone(
        self,
        request: RequestInfo,
        policy: CachePolicy,
        fetch: Fetch,
        asked: Directives,
        stale: Entry | None,
    ) -> Served:
        """Fetch without coalescing: a HEAD not fetched as a GET has no body to store, a
        request with credentials may get a private answer, and the last response for this
        key could not be stored (hit-for-miss)."""
        whole = request.method == "GET" or request.head_as_get  # the fetch gets a body
        shared_only = request.authorized and not request.per_principal
        self._fetching(request)
        fetched = await _conditional(fetch, validators(stale) if whole else [])
        status = "BYPASS" if asked.bypass_read else "MISS"
        detail = "fwd=request" if asked.bypass_read else "fwd=uri-miss"
        entry = None
        writes = self._writes()
        if whole:
            if stale is not None and fetched.status == 304:
                entry = await self._revalidated(request, policy, stale, fetched, writes)
                detail += "; fwd-status=304"
            else:
                # Stored only when the rules allow: a response to credentials must
                # say public, s-maxage or must-revalidate (RFC 9111 §3.5).
                entry = await self._store(request, policy, fetched, asked.cc, writes=writes)
        await self._grace(self._write_behind(writes))
        if entry is None and shared_only:
            status, detail = "BYPASS", "fwd=bypass"
        self.stats[status] += 1
        if entry is not None:
            return self.render(entry, request, self.clock(), status, detail + _stored(entry))
        return self._passed(fetched, status, detail)

    async def lookup(self, request: RequestInfo) -> tuple[Entry | None, Item | None]:
        """The entry for the request (Vary resolved) and what the primary key holds."""
        item = request.primary = await self.store.get(request.key)
        if isinstance(item, VaryMarker):
            variant = await self.store.get(_variant_key(request.key, item, request.headers))
            return (variant if isinstance(variant, Entry) else None), item
        return (item if isinstance(item, Entry) else None), item

    async def _landed(self, request: RequestInfo) -> Entry | HitForMiss | None:
        """A fresh entry (or a hit-for-miss marker) another process just stored."""
        found, primary = await self.lookup(request)
        if isinstance(primary, HitForMiss):
            return primary
        if found is None or self.purges.verdict(found.tags, found.fetched_at) is not None:
            return None
        if request.forced and found.stored_at < request.started:
            return None  # the entry the client asked to have checked, not a new answer
        return found if found.ttl_left(self.clock()) > 0 else None

    async def _miss(
        self,
        request: RequestInfo,
        policy: CachePolicy,
        fetch: Fetch,
        request_cc: CacheControl,
        stale: Entry | None,
        empty: bool,
    ) -> Served:
        flight = self._flights.get(request.key)
        if flight is not None and flight.done.is_set():
            # Ended, its entry still being written (see _lead): its answer serves only
            # while fresh; else this request leads a fetch of its own.
            entry = flight.entry
            if entry is None or entry.ttl_left(self.clock()) <= 0:
                flight = None
        if flight is not None and self._superseded(request.scopes, request, flight.started):
            # Its fetch started before an invalidation: its answer is not for us.
            flight = None
        if flight is not None:
            # Another request of this process is fetching: wait for its answer.
            flight.waiters += 1
            try:
                await flight.done.wait()
            finally:
                self._leave(flight)
            entry = flight.entry
            if entry is not None and (
                flight.vary is None
                or flight.vary == vary_values(vary_names(entry), request.headers)
            ):
                return self._collapsed(request, entry)
            if flight.failed and stale is not None and stale_if_error_ok(stale, self.clock()):
                return self._stale_on_error(request, stale, 0)  # don't ask a failing upstream
            if entry is not None:
                # The answer varies differently: fetch our own variant and store it
                # under the leader's marker (a new marker would orphan the leader's
                # variant). Ordered against our own fetch start, like any store.
                if flight.marker is not None:
                    request.primary = flight.marker
                return await self._fetch_alone(
                    request, policy, fetch, directives(request.headers, policy), stale
                )
            # The answer was not storable: fetch our own.
            fetched = await fetch()
            self.stats["MISS"] += 1
            return self._passed(fetched, "MISS", "fwd=uri-miss")
        flight = self._flights[request.key] = _Flight(waiters=1)
        # The fetch runs in a task of its own: if this request's client goes away, the
        # requests waiting on it still get their answer.
        lead = flight.task = asyncio.get_running_loop().create_task(
            self._lead(request, policy, fetch, request_cc, stale, empty, flight)
        )
        self._background.add(lead)
        lead.add_done_callback(self._background.discard)
        try:
            return await asyncio.shield(lead)
        finally:
            self._leave(flight)

    def _leave(self, flight: _Flight) -> None:
        """A request stops waiting for ``flight`` (answered, or its client left). When
        nobody waits any more for a fetch still under way, it is cancelled: its upstream
        request is aborted and its pool connection freed (nginx's
        ``proxy_ignore_client_abort off``). Once the response is in, the store goes on."""
        flight.waiters -= 1
        task = flight.task
        if flight.waiters or task is None or task.done() or flight.done.is_set():
            return
        flight.abandoned = True
        if flight.fetching:
            task.cancel()

    async def _lead(
        self,
        request: RequestInfo,
        policy: CachePolicy,
        fetch: Fetch,
        request_cc: CacheControl,
        stale: Entry | None,
        empty: bool,
        flight: _Flight,
    ) -> Served:
        """Fetch for every request of this process waiting on ``flight``, and with the
        other processes of the fleet: one upstream request per key."""
        writes = self._writes()
        try:
            token = await self._lock(request)
            if token is None and await self._holder_superseded(request):
                # The fetch holding the lock started before an invalidation this process
                # knows of: its answer will not be stored. Fetch now, without the lock.
                token = UNLOCKED
                self._fetching(request)
            if token is None:
                waited = await self._wait_for_fleet(request, flight, stale)
                if isinstance(waited, Served):
                    return waited
                token = waited
                if token == _TIMED_OUT:
                    # Like nginx after proxy_cache_lock_timeout: everyone waiting here
                    # goes upstream now, in parallel, and nobody stores.
                    self._drop_flight(request.key, flight)
                    flight.done.set()
            try:
                led = await self._fetch_led(
                    request, policy, fetch, request_cc, stale, empty, flight, token, writes
                )
                if isinstance(led, Served):
                    return led
                fetched, entry = led
            finally:
                if token != _TIMED_OUT:
                    key, held = request.key, token
                    await self._write(writes, lambda: self.coordinator.release(key, held))
        finally:
            # The answer is ready: the store, the landing message and the lock release
            # happen in that order, in a task of their own that the answer waits for only
            # briefly (WRITE_GRACE).
            behind = self._write_behind(writes)
            flight.done.set()
            # Requests arriving until the entry is readable join the ended flight.
            if behind is None:
                self._drop_flight(request.key, flight)
            else:
                key = request.key
                behind.add_done_callback(lambda _: self._drop_flight(key, flight))
        await self._grace(behind)
        status = "EXPIRED" if stale is not None else "MISS"
        fwd = "fwd=stale" if stale is not None else "fwd=uri-miss"
        if request.forced:
            status, fwd = "BYPASS", "fwd=request"
        self.stats[status] += 1
        if entry is None:
            return self._passed(fetched, status, fwd)
        return self.render(entry, request, self.clock(), status, fwd + _stored(entry))

    async def _fetch_led(
        self,
        request: RequestInfo,
        policy: CachePolicy,
        fetch: Fetch,
        request_cc: CacheControl,
        stale: Entry | None,
        empty: bool,
        flight: _Flight,
        token: str,
        writes: _Writes | None,
    ) -> Served | tuple[Fetched, Entry | None]:
        """The leader's fetch, holding the key's lock (``token``): the response and the
        entry stored from it, or the stale entry served instead of an upstream failure."""
        if token == _TIMED_OUT:
            self._fetching(request)
        # Otherwise the fetch counts as started when the lock was asked for (see _lock).
        flight.started = request.fetch_started
        if flight.abandoned:
            raise asyncio.CancelledError  # everyone left while it waited for the lock
        flight.fetching = True
        try:
            fetched = await _conditional(fetch, validators(stale))
        finally:
            flight.fetching = False
        if stale is not None and fetched.status == 304 and token != _TIMED_OUT:
            entry = await self._revalidated(request, policy, stale, fetched, writes)
        elif stale is not None and _failed(fetched):
            flight.failed = True
            if stale_if_error_ok(stale, self.clock()):
                await _discard(fetched)
                if self.coordinator.shared:
                    key = request.key
                    await self._write(writes, lambda: self.coordinator.landed(key, failed=True))
                return self._stale_on_error(request, stale, fetched.status)
            entry = None  # an error never replaces a good entry
        elif fetched.status == 304:
            entry = None  # not ours to answer (see _revalidated)
            fetched = await fetch()
        elif token == _TIMED_OUT:
            entry = None  # like nginx after proxy_cache_lock_timeout: don't store
        else:
            entry = await self._store(request, policy, fetched, request_cc, writes=writes)
        if (
            entry is None
            and empty
            and token != _TIMED_OUT
            and not _failed(fetched)
            and "no-store" not in request_cc
        ):
            marker = HitForMiss(stored_at=self.clock())
            await self._put(writes, request.key, marker, HIT_FOR_MISS_TTL)
        flight.entry = entry
        if entry is not None:
            names = vary_names(entry)
            flight.vary = vary_values(names, request.headers) if names else None
            flight.marker = _marker(request)
        if self.coordinator.shared:
            key = request.key
            await self._write(writes, lambda: self.coordinator.landed(key))
        return fetched, entry

    def _stale_on_error(self, request: RequestInfo, stale: Entry, status: int) -> Served:
        """The stale entry instead of an upstream failure (RFC 5861 stale-if-error)."""
        self._stale(request, "stale-if-error")
        now = self.clock()
        return self.render(
            stale,
            request,
            now,
            "STALE",
            f"hit; ttl={int(stale.ttl_left(now))}; fwd=stale; fwd-status={status}",
        )

    async def _wait_for_fleet(
        self, request: RequestInfo, flight: _Flight, stale: Entry | None
    ) -> Served | str:
        """Another process holds the key's lock: wait until its answer lands.

        Returns the response from the landed entry, or a lock token when this process
        should fetch after all: the holder vanished (we took the lock) or the wait timed
        out (`_TIMED_OUT`: fetch, don't store), or its answer could not be stored.
        """
        deadline = time.monotonic() + self.lock_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _TIMED_OUT
            news = await self.coordinator.wait(request.key, min(self.recheck, remaining))
            if not self.store.inline:
                # Reads after a wait are not the stall's (this task is the fetch's own).
                read_budget(self.read_budget)
            if news == "failed" and stale is not None and stale_if_error_ok(stale, self.clock()):
                # The fetch elsewhere failed upstream: serve our stale copy rather than ask
                # a failing upstream again.
                flight.failed = True
                return self._stale_on_error(request, stale, 0)
            landed = await self._landed(request)
            if isinstance(landed, Entry):
                flight.entry = landed
                names = vary_names(landed)
                flight.vary = vary_values(names, request.headers) if names else None
                flight.marker = _marker(request)
                return self._collapsed(request, landed)
            if isinstance(landed, HitForMiss):
                return _TIMED_OUT  # not storable: fetch our own, like everyone now
            token = await self._lock(request)
            if token is not None:
                return token

    def _collapsed(self, request: RequestInfo, entry: Entry) -> Served:
        self.stats["coalesced"] += 1
        self.stats["HIT"] += 1
        if self.metrics is not None:
            self.metrics.coalesced(request.service)
        now = self.clock()
        return self.render(
            entry, request, now, "HIT", f"hit; ttl={int(entry.ttl_left(now))}; collapsed"
        )

    def _refresh_in_background(
        self, request: RequestInfo, policy: CachePolicy, fetch: Fetch, stale: Entry
    ) -> None:
        if request.key in self._flights:
            return  # one refresh per key at a time
        flight = self._flights[request.key] = _Flight()

        async def refresh() -> None:
            token = None
            if not self.store.inline:
                read_budget(self.read_budget)  # its own reads, not the request's
            try:
                # One refresh per key for the whole fleet: skip if another process has it.
                token = await self._lock(request)
                if token is None:
                    return
                flight.started = request.fetch_started
                fetched = await _conditional(fetch, validators(stale))
                entry: Entry | None = None
                if fetched.status == 304:
                    entry = await self._revalidated(request, policy, stale, fetched)
                elif not _failed(fetched):
                    entry = await self._store(request, policy, fetched, CacheControl({}))
                else:
                    await _discard(fetched)
                flight.entry = entry
                names = vary_names(entry) if entry is not None else []
                flight.vary = vary_values(names, request.headers) if names else None
                flight.marker = _marker(request)
                await self.coordinator.landed(request.key)
            except Exception:
                logger.exception("cachegw: background refresh of %s failed", request.key)
            finally:
                if token is not None:
                    await self.coordinator.release(request.key, token)
                self._drop_flight(request.key, flight)
                flight.done.set()

        task = asyncio.get_running_loop().create_task(refresh())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _lock(self, request: RequestInfo) -> str | None:
        """Ask for the key's lock, across processes; with it, the fetch counts as started
        just before it was asked for: never later than the time the lock tells waiters."""
        started = self.clock()
        token = await self.coordinator.acquire(request.key, self.lock_ttl, started)
        if token is not None:
            request.fetch_started = started
        return token

    async def _holder_superseded(self, request: RequestInfo) -> bool:
        """Whether the fetch holding the key's lock (in any process) started before an
        invalidation of the request's entries that this process knows of."""
        held = await self.coordinator.holder_started(request.key)
        return held is not None and self._superseded(request.scopes, request, held)

    def _fetching(self, request: RequestInfo) -> float:
        """Note that the request's upstream request starts now; returns the time."""
        request.fetch_started = self.clock()
        return request.fetch_started

    def _drop_flight(self, key: str, flight: _Flight) -> None:
        # A newer flight may have replaced this one (see _superseded): leave it.
        if self._flights.get(key) is flight:
            del self._flights[key]
            self._landings[hash(key) % _LANDING_SLOTS] += 1

    def _superseded(self, scopes: list[str], request: RequestInfo, started: float) -> bool:
        """Whether a fetch that started at ``started`` began before an invalidation (a hard
        purge) of the request's entries: its answer must not be stored nor shared."""
        verdict = self.purges.verdict(scopes, started)
        if verdict is None and not request.target:
            verdict = self.purges.verdict((request.target_scope,), started)
        return verdict is not None and verdict[0] == "hard"

    def in_flight(self) -> dict[str, int]:
        """Fetches under way in this process (misses and refreshes) and the requests
        waiting for them (each miss's own request included): for the health endpoint."""
        flights = list(self._flights.values())
        return {"fetches": len(flights), "waiting": sum(f.waiters for f in flights)}

    def start(self) -> None:
        """Start listening for other processes (call from a running event loop)."""
        self.coordinator.start()
        self.purges.start()

    async def aclose(self, grace: float = 5.0) -> None:
        """Wait (bounded) for fetches and refreshes in flight, then cancel the rest."""
        if self._writing:
            await asyncio.wait(set(self._writing), timeout=grace)
        await self.coordinator.aclose()
        await self.purges.aclose(grace)
        if self._background:
            _, pending = await asyncio.wait(set(self._background), timeout=grace)
            for task in pending:
                task.cancel()

    # -- storing ----------------------------------------------------------------------

    async def _revalidated(
        self,
        request: RequestInfo,
        policy: CachePolicy,
        stale: Entry,
        fetched: Fetched,
        writes: _Writes | None = None,
    ) -> Entry:
        """The stored entry updated from a 304 to our conditional request (RFC 9111 §4.3.4);
        freshness is computed again from the merged headers."""
        updated = merge_not_modified(stale, fetched, unstored=self._unstored)
        entry = await self._store(
            request, policy, updated, CacheControl({}), revalidated=stale, writes=writes
        )
        return entry if entry is not None else stale

    async def _store(
        self,
        request: RequestInfo,
        policy: CachePolicy,
        fetched: Fetched,
        request_cc: CacheControl,
        *,
        revalidated: Entry | None = None,
        writes: _Writes | None = None,
    ) -> Entry | None:
        """Store ``fetched`` if the rules allow (`_core.build_entry`); the entry, or None.

        ``revalidated`` is the entry a 304 just confirmed: its policy-derived settings
        (tags, stale windows, sharing) carry over. With ``writes``, the backend writes are
        queued there (see `_write_behind`) and the entry does not claim to be stored.
        """
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
            request_cc=request_cc,
            unstored=self._unstored,
            compress_min=self.compress_min,
        )
        entry, names = build_entry(fetched, storing, policy, now, revalidated=revalidated)
        if entry is None:
            return None
        # Never kept longer than an invalidation of it is remembered (see `invalidate`).
        ttl = min(entry.storage_ttl(now), entry_life(policy))
        if ttl <= 0:
            return None
        if (started and now - started > STORE_WINDOW) or self._superseded(
            entry.tags, request, started
        ):
            # Writes are never undone: an answer whose fetch started before an
            # invalidation of its URI (or too long ago for the record to know) goes to
            # the requests that asked for it, and is not stored. Checked here, at store
            # time against fetch start, so a deferred store is judged the same way.
            entry.stored = False
            return entry
        await self._write_entry(request, policy, entry, names, ttl, now, writes)
        return entry

    async def _write_entry(
        self,
        request: RequestInfo,
        policy: CachePolicy,
        entry: Entry,
        names: list[str],
        ttl: float,
        now: float,
        writes: _Writes | None,
    ) -> None:
        target = request.key
        if names:
            # Responses here vary on request headers (the upstream's Vary and the route's
            # `vary`): the primary key holds a marker naming them, the response lives
            # under a key that includes their values.
            marker = request.primary
            if not isinstance(marker, VaryMarker) or marker.names != names:
                marker = VaryMarker(names=names, stored_at=now, gen=secrets.token_hex(8))
                request.primary = marker  # for requests sharing this fetch (see _miss)
            # The marker outlives this variant: other variants may be kept longer.
            assert policy.max_ttl is not None
            life = policy.max_ttl + policy.stale_window + entry.keep
            await self._put(writes, request.key, marker, max(ttl, min(MAX_STORAGE_TTL, life)))
            target = _variant_key(request.key, marker, request.headers)
        if writes is None:
            entry.stored = await self.store.set(target, entry, ttl)
            return
        entry.stored = False  # until the write lands

        async def write() -> None:
            entry.stored = await self.store.set(target, entry, ttl)

        writes.append(write)

    async def _put(self, writes: _Writes | None, key: str, item: Item, ttl: float) -> None:
        """``store.set`` now, or queued in ``writes``."""
        if writes is None:
            await self.store.set(key, item, ttl)
        else:
            writes.append(lambda: self.store.set(key, item, ttl))

    # -- writes after the answer ------------------------------------------------------

    def _writes(self) -> _Writes | None:
        """A list collecting a request's writes to send them after its answer, or None
        to write at once (a backend in the process: nothing to wait for)."""
        return None if self.store.inline else []

    @staticmethod
    async def _write(writes: _Writes | None, op: Callable[[], Awaitable[Any]]) -> None:
        if writes is None:
            await op()
        else:
            writes.append(op)

    def _write_behind(self, writes: _Writes | None) -> asyncio.Task[None] | None:
        """Run ``writes`` in order in a task of their own (issue 12: a stalled backend
        must not hold the answer). At most `max_writes_in_flight` such tasks: beyond,
        the writes are dropped (the entry is not stored, the lock expires by itself).
        Returns their task, if scheduled: the caller gives it `WRITE_GRACE` to finish."""
        if not writes:
            return None
        if len(self._writing) >= self.max_writes_in_flight:
            self.stats["writes_dropped"] += 1
            now = time.monotonic()
            if now >= self._dropped_at:
                self._dropped_at = now + 1.0
                logger.warning(
                    "cachegw: %d cache writes in flight; dropping new ones until the "
                    "backend keeps up",
                    len(self._writing),
                )
            return None

        async def run() -> None:
            for op in writes:
                try:
                    await op()
                except Exception:  # every op fails open by itself; this is a bug
                    logger.exception("cachegw: a cache write failed")

        task = asyncio.get_running_loop().create_task(run())
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)
        return task

    @staticmethod
    async def _grace(task: asyncio.Task[None] | None) -> None:
        """Wait (briefly) for a request's writes: see `WRITE_GRACE`."""
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=WRITE_GRACE)

    # -- building responses -------------------------------------------------------------

    def _cache_headers(self, cache_status: str, detail: str) -> Headers:
        return [
            (self.status_header, cache_status.encode("ascii")),
            (b"cache-status", f"{self.cache_name}; {detail}".encode("latin-1")),
        ]

    def render(
        self, entry: Entry, request: RequestInfo, now: float, cache_status: str, detail: str
    ) -> Served:
        """What the client gets from a stored entry: its headers with Age and the cache
        status headers, the form its Accept-Encoding takes, 304 for matching validators, no
        body for HEAD."""
        extra = self._cache_headers(cache_status, detail)
        age = int(entry.age(now))
        # RFC 9111 §5.1: Age says the response was not generated for this request; a
        # response just fetched carries only the age it arrived with.
        if age or cache_status in ("HIT", "STALE"):
            extra.insert(0, (b"age", str(age).encode("ascii")))
        headers, body = entry.headers, entry.body
        if entry.coding:  # the form this client accepts (see `_encoding`)
            headers, body = for_client(
                entry.coding, headers, body, request.headers.get("accept-encoding")
            )
        if _not_modified(entry.status, headers, request.headers):
            kept = [(n, v) for n, v in headers if n in _NOT_MODIFIED_KEEP]
            return Served(304, kept + extra, b"", cache_status=cache_status)
        if request.method == "HEAD":
            body = b""
        return Served(entry.status, headers + extra, body, cache_status=cache_status)

    def _passed(self, fetched: Fetched, cache_status: str, detail: str) -> Served:
        unpassed = self._unpassed
        headers = [h for h in fetched.headers if h[0] not in unpassed]
        # A few fixed (status, detail) pairs reach here: their headers are built once.
        extra = self._passed_headers.get((cache_status, detail))
        if extra is None:
            extra = self._passed_headers[cache_status, detail] = self._cache_headers(
                cache_status, detail
            )
        headers += extra
        return Served(
            fetched.status, headers, fetched.body or b"", fetched.stream, cache_status=cache_status
        )


# -- helpers (pure) -------------------------------------------------------------------


def entry_life(policy: CachePolicy) -> float:
    """The longest an entry of a route with ``policy`` is kept: freshness up to
    ``max_ttl``, then the longest of its stale windows and the time kept for revalidation
    (``max_ttl``). Stale windows an upstream asks for beyond that are cut to it."""
    assert policy.max_ttl is not None
    return min(MAX_STORAGE_TTL, policy.max_ttl + max(policy.max_ttl, policy.stale_window))


def _marker(request: RequestInfo) -> VaryMarker | None:
    primary = request.primary
    return primary if isinstance(primary, VaryMarker) else None


def _stored(entry: Entry) -> str:
    """RFC 9211 ``stored``, only when the backend really took the entry."""
    return "; stored" if entry.stored else ""


def _failed(fetched: Fetched) -> bool:
    return fetched.failed or fetched.status >= 500


async def _discard(fetched: Fetched) -> None:
    if fetched.stream is not None:
        aclose = getattr(fetched.stream, "aclose", None)
        if aclose is not None:
            await aclose()


def _variant_key(primary: str, marker: VaryMarker, headers: Mapping[str, str]) -> str:
    return hash_parts(primary, (marker.gen, *vary_values(marker.names, headers)))


def _not_modified(status: int, stored: Headers, headers: Mapping[str, str]) -> bool:
    """Whether the request's validators match a stored response with ``status`` and
    ``stored`` headers (RFC 9110 §13.1.2, §13.1.3)."""
    if status != 200:
        return False
    inm = headers.get("if-none-match")
    if inm is not None:
        etag = next((v for n, v in stored if n == b"etag"), None)
        if etag is None or not valid_etag(etag):
            return False  # an unquoted ETag (stored by an older version) is no validator
        if inm.strip() == "*":
            return True
        ours = _weak(etag.decode("latin-1"))
        return any(_weak(tag) == ours for tag in split_header_list(inm))
    ims = headers.get("if-modified-since")
    if ims is not None:
        since = parse_http_date(ims)
        modified = next((v for n, v in stored if n == b"last-modified"), None)
        if modified is None:
            # No Last-Modified: the Date it was generated at stands in (RFC 9111 §4.3.2).
            modified = next((v for n, v in stored if n == b"date"), None)
        stamp = parse_http_date(modified.decode("latin-1")) if modified else None
        return since is not None and stamp is not None and stamp <= since
    return False


def _weak(tag: str) -> str:
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag
