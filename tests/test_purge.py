"""Purging: the pure record, the admin API, the Python API, across processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from cachegw import Gateway, MemoryBackend, RedisBackend, Service
from cachegw._admin import PurgeError, parse_purge
from cachegw._backends import close_redis
from cachegw._purge import PurgeState, RedisPurges, scopes_for
from tests.gateway_process import gateway_processes
from tests.redis_process import HEALTHY
from tests.servers import StubUpstream, run_uvicorn
from tests.test_gateway import gateway_for

TOKEN = "s3cret-token"

# -- the record (pure) --------------------------------------------------------------------


def test_verdicts() -> None:
    state = PurgeState()
    scopes = scopes_for("svc", "/items/1", ["item:1"])
    assert state.verdict(scopes, 100.0) is None
    state.apply("tag:item:2", 200.0, soft=False)
    assert state.verdict(scopes, 100.0) is None  # another tag
    state.apply("tag:item:1", 150.0, soft=True)
    assert state.verdict(scopes, 100.0) == ("soft", 150.0)
    assert state.verdict(scopes, 160.0) is None  # fetched after the purge
    state.apply("svc:svc", 170.0, soft=False)
    assert state.verdict(scopes, 160.0) == ("hard", 170.0)
    state.apply("svc:svc", 120.0, soft=False)  # an older purge never lowers the record
    assert state.verdict(scopes, 160.0) == ("hard", 170.0)
    state.apply("*", 300.0, soft=False)
    assert state.verdict(["*"], 299.0) == ("hard", 300.0)


GATEWAY = Gateway(
    services=[
        Service("catalog", "http://127.0.0.1:1", prefix="/catalog").route(
            "/items/{item_id}", ttl=60
        )
    ]
)


@pytest.mark.parametrize(
    ("body", "scopes"),
    [
        (b'{"tags": ["item:42", "items"]}', ["tag:item:42", "tag:items"]),
        (b'{"service": "catalog"}', ["svc:catalog"]),
        (b'{"all": true, "soft": true}', ["*"]),
        (b'{"paths": ["/catalog/items/42"]}', ["path:catalog:/items/42"]),
        # The one spelling entries are stored under (RFC 3986 §6.2.2).
        (b'{"paths": ["/catalog/%69tems/%c3%a9"]}', ["path:catalog:/items/%C3%A9"]),
    ],
)
def test_parse_purge(body: bytes, scopes: list[str]) -> None:
    assert parse_purge(body, GATEWAY).scopes == scopes


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1]", "JSON object"),
        (b'{"tags": ["a"], "tagz": 1}', "Unknown field 'tagz'"),
        (b'{"tags": ["a"], "all": true}', "exactly one"),
        (b"{}", "exactly one"),
        (b'{"tags": "item:1"}', "non-empty list of strings"),
        (b'{"tags": []}', "non-empty list of strings"),
        (b'{"all": 1}', "'all' must be true"),
        (b'{"service": "nope"}', "must name a service"),
        (b'{"paths": ["/catalog/items/1?x=1"]}', "without a query"),
        (b'{"paths": ["/elsewhere"]}', "No declared route"),
        (b'{"paths": ["/catalog/a/../items/1"]}', "is refused: The request path contains a '.'"),
        (b'{"paths": ["/catalog/caf\\u00e9"]}', "It is not ASCII"),
        (b'{"tags": ["a"], "soft": "yes"}', "'soft' must be true or false"),
    ],
)
def test_parse_purge_errors(body: bytes, message: str) -> None:
    with pytest.raises(PurgeError) as error:
        parse_purge(body, GATEWAY)
    assert error.value.status == 400
    assert message in error.value.detail


# -- the admin API on a live gateway ----------------------------------------------------


ITEM_ROUTES: tuple[str, dict[str, Any]] = (
    "/items/{item_id}",
    {"ttl": 60, "tags": ["items", "item:{item_id}"]},
)


@pytest.fixture
def admin_token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TEST_CACHEGW_TOKEN", TOKEN)
    return TOKEN


def admin_gateway(stub: StubUpstream, **kwargs: Any) -> Any:
    return gateway_for(
        stub,
        ITEM_ROUTES,
        ("/{rest:path}", {"ttl": 60}),
        admin_token_env="TEST_CACHEGW_TOKEN",
        **kwargs,
    )


def statuses(client: httpx.Client, *paths: str) -> list[str]:
    return [client.get(p).headers["x-cache-status"] for p in paths]


def test_purge_by_tag_only_misses_tagged_entries(admin_token: str) -> None:
    stub = StubUpstream()
    with admin_gateway(stub) as (client, _):
        statuses(client, "/svc/items/42", "/svc/items/43", "/svc/other")
        answer = client.post(
            "/_cachegw/purge",
            json={"tags": ["item:42"]},
            headers={"authorization": f"Bearer {admin_token}"},
        )
        after = statuses(client, "/svc/items/42", "/svc/items/43", "/svc/other")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"purged": "tags", "scopes": ["tag:item:42"], "soft": False}
    assert after == ["MISS", "HIT", "HIT"]


def test_purge_by_upstream_surrogate_keys(admin_token: str) -> None:
    stub = StubUpstream()
    stub.route("/a", headers=[(b"surrogate-key", b"red blue")], body=b"a")
    stub.route("/b", headers=[(b"cache-tag", b"blue, green")], body=b"b")
    stub.route("/c", headers=[(b"cache-tag", b"green")], body=b"c")
    with admin_gateway(stub) as (client, _):
        first = client.get("/svc/a")
        statuses(client, "/svc/b", "/svc/c")
        client.post(
            "/_cachegw/purge", json={"tags": ["blue"]}, headers={"authorization": f"Bearer {TOKEN}"}
        )
        after = statuses(client, "/svc/a", "/svc/b", "/svc/c")
    assert "surrogate-key" not in first.headers  # read as tags, not passed on
    assert after == ["MISS", "MISS", "HIT"]


def test_purge_by_path_service_and_all(admin_token: str) -> None:
    stub = StubUpstream()
    auth = {"authorization": f"Bearer {admin_token}"}
    with admin_gateway(stub) as (client, _):
        statuses(client, "/svc/items/1?a=1", "/svc/items/1?a=2", "/svc/items/2")
        client.post("/_cachegw/purge", json={"paths": ["/svc/items/1"]}, headers=auth)
        by_path = statuses(client, "/svc/items/1?a=1", "/svc/items/1?a=2", "/svc/items/2")
        client.post("/_cachegw/purge", json={"service": "svc"}, headers=auth)
        by_service = statuses(client, "/svc/items/1?a=1", "/svc/items/2")
        client.post("/_cachegw/purge", json={"all": True}, headers=auth)
        by_all = statuses(client, "/svc/items/1?a=1", "/svc/items/2")
        again = statuses(client, "/svc/items/1?a=1", "/svc/items/2")
    assert by_path == ["MISS", "MISS", "HIT"]
    assert by_service == ["MISS", "MISS"]
    assert by_all == ["MISS", "MISS"]
    assert again == ["HIT", "HIT"]


def test_soft_purge_serves_stale_then_refreshes(admin_token: str) -> None:
    stub = StubUpstream()
    stub.route("/items/5", body=b"v1")
    routes = ("/items/{item_id}", {"ttl": 60, "stale_while_revalidate": 30, "tags": ["i"]})
    with gateway_for(stub, routes, admin_token_env="TEST_CACHEGW_TOKEN") as (client, _):
        client.get("/svc/items/5")
        stub.route("/items/5", body=b"v2")
        client.post(
            "/_cachegw/purge",
            json={"tags": ["i"], "soft": True},
            headers={"authorization": f"Bearer {admin_token}"},
        )
        stale = client.get("/svc/items/5")
        deadline = time.monotonic() + 5
        while stub.hits["/items/5"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        fresh = client.get("/svc/items/5")
    assert (stale.headers["x-cache-status"], stale.content) == ("STALE", b"v1")
    assert (fresh.headers["x-cache-status"], fresh.content) == ("HIT", b"v2")
    assert stub.hits["/items/5"] == 2


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({}, b'{"all": true}', 401),
        ({"authorization": "Bearer wrong"}, b'{"all": true}', 401),
        ({"authorization": f"Basic {TOKEN}"}, b'{"all": true}', 401),
        ({"authorization": f"Bearer {TOKEN}"}, b"{oops", 400),
        ({"authorization": f"Bearer {TOKEN}"}, b'{"all": true, "extra": 1}', 400),
    ],
)
def test_bad_purge_requests_purge_nothing(
    admin_token: str, headers: dict[str, str], body: bytes, status: int
) -> None:
    stub = StubUpstream()
    with admin_gateway(stub) as (client, _):
        client.get("/svc/items/1")
        answer = client.post("/_cachegw/purge", content=body, headers=headers)
        after = client.get("/svc/items/1")
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/problem+json"
    if status == 401:
        assert answer.headers["www-authenticate"].startswith("Bearer")
    assert after.headers["x-cache-status"] == "HIT"


def test_purge_is_404_without_a_configured_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_CACHEGW_TOKEN", raising=False)
    with admin_gateway(StubUpstream()) as (client, _):
        unset = client.post("/_cachegw/purge", json={"all": True})
    with gateway_for(StubUpstream()) as (client, _):
        unconfigured = client.post(
            "/_cachegw/purge", json={"all": True}, headers={"authorization": "Bearer x"}
        )
    assert unset.status_code == unconfigured.status_code == 404


# -- across processes sharing Redis -----------------------------------------------------


TOML = """
[cache]
backend = "{backend}"
op_timeout = "5s"  # a loaded machine must not turn HITs into misses

[admin]
token_env = "TEST_CACHEGW_TOKEN"

[[services]]
name = "catalog"
upstream = "{upstream}"
prefix = "/catalog"

  [[services.routes]]
  path = "/items/{{item_id}}"
  ttl = 60
  tags = ["items", "item:{{item_id}}"]
"""


def test_purge_reaches_two_gateway_processes(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_CACHEGW_TOKEN", TOKEN)
    stub = StubUpstream()
    with run_uvicorn(stub) as upstream:
        config = tmp_path / "gateway.toml"
        config.write_text(TOML.format(backend=redis_url, upstream=upstream))
        with gateway_processes(config, count=2) as [a, b]:
            for gw in (a, b):  # each process has read the (empty) purge record
                httpx.get(f"{gw.base}/catalog/items/42")
                httpx.get(f"{gw.base}/catalog/items/43")
            answer = httpx.post(
                f"{a.base}/_cachegw/purge",
                json={"tags": ["item:42"]},
                headers={"authorization": f"Bearer {TOKEN}"},
            )
            seen = {
                name: [
                    httpx.get(f"{gw.base}/catalog/items/{n}").headers["x-cache-status"]
                    for n in (42, 43)
                ]
                for name, gw in (("b", b), ("a", a))
            }
    assert answer.status_code == 200
    assert seen["b"] == ["MISS", "HIT"]  # the other process saw it, with no delay
    assert seen["a"] == ["HIT", "HIT"]  # b's miss stored a fresh 42 for both


def test_redis_purge_is_one_script_call(redis_url: str) -> None:
    """O(1): the purge touches the purge record only, whatever the entry count."""

    async def scenario() -> tuple[int, int]:
        client = RedisBackend.from_url(redis_url).client
        purges = RedisPurges(client, "o1")
        await client.config_resetstat()
        await purges.purge(["svc:catalog"])
        info = await client.info("commandstats")
        await close_redis(client)
        calls = {k: v["calls"] for k, v in info.items()}
        return calls.get("cmdstat_scan", 0) + calls.get("cmdstat_keys", 0), calls.get(
            "cmdstat_unlink", 0
        ) + calls.get("cmdstat_del", 0)

    scans, deletes = asyncio.run(scenario())
    assert (scans, deletes) == (0, 0)
    assert redis.Redis.from_url(redis_url).ttl("{o1:purge}:times") > 0  # every key has a TTL


# -- the Python API for @cached -----------------------------------------------------------


def test_decorator_purge_api(redis_url: str) -> None:
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi_cache import FastAPICache

    from cachegw import cached, purge

    calls: dict[str, int] = {}

    def make_app(make_backend: Any, prefix: str) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            backend = make_backend()
            FastAPICache.reset()
            FastAPICache.init(backend, prefix=prefix)
            yield
            if isinstance(backend, RedisBackend):
                await backend.aclose()  # on the loop its connections belong to
            FastAPICache.reset()

        app = FastAPI(lifespan=lifespan)

        @app.get("/items/{item_id}")
        @cached(ttl=60, tags=["item:{item_id}"])
        async def item(item_id: int) -> dict[str, int]:
            calls[str(item_id)] = calls.get(str(item_id), 0) + 1
            return {"id": item_id}

        @app.post("/purge/{item_id}")
        async def do_purge(item_id: int) -> dict[str, bool]:
            await purge(tags=[f"item:{item_id}"])
            return {"ok": True}

        return app

    backends = [
        (MemoryBackend, "deco-mem"),
        (lambda: RedisBackend.from_url(redis_url, op_timeout=HEALTHY), "deco-r"),
    ]
    for make_backend, prefix in backends:
        calls.clear()
        app = make_app(make_backend, prefix)
        with run_uvicorn(app, lifespan="on") as base, httpx.Client(base_url=base) as client:
            client.get("/items/1")
            client.get("/items/2")
            client.post("/purge/1")
            time.sleep(0.25)  # the purge record is re-read at most every 100 ms
            after = [client.get(f"/items/{n}").headers["x-cache-status"] for n in (1, 2)]
        assert after == ["MISS", "HIT"], prefix
        assert calls == {"1": 2, "2": 1}


def test_decorator_purge_needs_a_selector() -> None:
    from cachegw import purge

    with pytest.raises(ValueError, match="needs tags"):
        asyncio.run(purge())


@pytest.mark.redis
def test_purge_with_redis_down_is_a_503_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.redis_process import RedisProcess

    monkeypatch.setenv("TEST_CACHEGW_TOKEN", TOKEN)
    stub = StubUpstream()
    with RedisProcess() as redis_server, run_uvicorn(stub) as upstream:
        config = tmp_path / "gateway.toml"
        config.write_text(TOML.format(backend=redis_server.url, upstream=upstream))
        with gateway_processes(config) as [gw]:
            redis_server.stop()
            answer = httpx.post(
                f"{gw.base}/_cachegw/purge",
                json={"tags": ["item:1"]},
                headers={"authorization": f"Bearer {TOKEN}"},
            )
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/problem+json"
    assert "could not be recorded" in answer.json()["detail"]


def test_old_purges_are_forgotten() -> None:
    """A purge older than the longest an entry lives can match nothing: the record drops it
    instead of growing with every distinct tag ever purged."""
    from cachegw._purge_local import _PRUNE_SIZE, RECORD_TTL

    state = PurgeState()
    for n in range(_PRUNE_SIZE - 1):
        state.apply(f"tag:old-{n}", 1000.0, soft=False)
    state.apply("tag:new", 1000.0 + RECORD_TTL + 1, soft=False)
    assert "tag:old-0" not in state.hard
    assert state.hard == {"tag:new": 1000.0 + RECORD_TTL + 1}


def test_redis_purge_record_drops_purges_older_than_its_ttl(redis_url: str) -> None:
    from cachegw._purge import RECORD_TTL

    async def scenario() -> list[tuple[bytes, float]]:
        client = RedisBackend.from_url(redis_url).client
        clock = iter([1000.0, 1000.0 + RECORD_TTL + 1])
        purges = RedisPurges(client, "old", clock=lambda: next(clock))
        await purges.purge(["tag:a"])
        await purges.purge(["tag:b"])
        record: list[tuple[bytes, float]] = await client.zrange(
            "{old:purge}:times", 0, -1, withscores=True
        )
        await close_redis(client)
        return record

    assert asyncio.run(scenario()) == [(b"hard|tag:b", 1000.0 + RECORD_TTL + 1)]


def test_invalidations_are_forgotten_after_their_keep() -> None:
    """Invalidations (one per write) are remembered only as long as an entry they cover
    can be found: the record holds the paths written recently, not every path ever."""
    from cachegw._purge_local import _PRUNE_SIZE

    state = PurgeState()
    for n in range(_PRUNE_SIZE - 2):
        state.apply(f"path:svc:/items/{n}", 1000.0, soft=False, until=1100.0)
    state.apply("tag:admin", 1000.0, soft=False)  # a purge: kept RECORD_TTL
    state.apply("path:svc:/items/new", 1200.0, soft=False, until=1300.0)
    assert set(state.hard) == {"tag:admin", "path:svc:/items/new"}


def test_redis_invalidation_records_are_dropped_after_their_keep(redis_url: str) -> None:
    async def scenario() -> tuple[list[bytes], list[bytes], int]:
        client = RedisBackend.from_url(redis_url).client
        # The server's life is known already (its fence, a purge of "*" now, is past).
        await RedisPurges(client, "keep").poll()
        clock = iter([1000.0, 1001.0, 2000.0])
        purges = RedisPurges(client, "keep", clock=lambda: next(clock))
        await purges.purge(["path:svc:/a"], keep=60)
        await purges.purge(["tag:t"])  # default: kept RECORD_TTL
        await purges.purge(["path:svc:/b"], keep=60)  # 1000 s later: /a is past its keep
        times = [m for m, _ in await client.zrange("{keep:purge}:times", 0, -1, withscores=True)]
        ends = [m for m, _ in await client.zrange("{keep:purge}:ends", 0, -1, withscores=True)]
        fresh = RedisPurges(client, "keep")
        await fresh.poll()  # a process starting now loads what is left, with its ends
        ttl = await client.ttl("{keep:purge}:ends")
        await close_redis(client)
        assert fresh.verdict(["path:svc:/b"], 1999.0) == ("hard", 2000.0)
        assert fresh.verdict(["path:svc:/a"], 999.0) is None
        return times, ends, ttl

    times, ends, ttl = asyncio.run(scenario())
    assert sorted(times) == [b"hard|*", b"hard|path:svc:/b", b"hard|tag:t"]
    assert sorted(ends) == sorted(times)
    assert ttl > 0  # every key has a TTL


async def test_decorator_purge_returns_the_scopes_it_purged() -> None:
    from fastapi_cache import FastAPICache

    from cachegw import purge

    FastAPICache.init(MemoryBackend(), prefix="purge-result")
    try:
        assert await purge(tags=["item:42"]) == ["tag:item:42"]
        assert await purge(paths=["/items/42"], soft=True) == ["path::/items/42"]
        assert await purge(tags=["a", "b"], all=True) == ["tag:a", "tag:b", "*"]
    finally:
        FastAPICache.reset()
