"""Where a backend is chosen: `cache_backend` (any backend as a `CacheBackend`) and
`backend_from_url` (the gateway's ``cache.backend`` setting, the one place it is parsed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi_cache.types import Backend

from cachegw._backends._base import (
    OP_TIMEOUT,
    CacheBackend,
    FastAPICacheAdapter,
    InlineBackend,
)
from cachegw._backends._memory import MemoryBackend
from cachegw._backends._redis import RedisBackend

__all__ = ["backend_from_url", "cache_backend"]


def cache_backend(
    backend: Backend | CacheBackend, *, op_timeout: float = OP_TIMEOUT
) -> CacheBackend:
    """``backend`` itself when it is one of cachegw's, else a fastapi-cache2 backend wrapped
    in `FastAPICacheAdapter`."""
    if isinstance(backend, MemoryBackend | RedisBackend | FastAPICacheAdapter):
        return backend
    if isinstance(backend, Backend):
        return FastAPICacheAdapter(backend, op_timeout=op_timeout)
    return backend


def backend_from_url(
    url: str,
    *,
    max_entries: int = 10_000,
    max_bytes: int | str = 64 * 1024 * 1024,
    op_timeout: float = OP_TIMEOUT,
) -> MemoryBackend | RedisBackend:
    """``"memory"`` (bounded by ``max_entries`` / ``max_bytes``) or a Redis URL (see
    `RedisBackend.from_url`, each operation bounded by ``op_timeout``)."""
    if url == "memory":
        return MemoryBackend(max_entries=max_entries, max_bytes=max_bytes)
    return RedisBackend.from_url(url, op_timeout=op_timeout)


if TYPE_CHECKING:  # mypy checks that each backend implements the protocol it is used as

    def _conforms(
        memory: MemoryBackend, redis: RedisBackend, adapter: FastAPICacheAdapter
    ) -> tuple[InlineBackend, CacheBackend, CacheBackend]:
        return memory, redis, adapter
