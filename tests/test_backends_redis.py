"""RedisBackend against a real redis-server started by the test suite."""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
from fastapi_cache.types import Backend
from redis.asyncio import Redis, RedisCluster
from redis_process import HEALTHY, RedisProcess

from cachegw._backends import RedisBackend
from cachegw._backends._redis import CLUSTER_REDIS_PY, require_redis_py
from cachegw._errors import ConfigError

# The stall tests' deadline: far below the 1 s pause they measure, far above a healthy reply.
OP_TIMEOUT = 0.25
# Every other test: a healthy server on a loaded machine must never look stalled.
SLOW_OK = 5.0


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend.from_url(redis_url, op_timeout=SLOW_OK)
    yield backend
    await backend.aclose()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain synchronous client to inspect the server behind the backend's back."""
    with redis.Redis.from_url(redis_url) as client:
        yield client


def command_calls(client: redis.Redis, command: str) -> int:
    stats = client.info("commandstats")
    entry = stats.get(f"cmdstat_{command}")
    return int(entry["calls"]) if entry else 0


def test_truthy_and_flags() -> None:
    backend = RedisBackend(Redis())
    assert bool(backend)
    assert isinstance(backend, Backend)
    assert backend.inline is False
    assert not hasattr(RedisBackend, "__len__")


@pytest.mark.parametrize(
    "value",
    [b"", b"\x80\x00", bytes(range(256)), pickle.dumps({"a": 1}), b"x" * 100_000],
)
async def test_round_trip_raw_bytes(backend: RedisBackend, value: bytes) -> None:
    await backend.set("k", value)
    got = await backend.get("k")
    assert type(got) is bytes
    assert got == value  # pickle-looking bytes come back raw, never unpickled


async def test_every_key_has_a_ttl(backend: RedisBackend, raw: redis.Redis) -> None:
    await backend.set("default", b"v")
    await backend.set("five", b"v", expire=5)
    await backend.set("tiny", b"v", expire=0.0001)
    assert 3_590_000 < raw.pttl("default") <= 3_600_000
    assert 4_900 < raw.pttl("five") <= 5_000
    assert raw.pttl("tiny") in (
        0,
        1,
        -2,
    )  # at least 1 ms (0 or gone by now), never "no expiry" (-1)


async def test_default_ttl_is_configurable(redis_url: str, raw: redis.Redis) -> None:
    backend = RedisBackend.from_url(redis_url, default_ttl=7)
    try:
        await backend.set("k", b"v")
        assert 6_900 < raw.pttl("k") <= 7_000
    finally:
        await backend.aclose()


@pytest.mark.parametrize("expire", [0, -1, -0.5])
async def test_expire_not_positive_deletes(
    backend: RedisBackend, raw: redis.Redis, expire: float
) -> None:
    raw.set("k", b"old")
    await backend.set("k", b"new", expire=expire)
    assert raw.exists("k") == 0
    await backend.set("fresh", b"new", expire=expire)
    assert raw.exists("fresh") == 0


async def test_get_with_ttl(backend: RedisBackend, raw: redis.Redis) -> None:
    await backend.set("k", b"v", expire=4.2)
    assert await backend.get_with_ttl("k") == (5, b"v")  # rounded up
    assert await backend.get_with_ttl("missing") == (0, None)
    raw.set("forever", b"f")  # written by someone else, without TTL
    assert await backend.get_with_ttl("forever") == (-1, b"f")


async def test_delete(backend: RedisBackend, raw: redis.Redis) -> None:
    await backend.set("k", b"v")
    assert await backend.delete("k") is True
    assert await backend.delete("k") is False
    assert raw.exists("k") == 0


@pytest.mark.parametrize(
    ("namespace", "glob_lookalikes"),
    [
        # Read as glob patterns, these namespaces would match the look-alikes and
        # miss the real keys.
        ("app:*[x]:", ["app:ANYx:0", "app:x:1"]),
        ("a?\\b:", ["aZb:0", "a?b:1"]),
    ],
)
async def test_clear_namespace_is_literal_and_uses_scan(
    backend: RedisBackend, raw: redis.Redis, namespace: str, glob_lookalikes: list[str]
) -> None:
    mine = [f"{namespace}{i}" for i in range(3)]
    theirs = [*glob_lookalikes, "other", namespace[:-1]]
    for key in mine + theirs:
        raw.set(key, b"v")
    raw.config_resetstat()
    assert await backend.clear(namespace=namespace) == 3
    assert command_calls(raw, "keys") == 0
    assert command_calls(raw, "scan") > 0
    assert command_calls(raw, "unlink") > 0
    assert sorted(raw.scan_iter()) == sorted(k.encode() for k in theirs)


async def test_clear_many_keys_in_batches(backend: RedisBackend, raw: redis.Redis) -> None:
    with raw.pipeline(transaction=False) as pipe:
        for i in range(5000):
            pipe.set(f"ns:{i}", b"v", ex=60)
        pipe.set("keep:1", b"v")
        pipe.execute()
    raw.config_resetstat()
    assert await backend.clear(namespace="ns:") == 5000
    assert raw.dbsize() == 1
    assert command_calls(raw, "keys") == 0
    assert command_calls(raw, "scan") > 1
    assert command_calls(raw, "unlink") >= 5  # batched, one UNLINK per <= 1000 keys


async def test_clear_key(backend: RedisBackend, raw: redis.Redis) -> None:
    raw.set("ns:a", b"v")
    raw.set("ns:b", b"v")
    assert await backend.clear(key="ns:a") == 1
    assert await backend.clear(key="ns:a") == 0
    # FastAPICache.clear(key=...) passes its prefix as namespace too: the key wins.
    assert await backend.clear(namespace="ns:", key="nope") == 0
    assert raw.exists("ns:b") == 1
    assert await backend.clear() == 0


async def test_stopped_server_fails_fast_then_reconnects(
    redis_proc_private: RedisProcess,
) -> None:
    backend = RedisBackend.from_url(redis_proc_private.url, op_timeout=OP_TIMEOUT)
    try:
        await backend.set("k", b"v", expire=60)
        redis_proc_private.stop()
        for operation in (
            backend.get("k"),
            backend.set("k", b"w"),
            backend.get_with_ttl("k"),
            backend.delete("k"),
            backend.clear(namespace="k"),
        ):
            started = time.monotonic()
            with pytest.raises((redis.exceptions.RedisError, OSError)):
                await operation
            assert time.monotonic() - started < 0.5
        redis_proc_private.start()  # same port, empty (nothing persisted)
        await backend.set("k", b"again")  # same backend object: it reconnects
        assert await backend.get("k") == b"again"
    finally:
        await backend.aclose()


async def test_stalled_server_times_out_within_op_timeout(
    redis_proc_private: RedisProcess,
) -> None:
    backend = RedisBackend.from_url(redis_proc_private.url, op_timeout=OP_TIMEOUT)
    try:
        await backend.set("k1", b"one")
        await backend.set("k2", b"two")  # the pool's connection is now open

        # The server stopped (SIGSTOP) for as long as the GET takes: only the timeout can
        # end it, however slow the machine is (issue 28: no test depends on its speed).
        with redis_proc_private.frozen():
            started = time.monotonic()
            with pytest.raises(redis.exceptions.TimeoutError):
                await backend.get("k1")
            elapsed = time.monotonic() - started
        assert elapsed < 30, elapsed  # the deadline ended it (no retries: see the next test)
        # The late reply to GET k1 must not be read as the answer to GET k2.
        assert await backend.get("k2") == b"two"
    finally:
        await backend.aclose()


def test_from_url_bounds_every_operation(redis_url: str) -> None:
    backend = RedisBackend.from_url(redis_url, op_timeout=0.2)
    assert isinstance(backend.client, Redis)
    kwargs = backend.client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 0.2
    assert kwargs["socket_connect_timeout"] == 0.2
    assert _retries(kwargs["retry"]) == 0
    assert kwargs["health_check_interval"] == 0
    assert backend.op_timeout == 0.2


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "unix:///tmp/none.sock"]
)
def test_from_url_schemes(url: str) -> None:
    assert isinstance(RedisBackend.from_url(url).client, Redis)


def _retries(retry: Any) -> int:
    # get_retries() from redis-py 5; 4.x (what fastapi-cache2[redis] installs) has the field.
    return int(retry.get_retries() if hasattr(retry, "get_retries") else retry._retries)


def test_from_url_cluster_constructs_or_names_the_redis_py_it_needs() -> None:
    if redis.__version__.split(".")[0].isdigit() and int(redis.__version__.split(".")[0]) < 8:
        # An older redis-py (fastapi-cache2[redis] installs 4.x): a clear error, not a
        # cluster whose processes never hear of each other's changes.
        with pytest.raises(ConfigError, match=r"redis-py 8\.0 or later.*pip install 'redis>=8\.0'"):
            RedisBackend.from_url("redis+cluster://127.0.0.1:1")
        with pytest.raises(ConfigError, match=r"Sentinel .* needs redis-py 8\.0 or later"):
            RedisBackend.from_url("redis+sentinel://127.0.0.1:1/mymaster")
        return
    backend = RedisBackend.from_url("redis+cluster://127.0.0.1:1")
    assert isinstance(backend.client, RedisCluster)
    assert _retries(backend.client.retry) == 0


def test_features_that_need_a_newer_redis_py_say_which() -> None:
    require_redis_py(CLUSTER_REDIS_PY, "Redis Cluster", installed="8.0.0")
    require_redis_py(CLUSTER_REDIS_PY, "Redis Cluster", installed="9.1.2")
    with pytest.raises(ConfigError) as info:
        require_redis_py(CLUSTER_REDIS_PY, "Redis Cluster (redis+cluster://)", installed="4.6.0")
    assert str(info.value) == (
        "Redis Cluster (redis+cluster://) needs redis-py 8.0 or later, but redis-py 4.6.0 is "
        "installed; upgrade it with: pip install 'redis>=8.0'"
    )


@pytest.mark.parametrize("url", ["http://x", "127.0.0.1:6379", "memory"])
def test_from_url_rejects_other_schemes(url: str) -> None:
    with pytest.raises(ConfigError, match=repr(url)):
        RedisBackend.from_url(url)


@pytest.mark.parametrize("bad", [0, -1, "5", True])
def test_rejects_bad_timeouts(bad: object) -> None:
    with pytest.raises(ConfigError, match="op_timeout must be a number of seconds > 0"):
        RedisBackend(Redis(), op_timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="default_ttl must be a number of seconds > 0"):
        RedisBackend(Redis(), default_ttl=bad)  # type: ignore[arg-type]


async def test_more_concurrent_operations_than_pooled_connections(redis_url: str) -> None:
    """Past the pool's 100 connections operations wait for one instead of failing."""
    backend = RedisBackend.from_url(redis_url, op_timeout=1.0)
    try:
        await backend.set("k", b"v")
        results = await asyncio.gather(*(backend.get("k") for _ in range(300)))
        assert results == [b"v"] * 300
    finally:
        await backend.aclose()


def test_from_url_backends_bound_their_own_operations(redis_url: str) -> None:
    """The engine's store adds no deadline of its own on top of a client whose socket
    timeouts already bound every operation (and keeps it when that cannot be known)."""
    from cachegw._store import Store

    own = RedisBackend.from_url(redis_url, op_timeout=0.2)
    custom = RedisBackend.from_url(redis_url, op_timeout=0.2, max_connections=10)
    assert own.bounded and not custom.bounded
    assert Store(own, op_timeout=0.25)._bounded
    assert not Store(own, op_timeout=0.1)._bounded  # a tighter deadline than the client's
    assert not Store(custom)._bounded


async def test_store_reuses_decoding_of_identical_bytes_only(redis_url: str) -> None:
    """A hot key read again with the same bytes is not decoded again; changed bytes are."""
    from cachegw._entry import Entry, encode
    from cachegw._store import L1, Store

    backend = RedisBackend.from_url(redis_url, op_timeout=HEALTHY)
    store = Store(backend, op_timeout=HEALTHY, l1=L1(max_entries=0, max_bytes=0, ttl=0))
    try:
        entry = Entry(status=200, headers=[], body=b"one", stored_at=1.0, lifetime=60)
        await store.set("k", entry, 60)
        first = await store.get("k")
        again = await store.get("k")
        assert isinstance(first, Entry) and first.body == b"one"
        assert again is first  # same bytes in Redis: the decoded entry is reused
        other = Entry(status=200, headers=[], body=b"two", stored_at=1.0, lifetime=60)
        await backend.set("k", encode(other), 60)  # another process stored a new value
        changed = await store.get("k")
        assert isinstance(changed, Entry) and changed.body == b"two"
    finally:
        await backend.aclose()


async def test_concurrent_gets_share_one_round_trip(redis_url: str, raw: redis.Redis) -> None:
    """GETs asked for in the same turn of the event loop go out as one MGET, and each
    caller gets its own key's value."""
    backend = RedisBackend.from_url(redis_url, op_timeout=HEALTHY)
    try:
        for n in range(20):
            await backend.set(f"k{n}", b"v%d" % n)
        raw.config_resetstat()
        keys = [f"k{n % 20}" for n in range(50)] + ["missing"]
        values = await asyncio.gather(*(backend.get(key) for key in keys))
        assert values == [b"v%d" % (n % 20) for n in range(50)] + [None]
        calls = {k: v["calls"] for k, v in raw.info("commandstats").items()}
        assert calls.get("cmdstat_mget") == 1
        assert "cmdstat_get" not in calls
        assert await backend.get("k3") == b"v3"  # a lone GET is a plain GET
    finally:
        await backend.aclose()


async def test_a_failed_batch_fails_every_caller_fast(redis_proc_private: RedisProcess) -> None:
    backend = RedisBackend.from_url(redis_proc_private.url)
    redis_proc_private.stop()
    try:
        results = await asyncio.gather(
            *(backend.get(f"k{n}") for n in range(10)), return_exceptions=True
        )
        assert all(isinstance(r, Exception) for r in results)
    finally:
        await backend.aclose()


async def test_the_engine_takes_the_backends_deadline() -> None:
    """RedisBackend.from_url(op_timeout=...) holds for the decorator's and the gateway's
    engine too: its reads and writes, unless the engine is given a deadline of its own."""
    from cachegw._engine import CacheEngine

    patient = RedisBackend.from_url("redis://127.0.0.1:1/0", op_timeout=5)
    default = RedisBackend.from_url("redis://127.0.0.1:1/0")
    try:
        engine = CacheEngine(patient)
        assert engine.op_timeout == engine.store.op_timeout == engine.read_budget == 5
        assert engine.store._bounded  # the client's own timeouts bound it: no second timer
        assert (CacheEngine(default).op_timeout, CacheEngine(default).read_budget) == (0.25, 0.25)
        assert CacheEngine(patient, op_timeout=1).op_timeout == 1
    finally:
        await patient.aclose()
        await default.aclose()
