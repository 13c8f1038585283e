"""MemoryBackend: a bounded, per-instance LRU with real expiry."""

from __future__ import annotations

import pytest
from fastapi_cache import FastAPICache
from fastapi_cache.types import Backend

from cachegw._backends import MemoryBackend
from cachegw._backends._memory import ENTRY_OVERHEAD, parse_size
from cachegw._errors import ConfigError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cost(key: str, value: bytes) -> int:
    return len(key) + len(value) + ENTRY_OVERHEAD


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_round_trip_and_interface() -> None:
    backend = MemoryBackend()
    assert isinstance(backend, Backend)
    await backend.set("k", b"\x80\x00value")
    assert await backend.get("k") == b"\x80\x00value"
    assert await backend.get("missing") is None
    assert backend.inline is True


def test_empty_backend_is_truthy() -> None:
    # fastapi-cache2 does `assert cls._backend`: an empty backend must not look unset.
    assert bool(MemoryBackend())
    assert not hasattr(MemoryBackend, "__len__")


async def test_lru_evicts_least_recently_used_first() -> None:
    backend = MemoryBackend(max_entries=3)
    for key in "abc":
        await backend.set(key, key.encode())
    assert await backend.get("a") == b"a"  # a becomes most recent; b is now oldest
    await backend.set("d", b"d")
    assert await backend.get("b") is None
    assert [await backend.get(k) for k in "acd"] == [b"a", b"c", b"d"]
    await backend.set("e", b"e")  # the reads above left a, c, d in that order
    assert await backend.get("a") is None
    assert backend.stats()["evictions"] == 2
    assert backend.stats()["entries"] == 3


async def test_overwrite_refreshes_recency_and_accounting() -> None:
    backend = MemoryBackend(max_entries=2)
    await backend.set("a", b"1")
    await backend.set("b", b"2")
    await backend.set("a", b"333")
    await backend.set("c", b"4")
    assert await backend.get("b") is None
    assert await backend.get("a") == b"333"
    assert backend.stats()["bytes"] == cost("a", b"333") + cost("c", b"4")


async def test_max_bytes_bound() -> None:
    value = b"x" * 1000
    limit = 3 * cost("k0", value) + 10  # room for three entries, not four
    backend = MemoryBackend(max_entries=100, max_bytes=limit)
    for i in range(10):
        await backend.set(f"k{i}", value)
    stats = backend.stats()
    assert stats["entries"] == 3
    assert stats["bytes"] == 3 * cost("k0", value) <= limit
    assert stats["max_bytes"] == limit
    assert stats["evictions"] == 7
    assert [await backend.get(f"k{i}") for i in (7, 8, 9)] == [value] * 3
    assert await backend.get("k6") is None


async def test_max_entries_bound_with_many_keys() -> None:
    backend = MemoryBackend(max_entries=50)
    for i in range(1000):
        backend.set_nowait(f"k{i}", b"v")
    stats = backend.stats()
    assert stats == {
        "entries": 50,
        "bytes": sum(cost(f"k{i}", b"v") for i in range(950, 1000)),
        "max_entries": 50,
        "max_bytes": 64 * 1024 * 1024,
        "evictions": 950,
    }


async def test_oversize_value_not_stored_and_replaces_nothing() -> None:
    backend = MemoryBackend(max_bytes=ENTRY_OVERHEAD + 100)
    await backend.set("small", b"s")
    await backend.set("big", b"x" * 200)
    assert await backend.get("big") is None
    assert await backend.get("small") == b"s"  # nothing was evicted for it
    await backend.set("small", b"x" * 200)  # an unstorable set drops the old value
    assert await backend.get("small") is None
    assert backend.stats()["bytes"] == 0


async def test_expiry_on_monotonic_clock(clock: FakeClock) -> None:
    backend = MemoryBackend(clock=clock)
    await backend.set("k", b"v", expire=10)
    await backend.set("f", b"v", expire=0.5)
    assert await backend.get_with_ttl("k") == (10, b"v")
    assert await backend.get_with_ttl("f") == (1, b"v")  # rounded up
    clock.now += 0.5
    assert await backend.get("f") is None
    clock.now += 9.2
    assert await backend.get_with_ttl("k") == (1, b"v")
    clock.now += 0.3
    assert await backend.get("k") is None
    assert await backend.get_with_ttl("k") == (0, None)
    assert backend.stats()["entries"] == 0  # expired entries found by get are removed
    assert backend.stats()["bytes"] == 0


async def test_expire_none_never_expires(clock: FakeClock) -> None:
    backend = MemoryBackend(clock=clock)
    await backend.set("k", b"v")
    clock.now += 10**9
    assert await backend.get_with_ttl("k") == (-1, b"v")


@pytest.mark.parametrize("expire", [0, -1, -0.5])
async def test_expire_not_positive_is_not_stored(expire: float) -> None:
    backend = MemoryBackend()
    await backend.set("new", b"v", expire=expire)
    assert await backend.get("new") is None
    await backend.set("old", b"v", expire=60)
    await backend.set("old", b"w", expire=expire)
    assert await backend.get("old") is None
    assert backend.stats()["entries"] == 0


async def test_delete() -> None:
    backend = MemoryBackend()
    await backend.set("k", b"v")
    assert await backend.delete("k") is True
    assert await backend.delete("k") is False
    assert backend.delete_nowait("k") is False
    assert await backend.get("k") is None
    assert backend.stats()["bytes"] == 0


async def test_clear_namespace_and_key() -> None:
    backend = MemoryBackend()
    for key in ("ns:a", "ns:b", "ns2:c", "other"):
        await backend.set(key, b"v")
    assert await backend.clear(namespace="ns:") == 2
    assert await backend.get("ns:a") is None
    assert await backend.get("ns2:c") == b"v"
    assert await backend.clear(key="other") == 1
    assert await backend.clear(key="other") == 0  # missing key: no KeyError
    assert await backend.get("other") is None
    assert await backend.get("ns2:c") == b"v"
    # FastAPICache.clear(key=...) passes its prefix as namespace too: the key wins.
    assert await backend.clear(namespace="ns2", key="nope") == 0
    assert await backend.get("ns2:c") == b"v"
    assert await backend.clear() == 0
    assert await backend.clear(namespace="") == 1
    assert backend.stats()["entries"] == 0


async def test_instances_do_not_share_state() -> None:
    one, two = MemoryBackend(), MemoryBackend()
    await one.set("k", b"1")
    assert await two.get("k") is None
    await two.set("k", b"2")
    assert await one.get("k") == b"1"


async def test_works_as_fastapi_cache_backend() -> None:
    backend = MemoryBackend()
    FastAPICache.init(backend, prefix="app")
    try:
        assert FastAPICache.get_backend() is backend
        await backend.set("app:x", b"1")
        await backend.set("other:y", b"2")
        assert await FastAPICache.clear() == 1
        assert await backend.get("other:y") == b"2"
    finally:
        FastAPICache.reset()


def test_sync_fast_paths_match_async() -> None:
    backend = MemoryBackend()
    backend.set_nowait("k", b"v", None)
    assert backend.get_nowait("k") == b"v"
    assert backend.delete_nowait("k") is True
    assert backend.get_nowait("k") is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        (4096, 4096),
        ("1000", 1000),
        ("10B", 10),
        ("512KiB", 512 * 1024),
        ("64MiB", 64 * 1024**2),
        ("64mib", 64 * 1024**2),
        ("1GiB", 1024**3),
        ("1KB", 1000),
        ("2mb", 2_000_000),
        ("1GB", 1_000_000_000),
        (" 3 MiB ", 3 * 1024**2),
    ],
)
def test_parse_size(value: int | str, expected: int) -> None:
    assert parse_size(value, what="max_bytes") == expected


@pytest.mark.parametrize(
    "value", [0, -1, "0", "", "MiB", "1.5MiB", "12 parsecs", "-5KB", True, 2.5]
)
def test_parse_size_errors_quote_the_value(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(value, what="cache.max_bytes")  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith("cache.max_bytes must be")
    assert repr(value) in message


def test_constructor_accepts_size_strings() -> None:
    assert MemoryBackend(max_bytes="1MiB").stats()["max_bytes"] == 1024 * 1024


@pytest.mark.parametrize("bad", [0, -3, 1.5, "10", True])
def test_constructor_rejects_bad_max_entries(bad: object) -> None:
    with pytest.raises(ConfigError, match="max_entries must be a whole number ≥ 1, got "):
        MemoryBackend(max_entries=bad)  # type: ignore[arg-type]


def test_constructor_rejects_bad_max_bytes() -> None:
    with pytest.raises(ConfigError, match=r"max_bytes must be .* got '64 bananas'"):
        MemoryBackend(max_bytes="64 bananas")
