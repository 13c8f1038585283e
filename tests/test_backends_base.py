"""The backend protocol: cachegw's backends pass through, fastapi-cache2's are adapted."""

from __future__ import annotations

import pytest
from fastapi_cache.backends.inmemory import InMemoryBackend

from cachegw._backends import (
    FastAPICacheAdapter,
    MemoryBackend,
    RedisBackend,
    backend_from_url,
    cache_backend,
    is_inline,
)
from cachegw._engine import CacheEngine
from cachegw._flight import Coordinator, RedisCoordinator, coordinator_for
from cachegw._purge import LocalPurges, RedisPurges, purges_for


def test_cachegw_backends_are_used_as_they_are() -> None:
    memory = MemoryBackend()
    assert cache_backend(memory) is memory
    assert is_inline(memory) and memory.shared_client is None
    redis = RedisBackend.from_url("redis://127.0.0.1:1/0")  # never connected
    assert cache_backend(redis) is redis
    assert not is_inline(redis) and redis.shared_client is redis.client


def test_urls_build_backends_in_one_place() -> None:
    memory = backend_from_url("memory", max_entries=3, max_bytes="1KiB")
    assert isinstance(memory, MemoryBackend)
    assert memory.stats()["max_entries"] == 3 and memory.stats()["max_bytes"] == 1024
    assert isinstance(backend_from_url("redis://127.0.0.1:1/0"), RedisBackend)


def test_shared_backends_share_purges_and_fetches() -> None:
    redis = RedisBackend.from_url("redis://127.0.0.1:1/0")
    assert isinstance(purges_for(redis, "p"), RedisPurges)
    assert isinstance(coordinator_for(redis, "p"), RedisCoordinator)
    memory = MemoryBackend()
    assert isinstance(purges_for(memory, "p"), LocalPurges)
    assert type(coordinator_for(memory, "p")) is Coordinator


async def test_a_fastapi_cache2_backend_is_adapted() -> None:
    plain = InMemoryBackend()
    adapted = cache_backend(plain)
    assert isinstance(adapted, FastAPICacheAdapter) and adapted.backend is plain
    assert not adapted.inline and adapted.shared_client is None
    # fastapi-cache2 takes whole seconds and reads 0 as "expire now": at least 1 s.
    await adapted.set("k", b"v", 0.2)
    assert await plain.get_with_ttl("k") == (1, b"v")
    assert await adapted.get("k") == b"v"
    assert await adapted.delete("k") is True
    # InMemoryBackend.clear(key=) raises KeyError on a missing key: not an error here.
    assert await adapted.delete("k") is False


async def test_the_engine_accepts_either() -> None:
    plain = InMemoryBackend()
    engine = CacheEngine(plain)
    assert isinstance(engine.backend, FastAPICacheAdapter) and engine.backend.backend is plain
    memory = MemoryBackend()
    assert CacheEngine(memory).backend is memory


@pytest.mark.parametrize("url", ["memcached://x", "redis:/x"])
def test_backend_from_url_refuses_other_schemes(url: str) -> None:
    with pytest.raises(ValueError, match="Redis URL must start with"):
        backend_from_url(url)
