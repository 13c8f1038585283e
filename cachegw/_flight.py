"""Single-flight across processes: one upstream request per key for the whole fleet.

Inside a process the engine coalesces concurrent misses itself. Across processes that
share Redis, the process that starts a fetch holds a lock (``SET key:lock token NX PX``,
with a TTL, so a crashed holder cannot wedge the key) and, once the response is stored
(or known not to be storable), publishes the key on a channel. Waiting processes are
woken by that message and read the entry: no fixed re-check interval like nginx's
500 ms. A slow poll (every ``recheck`` seconds) backs the message up, so a lost message
or a holder that died only costs time, and a waiter whose holder vanished takes the
lock itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

from cachegw._backends import OP_TIMEOUT, CacheBackend, RedisBackend, close_redis
from cachegw._store import Breaker, read_time_left

__all__ = ["UNLOCKED", "Coordinator", "RedisCoordinator", "Waiters", "coordinator_for"]

#: The token of a fetch that went ahead without a lock because Redis failed.
UNLOCKED = "unlocked"

logger = logging.getLogger("cachegw")


class Waiters:
    """Requests waiting in this process for a key's flight in another process to land."""

    def __init__(self) -> None:
        self._by_key: dict[str, list[asyncio.Future[str]]] = {}

    async def wait(self, key: str, seconds: float) -> str | None:
        """What became of the flight ("landed", "failed"), or None after ``seconds``."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        waiters = self._by_key.setdefault(key, [])
        waiters.append(future)
        try:
            try:
                return await asyncio.wait_for(future, seconds)
            except TimeoutError:
                return None
        finally:
            waiters.remove(future)
            if not waiters:
                del self._by_key[key]

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def wake(self, key: str, outcome: str) -> bool:
        """Tell ``key``'s waiters ``outcome``; whether anyone was waiting."""
        waiters = self._by_key.get(key)
        for future in waiters or ():
            if not future.done():
                future.set_result(outcome)
        return bool(waiters)


class Coordinator:
    """No other processes to coordinate with: every lock is granted."""

    #: Whether waiting on another process can ever happen.
    shared = False

    async def acquire(self, key: str, ttl: float, started: float | None = None) -> str | None:
        """A token when this process may fetch ``key``; None when another one is.
        ``started``: when the fetch counts as started, for `holder_started`."""
        return "local"

    async def holder_started(self, key: str) -> float | None:
        """When the fetch holding ``key``'s lock started, if known."""
        return None

    async def release(self, key: str, token: str) -> None:
        """Give the lock back (only if still ours)."""

    async def landed(self, key: str, *, failed: bool = False) -> None:
        """Tell waiting processes that ``key`` has its answer (``failed``: the upstream
        failed and nothing new was stored)."""

    async def wait(self, key: str, seconds: float) -> str | None:
        """Wait until ``key`` lands or ``seconds`` pass: ``"landed"``, ``"failed"`` (the
        fetch ended with an upstream failure) or None (no news)."""
        await asyncio.sleep(seconds)
        return None

    def start(self) -> None:
        """Begin listening (needs a running loop)."""

    async def aclose(self) -> None:
        """Stop listening."""


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisCoordinator(Coordinator):
    """Locks and wake-ups through Redis, for processes sharing it."""

    shared = True

    def __init__(self, client: Any, prefix: str, *, op_timeout: float = OP_TIMEOUT) -> None:
        self.client = client
        self.channel = f"{prefix}:landed"
        self.op_timeout = op_timeout
        self._waiters = Waiters()
        self._task: asyncio.Task[None] | None = None
        #: Called with every key another process (or this one) announces as changed.
        self.on_landed: Callable[[str], None] | None = None
        #: The store's circuit breaker: while it is open, no lock is asked for.
        self.breaker: Breaker | None = None
        #: On a cluster, the breaker of the node a key lives on (the store's, per node).
        self.breaker_for: Callable[[str], Breaker] | None = None
        self._release = client.register_script(_RELEASE)

    def _open(self, key: str) -> bool:
        """Whether the circuit of the node holding ``key`` (of Redis) is open."""
        if self.breaker_for is not None:
            return self.breaker_for(key).open
        return self.breaker is not None and self.breaker.open

    async def acquire(self, key: str, ttl: float, started: float | None = None) -> str | None:
        if self._open(f"{key}:lock"):
            return UNLOCKED  # Redis is known to be sick: don't wait on it for a lock
        timeout = read_time_left(self.op_timeout)
        if timeout <= 0:
            return UNLOCKED  # the request's read budget is spent: fetch without the fleet
        token = secrets.token_hex(8)
        if started is not None:
            # Waiters read it (`holder_started`): a fetch that started before an
            # invalidation they know of is not worth waiting for.
            token += f"@{started!r}"
        try:
            async with asyncio.timeout(timeout):
                got = await self.client.set(
                    f"{key}:lock", token, nx=True, px=max(1, int(ttl * 1000))
                )
        except Exception as exc:
            # Redis is sick: fetch without the fleet (fail open), the breaker-protected
            # store will not be able to save the answer anyway.
            logger.debug("cachegw: lock for %s failed: %s", key, exc)
            return UNLOCKED
        return token if got else None

    async def holder_started(self, key: str) -> float | None:
        if self._open(f"{key}:lock"):
            return None
        timeout = read_time_left(self.op_timeout)
        if timeout <= 0:
            return None
        try:
            async with asyncio.timeout(timeout):
                value = await self.client.get(f"{key}:lock")
        except Exception as exc:
            logger.debug("cachegw: reading the lock of %s failed: %s", key, exc)
            return None
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        _, _, started = (value or "").partition("@")
        try:
            return float(started)
        except ValueError:
            return None  # no holder any more, or one that does not say

    async def release(self, key: str, token: str) -> None:
        if token == UNLOCKED or self._open(f"{key}:lock"):
            return  # the lock expires by itself
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.op_timeout):
                await self._release(keys=[f"{key}:lock"], args=[token])

    async def landed(self, key: str, *, failed: bool = False) -> None:
        if self._open(self.channel):
            return  # waiters re-check by themselves; don't wait on a sick Redis
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.op_timeout):
                await self.client.publish(self.channel, f"!{key}" if failed else key)

    async def wait(self, key: str, seconds: float) -> str | None:
        return await self._waiters.wait(key, seconds)

    def _wake(self, message: str) -> None:
        failed = message.startswith("!")
        key = message[1:] if failed else message
        if self.on_landed is not None:
            self.on_landed(key)
        self._waiters.wake(key, "failed" if failed else "landed")

    async def _listen(self) -> None:
        # A cluster client subscribes on the node owning the channel's slot; classic
        # PUBLISH reaches every node, so any one node hears every landing. Before
        # redis-py 8.0 the asyncio cluster client had no pub/sub: waiters re-check then.
        if not hasattr(self.client, "pubsub"):
            return
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        self._wake(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis gone: waiters fall back to re-checking
                logger.debug("cachegw: landing channel lost (%s); resubscribing", exc)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await close_redis(pubsub)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def coordinator_for(backend: CacheBackend, prefix: str) -> Coordinator:
    """Redis coordination when ``backend`` is cachegw's `RedisBackend`, else none.

    fastapi-cache2's Redis backend shares purges (`_purge.purges_for`) but not fetches:
    its `@cached` routes keep coalescing per process, as they always did.
    """
    if isinstance(backend, RedisBackend):
        return RedisCoordinator(backend.client, prefix, op_timeout=backend.op_timeout)
    return Coordinator()
