"""No acknowledged write is undone by Redis (issue 23): outages, restarts with data,
partitions and failovers, against real redis-server processes and real gateway
processes (`cachegw serve`), on every server version the suite runs.

A write (``PUT``) answered while its process cannot record the invalidation in Redis is
kept pending and replayed; a Redis that comes back as a new server (restarted with its
data, or a promoted replica) is fenced; a process that cannot read the purge record does
not serve its in-process copies of Redis entries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from cachegw import RedisBackend
from cachegw._purge import RedisPurges
from tests.gateway_process import gateway_processes
from tests.items_upstream import VersionedItems
from tests.redis_process import EVENTUALLY, RedisProcess, free_port
from tests.servers import run_uvicorn
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.redis

TOML = """
[cache]
backend = "{backend}"
prefix = "fo"
l1_ttl = 30     # long in-process copies: a test would see one that outlived a write

[[services]]
name = "api"
upstream = "{upstream}"
prefix = "/api"
ttl = 60

  [[services.routes]]
  path = "/items/{{item_id}}"
"""

QUIET = ["--no-access-log"]
#: Across processes an invalidation is seen within this (RedisPurges.propagation).
WINDOW = 0.2
PATH = "/api/items/1"


def write_config(path: Path, backend: str, upstream: str) -> Path:
    path.write_text(TOML.format(backend=backend, upstream=upstream))
    return path


def version(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return int(response.headers["x-version"])


def read(base: str) -> tuple[int, str]:
    answer = httpx.get(base + PATH, timeout=10)
    return version(answer), answer.headers["x-cache-status"]


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def cached_everywhere(*bases: str) -> None:
    """Version 0 of PATH is stored in Redis and every process has served it as a HIT."""
    assert read(bases[0]) == (0, "MISS")
    for base in bases:
        assert wait_for(lambda base=base: read(base) == (0, "HIT"), EVENTUALLY)  # type: ignore[misc]


def test_a_write_while_redis_is_down_is_not_undone_when_redis_returns_with_its_data(
    tmp_path: Path,
) -> None:
    """Redis stopped, a PUT through one process, Redis restarted from its AOF (the old
    entry is back in it): no process serves the old version, at any time after the PUT's
    answer plus the window."""
    upstream = VersionedItems()
    with (
        RedisProcess("--appendonly", "yes", "--appendfsync", "always") as redis,
        run_uvicorn(upstream) as origin,
        gateway_processes(
            write_config(tmp_path / "g.toml", redis.url, origin), count=2, args=QUIET
        ) as [a, b],
    ):
        cached_everywhere(b.base, a.base)
        redis.stop()
        put = httpx.put(a.base + PATH, timeout=10)
        assert version(put) == 1
        time.sleep(WINDOW)
        # While Redis is down: the processes' in-process copies are not served.
        assert read(b.base)[0] == 1
        assert read(a.base)[0] == 1
        redis.start()
        with redis.client() as client:
            assert client.exists("fo:" + "GET:api:/items/1") or client.dbsize() > 0
        seen = [read(base) for _ in range(20) for base in (b.base, a.base)]
        assert {v for v, _ in seen} == {1}, seen
        assert wait_for(lambda: read(b.base) == (1, "HIT"), EVENTUALLY)
        # Entries fetched in the first second after the restart may be fenced too (the fence
        # is never earlier than the start): the other process hits once it refetched.
        assert wait_for(lambda: read(a.base) == (1, "HIT"), EVENTUALLY)


def test_a_write_through_a_process_cut_off_from_redis_is_replayed(tmp_path: Path) -> None:
    """Only the writer loses Redis (a partition: its connections go through a proxy the
    test cuts); Redis keeps its data and serves the other process all along. Once the
    writer reaches Redis again, its invalidation is recorded with its time and the other
    process stops serving the old version (within the window), for good."""
    upstream = VersionedItems()
    with (
        RedisProcess() as redis,
        TcpProxy(redis.port) as proxy,
        run_uvicorn(upstream) as origin,
        gateway_processes(
            write_config(tmp_path / "a.toml", f"redis://127.0.0.1:{proxy.port}/0", origin),
            args=QUIET,
        ) as [a],
        gateway_processes(write_config(tmp_path / "b.toml", redis.url, origin), args=QUIET) as [b],
    ):
        cached_everywhere(b.base, a.base)
        proxy.cut()
        assert version(httpx.put(a.base + PATH, timeout=10)) == 1
        assert read(a.base)[0] == 1  # the writer knows at once
        proxy.mend()
        mended = time.monotonic()
        assert wait_for(lambda: read(b.base)[0] == 1, EVENTUALLY)
        print("b sees the write", time.monotonic() - mended, "s after the proxy mended")
        time.sleep(WINDOW)
        seen = [read(base) for _ in range(10) for base in (b.base, a.base)]
        assert {v for v, _ in seen} == {1}, seen
        assert wait_for(lambda: read(b.base) == (1, "HIT"), EVENTUALLY)


@pytest.mark.parametrize("mode", ["restart", "flush"])
def test_a_new_redis_life_is_fenced_once(mode: str) -> None:
    """A Redis that is not the server the record was written on (restarted with its data:
    fenced as of its start) or that lost the record (flushed: fenced as of now) makes every
    entry fetched before count as purged, for processes that knew the old server and for
    ones that start later; once."""
    with RedisProcess("--appendonly", "yes", "--appendfsync", "always") as redis:

        async def scenario() -> None:
            backend = RedisBackend.from_url(redis.url)
            first = RedisPurges(backend.client, "life")
            await first.poll()  # a server not seen before: fenced by the first poll ...
            assert first.fences == 1
            # ... as of when it started: what it holds was stored since, nothing in flight
            # now is lost (a new prefix, an upgrade, a restart without data cost nothing).
            assert first.state.hard["*"] <= time.time()
            await first.purge(["tag:a"])
            await first.poll()
            after = time.time()
            assert first.verdict(["*", "tag:b"], after) is None
            await backend.aclose()

            if mode == "restart":
                redis.restart()
            else:
                with redis.client() as client:
                    client.flushall()

            backend = RedisBackend.from_url(redis.url)
            old = RedisPurges(backend.client, "life")
            if mode == "restart":
                # Another process fences the new server first; the one that knew the old
                # server happens to have applied the same epoch number there: the new
                # server's record is loaded all the same (its fence with it).
                late = RedisPurges(backend.client, "life")
                await late.poll()
                old.state, old.epoch, old.server = first.state, late.epoch, first.server
                await old.poll()
                assert (late.fences, old.fences) == (1, 0)
            else:
                # The process that knew the server before:
                old.state, old.epoch, old.server = first.state, first.epoch, first.server
                await old.poll()
                late = RedisPurges(backend.client, "life")  # a process started after
                await late.poll()
                assert old.fences >= 1 and late.fences == 0
            for purges in (old, late):
                assert purges.verdict(["*", "tag:b"], after) is not None
                assert purges.verdict(["*", "tag:b"], time.time()) is None
            await backend.aclose()

        asyncio.run(scenario())


def test_pending_invalidations_are_bounded_and_replayed() -> None:
    """Invalidations that cannot be recorded are kept, past MAX_PENDING scopes as one
    purge of everything, and recorded once Redis answers."""
    port = free_port()

    async def scenario() -> None:
        import cachegw._purge as purge_module

        backend = RedisBackend.from_url(f"redis://127.0.0.1:{port}/0")
        purges = RedisPurges(backend.client, "pend")
        purges.interval = 0.05
        for name in ("a", "b"):
            with pytest.raises(Exception):  # noqa: B017 - nothing listens
                await purges.purge([f"tag:{name}"])
        assert [r[3] for r in purges.pending] == [["tag:a"], ["tag:b"]]
        limit, purge_module.MAX_PENDING = purge_module.MAX_PENDING, 2
        try:
            with pytest.raises(Exception):  # noqa: B017
                await purges.purge(["tag:c"])
        finally:
            purge_module.MAX_PENDING = limit
        last = purges.state.hard["tag:c"]
        assert purges.pending == [("hard", last, pytest.approx(last + 31 * 86400), ["*"])]
        assert purges.verdict(["tag:a"], last - 1) is not None  # applied here all along
        with RedisProcess(port=port):
            await asyncio.wait_for(purges._replay, 10)  # type: ignore[arg-type]
            assert purges.pending == []
            log = await backend.client.zrange("{pend:purge}:log", 0, -1)
            assert [m.decode().split("|")[:2] for m in log] == [["hard", repr(last)]]
            # (A process polling this new server fences it too, later than that.)
        await purges.aclose()
        await backend.aclose()

    asyncio.run(scenario())


def test_a_user_without_info_polls_without_fencing(caplog: pytest.LogCaptureFixture) -> None:
    """An ACL user refused INFO (-@dangerous): the record is read as before, a warning
    says restarts are not fenced, and INFO is asked for once only."""
    with RedisProcess() as redis:
        with redis.client() as client:
            client.execute_command(
                "ACL", "SETUSER", "app", "on", ">pw", "~*", "+@all", "-@dangerous"
            )

        async def scenario() -> None:
            backend = RedisBackend.from_url(f"redis://app:pw@127.0.0.1:{redis.port}/0")
            purges = RedisPurges(backend.client, "acl")
            await purges.purge(["tag:a"])
            for _ in range(3):
                purges.epoch = -1
                await purges.poll()
            assert purges.fences == 0
            assert purges.verdict(["tag:a"], 0.0) is not None
            await backend.aclose()

        asyncio.run(scenario())
        with redis.client() as client:
            refused = [e for e in client.acl_log() if e["object"] == "info"]
    assert [e["count"] for e in refused] == [1]
    assert "grant +info" in caplog.text
