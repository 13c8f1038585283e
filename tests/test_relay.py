"""`RelayCoordinator`: one fetch per key for the workers of one machine (issue 23).

Two engines in this process stand for two workers: each has its own memory backend and
its own coordinator on a shared relay directory (real Unix sockets, a real shared lease
table). A worker's identity in a lease is its pid, so the second one is given the pid of
another live process (this one's parent).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cachegw import CachePolicy, MemoryBackend
from cachegw._engine import CacheEngine
from cachegw._entry import Entry, decode
from cachegw._flight import UNLOCKED
from cachegw._models import Fetched, RequestInfo
from cachegw._relay import INLINE_MAX, RelayCoordinator, RelayPurges

POLICY = CachePolicy(ttl=60)


class Worker:
    def __init__(self, directory: str, pid: int | None = None) -> None:
        self.backend = MemoryBackend()
        self.coordinator = RelayCoordinator(directory, self.backend, pid=pid)
        self.purges = RelayPurges(directory)
        self.engine = CacheEngine(self.backend, purges=self.purges, coordinator=self.coordinator)

    async def aclose(self) -> None:
        await self.engine.aclose()


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[tuple[Worker, Worker]]:
    a = Worker(str(tmp_path))
    b = Worker(str(tmp_path), pid=os.getppid())
    a.engine.start()
    b.engine.start()
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


class Upstream:
    """Counts fetches; each waits for ``gate`` (when given) before it answers."""

    def __init__(self, body: bytes = b"hello", gate: asyncio.Event | None = None) -> None:
        self.calls = 0
        self.body = body
        self.gate = gate
        self.started = asyncio.Event()

    async def __call__(self) -> Fetched:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return Fetched(200, [(b"content-type", b"text/plain")], self.body)


def req(key: str = "t:k") -> RequestInfo:
    return RequestInfo(method="GET", key=key, headers={})


async def test_waiters_in_another_worker_get_the_leaders_answer(workers) -> None:  # type: ignore[no-untyped-def]
    a, b = workers
    gate = asyncio.Event()
    upstream = Upstream(gate=gate)
    leader = asyncio.create_task(a.engine.serve(req(), POLICY, upstream))
    await upstream.started.wait()  # worker a holds the key's lease and is fetching
    followers = [asyncio.create_task(b.engine.serve(req(), POLICY, upstream)) for _ in range(20)]
    while b.engine.in_flight()["waiting"] < 20:  # noqa: ASYNC110 - all wait in worker b
        await asyncio.sleep(0)
    gate.set()
    served = await asyncio.gather(leader, *followers)
    assert upstream.calls == 1
    assert {s.body for s in served} == {b"hello"}
    # Worker b holds the entry itself now: its next request is a plain hit.
    again = await b.engine.serve(req(), POLICY, Upstream(b"other"))
    assert again.body == b"hello"
    assert dict(again.headers)[b"x-cache-status"] == b"HIT"


async def test_a_worker_that_misses_after_the_landing_asks_for_the_entry(workers) -> None:  # type: ignore[no-untyped-def]
    a, b = workers
    upstream = Upstream()
    await a.engine.serve(req(), POLICY, upstream)
    assert b.backend.get_nowait("t:k") is None  # nothing is sent to workers that did not ask
    served = await b.engine.serve(req(), POLICY, upstream)
    assert served.body == b"hello"
    assert upstream.calls == 1
    assert b.backend.get_nowait("t:k") is not None  # b holds its own copy now
    assert (a.coordinator.sent, b.coordinator.received) == (1, 1)


async def test_a_worker_that_no_longer_holds_the_entry_says_so(workers) -> None:  # type: ignore[no-untyped-def]
    a, b = workers
    upstream = Upstream()
    await a.engine.serve(req(), POLICY, upstream)
    a.backend.delete_nowait("t:k")  # evicted
    served = await b.engine.serve(req(), POLICY, upstream)
    assert served.body == b"hello"
    assert upstream.calls == 2  # b fetched for itself, after a's empty answer
    assert b.coordinator.received == 1


async def test_large_answers_travel_in_a_memory_file(workers) -> None:  # type: ignore[no-untyped-def]
    a, b = workers
    body = os.urandom(INLINE_MAX * 4)
    upstream = Upstream(body)
    await a.engine.serve(req(), POLICY, upstream)
    served = await b.engine.serve(req(), POLICY, upstream)
    assert served.body == body
    assert upstream.calls == 1
    data = b.backend.get_nowait("t:k")
    assert data is not None
    assert isinstance(decode(data), Entry)


async def test_a_lease_is_exclusive_and_released(workers) -> None:  # type: ignore[no-untyped-def]
    a, b = workers
    token = await a.coordinator.acquire("t:x", 30.0, 1.5)
    assert token not in (None, UNLOCKED)
    assert await b.coordinator.acquire("t:x", 30.0) is None
    assert await b.coordinator.holder_started("t:x") == 1.5
    await b.coordinator.release("t:x", "1234")  # not its token: no effect
    assert await b.coordinator.acquire("t:x", 30.0) is None
    assert token is not None
    await a.coordinator.release("t:x", token)
    assert await b.coordinator.holder_started("t:x") is None
    assert await b.coordinator.acquire("t:x", 30.0) not in (None, UNLOCKED)


async def test_the_lease_of_a_worker_that_died_is_taken_over(tmp_path: Path) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = Worker(str(tmp_path), pid=int(done.stdout))
    live = Worker(str(tmp_path))
    try:
        assert await dead.coordinator.acquire("t:x", 30.0) not in (None, UNLOCKED)
        assert await live.coordinator.acquire("t:x", 30.0) not in (None, UNLOCKED)
    finally:
        await dead.aclose()
        await live.aclose()


async def test_an_expired_lease_is_taken_over(workers) -> None:  # type: ignore[no-untyped-def]
    a, b = workers
    assert await a.coordinator.acquire("t:x", 0.0) not in (None, UNLOCKED)
    assert await b.coordinator.acquire("t:x", 30.0) not in (None, UNLOCKED)


async def test_a_relayed_entry_is_judged_against_purges(workers) -> None:  # type: ignore[no-untyped-def]
    a, b = workers
    upstream = Upstream()
    await a.engine.serve(req(), POLICY, upstream)
    await b.engine.serve(req(), POLICY, upstream)  # b holds a's entry now
    assert upstream.calls == 1
    data = b.backend.get_nowait("t:k")
    assert data is not None
    entry = decode(data)
    assert isinstance(entry, Entry)
    await a.engine.purge(entry.tags)  # reaches worker b through the purge relay
    upstream.body = b"new"
    served = await b.engine.serve(req(), POLICY, upstream)
    assert served.body == b"new"
    assert upstream.calls == 2


async def test_the_landing_of_a_worker_that_exited_is_not_waited_for(tmp_path: Path) -> None:
    gone = Worker(str(tmp_path))
    live = Worker(str(tmp_path), pid=os.getppid())
    upstream = Upstream()
    try:
        await gone.engine.serve(req(), POLICY, upstream)
    finally:
        await gone.aclose()  # its socket goes with it
    live.engine.start()
    try:
        served = await live.engine.serve(req(), POLICY, upstream)
        assert served.body == b"hello"
        assert upstream.calls == 2
        assert dict(served.headers)[b"x-cache-status"] == b"MISS"
    finally:
        await live.aclose()


async def test_one_worker_uses_no_relay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CACHEGW_RELAY_DIR, the gateway's runtime builds no relay at all."""
    monkeypatch.delenv("CACHEGW_RELAY_DIR", raising=False)
    from cachegw._flight import Coordinator
    from cachegw._gateway import Gateway
    from cachegw._runtime import Runtime

    runtime = Runtime(Gateway(services=[]))
    await runtime.open()
    try:
        assert runtime.engine is not None
        assert type(runtime.engine.coordinator) is Coordinator
        assert isinstance(runtime.backend, MemoryBackend)
        assert runtime.backend.on_set is None
    finally:
        await runtime.close()


# -- purges: delivered before they are answered, or fenced -----------------------------


def fill_queue(purges: RelayPurges) -> int:
    """Fill ``purges``' socket queue (as a busy worker's would be); how many datagrams."""
    import socket

    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setblocking(False)
    sent = 0
    try:
        while True:
            sender.sendto(b'["hard", 0, 1, []]', purges.path)
            sent += 1
    except BlockingIOError:
        return sent
    finally:
        sender.close()


async def test_a_purge_waits_for_a_full_queue_to_take_it(tmp_path: Path) -> None:
    a, b = RelayPurges(str(tmp_path)), RelayPurges(str(tmp_path))
    try:
        fill_queue(b)  # b is busy: it does not read its queue (no reader started)
        purge = asyncio.create_task(a.purge(["tag:x"]))
        while not a._sending:  # noqa: ASYNC110 - until a is retrying
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        assert not purge.done()  # not answered while b has not got it
        b.drain()  # b reads its queue: room again
        at = await purge
        assert b.verdict(["tag:x"], at - 1) == ("hard", at)
        assert b.verdict(["tag:y"], at - 1) is None  # no fence: it was delivered
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_purge_that_cannot_be_delivered_fences_every_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cachegw._relay

    monkeypatch.setattr(cachegw._relay, "SEND_TIMEOUT", 0.05)
    a, b, c = (RelayPurges(str(tmp_path)) for _ in range(3))
    try:
        fill_queue(b)  # b stays busy past the send timeout
        at = await a.purge(["tag:x"])
        # Every worker (c got the purge itself, b did not) treats everything fetched
        # before it as purged, whatever scope: b's queue may have lost it.
        for worker in (b, c):
            assert worker.verdict(["*", "tag:y"], at - 1) == ("hard", at)
            assert worker.verdict(["*", "tag:y"], at + 1) is None
    finally:
        for worker in (a, b, c):
            await worker.aclose()


async def test_a_purge_whose_caller_stops_waiting_fences_at_once(tmp_path: Path) -> None:
    a, b = RelayPurges(str(tmp_path)), RelayPurges(str(tmp_path))
    try:
        fill_queue(b)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0):
                await a.purge(["tag:x"])
        at = a.state.hard["tag:x"]
        assert b.verdict(["*"], at - 1) == ("hard", at)
    finally:
        await a.aclose()
        await b.aclose()
