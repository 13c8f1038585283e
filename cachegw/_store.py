"""Access to a fastapi-cache2 `Backend` that can never hurt a request.

Every operation has a deadline and fails open (an error is "no entry" / "not stored"),
and a circuit breaker stops waiting on a sick backend: after ``failures`` consecutive
errors the store answers at once without calling the backend for ``cooldown`` seconds,
then lets one probe through; a success closes the circuit again. This is how a Redis
outage degrades to uncached proxying instead of a slow gateway (Souin fails open after
10 ms per operation; we default to 250 ms, see OP_TIMEOUT).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar, Token
from typing import Any, TypeVar

from cachegw import _entry
from cachegw._backends._base import OP_TIMEOUT, CacheBackend, is_inline
from cachegw._entry import Entry, Item

__all__ = [
    "L1",
    "OP_TIMEOUT",
    "READ_BUDGET",
    "Breaker",
    "Store",
    "end_read_budget",
    "read_budget",
    "read_time_left",
]

#: Default time one request may spend on backend reads, all of them together (the
#: lookup, a Vary variant, the purge record, the lock): a stalled Redis costs a request
#: at most this much before it is answered uncached (issue 12), not a deadline per read.
READ_BUDGET = OP_TIMEOUT

# When the current request's backend reads must be done (event-loop time), if it has a
# budget: a context variable, so a request's own tasks (the fetch it leads) share it.
_read_deadline: ContextVar[float | None] = ContextVar("cachegw_read_deadline", default=None)


def read_budget(seconds: float, *, until: float | None = None) -> tuple[float, Token[float | None]]:
    """Give the current request (task) ``seconds`` for its backend reads from now on, or
    the rest of a budget that ends at ``until`` (event-loop time). Returns the end, and
    the token for `end_read_budget` (which the caller must call when the request is done
    unless the task ends with it)."""
    deadline = asyncio.get_running_loop().time() + seconds if until is None else until
    return deadline, _read_deadline.set(deadline)


def end_read_budget(token: Token[float | None]) -> None:
    """Back to the budget (or none) that was current before `read_budget`."""
    _read_deadline.reset(token)


def read_time_left(op_timeout: float) -> float:
    """How long the next backend read of the current request may take: its operation
    deadline, or less when the request's read budget runs out sooner (<= 0: spent)."""
    deadline = _read_deadline.get()
    if deadline is None:
        return op_timeout
    return min(op_timeout, deadline - asyncio.get_running_loop().time())


# Values read from a remote backend and what they decoded to (see `Store.get`): at most
# this many bytes of values (the decoded items, mostly shared with the L1, at most as many
# again), each at most _DECODED_MAX_VALUE.
DECODED_MAX_BYTES = 8 * 1024 * 1024
_DECODED_MAX_VALUE = 64 * 1024

#: Bytes an L1 item costs besides its key, body, headers and tags: the decoded `Entry`,
#: its header list and tuples, the L1's slot (measured on CPython 3.11 x86-64 with
#: ``tracemalloc``: 450-600 bytes for a gateway entry with 8 headers and 3 tags, counted
#: below as this plus ``HEADER_OVERHEAD`` per header and tag).
ITEM_OVERHEAD = 400
HEADER_OVERHEAD = 100


def item_size(key: str, item: Item) -> int:
    """The bytes an L1 holding ``item`` under ``key`` keeps alive (see `L1`)."""
    size = len(key) + ITEM_OVERHEAD
    if isinstance(item, Entry):
        size += len(item.body) + HEADER_OVERHEAD * (len(item.headers) + len(item.tags))
        for name, value in item.headers:
            size += len(name) + len(value)
        for tag in item.tags:
            size += len(tag)
    return size


logger = logging.getLogger("cachegw")

T = TypeVar("T")


class Breaker:
    """Consecutive-failure circuit breaker with a half-open probe."""

    def __init__(
        self,
        *,
        failures: int = 5,
        cooldown: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self.clock = clock
        self._failed = 0
        self._open_until = 0.0
        self._probing = False
        self.on_change: Callable[[bool], None] | None = None

    @property
    def open(self) -> bool:
        return self._failed >= self.failures

    def allow(self) -> bool:
        """Whether an operation may go to the backend now."""
        if not self.open:
            return True
        if self._probing or self.clock() < self._open_until:
            return False
        self._probing = True  # one probe at a time while half-open
        return True

    def success(self) -> None:
        was_open = self.open
        self._failed = 0
        self._probing = False
        if was_open:
            logger.warning("cachegw: cache backend answers again; circuit closed")
            if self.on_change is not None:
                self.on_change(False)

    def failure(self) -> None:
        was_open = self.open
        self._failed += 1
        self._probing = False
        if self.open:
            self._open_until = self.clock() + self.cooldown
            if not was_open:
                logger.warning(
                    "cachegw: cache backend failed %d times in a row; circuit open, "
                    "serving uncached and probing every %gs",
                    self._failed,
                    self.cooldown,
                )
                if self.on_change is not None:
                    self.on_change(True)


class L1:
    """Decoded entries kept in the process, in front of the backend.

    In front of a remote backend (Redis) an entry is reused for ``ttl`` seconds without
    asking the backend; other processes' changes to a key reach this copy through
    `forget` (the landing channel) or after ``ttl`` at the latest. In front of the
    memory backend it only saves decoding: it is used when the backend still holds the
    very same bytes (checked by identity), so it is never stale.

    Bounded by entry count and by bytes: everything an item keeps alive counts (its key,
    body, headers and tags, `item_size`) and so do the answers the fast path builds from
    it (`charge`); the oldest entries go first. An item that leaves drops those answers.
    """

    def __init__(self, *, max_entries: int, max_bytes: int, ttl: float) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.bytes = 0
        self._items: dict[str, tuple[float, object, Item, int]] = {}

    def get(self, key: str, data: object = None) -> Item | None:
        """The decoded item for ``key``: when ``data`` is given, only if it was decoded
        from that very object; otherwise only while younger than ``ttl``."""
        found = self._items.get(key)
        if found is None:
            return None
        if data is not None:
            return found[2] if found[1] is data else None
        if time.monotonic() < found[0]:
            return found[2]
        self.forget(key)
        return None

    def put(self, key: str, item: Item, data: object = None) -> None:
        if not self.max_entries:
            return
        self.forget(key)
        size = item_size(key, item)
        if size > self.max_bytes:
            return
        self._items[key] = (time.monotonic() + self.ttl, data, item, size)
        self.bytes += size
        self._bound()

    def charge(self, key: str, extra: int) -> bool:
        """Count ``extra`` more bytes (fewer when negative) for the item under ``key``;
        whether it is still held afterwards (the bound may push it out, then with its
        answers: see `Entry.answers`)."""
        found = self._items.get(key)
        if found is None:
            return False
        self._items[key] = (*found[:3], found[3] + extra)
        self.bytes += extra
        self._bound()
        return key in self._items

    def _bound(self) -> None:
        items = self._items
        while len(items) > self.max_entries or self.bytes > self.max_bytes:
            self.forget(next(iter(items)))

    def stats(self) -> dict[str, int]:
        """Its size and bounds: ``entries``, ``bytes``, ``max_entries``, ``max_bytes``."""
        return {
            "entries": len(self._items),
            "bytes": self.bytes,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
        }

    def forget(self, key: str) -> None:
        found = self._items.pop(key, None)
        if found is not None:
            self.bytes -= found[3]
            item = found[2]
            if isinstance(item, Entry):
                item.answers = None  # counted here: they go with it

    def clear(self) -> None:
        """Drop every copy."""
        self._items.clear()
        self.bytes = 0


class Store:
    """Entries in a `CacheBackend`: encode/decode, deadlines, breaker, error counting, L1."""

    def __init__(
        self,
        backend: CacheBackend,
        *,
        op_timeout: float = OP_TIMEOUT,
        breaker: Breaker | None = None,
        on_error: Callable[[str, BaseException], None] | None = None,
        l1: L1 | None = None,
    ) -> None:
        self.backend = backend
        self.op_timeout = op_timeout
        self.breaker = breaker or Breaker()
        self.on_error = on_error
        self.errors = 0
        self._quiet_until = 0.0
        # An in-process backend never blocks: called synchronously, no deadline needed.
        self._inline = backend if is_inline(backend) else None
        self.inline = self._inline is not None
        # A backend whose client bounds its own operations (RedisBackend.from_url with our
        # timeouts) needs no second deadline, unless this store was given a tighter one.
        self._bounded = backend.bounded and op_timeout >= backend.op_timeout
        self.l1 = l1 if l1 is not None else L1(max_entries=4096, max_bytes=32 << 20, ttl=1.0)
        # Values read from a remote backend and what they decoded to (see get).
        self._decoded: dict[str, tuple[bytes, Item]] = {}
        self._decoded_bytes = 0
        if self._inline is not None and hasattr(self._inline, "on_evict"):
            # What the memory backend lets go of leaves the L1 too: its decoded copy (and
            # the answers built from it) must not outlive it.
            self._inline.on_evict = self.l1.forget
        self._probes: set[asyncio.Task[Any]] = set()
        # Redis Cluster: one breaker per node (issue 23), so a dead shard does not turn
        # the live ones off. `breaker` then stands for "some node's circuit is open".
        self._node_of: Callable[[str], str | None] | None = getattr(backend, "node_of", None)
        self._node_breakers: dict[str, Breaker] = {}
        #: When set and false, entries are not read from a remote backend (the shared
        #: purge record that says whether they are still valid cannot be read).
        self.gate: Callable[[], bool] | None = None

    def breaker_for(self, key: str | None) -> Breaker:
        """The breaker guarding ``key``'s node: per node on a cluster, else `breaker`."""
        if key is None or self._node_of is None:
            return self.breaker
        node = self._node_of(key)
        if node is None:
            return self.breaker
        found = self._node_breakers.get(node)
        if found is None:
            found = self._node_breakers[node] = Breaker(
                failures=self.breaker.failures,
                cooldown=self.breaker.cooldown,
                clock=self.breaker.clock,
            )
            found.on_change = self._node_changed
        return found

    @property
    def circuit_open(self) -> bool:
        """Whether a circuit is open: the backend's, or one node's of a cluster."""
        return self.breaker.open or any(b.open for b in self._node_breakers.values())

    @property
    def open_nodes(self) -> list[str]:
        """The cluster nodes whose circuit is open."""
        return sorted(node for node, b in self._node_breakers.items() if b.open)

    def _node_changed(self, opened: bool) -> None:
        if self.breaker.on_change is not None:
            self.breaker.on_change(self.circuit_open)

    async def _call(
        self,
        op: str,
        make: Callable[[], Awaitable[T]],
        default: T,
        *,
        read: bool = False,
        key: str | None = None,
    ) -> T:
        # A read counts against the request's read budget; writes (done after the answer
        # was sent, see CacheEngine) have the operation deadline.
        timeout = read_time_left(self.op_timeout) if read else self.op_timeout
        if timeout <= 0:
            return default  # the request's budget is spent: not asked, not a failure
        breaker = self.breaker_for(key)
        was_open = breaker.open
        if not breaker.allow():
            return default
        if was_open:
            # The breaker lets one probe through: it runs in the background, so no request
            # waits on a backend that was failing a moment ago (issue 12).
            probe = asyncio.get_running_loop().create_task(
                self._attempt(op, make, default, self.op_timeout, breaker)
            )
            self._probes.add(probe)
            probe.add_done_callback(self._probes.discard)
            return default
        return await self._attempt(op, make, default, timeout, breaker)

    async def _attempt(
        self,
        op: str,
        make: Callable[[], Awaitable[T]],
        default: T,
        seconds: float,
        breaker: Breaker,
    ) -> T:
        try:
            if self._bounded:
                # The client's socket timeouts bound it; they count time waiting on Redis,
                # not the event loop's queueing (a loaded loop must not fail healthy reads).
                # A read thus overruns the budget by at most what remained of it.
                result = await make()
            else:
                async with asyncio.timeout(seconds):
                    result = await make()
        except Exception as exc:
            breaker.failure()
            self._failed(op, exc)
            return default
        breaker.success()
        return result

    def _failed(self, op: str, exc: BaseException) -> None:
        self.errors += 1
        if self.on_error is not None:
            self.on_error(op, exc)
        # At most one line a second: an outage must not flood the log (the metrics count
        # every failure, and the breaker logs when it opens and closes).
        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + 1.0
            logger.warning(
                "cachegw: backend %s failed (%s: %s); serving uncached",
                op,
                type(exc).__name__,
                exc or "timed out",
            )

    async def get(self, key: str) -> Item | None:
        l1 = self.l1
        if self._inline is not None:
            data = self._inline.get_nowait(key)
            if data is None:
                return None
            item = l1.get(key, data)
            if item is not None:
                return item
        else:
            item = l1.get(key)
            if item is not None:
                return item
            if self.gate is not None and not self.gate():
                return None
            data = await self._call("get", lambda: self.backend.get(key), None, read=True, key=key)
            if data is None:
                return None
            # The same bytes as last time (a hot key): reuse what they decoded to. This is
            # no copy of the backend's state, only of the decoding, checked byte for byte.
            decoded = self._decoded.get(key)
            if decoded is not None and decoded[0] == data:
                l1.put(key, decoded[1])
                return decoded[1]
        item = _entry.decode(data)
        if item is None:
            logger.warning("cachegw: dropping undecodable cache value at %s", key)
            await self.delete(key)
            return None
        if self._inline is not None:
            l1.put(key, item, data)
        else:
            l1.put(key, item)
            if len(data) <= _DECODED_MAX_VALUE:
                kept = self._decoded
                old = kept.pop(key, None)
                if old is not None:
                    self._decoded_bytes -= len(old[0])
                while kept and self._decoded_bytes + len(data) > DECODED_MAX_BYTES:
                    self._decoded_bytes -= len(kept.pop(next(iter(kept)))[0])
                kept[key] = (data, item)
                self._decoded_bytes += len(data)
        return item

    async def set(self, key: str, item: Item, ttl: float) -> bool:
        """Store ``item``; whether the backend took it."""
        data = _entry.encode(item)
        if self._inline is not None:
            self._inline.set_nowait(key, data, ttl)
            self.l1.put(key, item, data)
            return True

        async def write() -> bool:
            await self.backend.set(key, data, ttl)
            return True

        # Into L1 only once the backend has it: an outage means no cache, not a local one.
        if await self._call("set", write, False, key=key):
            self.l1.put(key, item)
            return True
        return False

    def peek(self, key: str) -> Item | None:
        """The item for ``key`` if it can be had without I/O and without decoding: from
        the memory backend with its decoded copy, or from the L1. Else None."""
        if self._inline is not None:
            data = self._inline.get_nowait(key)
            return None if data is None else self.l1.get(key, data)
        return self.l1.get(key)

    def forget(self, key: str) -> None:
        """Drop the process's copy of ``key`` (another process changed it)."""
        self.l1.forget(key)
        old = self._decoded.pop(key, None)
        if old is not None:
            self._decoded_bytes -= len(old[0])

    def forget_all(self) -> None:
        """Drop every copy of a remote backend's entries (they can no longer be checked
        against the shared purge record: see `RedisPurges.on_unreachable`)."""
        if self._inline is None:
            self.l1.clear()
            self._decoded.clear()

    async def delete(self, key: str) -> None:
        self.forget(key)
        if self._inline is not None:
            self._inline.delete_nowait(key)
            return
        await self._call("delete", lambda: self.backend.delete(key), False, key=key)
