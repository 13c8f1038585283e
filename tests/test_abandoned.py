"""Work nobody waits for is let go (issue 24), against a real `cachegw serve` on the
memory and the Redis backend: clients that send a GET and leave, and the requests that
still wait for the same fetch. Timeouts are small for the test; no assertion is on a time
shorter than 100 ms.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from redis_process import RedisProcess

from tests.gateway_process import GatewayProcess
from tests.hostile import HostileOrigin, read_head, read_response
from tests.redis_process import EVENTUALLY

TOML = """
[cache]
backend = "{backend}"
op_timeout = "5s"  # a loaded machine must not turn HITs into misses

[[services]]
name = "ab"
upstream = "{upstream}"
prefix = "/ab"
ttl = 60
timeout = 10
max_connections = 4
pool_timeout = 5

  [[services.routes]]
  path = "/{{rest:path}}"
"""


@pytest.fixture(scope="module")
def origin() -> Iterator[HostileOrigin]:
    origin = HostileOrigin().start()
    yield origin
    origin.close()


@pytest.fixture(scope="module", params=["memory", "redis"])
def gateway(
    request: pytest.FixtureRequest,
    origin: HostileOrigin,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[int]:
    backend = "memory"
    if request.param == "redis":
        redis: RedisProcess = request.getfixturevalue("redis_proc")
        backend = redis.url
    config = tmp_path_factory.mktemp("abandoned") / "gateway.toml"
    config.write_text(TOML.format(backend=backend, upstream=origin.base))
    gw = GatewayProcess(config)
    gw.start()
    yield gw.port
    output = gw.stop()
    assert "Traceback" not in output, output


def send_get(port: int, path: str, method: str = "GET") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def waiting(port: int) -> int:
    """Requests of the gateway waiting for a fetch in flight (its health endpoint)."""
    health = httpx.get(f"http://127.0.0.1:{port}/_cachegw/health", timeout=5).json()
    return int(health["in_flight"]["waiting"])


def abandoned(port: int) -> int:
    health = httpx.get(f"http://127.0.0.1:{port}/_cachegw/health", timeout=5).json()
    return int(health["stats"]["abandoned"])


def wait_until(predicate: Callable[[], bool], timeout: float = EVENTUALLY) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def slow_hits(origin: HostileOrigin) -> int:
    return sum(n for path, n in origin.hits.items() if path.startswith("/slow/"))


def test_abandoned_gets_are_aborted_and_do_not_starve_the_pool(
    gateway: int, origin: HostileOrigin
) -> None:
    tag = f"{gateway}-{time.monotonic_ns()}"
    before = origin.slow.copy()
    hits = slow_hits(origin)
    counted = abandoned(gateway)
    # Three times the pool (4 connections): each client sends its GET and goes away.
    for i in range(12):
        send_get(gateway, f"/ab/slow/{tag}-{i}").close()
    # Each counted (the health endpoint's stats) once its client's close was seen.
    assert wait_until(lambda: abandoned(gateway) - counted == 12)
    # A well-behaved miss on the same service is served, not queued into a 503.
    ok = httpx.get(f"http://127.0.0.1:{gateway}/ab/small/{tag}", timeout=10)
    assert ok.status_code == 200, ok.text
    time.sleep(3.5)  # longer than the origin's answer would take
    # Those that reached the upstream before their client's close was seen are aborted;
    # none runs to its answer, and the ones still queued for the pool never go out.
    assert origin.slow["answered"] == before["answered"]
    assert origin.slow["aborted"] - before["aborted"] == slow_hits(origin) - hits


def test_a_waiter_keeps_the_fetch_its_leader_left(gateway: int, origin: HostileOrigin) -> None:
    path = f"/ab/slow/shared-{gateway}-{time.monotonic_ns()}"
    before = origin.slow.copy()
    hits = slow_hits(origin)
    leader = send_get(gateway, path)
    assert origin.wait_for(lambda: slow_hits(origin) == hits + 1)
    waiter = send_get(gateway, path)
    assert wait_until(lambda: waiting(gateway) == 2)  # the leader's request and the waiter
    leader.close()
    with waiter:
        answer = read_response(waiter)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"slow"), answer
    assert origin.slow["answered"] - before["answered"] == slow_hits(origin) - hits
    assert origin.slow["aborted"] == before["aborted"]


def test_a_fetch_everyone_left_is_aborted_once(gateway: int, origin: HostileOrigin) -> None:
    path = f"/ab/slow/all-left-{gateway}-{time.monotonic_ns()}"
    before = origin.slow.copy()
    hits = slow_hits(origin)
    clients = [send_get(gateway, path)]
    assert origin.wait_for(lambda: slow_hits(origin) == hits + 1)
    clients += [send_get(gateway, path) for _ in range(4)]
    assert wait_until(lambda: waiting(gateway) == 5)
    for sock in clients:
        sock.close()
    assert origin.wait_for(lambda: origin.slow["aborted"] == before["aborted"] + 1)
    assert wait_until(lambda: waiting(gateway) == 0)
    assert slow_hits(origin) == hits + 1  # coalesced: one upstream request, aborted
    # Nothing was stored from it: the next request fetches again.
    with send_get(gateway, path) as again:
        answer = read_response(again)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"x-cache-status: miss" in answer.lower()


def test_head_misses_are_fetched_as_one_get_stored_and_answered_without_body(
    gateway: int, origin: HostileOrigin
) -> None:
    name = f"head-{gateway}-{time.monotonic_ns()}"
    path = f"/ab/slow/{name}"
    heads = [send_get(gateway, path, "HEAD") for _ in range(100)]
    try:
        answers = [read_head(sock) for sock in heads]
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            assert answer.endswith(b"\r\n\r\n") and b"content-length: 4\r\n" in answer
        # 100 concurrent HEADs on a cold key: one upstream request, a GET.
        assert origin.methods[f"GET /slow/{name}"] == 1
        assert origin.methods[f"HEAD /slow/{name}"] == 0
        # Stored: more HEADs and a GET are hits; no body followed any HEAD's head (the
        # GET on the same connection is answered in order, with its body).
        more = [send_get(gateway, path, "HEAD") for _ in range(20)]
        for sock in more:
            with sock:
                assert b"x-cache-status: HIT" in read_head(sock)
        heads[0].sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        got = read_response(heads[0])
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\nslow"), got
        assert b"x-cache-status: HIT" in got
        assert origin.hits[f"/slow/{name}"] == 1
    finally:
        for sock in heads:
            sock.close()


def test_stalled_readers_are_cut_when_others_need_their_connections(
    gateway: int, origin: HostileOrigin
) -> None:
    """Clients that ask for a stream (64 MiB, over max_body) and read nothing take the
    whole pool (4 connections). With send_timeout at its 30 s default they would hold it
    for 30 s; while other requests wait for a connection, a stalled reader is cut after
    about a second, so a miss is served well within its pool_timeout (5 s)."""
    before, asked = origin.streams["cut"], origin.hits["/big"]
    readers = []
    try:
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", gateway))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /ab/big HTTP/1.1\r\nHost: x\r\n\r\n")
            readers.append(sock)
        assert origin.wait_for(lambda: origin.hits["/big"] >= asked + 4)
        ok = httpx.get(f"http://127.0.0.1:{gateway}/ab/nocache/{time.monotonic_ns()}", timeout=10)
        assert ok.status_code == 200, ok.text
        assert origin.wait_for(lambda: origin.streams["cut"] >= before + 1)
    finally:
        for sock in readers:
            sock.close()


def test_a_reload_lets_streams_in_flight_end_on_the_old_pool(
    origin: HostileOrigin, tmp_path: Path
) -> None:
    """A reload that replaces the service's upstream client (another timeout): a 12 MiB
    stream read slowly, for longer than the old configuration's timeouts (1 s each, plus
    the 5 s that reloads used to wait before closing the old client), is not cut: the old
    pool is closed when its last stream ends."""
    config = tmp_path / "gateway.toml"
    toml = TOML.format(backend="memory", upstream=origin.base).replace(
        "timeout = 10", "timeout = 1"
    )
    config.write_text(toml)
    gw = GatewayProcess(config, args=["--no-access-log"])
    gw.start()
    try:
        before = origin.streams["large finished"]
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(b"GET /ab/large HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while b"\r\n\r\n" not in received:
                received += sock.recv(65536)
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            config.write_text(toml.replace("timeout = 1\n", "timeout = 2\n"))
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGHUP)
            health = f"{gw.base}/_cachegw/health"
            assert wait_until(lambda: httpx.get(health).json()["config"]["generation"] == 2)
            reloaded = time.monotonic()
            while len(body) < 12 * 1024 * 1024:
                slow = time.monotonic() - reloaded < 10  # then the rest at full speed
                chunk = sock.recv(16384 if slow else 1 << 20)
                assert chunk, f"the stream was cut after {len(body)} bytes"
                body += chunk
                if slow:
                    time.sleep(0.05)
        assert len(body) == 12 * 1024 * 1024
        assert origin.wait_for(lambda: origin.streams["large finished"] == before + 1)
    finally:
        output = gw.stop()
    assert "Traceback" not in output, output
