"""Apps compared by ``decorator_hit.py`` and ``all.py``: one route, the same ~1 KiB JSON.

Each factory builds a FastAPI app with one ``GET /items`` route whose handler returns the
same dict, serialized by FastAPI as usual (no ``response_model``, no custom response
class); ``bare_bytes`` returns the same JSON already serialized, as a ceiling. The handlers
have no return annotation on purpose: FastAPI would turn one into a ``response_model`` and
validate and serialize through pydantic, which is not the baseline measured here.
Run one with ``uvicorn --factory --app-dir tests/bench apps:<factory>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Response
from fastapi_cache import FastAPICache
from fastapi_cache.backends.inmemory import InMemoryBackend
from fastapi_cache.decorator import cache
from fastapi_cache.types import Backend

from cachegw import CachedHits, MemoryBackend, cached

#: The redis:// URL `fastapi_cache2_redis` connects to.
REDIS_ENV = "CACHEGW_BENCH_REDIS"

#: ~1 KiB once serialized by FastAPI (checked by the benchmark before measuring).
PAYLOAD: dict[str, Any] = {
    "items": [
        {"id": i, "name": f"item-{i:03d}", "price": round(9.99 + i * 1.25, 2), "tags": ["a", "b"]}
        for i in range(17)
    ],
    "total": 17,
}


def _lifespan(make_backend: Callable[[], Backend]) -> Any:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        FastAPICache.init(make_backend())
        yield
        FastAPICache.reset()

    return lifespan


def bare() -> FastAPI:
    """(a) a bare FastAPI route: the baseline a cache hit should get close to."""
    app = FastAPI()

    @app.get("/items")
    async def items():  # type: ignore[no-untyped-def]
        return PAYLOAD

    return app


def bare_bytes() -> FastAPI:
    """A bare FastAPI route returning pre-serialized bytes: the ceiling for any handler
    that runs inside FastAPI's routing and dependency solving (REFERENCE.md's 8.9k)."""
    app = FastAPI()
    body = json.dumps(PAYLOAD, separators=(",", ":")).encode()

    @app.get("/items")
    async def items() -> Response:
        return Response(body, media_type="application/json")

    return app


def fastapi_cache2() -> FastAPI:
    """(b) fastapi-cache2's own ``@cache`` on its ``InMemoryBackend``."""
    app = FastAPI(lifespan=_lifespan(InMemoryBackend))

    @app.get("/items")
    @cache(expire=60)
    async def items():  # type: ignore[no-untyped-def]
        return PAYLOAD

    return app


def fastapi_cache2_redis() -> FastAPI:
    """fastapi-cache2's ``@cache`` on its ``RedisBackend`` (a ``redis.asyncio.Redis``
    client on the URL in ``CACHEGW_BENCH_REDIS``), hit path."""
    from fastapi_cache.backends.redis import RedisBackend
    from redis.asyncio import Redis

    url = os.environ[REDIS_ENV]
    app = FastAPI(lifespan=_lifespan(lambda: RedisBackend(Redis.from_url(url))))

    @app.get("/items")
    @cache(expire=60)
    async def items():  # type: ignore[no-untyped-def]
        return PAYLOAD

    return app


def cachegw_memory() -> FastAPI:
    """(c) cachegw's ``@cached`` on cachegw's ``MemoryBackend``, with ``CachedHits`` (the
    documented setup: plain hits answered before routing)."""
    app = FastAPI(lifespan=_lifespan(MemoryBackend))
    app.add_middleware(CachedHits)

    @app.get("/items")
    @cached(ttl=60)
    async def items():  # type: ignore[no-untyped-def]
        return PAYLOAD

    return app


def cachegw_memory_routed() -> FastAPI:
    """``@cached`` on ``MemoryBackend`` without ``CachedHits``: hits pay FastAPI's routing."""
    app = FastAPI(lifespan=_lifespan(MemoryBackend))

    @app.get("/items")
    @cached(ttl=60)
    async def items():  # type: ignore[no-untyped-def]
        return PAYLOAD

    return app


def cachegw_fc2_memory() -> FastAPI:
    """(d) cachegw's ``@cached`` on fastapi-cache2's ``InMemoryBackend``."""
    app = FastAPI(lifespan=_lifespan(InMemoryBackend))

    @app.get("/items")
    @cached(ttl=60)
    async def items():  # type: ignore[no-untyped-def]
        return PAYLOAD

    return app


def cachegw_redis() -> FastAPI:
    """cachegw's ``@cached`` on cachegw's ``RedisBackend`` (URL in ``CACHEGW_BENCH_REDIS``),
    with ``CachedHits``."""
    from cachegw import RedisBackend

    url = os.environ[REDIS_ENV]
    app = FastAPI(lifespan=_lifespan(lambda: RedisBackend.from_url(url)))
    app.add_middleware(CachedHits)

    @app.get("/items")
    @cached(ttl=60)
    async def items():  # type: ignore[no-untyped-def]
        return PAYLOAD

    return app
