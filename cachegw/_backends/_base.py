"""`CacheBackend`: what the engine needs of a cache backend, declared once.

cachegw's `MemoryBackend` and `RedisBackend` implement it (they are also fastapi-cache2
``Backend`` subclasses, so ``FastAPICache.init`` takes them); any other fastapi-cache2
backend is wrapped by `FastAPICacheAdapter` (see `cachegw._backends._build`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol, TypeGuard

if TYPE_CHECKING:
    from fastapi_cache.types import Backend
    from redis.asyncio import Redis, RedisCluster

__all__ = ["OP_TIMEOUT", "CacheBackend", "FastAPICacheAdapter", "InlineBackend", "is_inline"]

#: Default deadline of one backend operation (seconds). The deadline is wall-clock time
#: on the event loop, so it includes the loop's own queueing: with 100 concurrent
#: requests on this 2-core machine (the cache-tests suite) 100 ms still timed out
#: healthy Redis operations now and then (9-40 per run), 250 ms never did. A stalled
#: Redis costs at most `failures` such waits before the breaker stops asking it; a
#: stopped one fails at once (connection refused).
OP_TIMEOUT = 0.25


class CacheBackend(Protocol):
    """Bytes under string keys, each with a time to live.

    Errors propagate: the store (`cachegw._store.Store`) bounds every call, counts
    failures and fails open.
    """

    #: The ``*_nowait`` methods of `InlineBackend` answer without blocking: the store
    #: calls them synchronously, with no deadline.
    inline: bool
    #: The client bounds every operation by ``op_timeout`` itself: the store adds no
    #: deadline of its own unless it was given a tighter one.
    bounded: bool
    op_timeout: float

    @property
    def shared_client(self) -> Redis | RedisCluster | None:
        """The Redis client that processes sharing this backend coordinate through
        (purges, fetch locks, landing messages), or None when it is not shared."""
        ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, expire: float | None = None) -> None:
        """Store ``value`` for ``expire`` seconds (fractions allowed, > 0)."""
        ...

    async def delete(self, key: str) -> bool: ...


class InlineBackend(CacheBackend, Protocol):
    """A backend in this process's memory (``inline = True``)."""

    def get_nowait(self, key: str) -> bytes | None: ...

    def set_nowait(self, key: str, value: bytes, expire: float | None = None) -> None: ...

    def delete_nowait(self, key: str) -> bool: ...


def is_inline(backend: CacheBackend) -> TypeGuard[InlineBackend]:
    return backend.inline


class FastAPICacheAdapter:
    """Any fastapi-cache2 ``Backend`` as a `CacheBackend`.

    fastapi-cache2's backends take whole seconds and read 0 as "no expiry" (Redis) or
    "expire now" (InMemoryBackend): a TTL is rounded up to at least 1 s. They have no
    ``delete``: ``clear(key=...)`` stands in (InMemoryBackend's raises ``KeyError`` on a
    missing key). Its Redis backend's client (``.redis``) is shared like ours.
    """

    inline = False
    bounded = False

    def __init__(self, backend: Backend, *, op_timeout: float) -> None:
        self.backend = backend
        self.op_timeout = op_timeout

    def __repr__(self) -> str:
        return f"FastAPICacheAdapter({self.backend!r})"

    @property
    def shared_client(self) -> Redis | RedisCluster | None:
        from redis.asyncio import Redis, RedisCluster

        client = getattr(self.backend, "redis", None)  # fastapi_cache.backends.redis
        return client if isinstance(client, Redis | RedisCluster) else None

    async def get(self, key: str) -> bytes | None:
        return await self.backend.get(key)

    async def set(self, key: str, value: bytes, expire: float | None = None) -> None:
        await self.backend.set(key, value, None if expire is None else max(1, math.ceil(expire)))

    async def delete(self, key: str) -> bool:
        try:
            return bool(await self.backend.clear(key=key))
        except KeyError:
            return False
