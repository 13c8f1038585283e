"""``cachegw.compat.cache``: fastapi-cache2's ``@cache`` signature and headers on cachegw's
engine, ``FastAPICache.init``'s options in both entry points, loud misuse, exceptions.

A real uvicorn server (httpx and raw sockets), cachegw's memory backend and a real
redis-server for the Host rule (issue 18)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, BackgroundTasks, FastAPI, HTTPException, Request, Response
from fastapi_cache import FastAPICache
from fastapi_cache.coder import PickleCoder
from fastapi_cache.types import Backend
from servers import run_uvicorn
from test_decorator_host import raw_get

from cachegw import MemoryBackend, RedisBackend, cached, purge
from cachegw.compat import cache
from tests.redis_process import HEALTHY

COUNTS: Counter[str] = Counter()
CALLS: list[dict[str, Any]] = []
_LOOP: list[asyncio.AbstractEventLoop] = []
_prefixes = itertools.count()

app = FastAPI()


@app.get("/_loop")
async def _loop() -> dict[str, bool]:
    _LOOP[:] = [asyncio.get_running_loop()]
    return {}


@app.get("/plain/{item_id}")
@cache(expire=30, namespace="items")
async def plain(item_id: int, q: str = "") -> dict[str, Any]:
    COUNTS["plain"] += 1
    return {"id": item_id, "q": q, "n": COUNTS["plain"]}


def path_only_key(
    func: Any,
    namespace: str = "",
    *,
    request: Request | None = None,
    response: Response | None = None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> str:
    CALLS.append(
        {
            "func": func.__name__,
            "namespace": namespace,
            "request": isinstance(request, Request),
            "response": isinstance(response, Response),
            "args": args,
            "kwargs": kwargs,
        }
    )
    assert request is not None
    return f"{namespace}:{request.url.path}"  # ignores the query and the caller


@app.get("/built/{item_id}")
@cache(expire=30, namespace="ns", key_builder=path_only_key)
async def built(item_id: int, request: Request, q: str = "") -> dict[str, Any]:
    COUNTS["built"] += 1
    return {"id": item_id, "q": q, "n": COUNTS["built"]}


async def async_user_key(
    func: Any, namespace: str = "", *, request: Request | None = None, **_: Any
) -> str:
    assert request is not None
    return f"{namespace}:{request.headers.get('authorization', '')}"


@app.get("/mine")
@cache(expire=30, key_builder=async_user_key)
async def mine(request: Request) -> dict[str, Any]:
    COUNTS["mine"] += 1
    return {"auth": request.headers.get("authorization"), "n": COUNTS["mine"]}


@app.get("/link/{item_id}", name="link")
@cache(expire=30)
async def link(item_id: int, request: Request) -> dict[str, Any]:
    COUNTS["link"] += 1
    return {"self": str(request.url_for("link", item_id=item_id))}


@app.get("/link-built/{item_id}", name="link_built")
@cache(expire=30, key_builder=path_only_key)
async def link_built(item_id: int, request: Request) -> dict[str, Any]:
    return {"self": str(request.url_for("link_built", item_id=item_id))}


@app.get("/default-ttl")
@cache()
async def default_ttl() -> dict[str, int]:
    return {"n": 1}


@app.get("/cached-default-ttl")
@cached()
async def cached_default_ttl() -> dict[str, int]:
    COUNTS["cached-default-ttl"] += 1
    return {"n": COUNTS["cached-default-ttl"]}


@app.get("/pickled")
@cache(expire=30, coder=PickleCoder)
async def pickled() -> dict[str, int]:
    return {"n": 1}


@app.get("/own-cache-control")
@cache(expire=30)
async def own_cache_control(response: Response) -> dict[str, int]:
    response.headers["Cache-Control"] = "public, max-age=5"
    return {"n": 1}


@app.get("/missing/{item_id}")
@cache(expire=30)
async def missing(item_id: int) -> dict[str, int]:
    COUNTS["missing"] += 1
    raise HTTPException(status_code=404, detail="no such item", headers={"X-Mine": "1"})


@app.get("/cached-missing")
@cached(ttl=30)
async def cached_missing() -> dict[str, int]:
    raise HTTPException(status_code=409, detail="conflict")


@app.get("/with-task")
@cache(expire=30)
async def with_task(tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(COUNTS.update, ["task"])
    return {"n": 1}


@app.put("/put-only")
@cache(expire=30)
async def put_only() -> dict[str, int]:
    COUNTS["put"] += 1
    return {"n": COUNTS["put"]}


@app.get("/injected")
@cache(expire=30, injected_dependency_namespace="mine")
async def injected(__fastapi_cache_request: int = 1) -> dict[str, int]:
    return {"value": __fastapi_cache_request}


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with run_uvicorn(app) as url:
        httpx.get(f"{url}/_loop").raise_for_status()
        yield url


@pytest.fixture
def client(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=10) as made:
        yield made


def init(backend: Backend, **options: Any) -> None:
    COUNTS.clear()
    CALLS.clear()
    FastAPICache.reset()
    FastAPICache.init(backend, **{"prefix": f"cgwcompat{next(_prefixes)}", **options})


@pytest.fixture
def memory(base: str) -> Iterator[MemoryBackend]:
    backend = MemoryBackend()
    init(backend)
    yield backend
    FastAPICache.reset()


def fc(response: httpx.Response) -> str | None:
    return response.headers.get("x-fastapi-cache")


def test_headers_on_miss_and_hit(client: httpx.Client, memory: MemoryBackend) -> None:
    first = client.get("/plain/1")
    assert (fc(first), first.headers["x-cache-status"]) == ("MISS", "MISS")
    assert first.headers["cache-control"] == "max-age=30"
    etag = first.headers["etag"]
    assert etag.startswith('"')
    second = client.get("/plain/1")
    assert (fc(second), second.headers["x-cache-status"]) == ("HIT", "HIT")
    assert second.json() == first.json() and second.headers["etag"] == etag
    assert second.headers["cache-control"] in ("max-age=29", "max-age=30")
    assert client.get("/plain/1", headers={"If-None-Match": etag}).status_code == 304
    assert COUNTS["plain"] == 1


def test_request_no_cache_is_a_stored_miss(client: httpx.Client, memory: MemoryBackend) -> None:
    """As in fastapi-cache2 0.2.2: the handler runs and its answer replaces the entry."""
    client.get("/plain/12")
    fresh = client.get("/plain/12", headers={"Cache-Control": "no-cache"})
    assert (fc(fresh), fresh.headers["x-cache-status"]) == ("MISS", "BYPASS")
    assert fresh.headers["cache-control"] == "max-age=30"
    hit = client.get("/plain/12")
    assert fc(hit) == "HIT" and hit.json() == fresh.json() and COUNTS["plain"] == 2


def test_default_key_is_cachegws(client: httpx.Client, memory: MemoryBackend) -> None:
    # fastapi-cache2's default key ignores the query string; cachegw's does not.
    assert client.get("/plain/1?q=a").json()["q"] == "a"
    assert client.get("/plain/1?q=b").json()["q"] == "b"
    assert fc(client.get("/plain/1?q=b")) == "HIT"
    # Credentials bypass shared entries: no X-FastAPI-Cache, as for requests it won't cache.
    private = client.get("/plain/1?q=a", headers={"Authorization": "Bearer alice"})
    assert private.headers["x-cache-status"] == "BYPASS" and fc(private) is None
    assert "cache-control" not in private.headers


def test_key_builder_called_as_fastapi_cache2_calls_it(
    client: httpx.Client, memory: MemoryBackend
) -> None:
    first = client.get("/built/7?q=a")
    assert fc(first) == "MISS"
    call = CALLS[0]
    assert call["func"] == "built"
    assert call["namespace"] == f"{FastAPICache._prefix}:ns"
    assert call["request"] and call["response"] and call["args"] == ()
    # The handler's own arguments, without the request and response.
    assert call["kwargs"] == {"item_id": 7, "q": "a"}
    # The key builder ignores the query: its key decides, so ?q=b is a hit.
    second = client.get("/built/7?q=b")
    assert fc(second) == "HIT" and second.json() == first.json()


def test_key_builder_decides_identity(client: httpx.Client, memory: MemoryBackend) -> None:
    alice = {"Authorization": "Bearer alice"}
    bob = {"Authorization": "Bearer bob"}
    assert fc(client.get("/mine", headers=alice)) == "MISS"
    hit = client.get("/mine", headers=alice)
    assert fc(hit) == "HIT" and hit.json()["auth"] == "Bearer alice"
    # A per-user answer must not be kept by shared caches downstream.
    assert hit.headers["cache-control"].startswith("private, max-age=")
    other = client.get("/mine", headers=bob)
    assert fc(other) == "MISS" and other.json()["auth"] == "Bearer bob"


@pytest.mark.parametrize("backend_kind", ["memory", "redis"])
@pytest.mark.parametrize("path", ["/link/1", "/link-built/1"])
def test_evil_host_never_reaches_a_clean_client(
    base: str, request: pytest.FixtureRequest, backend_kind: str, path: str
) -> None:
    backend: Backend
    if backend_kind == "memory":
        backend = MemoryBackend()
    else:
        backend = RedisBackend.from_url(request.getfixturevalue("redis_url"), op_timeout=HEALTHY)
    init(backend)
    try:
        status, evil = raw_get(base, path, "evil.example")
        assert status == 200 and b"http://evil.example/" in evil
        for _ in range(2):
            status, clean = raw_get(base, path, "api.example")
            assert status == 200 and b"evil.example" not in clean
        assert b"x-fastapi-cache: HIT" in clean
    finally:
        FastAPICache.reset()
        if isinstance(backend, RedisBackend):
            asyncio.run_coroutine_threadsafe(backend.aclose(), _LOOP[0]).result(10)


def test_init_expire_is_the_default_ttl_of_both_entry_points(
    client: httpx.Client, base: str
) -> None:
    init(MemoryBackend(), expire=7)
    try:
        assert client.get("/default-ttl").headers["cache-control"] == "max-age=7"
        client.get("/cached-default-ttl")
        hit = client.get("/cached-default-ttl")
        assert hit.headers["cache-status"] in ("cachegw; hit; ttl=6", "cachegw; hit; ttl=7")
    finally:
        FastAPICache.reset()
    init(MemoryBackend())  # no expire: 60 s
    try:
        assert client.get("/default-ttl").headers["cache-control"] == "max-age=60"
    finally:
        FastAPICache.reset()


def test_init_enable_false_turns_both_entry_points_off(client: httpx.Client, base: str) -> None:
    init(MemoryBackend(), enable=False)
    try:
        for _ in range(2):
            response = client.get("/plain/1")
            assert fc(response) is None and response.headers["x-cache-status"] == "BYPASS"
            assert "cache-control" not in response.headers
            assert client.get("/cached-default-ttl").headers["x-cache-status"] == "BYPASS"
        assert COUNTS["plain"] == 2 and COUNTS["cached-default-ttl"] == 2
    finally:
        FastAPICache.reset()


def test_init_prefix_and_status_header(client: httpx.Client, base: str) -> None:
    backend = MemoryBackend()
    init(backend, prefix="myapp", cache_status_header="X-My-Cache")
    try:
        assert client.get("/plain/3").headers["x-my-cache"] == "MISS"
        assert client.get("/plain/3").headers["x-my-cache"] == "HIT"
        keys = list(backend._data)
        assert keys and all(key.startswith("myapp:") for key in keys), keys
    finally:
        FastAPICache.reset()


def test_coder_is_accepted_and_nothing_is_pickled(
    client: httpx.Client, memory: MemoryBackend
) -> None:
    assert fc(client.get("/pickled")) == "MISS"
    hit = client.get("/pickled")
    assert fc(hit) == "HIT" and hit.json() == {"n": 1}
    stored = b"".join(value for value, _deadline in memory._data.values())
    assert stored
    assert b"\x80\x04" not in stored and b"\x80\x05" not in stored  # pickle protocols 4, 5


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(TypeError, match=r"coder must be a fastapi_cache\.coder\.Coder class"):
        cache(coder="json")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expire must be a number"):
        cache(expire="soon")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="-1"):
        cache(expire=-1)


def test_handler_cache_control_is_kept(client: httpx.Client, memory: MemoryBackend) -> None:
    client.get("/own-cache-control")
    hit = client.get("/own-cache-control")
    assert fc(hit) == "HIT" and hit.headers.get_list("cache-control") == ["public, max-age=5"]


def test_namespace_is_a_purge_tag(client: httpx.Client, memory: MemoryBackend) -> None:
    client.get("/plain/5")
    assert fc(client.get("/plain/5")) == "HIT"
    asyncio.run_coroutine_threadsafe(purge(tags=["namespace:items"]), _LOOP[0]).result(10)
    assert fc(client.get("/plain/5")) == "MISS"


def test_injected_dependency_namespace(client: httpx.Client, memory: MemoryBackend) -> None:
    first = client.get("/injected", params={"__fastapi_cache_request": 3})
    assert first.json() == {"value": 3} and fc(first) == "MISS"
    assert "mine_request" not in str(app.openapi()["paths"]["/injected"])


def test_http_exception_carries_the_cache_status(
    client: httpx.Client, memory: MemoryBackend
) -> None:
    for _ in range(2):
        response = client.get("/missing/1")
        assert response.status_code == 404 and response.json() == {"detail": "no such item"}
        assert response.headers["x-cache-status"] == "MISS"
        assert response.headers["cache-status"] == "cachegw; fwd=uri-miss; detail=exception"
        assert response.headers["x-mine"] == "1"
    assert COUNTS["missing"] == 2
    private = client.get("/missing/1", headers={"Cookie": "a=1"})
    assert private.headers["x-cache-status"] == "BYPASS"
    assert client.get("/cached-missing").headers["x-cache-status"] == "MISS"


def test_background_tasks_run_on_a_miss_not_on_a_hit(
    client: httpx.Client, memory: MemoryBackend
) -> None:
    # Background tasks run after the response is sent: wait for them, each time.
    assert fc(client.get("/with-task")) == "MISS"
    until(lambda: COUNTS["task"] == 1)
    assert fc(client.get("/with-task")) == "HIT"
    assert fc(client.get("/plain/11")) == "MISS"  # a later request's task-free cycle
    client.get("/with-task?other=1")  # a miss whose task lands after any earlier one
    until(lambda: COUNTS["task"] == 2)
    time.sleep(0.2)
    assert COUNTS["task"] == 2  # the hit's handler did not run, so it added no task


def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_no_init_warns_once_per_route(
    client: httpx.Client, base: str, caplog: pytest.LogCaptureFixture
) -> None:
    FastAPICache.reset()
    with caplog.at_level(logging.WARNING, logger="cachegw"):
        for _ in range(3):
            assert client.get("/plain/9").headers["x-cache-status"] == "BYPASS"
            assert client.get("/cached-default-ttl").headers["x-cache-status"] == "BYPASS"
    messages = [r.getMessage() for r in caplog.records if "FastAPICache.init" in r.getMessage()]
    assert len(messages) == 2, messages
    assert any("@cache on GET /plain/{item_id}" in m for m in messages)
    assert any("@cached on GET /cached-default-ttl" in m for m in messages)
    assert all("Call it in the app's lifespan" in m for m in messages)


def test_non_get_route_warns_once(
    client: httpx.Client, memory: MemoryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cachegw"):
        assert client.put("/put-only").json() == {"n": 1}
        response = client.put("/put-only")
        assert response.json() == {"n": 2} and fc(response) is None
    messages = [r.getMessage() for r in caplog.records if "only GET and HEAD" in r.getMessage()]
    assert messages == [
        "cachegw: @cache on PUT /put-only never serves from the cache: only GET and HEAD "
        "requests are cached. Remove the decorator from this route."
    ]


# The check looks at the routers of the handler's module (where its route decorator
# comes from): these two are module globals, as apps and routers are.
wrong_app = FastAPI()
wrong_router = APIRouter()


def test_decorator_above_the_route_decorator_warns_at_import() -> None:
    with pytest.warns(UserWarning, match=r"@cache on .*wrong_order is applied above @app\.get"):

        @cache(expire=10)
        @wrong_app.get("/wrong")
        async def wrong_order() -> dict[str, int]:
            return {}

    with pytest.warns(UserWarning, match=r"above @router\.get.*Put @cached below the route"):

        @cached(ttl=10)
        @wrong_router.get("/wrong")
        async def wrong_order_too() -> dict[str, int]:
            return {}


def test_plain_function_runs_uncached(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    @cache(expire=10)
    async def helper(value: int) -> int:
        calls.append(value)
        return value * 2

    with caplog.at_level(logging.WARNING, logger="cachegw"):
        assert asyncio.run(helper(2)) == 4
        assert asyncio.run(helper(2)) == 4
    assert calls == [2, 2]
    assert [r.getMessage() for r in caplog.records].count(
        "cachegw: @cache on test_plain_function_runs_uncached.<locals>.helper caches route "
        "responses, but it was called directly (not by FastAPI as a route handler), so it runs "
        "uncached. Decorate the route handler, below its @app.get(...) decorator."
    ) == 1
