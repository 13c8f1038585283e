"""`CachedHits`: plain hits of ``@cached`` routes answered before FastAPI's routing, and
everything that needs FastAPI's request handling left to it. A real uvicorn server, httpx and
raw sockets; cachegw's memory backend and a real redis-server."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi_cache import FastAPICache
from fastapi_cache.types import Backend
from servers import run_uvicorn

from cachegw import CachedHits, MemoryBackend, RedisBackend, cached, purge
from tests.redis_process import HEALTHY

COUNTS: Counter[str] = Counter()
ROUTED: list[int] = [0]
_LOOP: list[asyncio.AbstractEventLoop] = []
_prefixes = itertools.count()


class Counting:
    """Counts the requests that reach FastAPI's routing (installed at the router's
    entrance, inside the layer `CachedHits` puts there)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            ROUTED[0] += 1
        await self.app(scope, receive, send)


def require_token(x_token: Annotated[str | None, Header()] = None) -> None:
    if x_token != "good":
        raise HTTPException(401, "bad token")


app = FastAPI()
app.router.middleware_stack = Counting(app.router.middleware_stack)
app.add_middleware(CachedHits)


@app.get("/_loop")
async def _loop() -> dict[str, bool]:
    _LOOP[:] = [asyncio.get_running_loop()]
    return {}


@app.get("/items/{item_id}")
@cached(ttl=60, tags=["item:{item_id}"])
async def item(item_id: int, q: str = "") -> Any:
    COUNTS["item"] += 1
    return {"id": item_id, "q": q}


@app.get("/guarded", dependencies=[Depends(require_token)])
@cached(ttl=60)
async def guarded() -> Any:
    COUNTS["guarded"] += 1
    return {"secret": True}


@app.get("/lang")
@cached(ttl=60, vary=["Accept-Language"])
async def lang(request: Request) -> Any:
    COUNTS["lang"] += 1
    return {"lang": request.headers.get("accept-language")}


@app.get("/mine")
@cached(ttl=60, key=lambda request: request.headers.get("x-user", ""))
async def mine(request: Request) -> Any:
    COUNTS["mine"] += 1
    return {"user": request.headers.get("x-user")}


@app.get("/header")
@cached(ttl=60)
async def with_header(x_mode: Annotated[str, Header()]) -> Any:
    COUNTS["header"] += 1
    return {"mode": x_mode}


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with run_uvicorn(app) as base:
        httpx.get(f"{base}/_loop").raise_for_status()
        yield base


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, base_url: str) -> Iterator[Backend]:
    made: Backend
    if request.param == "memory":
        made = MemoryBackend()
    else:
        made = RedisBackend.from_url(request.getfixturevalue("redis_url"), op_timeout=HEALTHY)
    COUNTS.clear()
    FastAPICache.reset()
    FastAPICache.init(made, prefix=f"cgwhits{next(_prefixes)}")
    try:
        yield made
    finally:
        FastAPICache.reset()
        if isinstance(made, RedisBackend):
            asyncio.run_coroutine_threadsafe(made.aclose(), _LOOP[0]).result(10)


@pytest.fixture
def client(base_url: str, backend: Backend) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10) as c:
        yield c


def routed(client: httpx.Client, *args: Any, **kwargs: Any) -> tuple[httpx.Response, int]:
    """The response, and whether FastAPI's routing saw the request (1) or not (0)."""
    before = ROUTED[0]
    response = client.get(*args, **kwargs)
    return response, ROUTED[0] - before


def test_plain_hit_is_answered_before_routing_with_the_same_bytes(client: httpx.Client) -> None:
    miss, miss_routed = routed(client, "/items/1?q=a")
    hit, hit_routed = routed(client, "/items/1?q=a")
    assert (miss.headers["x-cache-status"], miss_routed) == ("MISS", 1)
    assert (hit.headers["x-cache-status"], hit_routed) == ("HIT", 0)
    assert hit.content == miss.content == b'{"id":1,"q":"a"}'
    unchanging = [(k, v) for k, v in hit.headers.items() if k not in ("age", "cache-status")]
    assert unchanging == [
        (k, v.replace("MISS", "HIT"))
        for k, v in miss.headers.items()
        if k not in ("age", "cache-status")
    ]
    assert hit.headers["age"] in ("0", "1")
    assert hit.headers["cache-status"].startswith("cachegw; hit; ttl=")
    # FastAPI answers HEAD on a GET-only route with 405: so must the early layer (it does
    # not answer requests the router would not route to the handler).
    before = ROUTED[0]
    head = client.head("/items/1?q=a")
    assert (head.status_code, ROUTED[0] - before) == (405, 1)
    # The query is canonical in the key on both paths: the same entry.
    same, same_routed = routed(client, "/items/1?q=%61")
    assert (same.headers["x-cache-status"], same_routed) == ("HIT", 0)
    assert COUNTS["item"] == 1


def test_requests_that_need_fastapi_take_the_ordinary_path(client: httpx.Client) -> None:
    client.get("/items/2")
    for headers in (
        {"authorization": "Bearer x"},
        {"cookie": "a=b"},
        {"cache-control": "max-age=0"},
        {"if-none-match": '"x"'},
        {"range": "bytes=0-1"},
    ):
        response, seen = routed(client, "/items/2", headers=headers)
        assert seen == 1, headers
        assert response.status_code in (200, 206, 304), headers
    # Validation still happens: the early layer has no entry for a request FastAPI refuses.
    bad, seen = routed(client, "/items/abc")
    assert (bad.status_code, seen) == (422, 1)


def test_dependencies_run_on_every_request(client: httpx.Client) -> None:
    good, _ = routed(client, "/guarded", headers={"x-token": "good"})
    again, seen = routed(client, "/guarded", headers={"x-token": "good"})
    assert (good.headers["x-cache-status"], again.headers["x-cache-status"]) == ("MISS", "HIT")
    assert seen == 1  # a route with dependencies is never answered before them
    refused, seen = routed(client, "/guarded")
    assert (refused.status_code, seen) == (401, 1)
    assert b"secret" not in refused.content
    header, _ = routed(client, "/header", headers={"x-mode": "a"})
    missing, seen = routed(client, "/header")
    assert (header.status_code, missing.status_code, seen) == (200, 422, 1)


def test_key_function_routes_take_the_ordinary_path(client: httpx.Client) -> None:
    routed(client, "/mine", headers={"x-user": "alice"})
    alice2, seen = routed(client, "/mine", headers={"x-user": "alice"})
    bob, _ = routed(client, "/mine", headers={"x-user": "bob"})
    assert (alice2.headers["x-cache-status"], seen) == ("HIT", 1)
    assert bob.json() == {"user": "bob"}
    assert COUNTS["mine"] == 2


def test_vary_selects_the_variant_before_routing(client: httpx.Client) -> None:
    routed(client, "/lang", headers={"accept-language": "en"})
    routed(client, "/lang", headers={"accept-language": "fr"})
    en2, seen_en = routed(client, "/lang", headers={"accept-language": "en"})
    fr2, seen_fr = routed(client, "/lang", headers={"accept-language": "fr"})
    assert (en2.json(), fr2.json()) == ({"lang": "en"}, {"lang": "fr"})
    assert (en2.headers["x-cache-status"], seen_en, seen_fr) == ("HIT", 0, 0)
    assert COUNTS["lang"] == 2


def test_a_purged_entry_is_not_answered_before_routing(
    client: httpx.Client, backend: Backend
) -> None:
    client.get("/items/3")
    assert client.get("/items/3").headers["x-cache-status"] == "HIT"
    asyncio.run_coroutine_threadsafe(purge(tags=["item:3"]), _LOOP[0]).result(10)
    after, seen = routed(client, "/items/3")
    assert (after.headers["x-cache-status"], seen) == ("MISS", 1)
    assert COUNTS["item"] == 2
