"""Resilience with real processes: `cachegw serve` gateways, a real redis-server, an origin
made slow, failing or dead on command (tests/chaos.py).

Coalescing across processes, a dead lock holder, hit-for-miss, Redis faults (stopped,
stalled by DEBUG SLEEP, READONLY replica, OOM under noeviction), stale-if-error across an
origin outage, stale-while-revalidate with one refresh for the fleet, graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis as redis_lib

from cachegw import CachePolicy, RedisBackend
from cachegw._engine import CacheEngine, Fetched, RequestInfo
from cachegw._keys import hash_parts
from tests.chaos import Answer, Gateway, Origin, burst, get, request_bytes
from tests.hostile import read_response
from tests.redis_process import EVENTUALLY, RedisProcess

PREFIX = "rz"
SERVICE = "svc"

TOML = """
[cache]
backend = "{backend}"
prefix = "{prefix}"

[[services]]
name = "svc"
upstream = "{upstream}"
prefix = "/svc"
ttl = 60

  [[services.routes]]
  path = "/sie/{{rest:path}}"
  ttl = 1
  max_ttl = 60
  stale_if_error = 60

  [[services.routes]]
  path = "/swr/{{rest:path}}"
  ttl = 1
  stale_while_revalidate = 30

  [[services.routes]]
  path = "/{{rest:path}}"
"""


def write_config(directory: Path, backend: str, upstream: str, name: str = "gateway") -> Path:
    path = directory / f"{name}.toml"
    path.write_text(TOML.format(backend=backend, prefix=PREFIX, upstream=upstream))
    return path


def primary_key(rest: str, query: str = "") -> str:
    """The gateway's primary key for GET /svc{rest} over plain HTTP, on a service without
    ``hosts`` (see _GatewayMiddleware._key: service, path, query, key extra, scheme, host)."""
    return hash_parts(PREFIX, (SERVICE, rest, query, "", "http", ""))


def added_latency(answers: list[Answer], upstream_sent: float) -> list[float]:
    return [a.done - upstream_sent for a in answers]


@dataclass
class Fleet:
    origin: Origin
    redis: RedisProcess
    gateways: list[Gateway]
    config: Path


@pytest.fixture(scope="module")
def fleet(redis_proc: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two gateway processes sharing the session's redis-server, one origin."""
    with redis_proc.client() as client:
        client.flushall()
    directory = tmp_path_factory.mktemp("fleet")
    with Origin() as origin:
        config = write_config(directory, redis_proc.url, origin.base)
        gateways: list[Gateway] = []
        try:
            for _ in range(2):
                gateways.append(Gateway(config).start())
            yield Fleet(origin, redis_proc, gateways, config)
        finally:
            for gateway in gateways:
                gateway.stop()


# -- a. one upstream request for the fleet ------------------------------------------------


def test_stampede_across_two_processes_is_one_upstream_request(fleet: Fleet) -> None:
    body = b'{"cold": "' + b"x" * 1000 + b'"}'
    # Long enough for 100 requests to be sent while it is in flight, even on a loaded machine.
    fleet.origin.route("/cold/a", body=body, delay=1.0)
    a, b = fleet.gateways
    targets = [((a, b)[i % 2].port, request_bytes("/svc/cold/a")) for i in range(100)]

    answers, spread = burst(targets, timeout=10)

    # All sent while the first fetch is in flight, or the test proves nothing.
    assert spread < 0.9, f"requests were not sent together ({spread * 1000:.1f} ms)"
    assert fleet.origin.hits["/cold/a"] == 1
    assert [x.status for x in answers] == [200] * 100, Counter(x.error for x in answers)
    assert {x.body for x in answers} == {body}
    statuses = Counter(x.cache for x in answers)
    assert statuses == {"MISS": 1, "HIT": 99}, statuses
    assert sum("collapsed" in x.detail for x in answers) == 99
    [upstream_sent] = fleet.origin.sent["/cold/a"]
    waiters = [x for x in answers if x.cache == "HIT"]
    added = added_latency(waiters, upstream_sent)
    # Both processes had waiters, and they were woken, not left to their 5 s lock timeout.
    # How long they wait is a timing under load: tests/bench/stampede.py measures it.
    assert max(added) < 1.0, sorted(added)


# -- b. a lock holder that died -------------------------------------------------------------


def test_dead_lock_holder_does_not_wedge_the_key(fleet: Fleet) -> None:
    gateway = fleet.gateways[0]
    # The key format this test relies on, checked on a request of its own.
    fleet.origin.route("/lock/probe", body=b"probe")
    assert get(gateway.port, "/svc/lock/probe").status == 200
    with fleet.redis.client() as client:  # written just after the answer was sent
        assert wait_for(lambda: client.exists(primary_key("/lock/probe")) == 1, EVENTUALLY)

        fleet.origin.route("/lock/short", body=b"short")
        fleet.origin.route("/lock/long", body=b"long")
        # A holder that died: its lock expires in 2 s ...
        assert client.set(f"{primary_key('/lock/short')}:lock", "dead", nx=True, px=2000)
        # ... and one whose lock outlives the waiters' lock timeout (5 s, like nginx).
        assert client.set(f"{primary_key('/lock/long')}:lock", "dead", nx=True, px=30000)

        short, long = burst(
            [
                (gateway.port, request_bytes("/svc/lock/short")),
                (gateway.port, request_bytes("/svc/lock/long")),
            ],
            timeout=8,
        )[0]

        assert (short.status, short.body) == (200, b"short")
        assert 1.5 <= short.latency <= 3.0, short.latency
        assert fleet.origin.hits["/lock/short"] == 1
        assert client.exists(primary_key("/lock/short")) == 1  # took the lock, stored

        assert (long.status, long.body) == (200, b"long")
        assert 4.5 <= long.latency <= 5.5, long.latency
        assert fleet.origin.hits["/lock/long"] == 1
        # nginx semantics: after the lock timeout it goes upstream and does not store.
        assert client.exists(primary_key("/lock/long")) == 0


def test_lock_timeout_bounds_the_wait_of_every_request(fleet: Fleet) -> None:
    """nginx's proxy_cache_lock_timeout applies to each waiting request: after 5 s it
    goes upstream itself. Requests queued behind this process's own waiter must not wait
    for that waiter's upstream exchange as well, then make their own, one after the other.
    """
    gateway = fleet.gateways[1]
    fleet.origin.route("/lock/queued", body=b"queued", delay=1.0)
    with fleet.redis.client() as client:
        assert client.set(f"{primary_key('/lock/queued')}:lock", "dead", nx=True, px=30000)
    answers, _ = burst([(gateway.port, request_bytes("/svc/lock/queued"))] * 4, timeout=15)
    assert [(a.status, a.body) for a in answers] == [(200, b"queued")] * 4
    latencies = sorted(round(a.latency, 2) for a in answers)
    # lock_timeout (5 s) + one upstream exchange (1 s) + slack; not 5 + 1 + 1.
    assert max(latencies) <= 5.0 + 1.0 + 0.5, latencies


def test_leader_client_going_away_does_not_fail_the_waiters(fleet: Fleet) -> None:
    """The request that started the fetch hangs up while others wait on it: its fetch
    completes, is stored, and the requests waiting on it (in both processes) get it.
    (A fetch nobody waits for any more is cancelled: tests/test_abandoned.py.)"""
    a, b = fleet.gateways
    fleet.origin.route("/gone/leader", body=b"kept", delay=1.0)
    leader = socket.create_connection(("127.0.0.1", a.port))
    leader.sendall(request_bytes("/svc/gone/leader"))
    assert wait_for(lambda: fleet.origin.hits["/gone/leader"] == 1, EVENTUALLY)
    waiters = []
    for i in range(10):
        sock = socket.create_connection(("127.0.0.1", (a, b)[i % 2].port), timeout=10)
        sock.sendall(request_bytes("/svc/gone/leader"))
        waiters.append(sock)

    def waiting_in_a() -> bool:
        health = httpx.get(f"{a.base}/_cachegw/health", timeout=5).json()
        return bool(health["in_flight"]["waiting"] == 6)  # the leader's request and 5

    assert wait_for(waiting_in_a, EVENTUALLY)
    leader.close()  # before the upstream answers
    answers = []
    for sock in waiters:
        with sock:
            answers.append(read_response(sock))
    assert all(x.startswith(b"HTTP/1.1 200 ") and x.endswith(b"kept") for x in answers), answers
    assert all(b"x-cache-status: HIT" in x for x in answers), answers
    assert fleet.origin.hits["/gone/leader"] == 1
    with fleet.redis.client() as client:
        assert wait_for(lambda: client.exists(primary_key("/gone/leader")) == 1, EVENTUALLY)


# -- c. hit-for-miss --------------------------------------------------------------------------


def test_uncacheable_answers_are_not_queued_behind_a_lock(fleet: Fleet) -> None:
    fleet.origin.route(
        "/private/c", headers=[("cache-control", "private")], body=b"mine", delay=0.3
    )
    a, b = fleet.gateways

    def wave() -> list[Answer]:
        targets = [((a, b)[i % 2].port, request_bytes("/svc/private/c")) for i in range(20)]
        return burst(targets, timeout=10)[0]

    # Cold: the first answer is needed to learn it is uncacheable (one upstream delay),
    # then every waiter fetches its own in parallel (a second one) -- never 20 in a row.
    cold = wave()
    assert [x.status for x in cold] == [200] * 20
    assert {x.body for x in cold} == {b"mine"}
    # 20 in a row would take 6 s; two delays plus scheduling slack is the bound.
    assert max(x.latency for x in cold) < 0.3 * 2 + SLACK, sorted(x.latency for x in cold)
    assert fleet.origin.hits["/private/c"] == 20
    with fleet.redis.client() as client:  # the hit-for-miss marker
        assert wait_for(lambda: client.exists(primary_key("/private/c")) == 1, EVENTUALLY)

    # Later requests go straight upstream, all at once: queued behind one another, the
    # origin's 20 answers would be at least 19 upstream delays (5.7 s) apart.
    later = wave()
    assert [x.status for x in later] == [200] * 20
    answered = fleet.origin.sent["/private/c"][20:]
    assert max(answered) - min(answered) < 0.3 * 5, sorted(x.latency for x in later)
    assert fleet.origin.hits["/private/c"] == 40
    assert {x.cache for x in later} == {"MISS"}
    assert all("collapsed" not in x.detail for x in later)


# -- e. stale-if-error across an origin outage -----------------------------------------------


def test_stale_if_error_when_the_origin_fails_or_dies(fleet: Fleet) -> None:
    origin = fleet.origin
    a, b = fleet.gateways
    origin.route("/sie/e", body=b"good")
    # must-revalidate forbids serving it stale; the ETag keeps it for revalidation.
    origin.route(
        "/sie/mr", body=b"strict", headers=[("cache-control", "must-revalidate"), ("etag", '"1"')]
    )
    assert get(a.port, "/svc/sie/e").cache == "MISS"
    assert get(b.port, "/svc/sie/e").cache == "HIT"
    assert get(a.port, "/svc/sie/mr").cache == "MISS"
    time.sleep(1.2)  # ttl = 1

    origin.route("/sie/e", status=503, body=b"down")
    origin.route("/sie/mr", status=503, body=b"down")
    try:
        for gateway in (a, b, a):
            answer = get(gateway.port, "/svc/sie/e")
            assert (answer.status, answer.body, answer.cache) == (200, b"good", "STALE")
        strict = get(a.port, "/svc/sie/mr")
        assert (strict.status, strict.body) == (503, b"down")

        origin.stop()  # connection refused
        for gateway in (a, b):
            answer = get(gateway.port, "/svc/sie/e")
            assert (answer.status, answer.body, answer.cache) == (200, b"good", "STALE")
        strict = get(b.port, "/svc/sie/mr")
        assert strict.status == 502, (strict.status, strict.body)
    finally:
        origin.start()
    # The good entry was not replaced by the errors: the origin is back, answers again.
    origin.route("/sie/e", body=b"better")
    answer = get(a.port, "/svc/sie/e")
    assert (answer.status, answer.body) == (200, b"better")
    assert get(b.port, "/svc/sie/e").cache == "HIT"


def test_stale_if_error_for_every_coalesced_request(fleet: Fleet) -> None:
    """20 simultaneous requests for an expired entry inside stale_if_error while the
    upstream answers 503: all of them get the stale entry (not only the one that fetched),
    and the failing upstream is asked once per process, not once per request."""
    origin = fleet.origin
    a, b = fleet.gateways
    for path in ("/sie/herd1", "/sie/herd2"):
        origin.route(path, body=b"good")
        assert get(a.port, f"/svc{path}").cache == "MISS"
    time.sleep(1.2)  # ttl = 1
    for path in ("/sie/herd1", "/sie/herd2"):
        origin.route(path, status=503, body=b"down", delay=0.2)

    one, _ = burst([(a.port, request_bytes("/svc/sie/herd1"))] * 20, timeout=10)
    both, _ = burst(
        [((a, b)[i % 2].port, request_bytes("/svc/sie/herd2")) for i in range(20)], timeout=10
    )

    seen = Counter((x.status, x.cache) for x in one)
    assert seen == {(200, "STALE"): 20}, seen
    assert origin.hits["/sie/herd1"] == 1 + 1, origin.hits["/sie/herd1"] - 1
    seen = Counter((x.status, x.cache) for x in both)
    assert seen == {(200, "STALE"): 20}, seen
    assert origin.hits["/sie/herd2"] - 1 <= 2


# -- f. stale-while-revalidate: one refresh for the fleet ------------------------------------


def test_stale_while_revalidate_refreshes_once_for_the_fleet(fleet: Fleet) -> None:
    origin = fleet.origin
    a, b = fleet.gateways
    origin.route("/swr/f", body=b"v1")
    assert get(a.port, "/svc/swr/f").cache == "MISS"
    time.sleep(1.2)  # ttl = 1, stale_while_revalidate = 30
    origin.route("/swr/f", body=b"v2", delay=0.3)

    targets = [((a, b)[i % 2].port, request_bytes("/svc/swr/f")) for i in range(20)]
    answers, _ = burst(targets, timeout=10)

    assert [x.status for x in answers] == [200] * 20
    # Stale v1 to all: none waited for the refresh (it would have answered v2).
    assert {(x.cache, x.body) for x in answers} == {("STALE", b"v1")}
    assert max(x.latency for x in answers) < 0.3 + SLACK, sorted(x.latency for x in answers)
    time.sleep(0.6)  # the refresh takes 0.3 s
    assert origin.hits["/swr/f"] == 2  # the first fetch and ONE refresh
    for gateway in (a, b):
        answer = get(gateway.port, "/svc/swr/f")
        assert (answer.cache, answer.body) == ("HIT", b"v2")
    assert origin.hits["/swr/f"] == 2


# -- g. graceful shutdown -------------------------------------------------------------------


def test_sigterm_lets_the_request_in_flight_finish(fleet: Fleet) -> None:
    body = b"slow answer " * 100
    fleet.origin.route("/slow/g", body=body, delay=1.0)
    leaving = Gateway(fleet.config).start()
    try:
        result: list[tuple[list[Answer], float]] = []
        client = threading.Thread(
            target=lambda: result.append(
                burst([(leaving.port, request_bytes("/svc/slow/g"))], timeout=10)
            )
        )
        client.start()
        deadline = time.monotonic() + 2
        while fleet.origin.hits["/slow/g"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fleet.origin.hits["/slow/g"] == 1  # the request is in flight upstream
        signalled = time.monotonic()
        leaving.terminate()
        client.join(10)
        assert leaving.proc is not None
        leaving.proc.wait(10)
        exited = time.monotonic() - signalled
    finally:
        leaving.stop()
    [answer] = result[0][0]
    assert (answer.status, answer.body) == (200, body), (answer.status, answer.error)
    assert exited < 10
    # The next process sees the complete entry (or none): never half of it.
    after = get(fleet.gateways[0].port, "/svc/slow/g")
    assert (after.status, after.body) == (200, body)


# -- d. Redis faults ------------------------------------------------------------------------

UPSTREAM_DELAY = 0.05
OP_TIMEOUT = 0.25
# Scheduling slack for one answer on a loaded 2-core machine (CI runs the suite there).
SLACK = 1.0


def assert_no_deadline_waits(answers: list[Answer]) -> None:
    """No answer waited for a Redis operation's deadline: code that did (a write awaited
    on a dead server, a retry) makes every such answer take upstream + OP_TIMEOUT or more.
    A few answers may be that slow on a loaded machine without any waiting, so: most are
    faster than that, and none is slower than that plus scheduling slack."""
    latencies = sorted(round(a.latency, 3) for a in answers)
    waited = [t for t in latencies if t >= UPSTREAM_DELAY + OP_TIMEOUT]
    assert len(waited) <= len(latencies) // 10, latencies
    assert latencies[-1] <= UPSTREAM_DELAY + OP_TIMEOUT + SLACK, latencies


@dataclass
class Faulty:
    origin: Origin
    redis: RedisProcess
    gateway: Gateway


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    """One gateway on a redis-server of its own, which the tests stop, stall and fill."""
    directory = tmp_path_factory.mktemp("faulty")
    with RedisProcess() as redis, Origin() as origin:
        gateway = Gateway(write_config(directory, redis.url, origin.base)).start()
        try:
            yield Faulty(origin, redis, gateway)
        finally:
            gateway.stop()


class Loop:
    """Clients requesting back to back (one per path), each answer kept with its times."""

    def __init__(self, port: int, paths: list[str]) -> None:
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(port, path)) for path in paths]

    def _run(self, port: int, path: str) -> None:
        while not self._stop.is_set():
            self.answers.append(get(port, path, timeout=10))

    def __enter__(self) -> Loop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def since(self, start: float, end: float = float("inf")) -> list[Answer]:
        return [a for a in list(self.answers) if a.sent >= start and a.done <= end]


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def healthy_cache(faulty: Faulty, path: str) -> None:
    """Redis is up, the circuit closed, and ``path`` is a HIT."""
    faulty.redis.start()
    assert wait_for(lambda: get(faulty.gateway.port, path).cache == "HIT", EVENTUALLY)
    assert faulty.gateway.health()["circuit"] == "closed"


def test_redis_stopped_under_load_then_back(faulty: Faulty) -> None:
    """redis-server stopped under a request loop: no 5xx, no answer waits for a Redis
    operation's deadline, the circuit opens; Redis back: HITs again, circuit closed,
    without restarting the gateway. (How much latency an outage adds is measured by
    tests/bench/resilience.py, not asserted here.)"""
    gateway, origin, redis = faulty.gateway, faulty.origin, faulty.redis
    paths = ["/d/stop/0", "/d/stop/1"]
    for path in paths:
        origin.route(path, body=b"stop", delay=UPSTREAM_DELAY)
        healthy_cache(faulty, f"/svc{path}")
    circuits: list[str] = []
    hits_before = sum(origin.hits[path] for path in paths)
    with Loop(gateway.port, [f"/svc{path}" for path in paths]) as loop:
        time.sleep(0.3)
        redis.stop()
        down = time.monotonic()
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            circuits.append(gateway.health()["circuit"])
            time.sleep(0.05)
        redis.start()
        up = time.monotonic()
        back = wait_for(lambda: any(a.cache == "HIT" for a in loop.since(up)), EVENTUALLY)
        back_after = time.monotonic() - up
    answers = loop.answers
    assert back, Counter(a.cache for a in loop.since(up))
    assert back_after < 3
    assert [a.status for a in answers] == [200] * len(answers), Counter(a.status for a in answers)
    assert {a.body for a in answers} == {b"stop"}
    during = loop.since(down, up)
    assert len(during) > 10
    # Uncached while Redis is down (once the process's own 1 s copies have expired).
    assert {a.cache for a in during} <= {"MISS", "HIT"}
    assert sum(origin.hits[path] for path in paths) - hits_before >= 10
    assert_no_deadline_waits(answers)
    assert "open" in circuits
    assert wait_for(lambda: gateway.health()["circuit"] == "closed", EVENTUALLY)


def test_redis_stalled_by_client_pause(faulty: Faulty) -> None:
    """A Redis that stops answering (CLIENT PAUSE 2000 ALL): every request is answered,
    within a few operation deadlines; once the breaker is open, without waiting on Redis."""
    gateway, origin, redis = faulty.gateway, faulty.origin, faulty.redis
    paths = [f"/d/slow/{i}" for i in range(6)]
    for path in paths:
        origin.route(path, body=b"slow", delay=UPSTREAM_DELAY)
        healthy_cache(faulty, f"/svc{path}")
    opened: list[float] = []

    def sleep_redis() -> None:
        # CLIENT PAUSE works on every version (DEBUG is off by default since Redis 7); the
        # thread lives as long as the pause, so the loop below knows when Redis woke.
        with redis_lib.Redis(host="127.0.0.1", port=redis.port, socket_timeout=5) as client:
            client.execute_command("CLIENT", "PAUSE", "2000", "ALL")
        time.sleep(2)

    with Loop(gateway.port, [f"/svc{path}" for path in paths]) as loop:
        time.sleep(0.2)
        stalled = time.monotonic()
        sleeper = threading.Thread(target=sleep_redis)
        sleeper.start()
        while sleeper.is_alive():
            if not opened and gateway.health()["circuit"] == "open":
                opened.append(time.monotonic())
            time.sleep(0.02)
        sleeper.join()
        woke = time.monotonic()
        assert wait_for(lambda: any(a.cache == "HIT" for a in loop.since(woke + 0.3)), EVENTUALLY)
    answers = loop.answers
    assert [a.status for a in answers] == [200] * len(answers), Counter(a.status for a in answers)
    assert {a.body for a in answers} == {b"slow"}
    during = loop.since(stalled, woke)
    # Each answer waits for a few operation deadlines at most ...
    assert max(a.latency for a in during) <= UPSTREAM_DELAY + 4 * OP_TIMEOUT + SLACK, sorted(
        round(a.latency, 3) for a in during
    )
    # ... and once the breaker is open, at most one probe's deadline: most are fast.
    assert opened, "the circuit never opened while Redis slept"
    after_open = [a for a in loop.since(opened[0], woke) if a.cache != "HIT"]
    assert after_open
    latencies = sorted(round(a.latency, 3) for a in after_open)
    # Most never wait on Redis (a waiting one takes a whole deadline); none waits for more
    # than one probe's deadline.
    assert statistics.median(latencies) < UPSTREAM_DELAY + OP_TIMEOUT, latencies
    assert max(latencies) <= UPSTREAM_DELAY + OP_TIMEOUT + SLACK, latencies


@pytest.fixture
def paused_gateway(faulty: Faulty, tmp_path: Path) -> Iterator[Gateway]:
    """A gateway on the faulty Redis whose L1 copies last 5 s (1 s by default): long enough
    for 'a warm entry is served during the pause' not to depend on the machine's load."""
    config = write_config(tmp_path, faulty.redis.url, faulty.origin.base)
    config.write_text(config.read_text().replace("[cache]\n", "[cache]\nl1_ttl = 5\n", 1))
    gateway = Gateway(config).start()
    try:
        yield gateway
    finally:
        gateway.stop()


def test_paused_redis_costs_a_cold_request_one_read_budget(
    faulty: Faulty, paused_gateway: Gateway
) -> None:
    """Issue 12: with Redis paused (accepting connections, not answering), a cold request
    waits at most one read budget for all its reads together (lookup, purge record, lock)
    and never for its writes (store, landing message, lock release: after the answer).
    Warm entries are answered too (from the L1 copy only while the purge record can still
    be read); nothing fails."""
    origin, redis, gateway = faulty.origin, faulty.redis, paused_gateway
    origin.route("/d/pause/warm", body=b"warm")
    cold = [f"/d/pause/cold/{i}" for i in range(400)]
    for path in cold:
        origin.route(path, body=b"cold", delay=UPSTREAM_DELAY)
    redis.start()
    assert wait_for(lambda: get(gateway.port, "/svc/d/pause/warm").cache == "HIT", EVENTUALLY)
    assert gateway.health()["circuit"] == "closed"
    paused = threading.Event()

    def pause_redis() -> None:
        with redis_lib.Redis(host="127.0.0.1", port=redis.port, socket_timeout=5) as client:
            client.execute_command("CLIENT", "PAUSE", "3000", "ALL")
        paused.set()
        time.sleep(3)

    sleeper = threading.Thread(target=pause_redis)
    sleeper.start()
    assert paused.wait(5)
    began = time.monotonic()
    # Within the L1 copy's life: answered from the process, Redis or not.
    warm = [get(gateway.port, "/svc/d/pause/warm") for _ in range(5)]
    answers: list[Answer] = []
    queue = iter(cold)
    lock = threading.Lock()

    def client() -> None:
        while time.monotonic() - began < 2.0:
            with lock:
                path = next(queue, None)
            if path is None:
                return
            answers.append(get(gateway.port, f"/svc{path}", timeout=10))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(15)
    sleeper.join(10)
    # Served from the L1 copy until the purge record cannot be read, then uncached (issue
    # 23: no copy is served that cannot be checked); answered either way.
    assert {(a.status, a.body) for a in warm} == {(200, b"warm")}
    assert {a.cache for a in warm} <= {"HIT", "MISS"}
    assert len(answers) > 8
    assert [a.status for a in answers] == [200] * len(answers), Counter(a.status for a in answers)
    assert {a.body for a in answers} == {b"cold"}
    latencies = sorted(round(a.latency, 3) for a in answers)
    # One read budget (0.25 s) plus the upstream at most, with room for a loaded machine;
    # a deadline per operation (lookup, lock, store, landing, release) was ~1 s.
    assert latencies[-1] <= UPSTREAM_DELAY + OP_TIMEOUT + 0.35, latencies
    # Once the breaker is open, Redis is not waited for at all: most answers are fast.
    assert statistics.median(latencies) <= UPSTREAM_DELAY + 0.15, latencies


@contextlib.contextmanager
def out_of_memory(redis: RedisProcess) -> Iterator[None]:
    """Redis refusing every write with OOM (noeviction), for the duration."""
    fillers = 40
    with redis.client() as client:
        try:
            # 2 MB of data, then a 1 MB limit: every write is refused, with a margin that
            # Redis freeing client buffers (clientsCron) cannot eat into.
            for index in range(fillers):
                client.set(f"filler:{index}", b"x" * 50_000)
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", "1mb")
            with pytest.raises(redis_lib.exceptions.OutOfMemoryError):
                client.set("probe", b"x")
            yield
        finally:
            client.config_set("maxmemory", "0")
            client.delete(*[f"filler:{index}" for index in range(fillers)])


def test_redis_out_of_memory_under_noeviction(faulty: Faulty) -> None:
    gateway, origin = faulty.gateway, faulty.origin
    origin.route("/d/oom-cached", body=b"kept", delay=UPSTREAM_DELAY)
    origin.route("/d/oom-cold", body=b"cold", delay=UPSTREAM_DELAY)
    healthy_cache(faulty, "/svc/d/oom-cached")
    with out_of_memory(faulty.redis):
        before = origin.hits["/d/oom-cold"]
        answers = [get(gateway.port, "/svc/d/oom-cold") for _ in range(8)]
        kept = [get(gateway.port, "/svc/d/oom-cached") for _ in range(3)]
        together = burst([(gateway.port, request_bytes("/svc/d/oom-cold"))] * 10)[0]
        output = gateway.output()
    assert [a.status for a in answers + kept + together] == [200] * 21
    assert {a.body for a in answers + together} == {b"cold"}
    assert {a.cache for a in answers} == {"MISS"}  # nothing could be stored
    assert origin.hits["/d/oom-cold"] - before >= 8
    assert {(a.body, a.cache) for a in kept} == {(b"kept", "HIT")}  # served if present
    assert_no_deadline_waits(answers)
    assert "OutOfMemoryError" in output
    # Memory is back: caching resumes by itself.
    assert wait_for(lambda: get(gateway.port, "/svc/d/oom-cold").cache == "HIT", EVENTUALLY)


def test_cache_status_does_not_claim_stored_when_the_write_failed(faulty: Faulty) -> None:
    """RFC 9211: ``stored`` means the response was stored. A write Redis refused (here
    OOM; equally READONLY or an outage) must not be reported as stored."""
    faulty.origin.route("/d/claim", body=b"claim")
    with out_of_memory(faulty.redis):
        answer = get(faulty.gateway.port, "/svc/d/claim")
        with faulty.redis.client() as client:
            assert client.exists(primary_key("/d/claim")) == 0
    assert (answer.status, answer.cache) == (200, "MISS")
    assert "stored" not in answer.detail, answer.detail


def test_redis_readonly_replica(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> None:
    """After a failover to a replica that is still read-only: writes fail, reads work."""
    origin = fleet.origin
    origin.route("/ro/seeded", body=b"seeded")
    origin.route("/ro/cold", body=b"cold", delay=UPSTREAM_DELAY)
    assert get(fleet.gateways[0].port, "/svc/ro/seeded").cache == "MISS"
    directory = tmp_path_factory.mktemp("readonly")
    with fleet.redis.client() as primary:
        # Redis 7+ syncs replicas diskless after a 5 s delay by default (6.2: from disk,
        # at once): start the sync at once on every version.
        primary.config_set("repl-diskless-sync-delay", 0)
    with RedisProcess("--replicaof", "127.0.0.1", str(fleet.redis.port)) as replica:
        with replica.client() as client:
            assert wait_for(lambda: client.exists(primary_key("/ro/seeded")) == 1, EVENTUALLY)
        gateway = Gateway(write_config(directory, replica.url, origin.base)).start()
        try:
            seeded = [get(gateway.port, "/svc/ro/seeded") for _ in range(3)]
            cold = [get(gateway.port, "/svc/ro/cold") for _ in range(8)]
            together = burst([(gateway.port, request_bytes("/svc/ro/cold"))] * 10, timeout=10)[0]
            output = gateway.output()
        finally:
            gateway.stop()
    assert {(a.status, a.body, a.cache) for a in seeded} == {(200, b"seeded", "HIT")}
    assert [a.status for a in cold + together] == [200] * 18
    assert {a.body for a in cold + together} == {b"cold"}
    assert {a.cache for a in cold} == {"MISS"}
    assert_no_deadline_waits(cold)
    assert "READONLY" in output or "ReadOnly" in output, output[-2000:]


async def test_writes_after_the_answer_are_bounded_while_redis_stalls(
    redis_proc_private: RedisProcess,
) -> None:
    """Issue 12: answers do not wait for their cache writes, and a Redis that does not
    take writes cannot make them pile up: beyond the bound, writes are dropped."""
    backend = RedisBackend.from_url(redis_proc_private.url)
    engine = CacheEngine(backend)  # locks in the process: only the stores go to Redis
    engine.writer.max_in_flight = 3
    policy = CachePolicy(ttl=60)

    async def fetch(validators: object = ()) -> Fetched:
        return Fetched(200, [(b"content-length", b"4")], b"cold")

    with redis_proc_private.client() as client:
        # Writes wait (reads still answer: every lookup is a quick miss).
        client.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
        try:
            answers = await asyncio.gather(
                *(engine.serve(RequestInfo("GET", f"w:{i}", {}), policy, fetch) for i in range(10))
            )
            in_flight = list(engine.writer.writing)
            assert [a.status for a in answers] == [200] * 10
            assert {a.body for a in answers} == {b"cold"}
            # Every answer was ready while the writes were still waiting on Redis.
            assert len(in_flight) == 3 and not any(task.done() for task in in_flight)
            assert engine.stats["writes_dropped"] == 7
            assert all("stored" not in dict(a.headers)[b"cache-status"].decode() for a in answers)
        finally:
            client.execute_command("CLIENT", "UNPAUSE")
    await engine.aclose()
    await backend.aclose()
    with redis_proc_private.client() as client:
        # The dropped writes never reached Redis (the others may have, once it resumed).
        assert set(client.keys("w:*")) <= {b"w:0", b"w:1", b"w:2"}
