"""Attacks on the decorator's key rule (issue 22, red team): one caller must never receive
another caller's answer through ``@cached``, ``cachegw.compat.cache`` or `CachedHits`.

Each test is an attack that leaked before its fix: two callers who differ in an input the
route reads get two answers (handlers number their calls, so a shared answer shows up as
the other caller's call number).

No ``from __future__ import annotations`` here: FastAPI must see the handlers' annotations
evaluated.
"""

import functools
import logging
from collections.abc import Callable
from typing import Annotated, Any

import pytest
from fastapi import APIRouter, Cookie, Depends, Header, HTTPException, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBasic, HTTPBearer
from fastapi_cache.types import Backend
from pydantic import AliasChoices, BaseModel, ConfigDict
from starlette.responses import JSONResponse

from cachegw import cached
from cachegw.compat import cache

# The callers, the faces and the backends of tests/test_inputs.py.
from tests import test_inputs as shared
from tests.test_inputs import FACES, Calls, client, decorate, new_app

backend = shared.backend  # the fixture: memory and a real redis-server


@pytest.mark.parametrize("face", FACES)
async def test_duplicate_cookie_lines_key_what_starlette_reads(face: str, backend: Backend) -> None:
    """Starlette up to 0.4x reads the first ``Cookie`` line only (later versions all of
    them): a key made from the joined lines let a request run as ``globex`` there and
    store its answer under ``acme``'s key."""
    calls = Calls()
    app = new_app(face)

    @app.get("/home")
    @decorate(face)
    async def home(tenant: Annotated[str | None, Cookie()] = None) -> dict[str, Any]:
        return calls(tenant=tenant)

    async with client(app) as c:
        poison = await c.get(
            "/home", headers=[("cookie", "tenant=globex"), ("cookie", "tenant=acme")]
        )
        assert poison.json()["tenant"] in ("globex", "acme")  # the version decides
        for tenant in ("acme", "globex", "acme"):
            got = await c.get("/home", headers={"cookie": f"tenant={tenant}"})
            assert got.json()["tenant"] == tenant


@pytest.mark.parametrize("face", FACES)
async def test_a_security_scheme_with_its_own_call_is_not_trusted(
    face: str, backend: Backend
) -> None:
    """A scheme subclass whose ``__call__`` reads the request itself can read anything."""
    calls = Calls()
    app = new_app(face)

    class SessionBearer(HTTPBearer):
        async def __call__(self, request: Request) -> HTTPAuthorizationCredentials | None:  # type: ignore[override]
            session = request.headers.get("x-session")
            if session is None:
                raise HTTPException(401)
            return HTTPAuthorizationCredentials(scheme="Session", credentials=session)

    scheme = SessionBearer()

    @app.get("/me")
    @decorate(face)
    async def me(creds: Annotated[HTTPAuthorizationCredentials, Security(scheme)]) -> Any:
        return calls(user=creds.credentials)

    async with client(app) as c:
        assert (await c.get("/me", headers={"x-session": "alice"})).json()["user"] == "alice"
        assert (await c.get("/me", headers={"x-session": "bob"})).json()["user"] == "bob"
        assert (await c.get("/me")).status_code == 401


@pytest.mark.parametrize("face", FACES)
async def test_header_parameters_of_a_security_scheme_are_keyed(
    face: str, backend: Backend
) -> None:
    calls = Calls()
    app = new_app(face)

    class TenantBearer(HTTPBearer):
        async def __call__(  # type: ignore[override]
            self, request: Request, x_tenant: Annotated[str, Header()] = "none"
        ) -> HTTPAuthorizationCredentials | None:
            creds = await super().__call__(request)
            assert creds is not None
            return HTTPAuthorizationCredentials(scheme=x_tenant, credentials=creds.credentials)

    scheme = TenantBearer()

    @app.get("/me")
    @decorate(face, shared=True) if face != "compat" else decorate(face)
    async def me(creds: Annotated[HTTPAuthorizationCredentials, Security(scheme)]) -> Any:
        return calls(tenant=creds.scheme)

    async with client(app) as c:
        bearer = {"authorization": "Bearer alice"}
        assert (await c.get("/me", headers={**bearer, "x-tenant": "a"})).json()["tenant"] == "a"
        assert (await c.get("/me", headers={**bearer, "x-tenant": "b"})).json()["tenant"] == "b"


@pytest.mark.parametrize("face", FACES)
async def test_dependency_overrides_are_analysed(face: str, backend: Backend) -> None:
    """``app.dependency_overrides`` swaps a dependency for one with other inputs."""
    calls = Calls()
    app = new_app(face)

    def current_user() -> str:
        return "nobody"

    @app.get("/me")
    @decorate(face)
    async def me(user: Annotated[str, Depends(current_user)]) -> dict[str, Any]:
        return calls(user=user)

    def user_from_header(x_user: Annotated[str, Header()]) -> str:
        return x_user

    router = APIRouter()

    @router.get("/me")
    @decorate(face)
    async def included(user: Annotated[str, Depends(current_user)]) -> dict[str, Any]:
        return calls(user=user)

    app.include_router(router, prefix="/r")
    app.dependency_overrides[current_user] = user_from_header
    async with client(app) as c:
        for path in ("/me", "/r/me"):
            assert (await c.get(path, headers={"x-user": "alice"})).json()["user"] == "alice"
            assert (await c.get(path, headers={"x-user": "bob"})).json()["user"] == "bob"
    app.dependency_overrides.clear()
    async with client(app) as c:
        assert (await c.get("/me", headers={"x-user": "carol"})).json()["user"] == "nobody"


class Extras(BaseModel):
    model_config = ConfigDict(extra="allow")
    x_tenant: str | None = None


@pytest.mark.parametrize("face", FACES)
async def test_a_header_model_that_takes_every_header(face: str, backend: Backend) -> None:
    calls = Calls()
    app = new_app(face)

    @app.get("/h")
    @decorate(face)
    async def h(headers: Annotated[Extras, Header()]) -> dict[str, Any]:
        return calls(session=(headers.model_extra or {}).get("x-session"))

    @app.get("/c")
    @decorate(face)
    async def c_(cookies: Annotated[Extras, Cookie()]) -> dict[str, Any]:
        return calls(session=(cookies.model_extra or {}).get("session"))

    async with client(app) as c:
        assert (await c.get("/h", headers={"x-session": "alice"})).json()["session"] == "alice"
        assert (await c.get("/h", headers={"x-session": "bob"})).json()["session"] == "bob"
        for user in ("alice", "bob"):
            got = await c.get("/c", headers={"cookie": f"session={user}"})
            assert got.json()["session"] == user


class AuthRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Any:
            if request.headers.get("x-session") != "ok":
                raise HTTPException(401)
            return await handler(request)

        return checked


async def test_a_custom_route_class_is_never_answered_before_routing(backend: Backend) -> None:
    calls = Calls()
    app = new_app("early")
    router = APIRouter(route_class=AuthRoute)

    @router.get("/private")
    @cached(ttl=60)
    async def private() -> dict[str, Any]:
        return calls(secret=True)

    app.router.routes.extend(router.routes)
    async with client(app) as c:
        assert (await c.get("/private", headers={"x-session": "ok"})).status_code == 200
        assert (await c.get("/private", headers={"x-session": "ok"})).headers[
            "x-cache-status"
        ] == "HIT"
        assert (await c.get("/private")).status_code == 401


@pytest.mark.parametrize("face", FACES)
async def test_every_alias_choice_of_a_header_is_keyed(face: str, backend: Backend) -> None:
    """FastAPI 0.12x and later read a header under each choice of ``AliasChoices``."""
    calls = Calls()
    app = new_app(face)
    org = Header(validation_alias=AliasChoices("x-tenant", "x-org"))

    @app.get("/t")
    @decorate(face)
    async def t(tenant: Annotated[str | None, org] = None) -> dict[str, Any]:
        return calls(tenant=tenant)

    async with client(app) as c:
        acme = (await c.get("/t", headers={"x-org": "acme"})).json()["tenant"]
        assert acme in ("acme", None)  # None: a FastAPI that reads the first name only
        globex = (await c.get("/t", headers={"x-org": "globex"})).json()["tenant"]
        assert globex == ("globex" if acme else None)


async def test_a_scheme_with_its_own_call_says_why_it_is_not_cached_and_shared_keys_it(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """The usual JWT recipe (an ``HTTPBearer`` subclass that checks the token) is not
    cached until the route says its answer depends on the bearer token alone."""
    calls = Calls()
    app = new_app("cached")

    class JWTBearer(HTTPBearer):
        async def __call__(self, request: Request) -> HTTPAuthorizationCredentials | None:  # type: ignore[override]
            creds = await super().__call__(request)
            if creds is None or not creds.credentials.startswith("ok-"):
                raise HTTPException(403)
            return creds

    jwt = JWTBearer()

    @app.get("/unsaid")
    @cached(ttl=60)
    async def unsaid(creds: Annotated[HTTPAuthorizationCredentials, Security(jwt)]) -> Any:
        return calls(user=creds.credentials)

    @app.get("/said")
    @cached(ttl=60, shared=True)
    async def said(creds: Annotated[HTTPAuthorizationCredentials, Security(jwt)]) -> Any:
        return calls(user=creds.credentials)

    alice = {"authorization": "Bearer ok-alice"}
    with caplog.at_level(logging.WARNING, logger="cachegw"):
        async with client(app) as c:
            for _ in range(2):
                got = await c.get("/unsaid", headers=alice)
                assert got.headers["x-cache-status"] == "BYPASS"
            first = (await c.get("/said", headers=alice)).json()
            again = await c.get("/said", headers=alice)
            assert again.headers["x-cache-status"] == "HIT" and again.json() == first
            bob = await c.get("/said", headers={"authorization": "Bearer ok-bob"})
            assert bob.json()["user"] == "ok-bob"
    warnings = [r.getMessage() for r in caplog.records if "its own __call__" in r.getMessage()]
    assert len(warnings) == 1 and "JWTBearer" in warnings[0] and "shared=True" in warnings[0]


async def test_a_key_builder_that_forgets_the_caller_keeps_declared_credentials_apart(
    backend: Backend,
) -> None:
    """fastapi-cache2's docs' request key builder (path and query) on a route with an API
    key: fastapi-cache2 would serve Alice's answer to Bob."""
    calls = Calls()
    app = new_app("compat")
    scheme = APIKeyHeader(name="X-Key")

    def by_path(func: Any, namespace: str = "", *, request: Any = None, **_: Any) -> str:
        return f"{namespace}:{request.url.path}"

    @app.get("/me")
    @cache(expire=60, key_builder=by_path)
    async def me(key: Annotated[str, Depends(scheme)]) -> dict[str, Any]:
        return calls(user=key)

    async with client(app) as c:
        alice = (await c.get("/me", headers={"x-key": "alice"})).json()
        assert (await c.get("/me", headers={"x-key": "bob"})).json()["user"] == "bob"
        again = await c.get("/me", headers={"x-key": "alice"})
        assert again.json() == alice and again.headers["x-fastapi-cache"] == "HIT"


class TenantHeaders(BaseModel):
    x_tenant: str = "none"


@pytest.mark.parametrize("face", FACES)
async def test_an_optional_header_model_is_keyed_by_its_fields(face: str, backend: Backend) -> None:
    """FastAPI 0.12x and later read ``Model | None`` header parameters as a model."""
    calls = Calls()
    app = new_app(face)

    @app.get("/o")
    @decorate(face)
    async def o(h: Annotated[TenantHeaders | None, Header()] = None) -> dict[str, Any]:
        return calls(tenant=h.x_tenant if h else None)

    async with client(app) as c:
        acme = (await c.get("/o", headers={"x-tenant": "acme"})).json()["tenant"]
        assert acme in ("acme", None)  # None: a FastAPI that reads no optional model
        globex = (await c.get("/o", headers={"x-tenant": "globex"})).json()["tenant"]
        assert globex == ("globex" if acme else None)


@pytest.mark.parametrize(
    ("declared", "headers"),
    [
        ("key", {"x-custom-key": "alice"}),
        ("tenant", {"x-tenant": "acme"}),
        ("", {"x-api-key": "a"}),
    ],
)
async def test_compat_max_age_is_private_when_the_answer_is_per_caller(
    declared: str, headers: dict[str, str], backend: Backend
) -> None:
    """fastapi-cache2's ``Cache-Control: max-age`` on an answer keyed by a declared input or
    given to a request with credentials would let a CDN in front serve it to everyone."""
    app = new_app("compat")
    scheme = APIKeyHeader(name="X-Custom-Key")

    @app.get("/key")
    @cache(expire=60)
    async def key(k: Annotated[str, Security(scheme)]) -> dict[str, Any]:
        return {"k": k}

    @app.get("/tenant")
    @cache(expire=60)
    async def tenant(x_tenant: Annotated[str, Header()]) -> dict[str, Any]:
        return {"t": x_tenant}

    @app.get("/")
    @cache(expire=60)
    async def plain() -> dict[str, Any]:
        return {}

    async with client(app) as c:
        for _ in range(2):  # the miss that stores, then the hit
            got = await c.get(f"/{declared}", headers=headers)
            # A request with undeclared credentials bypasses: no max-age at all.
            assert got.headers.get("cache-control", "private").startswith("private")
            assert bool(declared) == ("max-age" in got.headers.get("cache-control", ""))
        if not declared:
            assert (await c.get("/")).headers["cache-control"].startswith("max-age=")


@pytest.mark.parametrize("face", FACES)
async def test_no_header_or_cookie_value_spells_absent(face: str, backend: Backend) -> None:
    """h11 lets control characters other than NUL through: the key's marker for an
    absent input must not be a value a client can send."""
    calls = Calls()
    app = new_app(face)

    @app.get("/a")
    @decorate(face)
    async def a(
        x_tenant: Annotated[str | None, Header()] = None,
        t: Annotated[str | None, Cookie()] = None,
    ) -> dict[str, Any]:
        return calls(tenant=x_tenant, t=t)

    async with client(app) as c:
        for forged in ({"x-tenant": "\x01absent"}, {"cookie": "t=\x01absent"}):
            assert (await c.get("/a", headers=forged)).status_code == 200
        absent = (await c.get("/a")).json()
        assert (absent["tenant"], absent["t"]) == (None, None)


class _TenantOf:
    """A class dependency: FastAPI reads ``__init__``'s parameters."""

    def __init__(self, x_tenant: Annotated[str | None, Header()] = None) -> None:
        self.tenant = x_tenant


class _Caller:
    """An instance dependency: FastAPI reads ``__call__``'s parameters."""

    def __call__(self, x_user: Annotated[str | None, Header()] = None) -> str | None:
        return x_user


def _by_prefix(prefix: str, x_user: Annotated[str | None, Header()] = None) -> str:
    return f"{prefix}{x_user}"


def _shapes() -> dict[str, tuple[Any, list[Any], list[Any]]]:
    """Dependency shapes that were tried and are keyed: the dependency, then Alice's and
    Bob's request headers."""
    return {
        "http-basic": (
            HTTPBasic(),
            [("authorization", "Basic YWxpY2U6cA==")],
            [("authorization", "Basic Ym9iOnA=")],
        ),
        "class": (_TenantOf, [("x-tenant", "acme")], [("x-tenant", "globex")]),
        "instance": (_Caller(), [("x-user", "alice")], [("x-user", "bob")]),
        "partial": (functools.partial(_by_prefix, "u:"), [("x-user", "a")], [("x-user", "b")]),
        "no-underscore-conversion": (
            _header_dependency(Header(convert_underscores=False)),
            [("x_user", "alice")],
            [("x_user", "bob")],
        ),
        "alias": (
            _header_dependency(Header(alias="X-Principal")),
            [("x-principal", "alice")],
            [("x-principal", "bob")],
        ),
        "list-lines": (
            _list_dependency(),
            [("x-user", "alice"), ("x-user", "bob")],
            [("x-user", "alice")],
        ),
        "no-dependency-cache": (
            Depends(_Caller(), use_cache=False),
            [("x-user", "alice")],
            [("x-user", "bob")],
        ),
    }


def _header_dependency(param: Any) -> Any:
    def dependency(x_user: Annotated[str | None, param] = None) -> str | None:
        return x_user

    return dependency


def _list_dependency() -> Any:
    def dependency(x_user: Annotated[list[str] | None, Header()] = None) -> Any:
        return x_user

    return dependency


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("shape", sorted(_shapes()))
async def test_dependency_shapes_are_keyed(shape: str, face: str, backend: Backend) -> None:
    dependency, alice, bob = _shapes()[shape]
    calls = Calls()
    app = new_app(face)
    marker = dependency if isinstance(dependency, type(Depends())) else Depends(dependency)

    @app.get("/who")
    @decorate(face)
    async def who(user: Annotated[Any, marker]) -> dict[str, Any]:
        return calls(user=repr(getattr(user, "tenant", user)))

    async with client(app) as c:
        first = (await c.get("/who", headers=alice)).json()
        second = (await c.get("/who", headers=bob)).json()
        assert first["user"] != second["user"]
        again = await c.get("/who", headers=alice)
        assert again.json() == first  # Alice's own entry


@pytest.mark.parametrize("face", FACES)
async def test_a_function_wrapped_around_a_security_scheme_is_not_the_scheme(
    face: str, backend: Backend
) -> None:
    """``functools.wraps(scheme)`` gives FastAPI the scheme's signature, and the function
    the request: it may read anything."""
    calls = Calls()
    app = new_app(face)
    base = APIKeyHeader(name="X-Key", auto_error=False)

    @functools.wraps(base)
    async def session_or_key(request: Request) -> str | None:
        return request.headers.get("x-session") or await base(request)

    @app.get("/me")
    @decorate(face)
    async def me(user: Annotated[str | None, Security(session_or_key)]) -> dict[str, Any]:
        return calls(user=user)

    async with client(app) as c:
        assert (await c.get("/me", headers={"x-session": "alice"})).json()["user"] == "alice"
        assert (await c.get("/me", headers={"x-session": "bob"})).json()["user"] == "bob"


async def test_compat_says_what_it_can_do_about_a_request_taking_route(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """``@cache`` has no ``vary``/``key``: its warning names its own remedies, and its
    ``shared=True`` keys the declared credential like ``@cached``'s."""
    calls = Calls()
    app = new_app("compat")
    scheme = APIKeyHeader(name="X-Key")

    @app.get("/unsaid")
    @cache(expire=60)
    async def unsaid(request: Request) -> dict[str, Any]:
        return calls(path=request.url.path)

    @app.get("/said")
    @cache(expire=60, shared=True)
    async def said(request: Request, key: Annotated[str, Security(scheme)]) -> Any:
        return calls(user=key, link=str(request.url_for("said")))

    with caplog.at_level(logging.WARNING, logger="cachegw"):
        async with client(app) as c:
            await c.get("/unsaid")
            alice = (await c.get("/said", headers={"x-key": "alice"})).json()
            again = await c.get("/said", headers={"x-key": "alice"})
            assert again.json() == alice and again.headers["x-fastapi-cache"] == "HIT"
            assert (await c.get("/said", headers={"x-key": "bob"})).json()["user"] == "bob"
    warnings = [r.getMessage() for r in caplog.records if "does not declare" in r.getMessage()]
    assert len(warnings) == 1 and "/unsaid" in warnings[0]
    assert "key_builder" in warnings[0] and "vary=" not in warnings[0]
    with pytest.raises(TypeError, match="shared"):
        cache(shared="yes")  # type: ignore[arg-type]


class _RouteLessMatch(APIRoute):
    """A route class whose ``matches`` leaves ``scope["route"]`` unset."""

    def matches(self, scope: Any) -> Any:
        match, child = super().matches(scope)
        child.pop("route", None)
        return match, child


@pytest.mark.parametrize("face", FACES)
async def test_a_route_whose_inputs_cannot_be_found_is_not_shared(
    face: str, backend: Backend
) -> None:
    calls = Calls()
    app = new_app(face)
    router = APIRouter(route_class=_RouteLessMatch)

    @router.get("/t")
    @decorate(face)
    async def t(x_tenant: Annotated[str | None, Header()] = None) -> JSONResponse:
        return JSONResponse(calls(tenant=x_tenant))

    app.include_router(router)
    async with client(app) as c:
        for tenant in ("acme", "globex"):
            got = await c.get("/t", headers={"x-tenant": tenant})
            assert got.json()["tenant"] == tenant
            # Starlette 1.x's router sets scope["route"] itself: the route is known there.
            assert got.headers["x-cache-status"] in ("BYPASS", "MISS")


class _AppRequest(Request):
    """A project's own Request class, as handlers annotate it."""


@pytest.mark.parametrize("face", FACES)
async def test_a_request_subclass_parameter_is_the_request(face: str, backend: Backend) -> None:
    """FastAPI fills one request parameter: the wrapper's own took it from a handler
    annotated with a Request subclass (500), and the route was not seen to take one."""
    calls = Calls()
    app = new_app(face)

    @app.get("/r")
    @decorate(face)
    async def r(req: _AppRequest) -> dict[str, Any]:
        return calls(user=req.headers.get("authorization"))

    async with client(app) as c:
        anonymous = await c.get("/r")
        assert anonymous.status_code == 200 and anonymous.json()["user"] is None
        alice = await c.get("/r", headers={"authorization": "Bearer alice"})
        assert alice.json()["user"] == "Bearer alice"  # per-principal: not the shared entry
        assert (await c.get("/r")).json() == anonymous.json()
