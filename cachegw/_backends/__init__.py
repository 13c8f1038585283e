"""Cache backends: the `CacheBackend` protocol the engine uses, cachegw's two backends
(also fastapi-cache2 ``Backend`` subclasses) and the adapter for any other."""

from __future__ import annotations

from ._base import OP_TIMEOUT, CacheBackend, FastAPICacheAdapter, InlineBackend, is_inline
from ._build import backend_from_url, cache_backend
from ._memory import MemoryBackend
from ._redis import RedisBackend, close_redis

__all__ = [
    "OP_TIMEOUT",
    "CacheBackend",
    "FastAPICacheAdapter",
    "InlineBackend",
    "MemoryBackend",
    "RedisBackend",
    "backend_from_url",
    "cache_backend",
    "close_redis",
    "is_inline",
]
