"""Keyed or not shared, at the decorator (issue 22): the key covers the route that matched and
every input its dependency tree declares; what a route can read undeclared is not shared.

Each case is two callers who differ in one input and must get two answers, through
``@cached``, ``cachegw.compat.cache`` and the pre-routing hit path (`CachedHits`), on the
memory backend and a real redis-server. Handlers count their calls: a second caller served
the first caller's answer shows up as the first caller's call number.

The property test at the end generates apps (dependency trees, include prefixes, wrapper
decorators) and request pairs. It runs on the oldest and the newest FastAPI the package
allows (CI runs both).

No ``from __future__ import annotations`` here: the handlers' annotations name local
dependencies, which FastAPI can only see evaluated.
"""

import functools
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Cookie, Depends, FastAPI, Header, HTTPException, Request, Security
from fastapi.security import APIKeyCookie, APIKeyHeader, APIKeyQuery, OAuth2PasswordBearer
from fastapi_cache import FastAPICache
from fastapi_cache.types import Backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import AliasChoices, BaseModel
from starlette.middleware.base import BaseHTTPMiddleware

from cachegw import CachedHits, MemoryBackend, RedisBackend, cached
from cachegw._inputs import inputs_of, matched_dependant
from cachegw.compat import cache
from tests.redis_process import HEALTHY

_prefixes = itertools.count()
FACES = ["cached", "compat", "early"]


def decorate(face: str, **kw: Any) -> Callable[[Callable[..., Any]], Any]:
    return cache(expire=60, **kw) if face == "compat" else cached(ttl=60, **kw)


def new_app(face: str) -> FastAPI:
    app = FastAPI()
    if face == "early":
        app.add_middleware(CachedHits)
    return app


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    made: Backend
    if request.param == "memory":
        made = MemoryBackend()
    else:
        made = RedisBackend.from_url(request.getfixturevalue("redis_url"), op_timeout=HEALTHY)
    FastAPICache.reset()
    FastAPICache.init(made, prefix=f"cgwin{next(_prefixes)}")
    try:
        yield made
    finally:
        FastAPICache.reset()
        if isinstance(made, RedisBackend):
            await made.aclose()


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test")


class Calls:
    """Numbers each handler call: an answer carries the call that made it."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, **seen: Any) -> dict[str, Any]:
        self.n += 1
        return {"call": self.n, **seen}


# -- the route that matched --------------------------------------------------------------


@pytest.mark.parametrize("face", FACES)
async def test_routers_under_different_prefixes_never_share(face: str, backend: Backend) -> None:
    calls = Calls()
    app = new_app(face)

    def admin_only(x_role: Annotated[str | None, Header()] = None) -> None:
        if x_role != "admin":
            raise HTTPException(403)

    admin = APIRouter()
    public = APIRouter()

    @admin.get("/{user_id}")
    @decorate(face)
    async def admin_user(user_id: int) -> dict[str, Any]:
        return calls(who="admin", ssn="123-45-6789", user=user_id)

    @public.get("/{user_id}")
    @decorate(face)
    async def public_user(user_id: int) -> dict[str, Any]:
        return calls(who="public", user=user_id)

    shared = APIRouter()

    @shared.get("/x")
    @decorate(face)
    async def x() -> dict[str, Any]:
        return calls(where="x")

    app.include_router(admin, prefix="/admin/users", dependencies=[Depends(admin_only)])
    app.include_router(public, prefix="/users")
    app.include_router(shared, prefix="/p1")
    app.include_router(shared, prefix="/p2")
    async with client(app) as c:
        first = await c.get("/admin/users/7", headers={"x-role": "admin"})
        assert first.json()["who"] == "admin"
        for _ in range(2):
            anonymous = await c.get("/users/7")
            assert anonymous.json()["who"] == "public" and "ssn" not in anonymous.text
        assert (await c.get("/admin/users/7")).status_code == 403
        p1 = (await c.get("/p1/x")).json()["call"]
        p2 = (await c.get("/p2/x")).json()["call"]
        assert p1 != p2
        assert (await c.get("/p2/x")).json()["call"] == p2  # each prefix keeps its entry


# -- declared inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("face", FACES)
async def test_api_key_security_is_keyed_per_caller(face: str, backend: Backend) -> None:
    calls = Calls()
    app = new_app(face)
    scheme = APIKeyHeader(name="X-Custom-Key")

    @app.get("/me")
    @decorate(face)
    async def me(key: Annotated[str, Security(scheme)]) -> dict[str, Any]:
        return calls(user=key)

    async with client(app) as c:
        alice = (await c.get("/me", headers={"x-custom-key": "alice"})).json()
        bob = await c.get("/me", headers={"x-custom-key": "bob"})
        assert bob.json()["user"] == "bob"
        again = await c.get("/me", headers={"x-custom-key": "alice"})
        assert again.json() == alice  # each caller's own entry is used
        assert (await c.get("/me")).status_code in (401, 403)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize(
    ("name", "values"),
    [("x-tenant", ("acme", "globex")), ("accept-language", ("en", "fr"))],
)
async def test_header_parameters_are_keyed(
    face: str, name: str, values: tuple[str, str], backend: Backend
) -> None:
    calls = Calls()
    app = new_app(face)

    @app.get("/page")
    @decorate(face)
    async def page(
        x_tenant: Annotated[str | None, Header()] = None,
        accept_language: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        return calls(tenant=x_tenant, lang=accept_language)

    async with client(app) as c:
        first = (await c.get("/page", headers={name: values[0]})).json()
        second = (await c.get("/page", headers={name: values[1]})).json()
        assert first["call"] != second["call"]
        # An undeclared header changes nothing: the entry is shared.
        third = await c.get("/page", headers={name: values[0], "x-noise": "1"})
        assert third.json() == first


@pytest.mark.parametrize("face", FACES)
async def test_inputs_of_dependencies_router_dependencies_and_query_keys(
    face: str, backend: Backend
) -> None:
    calls = Calls()
    app = new_app(face)
    seen: list[str | None] = []

    def tenant(x_tenant: Annotated[str | None, Header()] = None) -> str | None:
        return x_tenant

    def nested(
        t: Annotated[str | None, Depends(tenant)], theme: Annotated[str, Cookie()] = "light"
    ) -> str:
        return f"{t}/{theme}"

    def audit(x_region: Annotated[str | None, Header()] = None) -> None:
        seen.append(x_region)

    router = APIRouter(dependencies=[Depends(audit)])

    @router.get("/d")
    @decorate(face)
    async def d(v: Annotated[str, Depends(nested)]) -> dict[str, Any]:
        return calls(v=v)

    @router.get("/q")
    @decorate(face)
    async def q(
        key: Annotated[str | None, Security(APIKeyQuery(name="api_key", auto_error=False))],
    ) -> dict[str, Any]:
        return calls(key=key)

    app.include_router(router, prefix="/r")
    async with client(app) as c:
        a = (await c.get("/r/d", headers={"x-tenant": "acme"})).json()
        b = (await c.get("/r/d", headers={"x-tenant": "globex"})).json()
        assert (a["v"], b["v"]) == ("acme/light", "globex/light")
        c1 = (await c.get("/r/d", headers={"x-tenant": "acme", "cookie": "theme=dark"})).json()
        assert c1["v"] == "acme/dark"
        # The router-level dependency's input is keyed too.
        r1 = (await c.get("/r/d", headers={"x-tenant": "acme", "x-region": "eu"})).json()
        assert r1["call"] not in (a["call"], b["call"], c1["call"])
        assert (await c.get("/r/d", headers={"x-tenant": "acme"})).json() == a
        alice = (await c.get("/r/q?api_key=alice")).json()
        bob = (await c.get("/r/q?api_key=bob")).json()
        assert (alice["key"], bob["key"]) == ("alice", "bob")


# -- what cannot be seen is not shared ---------------------------------------------------


@pytest.mark.parametrize("face", FACES)
async def test_a_request_taking_route_is_not_shared_with_credentials(
    face: str, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    calls = Calls()
    app = new_app(face)

    @app.get("/account")
    @decorate(face)
    async def account(request: Request) -> dict[str, Any]:
        token = request.headers.get("authorization") or request.headers.get("x-api-key")
        return calls(user=token)

    with caplog.at_level(logging.WARNING, logger="cachegw"):
        async with client(app) as c:
            anonymous = (await c.get("/account")).json()
            for credential in ({"authorization": "Bearer alice"}, {"x-api-key": "alice"}):
                authorized = await c.get("/account", headers=credential)
                assert authorized.json()["user"].endswith("alice")
                assert authorized.json()["call"] != anonymous["call"]
                assert (await c.get("/account")).json() == anonymous
    warnings = [r.getMessage() for r in caplog.records if "does not declare" in r.getMessage()]
    assert len(warnings) == 1 and "'request'" in warnings[0] and "shared=True" in warnings[0]


@pytest.mark.parametrize("face", FACES)
async def test_an_optional_user_dependency_is_keyed(face: str, backend: Backend) -> None:
    calls = Calls()
    app = new_app(face)
    oauth = OAuth2PasswordBearer(tokenUrl="token", auto_error=False)

    def optional_user(token: Annotated[str | None, Depends(oauth)]) -> str | None:
        return token

    @app.get("/feed")
    @decorate(face)
    async def feed(user: Annotated[str | None, Depends(optional_user)]) -> dict[str, Any]:
        return calls(user=user)

    async with client(app) as c:
        alice = (await c.get("/feed", headers={"authorization": "Bearer alice"})).json()
        anonymous = (await c.get("/feed")).json()
        assert (alice["user"], anonymous["user"]) == ("alice", None)
        bob = (await c.get("/feed", headers={"authorization": "Bearer bob"})).json()
        assert bob["user"] == "bob"
        assert (await c.get("/feed", headers={"authorization": "Bearer alice"})).json() == alice


@pytest.mark.parametrize("face", FACES)
async def test_an_undeclared_api_key_header_bypasses_shared_entries(
    face: str, backend: Backend
) -> None:
    calls = Calls()
    app = new_app(face)

    @app.get("/plain")
    @decorate(face)
    async def plain() -> dict[str, Any]:
        return calls()

    async with client(app) as c:
        stored = (await c.get("/plain")).json()
        with_key = await c.get("/plain", headers={"x-api-key": "alice"})
        assert with_key.json()["call"] != stored["call"]


# -- hits before routing -----------------------------------------------------------------


def login_required(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    async def check(*args: Any, **kwargs: Any) -> Any:
        if kwargs["request"].headers.get("x-session") != "ok":
            raise HTTPException(401)
        return await func(*args, **kwargs)

    return check


async def test_a_wrapped_endpoint_is_never_answered_before_routing(backend: Backend) -> None:
    calls = Calls()
    app = new_app("early")

    @app.get("/private")
    @login_required
    @cached(ttl=60, shared=True)
    async def private(request: Request) -> dict[str, Any]:
        return calls()

    async with client(app) as c:
        assert (await c.get("/private", headers={"x-session": "ok"})).status_code == 200
        assert (await c.get("/private", headers={"x-session": "ok"})).headers[
            "x-cache-status"
        ] == "HIT"
        for _ in range(2):
            assert (await c.get("/private")).status_code == 401


@pytest.mark.parametrize("order", ["auth-first", "hits-first"])
async def test_hits_before_routing_run_inside_every_middleware(
    order: str, backend: Backend
) -> None:
    calls = Calls()
    app = FastAPI()

    async def auth(request: Request, call_next: Any) -> Any:
        if request.headers.get("x-session") != "ok":
            return httpx_response(401)
        return await call_next(request)

    if order == "auth-first":
        app.add_middleware(BaseHTTPMiddleware, dispatch=auth)
        app.add_middleware(CachedHits)
    else:
        app.add_middleware(CachedHits)
        app.add_middleware(BaseHTTPMiddleware, dispatch=auth)

    @app.get("/items/{i}")
    @cached(ttl=60)
    async def item(i: int) -> dict[str, Any]:
        return calls(i=i)

    routed = [0]
    inner = app.router.middleware_stack

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        routed[0] += 1  # reached FastAPI's routing: not answered before it
        await inner(scope, receive, send)

    app.router.middleware_stack = counting
    async with client(app) as c:
        ok = {"x-session": "ok"}
        first = await c.get("/items/1", headers=ok)
        assert (await c.get("/items/1", headers=ok)).json() == first.json()
        assert routed[0] == 1  # the hit was answered before routing, after the middleware
        assert (await c.get("/items/1")).status_code == 401


def httpx_response(status: int) -> Any:
    from starlette.responses import Response

    return Response(status_code=status)


# -- compat ------------------------------------------------------------------------------


async def test_compat_keys_arguments_and_excludes_unencodable_ones_loudly(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    calls = Calls()
    app = FastAPI()

    class Session:  # no stable encoding: a database session, say
        pass

    @app.get("/r")
    @cache(expire=60, namespace="r")
    async def r(db: Annotated[Session, Depends(Session)], q: str = "") -> dict[str, Any]:
        return calls(q=q)

    with caplog.at_level(logging.WARNING, logger="cachegw"):
        async with client(app) as c:
            first = (await c.get("/r?q=1")).json()
            assert (await c.get("/r?q=1")).json() == first  # not a miss every time
            assert (await c.get("/r?q=2")).json()["call"] != first["call"]
    excluded = [r.getMessage() for r in caplog.records if "no stable encoding" in r.getMessage()]
    assert len(excluded) == 1 and "'db'" in excluded[0]


async def test_fastapicache_clear_finds_compat_entries(backend: Backend) -> None:
    calls = Calls()
    app = FastAPI()

    def by_path(func: Any, namespace: str = "", *, request: Any = None, **_: Any) -> str:
        return f"{namespace}:{request.url.path}"

    @app.get("/ns")
    @cache(expire=60, namespace="items")
    async def ns() -> dict[str, Any]:
        return calls()

    @app.get("/kb")
    @cache(expire=60, key_builder=by_path)
    async def kb() -> dict[str, Any]:
        return calls()

    async with client(app) as c:
        first = (await c.get("/ns")).json()
        assert (await c.get("/ns")).json() == first
        assert await FastAPICache.clear(namespace="items") >= 1
        assert (await c.get("/ns")).json() != first
        kb1 = (await c.get("/kb")).json()
        assert (await c.get("/kb")).json() == kb1
        prefix = FastAPICache.get_prefix()
        assert await FastAPICache.clear(key=f"{prefix}::/kb") >= 1
        assert (await c.get("/kb")).json() != kb1


# -- the contract with FastAPI's internals (cachegw._inputs.matched_dependant) --------------


async def test_matched_dependant_includes_the_include_level_dependencies() -> None:
    found: list[Any] = []

    def role(x_role: Annotated[str | None, Header()] = None) -> None:
        return None

    router = APIRouter()

    @router.get("/{i}")
    async def endpoint(request: Request, i: int) -> dict[str, int]:
        found.append(inputs_of(matched_dependant(request.scope)))  # type: ignore[arg-type]
        return {"i": i}

    app = FastAPI()
    app.include_router(router, prefix="/a", dependencies=[Depends(role)])
    app.include_router(router, prefix="/b")
    async with client(app) as c:
        await c.get("/a/1")
        await c.get("/b/1")
    assert b"x-role" in found[0].headers and found[1].headers == ()
    assert found[0].opaque and found[0].opaque == found[1].opaque


# -- property: generated apps and request pairs ------------------------------------------

HEADERS = ("x-tenant", "x-region")
COOKIES = ("theme",)
ATOMS = (
    "h:x-tenant",
    "h:x-region",
    "c:theme",
    "q:q",
    "sec:x-custom-key",
    "sec:cookie-sid",
    "sec:bearer",
    "opaque",
    "choices:x-org",
    "model:x-plan",
)


class PlanHeaders(BaseModel):
    x_plan: str | None = None


def _atom_dependency(atom: str) -> Any:
    """A dependency that reads one input and returns it (``opaque`` reads Authorization
    through the Request, undeclared)."""
    kind, _, name = atom.partition(":")
    if kind == "h":

        def header(value: Annotated[str | None, Header(alias=name)] = None) -> Any:
            return value

        return header
    if kind == "c":

        def cookie(value: Annotated[str | None, Cookie(alias=name)] = None) -> Any:
            return value

        return cookie
    if kind == "q":

        def query(q: str | None = None) -> Any:
            return q

        return query
    if kind == "choices":
        # FastAPI 0.12x and later read the header under each choice.
        org = Header(validation_alias=AliasChoices("x-org-id", name))

        def choices(value: Annotated[str | None, org] = None) -> Any:
            return value

        return choices
    if kind == "model":
        # FastAPI 0.12x and later read an optional model of headers field by field.
        def model(value: Annotated[PlanHeaders | None, Header()] = None) -> Any:
            return value

        return model
    if atom == "sec:x-custom-key":
        return APIKeyHeader(name="X-Custom-Key", auto_error=False)
    if atom == "sec:cookie-sid":
        return APIKeyCookie(name="sid", auto_error=False)
    if atom == "sec:bearer":
        return OAuth2PasswordBearer(tokenUrl="t", auto_error=False)

    def opaque(request: Request) -> Any:
        return request.headers.get("authorization")

    return opaque


def _declared(atom: str) -> tuple[str, str] | None:
    """Where the oracle reads an atom's input: ("header"|"cookie"|"query", name)."""
    return {
        "h:x-tenant": ("header", "x-tenant"),
        "h:x-region": ("header", "x-region"),
        "c:theme": ("cookie", "theme"),
        "choices:x-org": ("header", "x-org"),
        "model:x-plan": ("header", "x-plan"),
        "q:q": ("query", "q"),
        "sec:x-custom-key": ("header", "x-custom-key"),
        "sec:cookie-sid": ("cookie", "sid"),
        "sec:bearer": ("header", "authorization"),
    }.get(atom)


route_specs = st.lists(
    st.fixed_dictionaries(
        {
            "direct": st.lists(st.sampled_from(ATOMS), max_size=2, unique=True),
            "nested": st.lists(st.sampled_from(ATOMS), max_size=2, unique=True),
            "router_deps": st.lists(st.sampled_from(ATOMS), max_size=1, unique=True),
            "prefixes": st.lists(
                st.sampled_from(["/a", "/b", "/c/d"]), min_size=1, max_size=2, unique=True
            ),
            "wrapped": st.booleans(),
        }
    ),
    min_size=1,
    max_size=3,
)
request_inputs = st.fixed_dictionaries(
    {
        "route": st.integers(0, 5),
        "prefix": st.integers(0, 1),
        "x-tenant": st.sampled_from([None, "acme", "globex"]),
        "x-region": st.sampled_from([None, "eu"]),
        "theme": st.sampled_from([None, "dark"]),
        # A second Cookie line: Starlette 0.4x reads the first line only, later ones all.
        "theme2": st.sampled_from([None, "light"]),
        "x-org": st.sampled_from([None, "o1", "o2"]),
        "x-plan": st.sampled_from([None, "free", "pro"]),
        "sid": st.sampled_from([None, "s1", "s2"]),
        "q": st.sampled_from([None, "1", "2"]),
        "x-custom-key": st.sampled_from([None, "alice", "bob"]),
        "authorization": st.sampled_from([None, "Bearer alice", "Bearer bob"]),
        "x-noise": st.sampled_from([None, "1", "2"]),
        "x-session": st.sampled_from(["ok", None]),
    }
)


def _build(
    face: str, specs: list[dict[str, Any]]
) -> tuple[FastAPI, list[tuple[str, dict[str, Any]]]]:
    app = new_app(face)
    routes = []
    for index, spec in enumerate(specs):
        router = APIRouter(dependencies=[Depends(_atom_dependency(a)) for a in spec["router_deps"]])
        nested_atoms = spec["nested"]

        def nested(**kw: Any) -> Any:
            return kw

        # A sub-dependency with its own parameters, each a dependency of one atom.
        nested.__signature__ = _signature(
            {f"n{i}": _atom_dependency(a) for i, a in enumerate(nested_atoms)}
        )  # type: ignore[attr-defined]
        params = {f"d{i}": _atom_dependency(a) for i, a in enumerate(spec["direct"])}
        params["nested"] = nested
        wrapped = spec["wrapped"]

        def handler(**kw: Any) -> Any:
            return None

        async def endpoint(__index: int = index, **kw: Any) -> dict[str, Any]:
            ENDPOINT_CALLS[0] += 1
            return {"call": ENDPOINT_CALLS[0], "route": __index}

        sig = _signature(params, request=wrapped)
        endpoint.__signature__ = sig  # type: ignore[attr-defined]
        endpoint.__name__ = endpoint.__qualname__ = f"endpoint{index}"
        decorated: Any = (
            decorate(face, shared=True) if (wrapped and face != "compat") else decorate(face)
        )
        handler_fn = decorated(endpoint)
        if wrapped:
            handler_fn = login_required(handler_fn)
        router.add_api_route("/r", handler_fn, methods=["GET"])
        for prefix in spec["prefixes"]:
            app.include_router(router, prefix=f"{prefix}{index}")
            routes.append((f"{prefix}{index}/r", spec))
    return app, routes


ENDPOINT_CALLS = [0]


def _signature(deps: dict[str, Any], request: bool = False) -> Any:
    import inspect

    params = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=Depends(dep), annotation=Any
        )
        for name, dep in deps.items()
    ]
    if request:
        params.insert(
            0, inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)
        )
    return inspect.Signature(params)


def _atoms(spec: dict[str, Any]) -> list[str]:
    return [*spec["direct"], *spec["nested"], *spec["router_deps"]]


def _request(values: dict[str, Any], path: str) -> tuple[str, list[tuple[str, str]]]:
    names = ("x-tenant", "x-region", "x-custom-key", "authorization", "x-session", "x-org")
    headers = [(n, values[n]) for n in (*names, "x-plan", "x-noise") if values[n]]
    cookies = "; ".join(f"{n}={values[n]}" for n in ("theme", "sid") if values[n])
    if cookies:
        headers.append(("cookie", cookies))
    if values["theme2"]:
        headers.append(("cookie", f"theme={values['theme2']}"))
    query = f"?q={values['q']}" if values["q"] else ""
    return path + query, headers


def _oracle(spec: dict[str, Any], path: str, values: dict[str, Any]) -> tuple[Any, ...]:
    """Everything the answer may depend on: the route matched and the declared inputs."""
    declared = sorted({d for a in _atoms(spec) if (d := _declared(a)) is not None})
    # A second Cookie line (theme=...) may change what the theme cookie reads as.
    lines = values["theme2"] if ("cookie", "theme") in declared else None
    return (path, values["q"], lines, *(values[name] for _, name in declared))


def _credentialed(values: dict[str, Any]) -> bool:
    return bool(
        values["authorization"]
        or values["theme"]
        or values["theme2"]
        or values["sid"]
        or values["x-custom-key"]
    )


@pytest.mark.parametrize("face", FACES)
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    specs=route_specs,
    pairs=st.lists(st.tuples(request_inputs, request_inputs), min_size=1, max_size=4),
)
async def test_generated_apps_never_share_between_different_inputs(
    face: str,
    memory_and_redis_backends: list[Backend],
    specs: list[dict[str, Any]],
    pairs: list[Any],
) -> None:
    for made in memory_and_redis_backends:
        FastAPICache.reset()
        FastAPICache.init(made, prefix=f"cgwprop{next(_prefixes)}")
        app, routes = _build(face, specs)
        answers: dict[int, tuple[Any, ...]] = {}  # call number -> the oracle of its request
        async with client(app) as c:
            for first, second in pairs:
                for values, noise in ((first, None), (second, None), (first, "3")):
                    path, spec = routes[values["route"] % len(routes)]
                    target, headers = _request(values, path)
                    if noise:
                        headers = [(n, v) for n, v in headers if n != "x-noise"]
                        headers.append(("x-noise", noise))
                    response = await c.get(target, headers=headers)
                    if spec["wrapped"] and values["x-session"] != "ok":
                        assert response.status_code == 401
                        continue
                    assert response.status_code == 200, response.text
                    call = response.json()["call"]
                    oracle = _oracle(spec, path, values)
                    seen = answers.setdefault(call, oracle)
                    # Never another request's answer: same call -> same route and inputs.
                    assert seen == oracle, (face, path, headers)
                    if (
                        noise
                        and "opaque" not in _atoms(spec)
                        and not _credentialed(values)
                        and not spec["wrapped"]
                    ):
                        # Differing only in an undeclared, non-credential header: shared.
                        assert (
                            response.headers.get("x-cache-status") == "HIT"
                            or response.headers.get("x-fastapi-cache") == "HIT"
                        )


@pytest.fixture
async def memory_and_redis_backends(redis_url: str) -> AsyncIterator[list[Backend]]:
    redis = RedisBackend.from_url(redis_url, op_timeout=HEALTHY)
    try:
        yield [MemoryBackend(), redis]
    finally:
        FastAPICache.reset()
        await redis.aclose()
