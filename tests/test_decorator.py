"""``@cached`` end to end: a FastAPI app served by a real uvicorn on a loopback port, through
httpx, on four backends (cachegw's MemoryBackend and RedisBackend, fastapi-cache2's own
InMemoryBackend and RedisBackend) — Redis being a real redis-server started by the suite."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import Counter
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import redis.asyncio
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi_cache import FastAPICache
from fastapi_cache.backends.inmemory import InMemoryBackend as FC2InMemoryBackend
from fastapi_cache.backends.redis import RedisBackend as FC2RedisBackend
from fastapi_cache.types import Backend
from pydantic import BaseModel
from redis_process import RedisProcess
from servers import free_port, run_uvicorn

from cachegw import CachedHits, CachePolicy, ConfigError, MemoryBackend, RedisBackend, cached
from cachegw._backends import close_redis
from cachegw._decorator import engine_for
from cachegw._entry import strong_etag

# -- the app under test ----------------------------------------------------------------

COUNTS: Counter[str] = Counter()
_LOCK = threading.Lock()
_LOOP: list[asyncio.AbstractEventLoop] = []


def count(name: str) -> int:
    with _LOCK:  # sync handlers run in a thread pool
        COUNTS[name] += 1
        return COUNTS[name]


class Public(BaseModel):
    name: str
    n: int


def user_header(request: Request) -> str:
    return request.headers["x-user"]


async def current_user(request: Request) -> str:
    """The documented pattern: a dependency authenticates and sets request.state.user."""
    user = request.headers.get("authorization", "Bearer anonymous").removeprefix("Bearer ")
    request.state.user = user
    return user


app = FastAPI()


@app.get("/_loop")
async def _loop() -> dict[str, bool]:
    _LOOP[:] = [asyncio.get_running_loop()]
    return {}


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}


@app.get("/items")
@cached(ttl=60)
async def items(q: str | None = None, a: str | None = None, b: str | None = None) -> Any:
    return {"q": q, "a": a, "b": b, "n": count("items")}


@app.get("/items/{item_id}")
@cached(ttl=60)
async def item(item_id: int) -> Any:
    return {"id": item_id, "n": count(f"item{item_id}")}


@app.get("/dict")
@cached(ttl=60)
async def plain_dict() -> Any:
    return {"hello": "world", "n": count("dict")}


@app.get("/created")
@cached(ttl=60)
async def created() -> JSONResponse:
    return JSONResponse({"n": count("created")}, status_code=201, headers={"x-a": "b"})


@app.get("/html", response_class=HTMLResponse)
@cached(ttl=60)
async def html() -> str:
    return f"<p>{count('html')}</p>"


@app.get("/model", response_model=Public)
@cached(ttl=60)
async def model() -> Any:
    return {"name": "widget", "secret": "s3cr3t", "n": count("model")}


@app.get("/accepted", status_code=202)
@cached(ttl=60)
async def accepted() -> Any:
    return {"n": count("accepted")}


@app.get("/custom-header")
@cached(ttl=60)
async def custom_header(response: Response) -> Any:
    n = count("custom")
    response.headers["x-custom"] = f"set-{n}"
    return {"n": n}


@app.get("/sync")
@cached(ttl=60)
def sync_handler(q: str = "") -> Any:
    return {"q": q, "n": count("sync")}


@app.get("/cookie")
@cached(ttl=60)
async def cookie(response: Response) -> Any:
    n = count("cookie")
    response.set_cookie("session", f"s{n}")
    return {"n": n}


@app.get("/no-store")
@cached(ttl=60)
async def no_store() -> Response:
    n = count("no-store")
    return Response(f"{n}", headers={"cache-control": "no-store"})


@app.get("/private")
@cached(ttl=60)
async def private() -> Response:
    n = count("private")
    return Response(f"{n}", headers={"cache-control": "private, max-age=60"})


@app.get("/non-authoritative", status_code=203)
@cached(ttl=60, statuses=[200])
async def non_authoritative() -> Any:
    return {"n": count("203")}


@app.get("/whoami")
@cached(ttl=60)
async def whoami(request: Request) -> Any:
    return {
        "auth": request.headers.get("authorization"),
        "cookie": request.headers.get("cookie"),
        "n": count("whoami"),
    }


@app.get("/per-user")
@cached(ttl=60, key=user_header)
async def per_user(request: Request) -> Any:
    return {"user": request.headers["x-user"], "n": count("per-user")}


@app.get("/key-raises")
@cached(ttl=60, key=user_header)
async def key_raises() -> Any:
    return {"n": count("key-raises")}


@app.get("/per-state", dependencies=[Depends(current_user)])
@cached(ttl=60, key=lambda r: r.state.user)
async def per_state(request: Request) -> Any:
    return {"user": request.state.user, "n": count("per-state")}


@app.get("/vary")
@cached(policy=CachePolicy(ttl=60, vary=["Accept-Language"]))
async def vary(request: Request) -> Any:
    return {"lang": request.headers.get("accept-language"), "n": count("vary")}


@app.get("/slow")
@cached(ttl=60)
async def slow() -> Any:
    n = count("slow")
    await asyncio.sleep(0.1)
    return {"n": n}


@app.get("/bounded/{i}")
@cached(ttl=60)
async def bounded(i: int) -> Any:
    return {"i": i, "n": count(f"bounded{i}")}


@app.get("/same-a")
@cached(ttl=60)
async def same_a() -> Any:
    count("same-a")
    return {"same": True}


@app.get("/same-b")
@cached(ttl=60)
async def same_b() -> Any:
    count("same-b")
    return {"same": True}


# -- fixtures --------------------------------------------------------------------------

_prefixes = itertools.count()
CACHE_HEADERS = {"age", "x-cache-status", "cache-status"}


@pytest.fixture(scope="module", params=["routed", "early"])
def base_url(request: pytest.FixtureRequest) -> Iterator[str]:
    # Every test runs twice: hits through FastAPI's routing, and with CachedHits in front
    # answering plain hits before it (the same rules must hold on both paths).
    served: Any = app if request.param == "routed" else CachedHits(app)
    with run_uvicorn(served) as base:
        httpx.get(f"{base}/_loop").raise_for_status()
        yield base


def in_server_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on the server's event loop (where the backends' clients live)."""
    return asyncio.run_coroutine_threadsafe(coro, _LOOP[0]).result(10)


@contextmanager
def cache_on(backend: Backend) -> Iterator[Backend]:
    COUNTS.clear()
    FC2InMemoryBackend._store.clear()  # class-level, shared by every instance
    FastAPICache.reset()
    FastAPICache.init(backend, prefix=f"cgwtest{next(_prefixes)}")
    try:
        yield backend
    finally:
        FastAPICache.reset()
        FC2InMemoryBackend._store.clear()
        if isinstance(backend, RedisBackend):
            in_server_loop(backend.aclose())
        elif isinstance(backend, FC2RedisBackend):
            in_server_loop(close_redis(backend.redis))


BACKENDS = ["memory", "redis", "fc2-memory", "fc2-redis"]
#: Deadline for a healthy Redis's operations: these tests are about caching, not outages
#: (those are test_resilience's), so a slow machine must not turn them into failures.
HEALTHY = 5.0


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, base_url: str) -> Iterator[Backend]:
    kind = request.param
    made: Backend
    if kind == "memory":
        made = MemoryBackend()
    elif kind == "redis":
        made = RedisBackend.from_url(request.getfixturevalue("redis_url"), op_timeout=HEALTHY)
    elif kind == "fc2-memory":
        made = FC2InMemoryBackend()
    else:
        made = FC2RedisBackend(redis.asyncio.Redis.from_url(request.getfixturevalue("redis_url")))
    with cache_on(made):
        if kind == "fc2-redis":
            # fastapi-cache2's backend has no deadline knob: the engine's 250 ms one,
            # missed by a healthy server on a busy machine, would make its writes fail
            # open and the next request fetch again (issue 28).
            engine = engine_for(made)
            engine.op_timeout = engine.store.op_timeout = engine.read_budget = HEALTHY
        yield made


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10) as c:
        yield c


def status(response: httpx.Response) -> str | None:
    return response.headers.get("x-cache-status")


def without_cache_headers(response: httpx.Response) -> list[tuple[str, str]]:
    return [(k, v) for k, v in response.headers.multi_items() if k not in CACHE_HEADERS]


# -- replay ------------------------------------------------------------------------------


def test_second_request_is_identical_hit(client: httpx.Client, backend: Backend) -> None:
    miss = client.get("/dict")
    hit = client.get("/dict")
    assert COUNTS["dict"] == 1
    assert (miss.status_code, miss.json()) == (200, {"hello": "world", "n": 1})
    assert (status(miss), status(hit)) == ("MISS", "HIT")
    assert hit.status_code == miss.status_code
    assert hit.content == miss.content
    assert without_cache_headers(hit) == without_cache_headers(miss)
    # A backend over the network is written in the background, the answer waiting 10 ms
    # for it: it says "stored" only when the write landed by then (RFC 9211).
    statuses = {"cachegw; fwd=uri-miss; stored"}
    if not getattr(backend, "inline", False):
        statuses.add("cachegw; fwd=uri-miss")
    assert miss.headers["cache-status"] in statuses
    assert hit.headers["cache-status"].startswith("cachegw; hit; ttl=")
    assert int(hit.headers["cache-status"].rpartition("ttl=")[2]) in (59, 60)
    assert "age" not in miss.headers
    assert hit.headers["age"] in ("0", "1")
    assert hit.headers["content-type"] == "application/json"


@pytest.mark.usefixtures("backend")
def test_etag_is_stable_and_quoted(client: httpx.Client) -> None:
    a = client.get("/same-a")
    b = client.get("/same-b")
    a_hit = client.get("/same-a")
    assert a.headers["etag"] == b.headers["etag"] == a_hit.headers["etag"]
    assert a.headers["etag"] == strong_etag(a.content)
    assert a.headers["etag"].startswith('"')
    assert COUNTS["same-a"] == COUNTS["same-b"] == 1


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("template", ["{}", "W/{}", '"nope", {}', "*"])
def test_if_none_match_gives_304(client: httpx.Client, template: str) -> None:
    etag = client.get("/dict").headers["etag"]
    revalidated = client.get("/dict", headers={"if-none-match": template.format(etag)})
    assert revalidated.status_code == 304
    assert revalidated.content == b""
    assert revalidated.headers["etag"] == etag
    assert status(revalidated) == "HIT"
    assert client.get("/dict", headers={"if-none-match": '"nope"'}).status_code == 200
    assert COUNTS["dict"] == 1


@pytest.mark.usefixtures("backend")
def test_query_string_is_part_of_the_key(client: httpx.Client) -> None:
    assert client.get("/items?q=a").json()["q"] == "a"
    assert client.get("/items?q=b").json()["q"] == "b"
    again = client.get("/items?q=a")
    assert (status(again), again.json()["q"]) == ("HIT", "a")
    assert COUNTS["items"] == 2
    client.get("/items?a=1&b=2")
    reordered = client.get("/items?b=2&a=1")
    assert status(reordered) == "HIT"
    assert reordered.json() == {"q": None, "a": "1", "b": "2", "n": 3}
    assert COUNTS["items"] == 3
    assert status(client.get("/items?q=a;b=2")) == "MISS"  # ; is not a separator
    assert COUNTS["items"] == 4


@pytest.mark.usefixtures("backend")
def test_path_params_are_part_of_the_key(client: httpx.Client) -> None:
    assert client.get("/items/1").json() == {"id": 1, "n": 1}
    assert client.get("/items/2").json() == {"id": 2, "n": 1}
    hit = client.get("/items/1")
    assert (status(hit), hit.json()) == ("HIT", {"id": 1, "n": 1})
    assert (COUNTS["item1"], COUNTS["item2"]) == (1, 1)


@pytest.mark.usefixtures("backend")
def test_json_response_status_and_headers_replayed(client: httpx.Client) -> None:
    miss = client.get("/created")
    hit = client.get("/created")
    for response in (miss, hit):
        assert response.status_code == 201
        assert response.headers["x-a"] == "b"
        assert response.json() == {"n": 1}
    assert status(hit) == "HIT"
    assert COUNTS["created"] == 1


@pytest.mark.usefixtures("backend")
def test_html_response_class(client: httpx.Client) -> None:
    miss = client.get("/html")
    hit = client.get("/html")
    assert miss.text == hit.text == "<p>1</p>"
    assert hit.headers["content-type"].startswith("text/html")
    assert status(hit) == "HIT"


@pytest.mark.usefixtures("backend")
def test_response_model_filters_on_miss_and_hit(client: httpx.Client) -> None:
    miss = client.get("/model")
    hit = client.get("/model")
    assert miss.json() == hit.json() == {"name": "widget", "n": 1}
    assert "s3cr3t" not in miss.text
    assert "s3cr3t" not in hit.text
    assert status(hit) == "HIT"


@pytest.mark.usefixtures("backend")
def test_route_status_code_replayed(client: httpx.Client) -> None:
    miss = client.get("/accepted")
    hit = client.get("/accepted")
    assert (miss.status_code, hit.status_code) == (202, 202)
    assert status(hit) == "HIT"
    assert COUNTS["accepted"] == 1


@pytest.mark.usefixtures("backend")
def test_headers_set_on_injected_response_replayed(client: httpx.Client) -> None:
    miss = client.get("/custom-header")
    hit = client.get("/custom-header")
    assert miss.headers["x-custom"] == hit.headers["x-custom"] == "set-1"
    assert status(hit) == "HIT"


@pytest.mark.usefixtures("backend")
def test_sync_handler(client: httpx.Client) -> None:
    assert client.get("/sync?q=x").json() == {"q": "x", "n": 1}
    hit = client.get("/sync?q=x")
    assert (status(hit), hit.json()) == ("HIT", {"q": "x", "n": 1})


# -- what is never stored --------------------------------------------------------------


@pytest.mark.usefixtures("backend")
def test_set_cookie_response_not_stored(client: httpx.Client) -> None:
    first = client.get("/cookie")
    client.cookies.clear()  # else the cookie comes back and the request bypasses
    second = client.get("/cookie")
    assert first.headers["set-cookie"].startswith("session=s1")
    assert second.headers["set-cookie"].startswith("session=s2")
    assert (status(first), status(second)) == ("MISS", "MISS")
    assert COUNTS["cookie"] == 2


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("path", ["/no-store", "/private", "/non-authoritative"])
def test_unstorable_responses_call_handler_every_time(client: httpx.Client, path: str) -> None:
    first = client.get(path)
    second = client.get(path)
    assert first.text != second.text
    assert status(second) == "MISS"
    assert sum(COUNTS.values()) == 2


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize(
    ("name", "value", "field"),
    [("authorization", "Bearer alice", "auth"), ("cookie", "session=alice", "cookie")],
)
def test_credentials_bypass_and_never_get_another_users_entry(
    client: httpx.Client, name: str, value: str, field: str
) -> None:
    public = client.get("/whoami")
    assert (status(public), public.json()["n"]) == ("MISS", 1)
    alice = client.get("/whoami", headers={name: value})
    assert status(alice) == "BYPASS"
    assert alice.json()[field] == value
    assert COUNTS["whoami"] == 2
    bob = client.get("/whoami", headers={name: value.replace("alice", "bob")})
    assert status(bob) == "BYPASS"
    assert bob.json()[field] == value.replace("alice", "bob")
    anonymous = client.get("/whoami")
    assert (status(anonymous), anonymous.json()) == ("HIT", public.json())
    assert COUNTS["whoami"] == 3


@pytest.mark.usefixtures("backend")
def test_key_function_makes_entries_per_principal(client: httpx.Client) -> None:
    a1 = client.get("/per-user", headers={"x-user": "a"})
    b1 = client.get("/per-user", headers={"x-user": "b"})
    a2 = client.get("/per-user", headers={"x-user": "a", "authorization": "Bearer a"})
    b2 = client.get("/per-user", headers={"x-user": "b"})
    assert a1.json() == {"user": "a", "n": 1}
    assert b1.json() == {"user": "b", "n": 2}
    assert (status(a2), a2.json()) == ("HIT", a1.json())
    assert (status(b2), b2.json()) == ("HIT", b1.json())
    assert COUNTS["per-user"] == 2


@pytest.mark.usefixtures("backend")
def test_key_from_dependency_set_state(client: httpx.Client) -> None:
    alice = {"authorization": "Bearer alice"}
    bob = {"authorization": "Bearer bob"}
    assert client.get("/per-state", headers=alice).json() == {"user": "alice", "n": 1}
    assert client.get("/per-state", headers=bob).json() == {"user": "bob", "n": 2}
    again = client.get("/per-state", headers=alice)
    assert (status(again), again.json()) == ("HIT", {"user": "alice", "n": 1})
    assert COUNTS["per-state"] == 2


@pytest.mark.usefixtures("backend")
def test_key_function_that_raises_bypasses(
    client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="cachegw"):
        first = client.get("/key-raises")  # no x-user header: user_header raises KeyError
        second = client.get("/key-raises")
    for n, response in enumerate((first, second), 1):
        assert response.status_code == 200
        assert response.json() == {"n": n}
        assert status(response) == "BYPASS"
    assert "user_header" in caplog.text
    assert "KeyError" in caplog.text


@pytest.mark.usefixtures("backend")
def test_request_no_cache_is_parsed_case_insensitively(client: httpx.Client) -> None:
    client.get("/dict")
    reload = client.get("/dict", headers={"cache-control": "NO-CACHE"})
    assert reload.json()["n"] == 2
    assert status(reload) != "HIT"
    after = client.get("/dict")
    assert (status(after), after.json()["n"]) == ("HIT", 2)


@pytest.mark.usefixtures("backend")
def test_vary_header_values_get_separate_entries(client: httpx.Client) -> None:
    en = client.get("/vary", headers={"accept-language": "en"})
    fr = client.get("/vary", headers={"accept-language": "fr"})
    en2 = client.get("/vary", headers={"accept-language": "en"})
    assert (en.json(), fr.json()) == ({"lang": "en", "n": 1}, {"lang": "fr", "n": 2})
    assert (status(en2), en2.json()) == ("HIT", en.json())
    assert "accept-language" in en.headers["vary"].lower()
    assert COUNTS["vary"] == 2


@pytest.mark.usefixtures("backend")
async def test_concurrent_cold_requests_run_handler_once(base_url: str) -> None:
    limits = httpx.Limits(max_connections=20, max_keepalive_connections=20)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=10) as ac:
        await asyncio.gather(*(ac.get("/ping") for _ in range(20)))  # open the connections
        responses = await asyncio.gather(*(ac.get("/slow") for _ in range(20)))
    assert COUNTS["slow"] == 1
    assert {r.status_code for r in responses} == {200}
    assert {r.content for r in responses} == {b'{"n":1}'}


# -- backends ----------------------------------------------------------------------------


def test_memory_backend_bound_through_decorator(base_url: str, client: httpx.Client) -> None:
    with cache_on(MemoryBackend(max_entries=3)):
        for i in range(1, 6):
            assert status(client.get(f"/bounded/{i}")) == "MISS"
        assert status(client.get("/bounded/5")) == "HIT"
        assert status(client.get("/bounded/1")) == "MISS"  # the earliest was evicted
        assert COUNTS["bounded1"] == 2
        assert COUNTS["bounded5"] == 1


def test_unreachable_redis_fails_open(base_url: str, client: httpx.Client) -> None:
    with cache_on(RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}/0")):
        for n in range(1, 4):
            response = client.get("/dict")
            assert response.status_code == 200
            assert response.json()["n"] == n
            assert status(response) == "MISS"


def test_redis_stopped_mid_test_fails_open(
    base_url: str, client: httpx.Client, redis_proc_private: RedisProcess
) -> None:
    with cache_on(RedisBackend.from_url(redis_proc_private.url)):
        assert status(client.get("/dict")) == "MISS"
        assert status(client.get("/dict")) == "HIT"
        redis_proc_private.stop()
        for n in (2, 3):
            response = client.get("/dict")
            assert response.status_code == 200
            assert response.json()["n"] == n
        redis_proc_private.start()
        assert client.get("/dict").status_code == 200


# -- bad decorator input -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"ttl": -5}, "-5"),
        ({"ttl": "abc"}, "'abc'"),
        ({"key": "notcallable"}, "'notcallable'"),
        ({"vary": ["bad header"]}, "'bad header'"),
        ({"statuses": [99]}, "99"),
    ],
)
def test_bad_decorator_input_raises_config_error(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        cached(**kwargs)
    assert fragment in str(info.value)


def test_misspelt_knob_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="tll"):
        cached(tll=5)  # type: ignore[call-arg]


def test_policy_must_be_a_cache_policy() -> None:
    with pytest.raises(TypeError, match="CachePolicy"):
        cached(policy={"ttl": 5})  # type: ignore[arg-type]
