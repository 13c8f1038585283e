"""One owner for the hit decision (issue 27): a rule added to `cachegw._core.decide`, as the
engine asks it, changes every hit path — the gateway's ordinary and protocol-level paths,
``@cached`` through FastAPI and `CachedHits` before routing.

The throwaway rule here: "every entry is stale" (the clock moved a year ahead). A path with a
freshness test of its own would still answer ``HIT``.
"""

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi_cache import FastAPICache

import cachegw._engine
from cachegw import CachedHits, Gateway, MemoryBackend, Service, cached, create_app
from cachegw._server import uvicorn_options
from tests.servers import Receive, Scope, Send, run_uvicorn


@pytest.fixture
def stale_rule(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    real = cachegw._engine.decide

    def decide(entry: Any, **kw: Any) -> Any:
        return real(entry, **{**kw, "now": kw["now"] + 365 * 86400})

    def install() -> None:
        monkeypatch.setattr(cachegw._engine, "decide", decide)

    yield install  # type: ignore[misc]


async def origin(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


def test_a_rule_in_decide_reaches_the_gateways_fast_and_ordinary_paths(stale_rule: Any) -> None:
    with run_uvicorn(origin) as upstream:
        svc = Service("svc", upstream, prefix="/svc")
        svc.route("/{rest:path}", ttl=60)
        app = create_app(Gateway(services=[svc], backend="memory"))
        with run_uvicorn(app, **uvicorn_options(lifespan="on")) as base, httpx.Client() as c:
            ordinary = {"cache-control": "max-stale=0"}  # a directive: the ordinary path
            assert c.get(f"{base}/svc/a").headers["x-cache-status"] == "MISS"
            assert c.get(f"{base}/svc/a").headers["x-cache-status"] == "HIT"  # fast path
            assert c.get(f"{base}/svc/a", headers=ordinary).headers["x-cache-status"] == "HIT"
            stale_rule()
            assert c.get(f"{base}/svc/a").headers["x-cache-status"] != "HIT"
            assert c.get(f"{base}/svc/a", headers=ordinary).headers["x-cache-status"] != "HIT"


@pytest.mark.parametrize("early", [False, True], ids=["routed", "before-routing"])
async def test_a_rule_in_decide_reaches_both_decorator_hit_paths(
    stale_rule: Any, early: bool
) -> None:
    app = FastAPI()
    if early:
        app.add_middleware(CachedHits)

    @app.get("/n")
    @cached(ttl=60)
    async def n() -> dict[str, int]:
        return {"n": 1}

    FastAPICache.init(MemoryBackend(), prefix="rule")
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            assert (await c.get("/n")).headers["x-cache-status"] == "MISS"
            assert (await c.get("/n")).headers["x-cache-status"] == "HIT"
            stale_rule()
            assert (await c.get("/n")).headers["x-cache-status"] != "HIT"
    finally:
        FastAPICache.reset()
