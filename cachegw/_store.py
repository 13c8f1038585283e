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
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi_cache.types import Backend

from cachegw import _entry
from cachegw._entry import Item

__all__ = ["OP_TIMEOUT", "Breaker", "Store"]

#: Default deadline of one backend operation (seconds). The deadline is wall-clock time
#: on the event loop, so it includes the loop's own queueing: with 100 concurrent
#: requests on this 2-core machine (the cache-tests suite) 100 ms still timed out
#: healthy Redis operations now and then (9-40 per run), 250 ms never did. A stalled
#: Redis costs at most `failures` such waits before the breaker stops asking it; a
#: stopped one fails at once (connection refused).
OP_TIMEOUT = 0.25

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


class Store:
    """Entries in a backend: encode/decode, deadlines, breaker, error counting."""

    def __init__(
        self,
        backend: Backend,
        *,
        op_timeout: float = OP_TIMEOUT,
        breaker: Breaker | None = None,
        on_error: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self.backend = backend
        self.op_timeout = op_timeout
        self.breaker = breaker or Breaker()
        self.on_error = on_error
        self.errors = 0
        self._quiet_until = 0.0
        # Our MemoryBackend never blocks: call it synchronously, no deadline needed.
        self.inline = bool(getattr(backend, "inline", False))
        # fastapi-cache2's own backends take whole seconds and read 0 as "no expiry"
        # (Redis) or "expire now" (InMemoryBackend): they get ceil(ttl) >= 1.
        self._float_ttl = hasattr(backend, "delete")

    async def _call(self, op: str, make: Callable[[], Awaitable[T]], default: T) -> T:
        if not self.breaker.allow():
            return default
        try:
            async with asyncio.timeout(self.op_timeout):
                result = await make()
        except KeyError:
            # fastapi-cache2's InMemoryBackend.clear(key=) raises on a missing key.
            self.breaker.success()
            return default
        except Exception as exc:
            self.breaker.failure()
            self._failed(op, exc)
            return default
        self.breaker.success()
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
        if self.inline:
            data = self.backend.get_nowait(key)  # type: ignore[attr-defined]
        else:
            data = await self._call("get", lambda: self.backend.get(key), None)
        if data is None:
            return None
        item = _entry.decode(data)
        if item is None:
            logger.warning("cachegw: dropping undecodable cache value at %s", key)
            await self.delete(key)
        return item

    async def set(self, key: str, item: Item, ttl: float) -> None:
        data = _entry.encode(item)
        if self.inline:
            self.backend.set_nowait(key, data, ttl)  # type: ignore[attr-defined]
            return
        expire: Any = ttl if self._float_ttl else max(1, math.ceil(ttl))
        await self._call("set", lambda: self.backend.set(key, data, expire), None)

    async def delete(self, key: str) -> None:
        if self.inline:
            self.backend.delete_nowait(key)  # type: ignore[attr-defined]
            return
        delete = getattr(self.backend, "delete", None)
        if delete is not None:
            await self._call("delete", lambda: delete(key), None)
        else:
            await self._call("delete", lambda: self.backend.clear(key=key), 0)
