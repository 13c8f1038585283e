"""Writes are never undone (issue 11): an answer whose fetch started before an
invalidation of its URI is never served as fresh after it.

Deterministic races, with an upstream that parks a GET until the test releases it, on
the memory backend (one `cachegw serve` process) and on Redis (two processes: the read
goes through one, the write through the other), with and without ``Vary``, and for a
route with a ``key`` function (a write by one user invalidates every user's entry).
Plus a short run of the consistency checker (tests/consistency_check.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi_cache import FastAPICache

from cachegw import Gateway, MemoryBackend, RedisBackend, Service, cached, create_app, purge
from cachegw._server import uvicorn_options
from tests.consistency_check import Workload, check
from tests.gateway_process import gateway_processes
from tests.items_upstream import Hold, VersionedItems
from tests.redis_process import HEALTHY
from tests.servers import run_uvicorn

TOML = """
[cache]
backend = "{backend}"
op_timeout = "5s"  # a loaded machine must not turn HITs into misses
prefix = "{prefix}"

[[services]]
name = "api"
upstream = "{upstream}"
prefix = "/api"
ttl = 60

  [[services.routes]]
  path = "/items/{{item_id}}"

  [[services.routes]]
  path = "/vitems/{{item_id}}"
"""

QUIET = ["--no-access-log"]
#: Across processes an invalidation is seen within this (RedisPurges.propagation).
WINDOW = 0.2


def config(tmp_path: Path, upstream: str, backend: str, prefix: str = "c") -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(TOML.format(upstream=upstream, backend=backend, prefix=prefix))
    return path


def version(response: httpx.Response) -> int:
    assert response.status_code in (200, 404), response.text
    return int(response.headers["x-version"])


def background_get(url: str, headers: dict[str, str]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        out.append(httpx.get(url, headers=headers, timeout=10))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def race(
    upstream: VersionedItems,
    path: str,
    read_via: str,
    write_via: str,
    *,
    window: float,
    user: tuple[str, str] | None = None,
) -> None:
    """The race of issue 11, step by step; asserts every read the rule constrains.

    ``user``: (writer, other) for a route keyed on the ``x-user`` header.
    """
    writer, other = user or ("", "")
    fr = {"accept-language": "fr", "x-user": other}
    en = {"accept-language": "en", "x-user": writer}
    with httpx.Client(timeout=10) as client:
        # 1. A cached answer (for /vitems: the fr variant; with a key: the other user's).
        assert version(client.get(read_via + path, headers=fr)) == 0
        hit = client.get(read_via + path, headers=fr)
        assert (version(hit), hit.headers["x-cache-status"]) == (0, "HIT")
        # 2. A write invalidates it (through the other process when there are two).
        assert version(client.put(write_via + path, headers=en)) == 1
        time.sleep(window)
        # 3. A GET misses and its fetch is parked at the upstream, having read version 1.
        hold = upstream.hold(path[len("/api") :])
        thread, held = background_get(read_via + path, en)
        assert hold.arrived.wait(10)
        assert hold.version == 1
        # 4. A second write while that fetch is in flight.
        assert version(client.put(write_via + path, headers=en)) == 2
        # A read that starts now neither joins the fetch in flight nor waits for it
        # (across processes: for its lock, up to 5 s): it fetches version 2 and stores it.
        time.sleep(window)
        for base in dict.fromkeys((write_via, read_via)):
            deadline = time.monotonic() + 3
            while True:
                during = client.get(base + path, headers=en)
                assert version(during) == 2, during.headers
                if during.headers["x-cache-status"] == "HIT":
                    break
                assert time.monotonic() < deadline, "no hit while the old fetch is in flight"
                time.sleep(0.05)
        # 5. The parked fetch completes: its client may see version 1 (it asked before
        #    the write was acknowledged) ...
        hold.release()
        thread.join(10)
        assert version(held[0]) == 1
        # 6. ... but nobody who asks after the write (plus the visibility window across
        #    processes) sees anything older than 2: not that answer, not the fr variant or
        #    the other user's entry cached at step 1.
        time.sleep(window)
        for base in dict.fromkeys((read_via, write_via)):
            for headers in (en, fr, en, fr):
                seen = client.get(base + path, headers=headers)
                assert version(seen) == 2, (base, headers, seen.headers)
        again = client.get(read_via + path, headers=en)
        assert (version(again), again.headers["x-cache-status"]) == (2, "HIT")


def test_race_on_memory(tmp_path: Path) -> None:
    upstream = VersionedItems()
    with (
        run_uvicorn(upstream) as origin,
        gateway_processes(config(tmp_path, origin, "memory")) as [gw],
    ):
        for path in ("/api/items/8", "/api/vitems/8"):  # without and with Vary
            race(upstream, path, gw.base, gw.base, window=0.0)


def test_race_on_redis_across_two_processes(tmp_path: Path, redis_url: str) -> None:
    upstream = VersionedItems()
    with (
        run_uvicorn(upstream) as origin,
        gateway_processes(config(tmp_path, origin, redis_url, "r"), count=2) as [a, b],
    ):
        for path in ("/api/items/8", "/api/vitems/8"):  # read through a, write through b
            started = time.monotonic()
            race(upstream, path, a.base, b.base, window=WINDOW)
            print(path, time.monotonic() - started)
        # Both through one process: seen at once, no window.
        race(upstream, "/api/vitems/3", a.base, a.base, window=0.0)


def by_user(request: Request) -> str:
    return request.headers.get("x-user", "")


@contextmanager
def keyed_gateways(origin: str, backend: str, count: int) -> Iterator[list[str]]:
    """``count`` gateways (own engine, loop and backend client each) with a route keyed on
    the user, served by cachegw's uvicorn protocol (fast path included)."""
    with ExitStack() as stack:
        bases = []
        for _ in range(count):
            service = Service("api", origin, prefix="/api", ttl=60)
            service.route("/items/{item_id}", key=by_user)
            service.route("/vitems/{item_id}", key=by_user)
            app = create_app(
                Gateway(services=[service], backend=backend, prefix="k", op_timeout=HEALTHY)
            )
            bases.append(stack.enter_context(run_uvicorn(app, **uvicorn_options(lifespan="on"))))
        yield bases


@pytest.mark.parametrize("path", ["/api/items/5", "/api/vitems/5"])
def test_write_by_one_user_invalidates_every_users_entry_on_memory(path: str) -> None:
    upstream = VersionedItems()
    with run_uvicorn(upstream) as origin, keyed_gateways(origin, "memory", 1) as [gw]:
        race(upstream, path, gw, gw, window=0.0, user=("alice", "bob"))


def test_write_by_one_user_invalidates_every_users_entry_on_redis(redis_url: str) -> None:
    upstream = VersionedItems()
    with run_uvicorn(upstream) as origin, keyed_gateways(origin, redis_url, 2) as [a, b]:
        race(upstream, "/api/vitems/6", a, b, window=WINDOW, user=("alice", "bob"))


# -- the checker ----------------------------------------------------------------------


def test_consistency_checker_finds_no_violation(tmp_path: Path, redis_url: str) -> None:
    """Concurrent readers and writers for a few seconds on each backend: no read that
    started after an acknowledged write (plus the window across processes) is older."""
    workload = Workload(items=50, workers=8, seconds=2.0)
    for backend, count, window in (("memory", 1, 0.0), (redis_url, 2, WINDOW)):
        upstream = VersionedItems()
        with (
            run_uvicorn(upstream) as origin,
            gateway_processes(
                config(tmp_path, origin, backend, "chk"), count=count, args=QUIET
            ) as procs,
        ):
            result = check([p.base + "/api" for p in procs], workload, window=window)
        assert result.violations == [], result.report()
        assert result.errors == 0, result.report()
        assert result.reads > 50 and result.writes > 5 and result.hits > 0, result.report()


# -- @cached ----------------------------------------------------------------------------


def items_app(make_backend: Callable[[], Any], prefix: str) -> tuple[FastAPI, dict[str, Any]]:
    """An app whose GET handler is `@cached` and whose PUT handler writes, then purges the
    path (the documented way to invalidate after a write). ``state["hold"]`` parks the
    next GET after it has read the version."""
    state: dict[str, Any] = {"version": 0, "hold": None}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend = make_backend()
        FastAPICache.reset()
        FastAPICache.init(backend, prefix=prefix)
        yield
        if isinstance(backend, RedisBackend):
            await backend.aclose()
        FastAPICache.reset()

    app = FastAPI(lifespan=lifespan)

    @app.get("/items/{item_id}")
    @cached(ttl=60)
    async def get_item(item_id: int) -> dict[str, int]:
        version = state["version"]
        hold: Hold | None = state["hold"]
        if hold is not None:
            state["hold"] = None
            hold.version = version
            hold.arrived.set()
            await asyncio.to_thread(hold.released.wait, 30)
        return {"id": item_id, "version": version}

    @app.put("/items/{item_id}")
    async def put_item(item_id: int, request: Request) -> dict[str, int]:
        state["version"] += 1
        await purge(paths=[request.url.path])
        return {"id": item_id, "version": state["version"]}

    return app, state


@pytest.mark.parametrize("which", ["memory", "redis"])
def test_cached_route_write_is_not_undone_by_a_concurrent_miss(which: str, request: Any) -> None:
    make_backend: Callable[[], Any] = MemoryBackend
    if which == "redis":
        url: str = request.getfixturevalue("redis_url")
        make_backend = lambda: RedisBackend.from_url(url, op_timeout=HEALTHY)  # noqa: E731
    app, state = items_app(make_backend, f"deco-{which}")
    with run_uvicorn(app, lifespan="on") as base, httpx.Client(base_url=base) as client:
        assert client.get("/items/1").json()["version"] == 0
        assert client.get("/items/1").headers["x-cache-status"] == "HIT"
        hold = state["hold"] = Hold()
        client.put("/items/1")  # version 1; the cached version 0 is purged
        thread, held = background_get(f"{base}/items/1", {})
        assert hold.arrived.wait(10) and hold.version == 1
        assert client.put("/items/1").json()["version"] == 2
        during = client.get("/items/1")  # must not join the fetch in flight
        hold.release()
        thread.join(10)
        assert held[0].json()["version"] == 1  # asked before the write: may be older
        after = [client.get("/items/1") for _ in range(2)]
    assert during.json()["version"] == 2
    assert [a.json()["version"] for a in after] == [2, 2]
    assert after[1].headers["x-cache-status"] == "HIT"
