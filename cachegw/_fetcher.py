"""The engine's fetches: one request's alone, one per key for the requests coalesced on it
(in this process and across the fleet), and background refreshes.

Each step takes the request's `Job` and asks the pure rules of `cachegw._outcome` what
follows (merge a ``304``, store, serve stale on an error, fetch again, mark the key
hit-for-miss, share the answer with the requests waiting); this module does the waiting,
locking and fetching they ask for, `cachegw._writer` the writes and `cachegw._answers`
the answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from cachegw._answers import Answers
from cachegw._core import validators, vary_names
from cachegw._entry import Entry, Headers, HitForMiss, Item, VaryMarker
from cachegw._flight import UNLOCKED, Coordinator
from cachegw._job import Flight, Job
from cachegw._keys import vary_values
from cachegw._models import Fetch, Fetched, RequestInfo, Served
from cachegw._outcome import (
    FetchPath,
    after_fetch,
    after_wait,
    alone_status,
    hit_for_miss,
    landed,
    miss_status,
    stale_on_error,
)
from cachegw._policy import CacheControl, CachePolicy
from cachegw._purge import Purges
from cachegw._store import Store, read_budget
from cachegw._writer import Writer, superseded

__all__ = ["HIT_FOR_MISS_TTL", "LANDING_SLOTS", "Engine", "Fetcher"]

HIT_FOR_MISS_TTL = 10.0  # how long an uncacheable answer keeps a key out of coalescing
#: Ended flights are counted per slot of the key's hash (see `Fetcher.landings`).
LANDING_SLOTS = 256
_TIMED_OUT = "timed-out"  # a "token" meaning: fetch without the lock, and don't store
_NO_DIRECTIVES = CacheControl({})

logger = logging.getLogger("cachegw")


class Engine(Protocol):
    """What the fetcher uses of its engine (`cachegw.CacheEngine`); the settings are read
    at each use, a reload may change them."""

    lock_ttl: float
    lock_timeout: float
    recheck: float
    read_budget: float
    coordinator: Coordinator
    store: Store
    purges: Purges
    clock: Callable[[], float]
    writer: Writer

    def lookup(self, request: RequestInfo) -> Awaitable[tuple[Entry | None, Item | None]]: ...


class Fetcher:
    """Fetches for the engine; holds this process's flights (fetches others may join)."""

    def __init__(self, engine: Engine, answers: Answers) -> None:
        self.engine = engine
        self.coordinator = engine.coordinator
        self.store = engine.store
        self.purges = engine.purges
        self.writer = engine.writer
        self.answers = answers
        self.clock = engine.clock
        self.flights: dict[str, Flight] = {}
        # How many flights ended, per slot of the key's hash. A request whose lookup
        # missed while its key's flight was ending (the answer given, its entry not yet
        # readable) finds no flight to join; the count having moved since its lookup
        # began, it looks again instead of fetching a second time (issue 28: one
        # upstream request per key did not hold on a slow machine).
        self.landings = [0] * LANDING_SLOTS
        self.background: set[asyncio.Task[Any]] = set()

    # -- alone ----------------------------------------------------------------------------

    async def alone(self, job: Job, *, bypass_read: bool) -> Served:
        """Fetch without coalescing: a HEAD not fetched as a GET has no body to store, a
        request with credentials may get a private answer, and the last response for this
        key could not be stored (hit-for-miss)."""
        request, stale = job.request, job.stale
        whole = request.method == "GET" or request.head_as_get  # the fetch gets a body
        self.fetching(request)
        fetched = await _conditional(job.fetch, validators(stale) if whole else [])
        path: FetchPath = "alone" if whole else "head"
        outcome = after_fetch(fetched, stale, path, self.clock())
        job.writes = self.writer.batch()
        entry = None
        if outcome == "merge":
            entry = await self.writer.merge(job, fetched)
        elif outcome == "store":
            entry = await self.writer.store_entry(job, fetched)
        await self.writer.grace(self.writer.behind(job.writes))
        status, detail = alone_status(
            bypass_read=bypass_read,
            merged=outcome == "merge",
            stored=entry is not None,
            shared_only=request.authorized and not request.per_principal,
        )
        return self.answers.fetched(entry, fetched, request, self.clock(), status, detail)

    # -- coalesced ------------------------------------------------------------------------

    async def miss(self, job: Job) -> Served:
        """Join the flight of this process fetching the key, or lead one."""
        request = job.request
        flight = self.flights.get(request.key)
        if flight is not None and self._joinable(flight, request):
            return await self._join(job, flight)
        flight = job.flight = self.flights[request.key] = Flight(waiters=1)
        # The fetch runs in a task of its own: if this request's client goes away, the
        # requests waiting on it still get their answer.
        lead = flight.task = asyncio.get_running_loop().create_task(self._lead(job))
        self.background.add(lead)
        lead.add_done_callback(self.background.discard)
        try:
            return await asyncio.shield(lead)
        finally:
            self.leave(flight)

    def _joinable(self, flight: Flight, request: RequestInfo) -> bool:
        if flight.done.is_set():
            # Ended, its entry still being written (see _lead): its answer serves only
            # while fresh; else this request leads a fetch of its own.
            entry = flight.entry
            if entry is None or entry.ttl_left(self.clock()) <= 0:
                return False
        # A fetch that started before an invalidation: its answer is not for us.
        return not superseded(self.purges, request.scopes, request, flight.started)

    async def _join(self, job: Job, flight: Flight) -> Served:
        """Wait for another request of this process fetching the key; answer from it."""
        request, stale = job.request, job.stale
        flight.waiters += 1
        try:
            await flight.done.wait()
        finally:
            self.leave(flight)
        entry, now = flight.entry, self.clock()
        joined = after_wait(
            entry,
            vary=flight.vary,
            headers=request.headers,
            failed=flight.failed,
            stale=stale,
            now=now,
        )
        if joined == "collapsed" and entry is not None:
            return self.answers.collapsed(entry, request, now)
        if joined == "stale" and stale is not None:
            return self.answers.stale_on_error(stale, request, now, 0)  # don't ask again
        if joined == "own-variant":
            # Fetch our own variant and store it under the leader's marker (a new marker
            # would orphan the leader's variant). Ordered against our own fetch start.
            if flight.marker is not None:
                request.primary = flight.marker
            return await self.alone(job, bypass_read=request.forced)
        # The answer was not storable: fetch our own.
        return self.answers.counted(await job.fetch(), "MISS", "fwd=uri-miss")

    def leave(self, flight: Flight) -> None:
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

    async def _lead(self, job: Job) -> Served:
        """Fetch for every request of this process waiting on the job's flight, and with
        the other processes of the fleet: one upstream request per key."""
        request, flight = job.request, job.flight
        assert flight is not None
        job.writes = self.writer.batch()
        try:
            waited = await self._take_lock(job)
            if waited is not None:
                return waited
            try:
                led = await self._fetch_led(job)
                if isinstance(led, Served):
                    return led
                fetched, entry = led
            finally:
                if job.token != _TIMED_OUT:
                    key, held = request.key, job.token
                    await self.writer.later(job.writes, lambda: self.coordinator.release(key, held))
        finally:
            # The answer is ready: the store, the landing message and the lock release
            # happen in that order, in a task of their own that the answer waits for only
            # briefly (WRITE_GRACE).
            behind = self.writer.behind(job.writes)
            flight.done.set()
            # Requests arriving until the entry is readable join the ended flight.
            if behind is None:
                self.drop(request.key, flight)
            else:
                key = request.key
                behind.add_done_callback(lambda _: self.drop(key, flight))
        await self.writer.grace(behind)
        status, fwd = miss_status(job.stale, request.forced)
        return self.answers.fetched(entry, fetched, request, self.clock(), status, fwd)

    async def _take_lock(self, job: Job) -> Served | None:
        """Take the key's lock for the job (``job.token``), or an answer from the fetch
        another process made while this one waited."""
        request = job.request
        token = await self.lock(request)
        if token is None and await self._holder_superseded(request):
            # The fetch holding the lock started before an invalidation this process
            # knows of: its answer will not be stored. Fetch now, without the lock.
            token = UNLOCKED
            self.fetching(request)
        if token is None:
            waited = await self._wait_for_fleet(job)
            if isinstance(waited, Served):
                return waited
            token = waited
            if token == _TIMED_OUT:
                # Like nginx after proxy_cache_lock_timeout: everyone waiting here
                # goes upstream now, in parallel, and nobody stores.
                assert job.flight is not None
                self.drop(request.key, job.flight)
                job.flight.done.set()
        job.token = token
        return None

    async def _fetch_led(self, job: Job) -> Served | tuple[Fetched, Entry | None]:
        """The leader's fetch, holding the key's lock: the response and the entry stored
        from it, or the stale entry served instead of an upstream failure."""
        request, flight, stale = job.request, job.flight, job.stale
        assert flight is not None
        path: FetchPath = "timed-out" if job.token == _TIMED_OUT else "led"
        if path == "timed-out":
            self.fetching(request)
        # Otherwise the fetch counts as started when the lock was asked for (see lock).
        flight.started = request.fetch_started
        if flight.abandoned:
            raise asyncio.CancelledError  # everyone left while it waited for the lock
        flight.fetching = True
        try:
            fetched = await _conditional(job.fetch, validators(stale))
        finally:
            flight.fetching = False
        outcome = after_fetch(fetched, stale, path, self.clock())
        if outcome in ("stale", "failed"):
            flight.failed = True  # waiters holding a stale entry serve it
        if outcome == "stale" and stale is not None:
            await _discard(fetched)
            await self._landed(job, failed=True)
            return self.answers.stale_on_error(stale, request, self.clock(), fetched.status)
        entry = None
        if outcome == "merge":
            entry = await self.writer.merge(job, fetched)
        elif outcome == "store":
            entry = await self.writer.store_entry(job, fetched)
        elif outcome == "refetch":
            fetched = await job.fetch()  # a 304 not ours to answer
        if hit_for_miss(entry, fetched, job.empty, path, job.cc):
            marker = HitForMiss(stored_at=self.clock())
            await self.writer.put(job.writes, request.key, marker, HIT_FOR_MISS_TTL)
        _share(flight, entry, request)
        await self._landed(job)
        return fetched, entry

    async def _landed(self, job: Job, *, failed: bool = False) -> None:
        """Tell the other processes the key's fetch ended (after the job's writes)."""
        if self.coordinator.shared:
            key = job.request.key
            await self.writer.later(job.writes, lambda: self.coordinator.landed(key, failed=failed))

    async def _wait_for_fleet(self, job: Job) -> Served | str:
        """Another process holds the key's lock: wait until its answer lands.

        Returns the response from the landed entry, or a lock token when this process
        should fetch after all: the holder vanished (we took the lock) or the wait timed
        out (`_TIMED_OUT`: fetch, don't store), or its answer could not be stored.
        """
        request, stale, engine = job.request, job.stale, self.engine
        deadline = time.monotonic() + engine.lock_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _TIMED_OUT
            news = await self.coordinator.wait(request.key, min(engine.recheck, remaining))
            if not self.store.inline:
                # Reads after a wait are not the stall's (this task is the fetch's own).
                read_budget(engine.read_budget)
            now = self.clock()
            if news == "failed" and stale is not None and stale_on_error(stale, now):
                # The fetch elsewhere failed upstream: serve our stale copy rather than ask
                # a failing upstream again.
                assert job.flight is not None
                job.flight.failed = True
                return self.answers.stale_on_error(stale, request, now, 0)
            found, primary = await engine.lookup(request)
            verdict = None if found is None else self.purges.verdict(found.tags, found.fetched_at)
            got = landed(
                found,
                primary,
                verdict,
                forced=request.forced,
                started=request.started,
                now=self.clock(),
            )
            if isinstance(got, Entry):
                assert job.flight is not None
                _share(job.flight, got, request)
                return self.answers.collapsed(got, request, self.clock())
            if isinstance(got, HitForMiss):
                return _TIMED_OUT  # not storable: fetch our own, like everyone now
            token = await self.lock(request)
            if token is not None:
                return token

    # -- background refreshes -------------------------------------------------------------

    def refresh(
        self, request: RequestInfo, policy: CachePolicy, fetch: Fetch, stale: Entry
    ) -> None:
        """Refresh ``stale`` in a task of its own: one refresh per key at a time."""
        if request.key in self.flights:
            return
        flight = self.flights[request.key] = Flight()
        job = Job(request, policy, fetch, _NO_DIRECTIVES, stale=stale, flight=flight)
        task = asyncio.get_running_loop().create_task(self._refresh(job, flight))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _refresh(self, job: Job, flight: Flight) -> None:
        request, token = job.request, None
        if not self.store.inline:
            read_budget(self.engine.read_budget)  # its own reads, not the request's
        try:
            # One refresh per key for the whole fleet: skip if another process has it.
            token = await self.lock(request)
            if token is None:
                return
            flight.started = request.fetch_started
            fetched = await _conditional(job.fetch, validators(job.stale))
            outcome = after_fetch(fetched, job.stale, "refresh", self.clock())
            entry: Entry | None = None
            if outcome == "merge":
                entry = await self.writer.merge(job, fetched)
            elif outcome == "store":
                entry = await self.writer.store_entry(job, fetched)
            else:
                await _discard(fetched)
            _share(flight, entry, request)
            await self.coordinator.landed(request.key)
        except Exception:
            logger.exception("cachegw: background refresh of %s failed", request.key)
        finally:
            if token is not None:
                await self.coordinator.release(request.key, token)
            self.drop(request.key, flight)
            flight.done.set()

    # -- locks and flights ----------------------------------------------------------------

    async def lock(self, request: RequestInfo) -> str | None:
        """Ask for the key's lock, across processes; with it, the fetch counts as started
        just before it was asked for: never later than the time the lock tells waiters."""
        started = self.clock()
        token = await self.coordinator.acquire(request.key, self.engine.lock_ttl, started)
        if token is not None:
            request.fetch_started = started
        return token

    async def _holder_superseded(self, request: RequestInfo) -> bool:
        """Whether the fetch holding the key's lock (in any process) started before an
        invalidation of the request's entries that this process knows of."""
        held = await self.coordinator.holder_started(request.key)
        return held is not None and superseded(self.purges, request.scopes, request, held)

    def fetching(self, request: RequestInfo) -> float:
        """Note that the request's upstream request starts now; returns the time."""
        request.fetch_started = self.clock()
        return request.fetch_started

    def drop(self, key: str, flight: Flight) -> None:
        """The flight ended: requests for the key no longer join it."""
        # A newer flight may have replaced this one (see superseded): leave it.
        if self.flights.get(key) is flight:
            del self.flights[key]
            self.landings[hash(key) % LANDING_SLOTS] += 1

    def in_flight(self) -> dict[str, int]:
        """Fetches under way in this process (misses and refreshes) and the requests
        waiting for them (each miss's own request included): for the health endpoint."""
        flights = list(self.flights.values())
        return {"fetches": len(flights), "waiting": sum(f.waiters for f in flights)}

    async def aclose(self, grace: float) -> None:
        """Wait (bounded) for fetches and refreshes in flight, then cancel the rest."""
        if self.background:
            _, pending = await asyncio.wait(set(self.background), timeout=grace)
            for task in pending:
                task.cancel()


def _share(flight: Flight, entry: Entry | None, request: RequestInfo) -> None:
    """What the requests waiting on ``flight`` answer from: ``entry``, which the request's
    headers fetched (and the Vary marker it is stored under)."""
    flight.entry = entry
    if entry is not None:
        names = vary_names(entry)
        flight.vary = vary_values(names, request.headers) if names else None
        primary = request.primary
        flight.marker = primary if isinstance(primary, VaryMarker) else None


def _conditional(fetch: Fetch, validators: Headers) -> Awaitable[Fetched]:
    return fetch(validators) if validators else fetch()


async def _discard(fetched: Fetched) -> None:
    if fetched.stream is not None:
        aclose = getattr(fetched.stream, "aclose", None)
        if aclose is not None:
            await aclose()
