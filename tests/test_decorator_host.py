"""``@cached`` keys on the scheme and Host the app sees (issue 18): a handler that builds links
with ``request.url_for`` cannot be poisoned through ``Host``. Real uvicorn servers, httpx and
raw sockets; cachegw's memory backend and a real redis-server."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI, Request
from fastapi_cache import FastAPICache
from fastapi_cache.types import Backend
from servers import run_uvicorn
from starlette.middleware.trustedhost import TrustedHostMiddleware

from cachegw import CachedHits, MemoryBackend, RedisBackend, cached
from tests.redis_process import HEALTHY

COUNTS: Counter[str] = Counter()
_LOOP: list[asyncio.AbstractEventLoop] = []
_prefixes = itertools.count()


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/_loop")
    async def _loop() -> dict[str, bool]:
        _LOOP[:] = [asyncio.get_running_loop()]
        return {}

    @app.get("/items/{item_id}", name="item")
    @cached(ttl=60)
    async def item(item_id: int, request: Request) -> Any:
        COUNTS["item"] += 1
        return {"id": item_id, "self": str(request.url_for("item", item_id=item_id))}

    @app.get("/shared/{item_id}")
    @cached(ttl=60, per_host=False)
    async def shared(item_id: int, request: Request) -> Any:
        COUNTS["shared"] += 1
        return {"id": item_id, "host": request.headers.get("host")}

    return app


ROUTED: list[int] = [0]  # requests that reached FastAPI's routing (see Counting)


class Counting:
    """Counts the requests that reach the router's routing, inside every middleware of the
    app and inside the layer `CachedHits` puts at the router's entrance."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            ROUTED[0] += 1
        await self.app(scope, receive, send)


def make_apps(early: bool) -> FastAPI:
    app = make_app()
    app.router.middleware_stack = Counting(app.router.middleware_stack)
    # Mounted on the same server (one event loop for the backends' clients); its routes
    # have the same templates as the app's, and the mount point keeps their entries apart.
    guarded = make_app()
    guarded.add_middleware(TrustedHostMiddleware, allowed_hosts=["api.example", "127.0.0.1"])
    if early:
        # Plain hits answered before routing. Added first on the plain app, as documented;
        # on the guarded one added last, in front of the host check: the key alone must
        # keep another host's entry out of reach.
        app.add_middleware(CachedHits)
        guarded.add_middleware(CachedHits)
    app.mount("/guarded", guarded)
    return app


APPS = {"routed": make_apps(early=False), "early": make_apps(early=True)}


@pytest.fixture(scope="module", params=list(APPS))
def servers(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    # The plain app trusts X-Forwarded-Proto from loopback, as uvicorn --proxy-headers does
    # behind a local proxy: the scheme the app sees is then the forwarded one.
    app = APPS[request.param]
    with run_uvicorn(app, proxy_headers=True, forwarded_allow_ips="127.0.0.1") as base:
        httpx.get(f"{base}/_loop").raise_for_status()
        yield {"plain": base, "guarded": base, "mode": request.param}


_REDIS_URLS: dict[int, str] = {}


def entries(backend: Backend) -> int:
    if isinstance(backend, MemoryBackend):
        return backend.stats()["entries"]
    with redis.Redis.from_url(_REDIS_URLS[id(backend)]) as client:
        return sum(1 for _ in client.scan_iter(match=f"{FastAPICache._prefix}*"))


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, servers: dict[str, str]) -> Iterator[Backend]:
    made: Backend
    if request.param == "memory":
        made = MemoryBackend()
    else:
        url = request.getfixturevalue("redis_url")
        made = RedisBackend.from_url(url, op_timeout=HEALTHY)
        _REDIS_URLS[id(made)] = url
    COUNTS.clear()
    FastAPICache.reset()
    FastAPICache.init(made, prefix=f"cgwhost{next(_prefixes)}")
    try:
        yield made
    finally:
        FastAPICache.reset()
        if isinstance(made, RedisBackend):
            asyncio.run_coroutine_threadsafe(made.aclose(), _LOOP[0]).result(10)


def raw_get(base: str, path: str, host: str, extra: bytes = b"") -> tuple[int, bytes]:
    """One request with the Host header exactly as given; (status, whole response)."""
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n".encode()
        sock.sendall(head + extra + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_evil_host_never_reaches_a_clean_client(servers: dict[str, str], backend: Backend) -> None:
    base = servers["plain"]
    status, evil = raw_get(base, "/items/1", "evil.example")
    assert status == 200 and b"http://evil.example/items/1" in evil
    assert b"x-cache-status: MISS" in evil
    for _ in range(2):
        status, clean = raw_get(base, "/items/1", "api.example")
        assert status == 200
        assert b"evil.example" not in clean
        assert b'"self":"http://api.example/items/1"' in clean
    assert b"x-cache-status: HIT" in clean  # the clean host has its own entry, and it is used
    routed = ROUTED[0]
    _, again = raw_get(base, "/items/1", "evil.example")
    assert b"x-cache-status: HIT" in again and b"api.example" not in again
    assert COUNTS["item"] == 2
    # With CachedHits, that hit was answered before routing: the rules held there too.
    assert ROUTED[0] - routed == (0 if servers["mode"] == "early" else 1)


def test_forwarded_scheme_after_proxy_headers_is_keyed(
    servers: dict[str, str], backend: Backend
) -> None:
    base = servers["plain"]
    _, https = raw_get(base, "/items/2", "api.example", b"X-Forwarded-Proto: https\r\n")
    _, http = raw_get(base, "/items/2", "api.example")
    assert b'"self":"https://api.example/items/2"' in https
    assert b'"self":"http://api.example/items/2"' in http
    assert b"x-cache-status: MISS" in http
    assert COUNTS["item"] == 2


def test_trusted_host_middleware_refuses_and_stores_nothing(
    servers: dict[str, str], backend: Backend
) -> None:
    base = servers["guarded"]
    before = entries(backend)
    status, evil = raw_get(base, "/guarded/items/3", "evil.example")
    assert status == 400 and b"evil.example" not in evil
    assert COUNTS["item"] == 0
    assert entries(backend) == before
    status, clean = raw_get(base, "/guarded/items/3", "api.example")
    assert status == 200 and b"x-cache-status: MISS" in clean
    assert b'"self":"http://api.example/' in clean and b"evil" not in clean
    assert entries(backend) > before
    _, again = raw_get(base, "/guarded/items/3", "api.example")
    assert b"x-cache-status: HIT" in again
    # Same template, other mount point: its own entry.
    _, plain = raw_get(base, "/items/3", "api.example")
    assert b"x-cache-status: MISS" in plain
    assert COUNTS["item"] == 2


def test_per_host_false_shares_one_entry(servers: dict[str, str], backend: Backend) -> None:
    base = servers["plain"]
    _, first = raw_get(base, "/shared/1", "a.example")
    _, second = raw_get(base, "/shared/1", "b.example")
    assert b"x-cache-status: MISS" in first and b"x-cache-status: HIT" in second
    # The cost of the opt-out: the first host's answer is everyone's.
    assert b'"host":"a.example"' in second
    assert COUNTS["shared"] == 1


def test_per_host_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="per_host must be True or False"):
        cached(ttl=1, per_host="no")  # type: ignore[arg-type]
