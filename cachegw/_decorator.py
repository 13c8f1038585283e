"""``@cached``: per-route response caching for FastAPI handlers, on fastapi-cache2's backend."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import functools
import inspect
import json
import logging
import uuid
import warnings
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.datastructures import DefaultPlaceholder
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_typed_signature
from fastapi.routing import APIRoute, APIRouter, serialize_response
from fastapi.security import SecurityScopes
from fastapi.utils import is_body_allowed_for_status_code
from fastapi_cache.types import Backend
from pydantic import BaseModel
from starlette.background import BackgroundTasks
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from cachegw import _fc2
from cachegw._backends import cache_backend
from cachegw._engine import CacheEngine
from cachegw._errors import ConfigError
from cachegw._inputs import NO_INPUTS, RouteInputs, inputs_of, matched
from cachegw._keys import format_tag, handler_key, hash_parts, origin, principal
from cachegw._models import Fetch, Fetched, RequestInfo, Served
from cachegw._policy import DEFAULT_STATUSES, KNOB_SPECS, CachePolicy, KeyFunc
from cachegw._purge import purges_for, scopes_for
from cachegw._store import L1

__all__ = [
    "DECORATOR_STATUSES",
    "DEFAULT_TTL",
    "READ_DEADLINE",
    "Face",
    "Marked",
    "PolicyFor",
    "cached",
    "engine_for",
    "purge",
    "wrap",
]

logger = logging.getLogger("cachegw")

#: ``@cached``'s ttl when neither the decorator nor ``FastAPICache.init(expire=...)`` sets one.
DEFAULT_TTL = 60


P = ParamSpec("P")
R = TypeVar("R")

_REQUEST_PARAM = "__cachegw_request"
_RESPONSE_PARAM = "__cachegw_response"
_SERIALIZE_HAS_DUMP_JSON = "dump_json" in inspect.signature(serialize_response).parameters

#: Scope key where `cachegw.CachedHits` leaves the end of the request's read budget after
#: a lookup that found no hit, so the ordinary path does not start a second budget.
READ_DEADLINE = "cachegw.read_deadline"

#: A handler's 2xx answers are its deliberate responses (errors arrive as exceptions), so
#: the decorator stores them all by default, plus the shared-cache defaults. 206 is a
#: partial body and never stored.
DECORATOR_STATUSES = DEFAULT_STATUSES | (frozenset(range(200, 300)) - {206})

_engines: weakref.WeakKeyDictionary[Backend, CacheEngine] = weakref.WeakKeyDictionary()


def engine_for(backend: Backend) -> CacheEngine:
    """The engine (coalescing state, counters) that serves `@cached` routes on ``backend``."""
    engine = _engines.get(backend)
    if engine is None:
        prefix = _fc2.prefix()
        # No L1 copies in front of a shared backend: without the gateway's landing channel
        # another process's refresh would only be seen after the L1's ttl. (In front of
        # the memory backend the L1 only saves decoding and is never stale.)
        cache = cache_backend(backend)
        l1 = None if cache.inline else L1(max_entries=0, max_bytes=0, ttl=0)
        engine = _engines[backend] = CacheEngine(cache, purges=purges_for(cache, prefix), l1=l1)
    return engine


async def purge(
    *,
    tags: Iterable[str] = (),
    paths: Iterable[str] = (),
    all: bool = False,
    soft: bool = False,
    backend: Backend | None = None,
) -> list[str]:
    """Take back `@cached` entries before they expire; returns the scopes purged, in the
    admin API's vocabulary (``["tag:item:42"]``, ``["path::/items/42"]``, ``["*"]``).

    Usage::

        await purge(tags=["item:42"])          # entries whose tags include item:42
        await purge(paths=["/items/42"])       # entries of that request path, any query
        await purge(all=True, soft=True)       # mark everything stale

    A hard purge makes entries absent; a soft one makes them stale, so they may still be
    served under ``stale_while_revalidate`` / ``stale_if_error`` while one request
    refreshes them. Purging is O(1) in the number of entries. With a Redis backend the
    purge reaches every process sharing it within 200 ms.

    Parameters:

    * **tags** - tags as the routes declare them, templates filled (``"item:42"``).
    * **paths** - request paths as clients send them, without query string.
    * **all** - everything.
    * **soft** - mark stale instead of removing.
    * **backend** - the backend to purge; defaults to the one given to ``FastAPICache.init``.
    """
    scopes = [f"tag:{tag}" for tag in _strings(tags, "tags")]
    scopes += [scopes_for("", path, ())[2] for path in _strings(paths, "paths")]
    if all:
        scopes.append("*")
    if not scopes:
        raise ValueError("purge() needs tags=, paths= or all=True")
    backend = backend if backend is not None else _fc2.backend()
    if backend is None:
        raise ConfigError("purge() needs a backend: call FastAPICache.init(backend) first")
    await engine_for(backend).purge(scopes, soft=soft)
    return scopes


def _strings(values: Iterable[str], what: str) -> list[str]:
    if isinstance(values, str):
        raise TypeError(f"{what} must be a list of strings, got the string {values!r}")
    return list(values)


def cached(
    ttl: float | str | None = None,
    *,
    key: KeyFunc | None = None,
    max_ttl: float | str | None = None,
    vary: Iterable[str] = (),
    tags: Iterable[str] = (),
    stale_while_revalidate: float | str = 0,
    stale_if_error: float | str = 0,
    statuses: Iterable[int] | None = None,
    max_body: int | str = 1024 * 1024,
    heuristic: float = 0.0,
    early_refresh: float = 0.0,
    ignore_request_cache_control: bool = False,
    policy: CachePolicy | None = None,
    per_host: bool = True,
    shared: bool = False,
) -> Callable[[Callable[P, Any]], Callable[P, Awaitable[Any]]]:
    """Cache a FastAPI route handler's final response in the fastapi-cache2 backend.

    Usage::

        from fastapi_cache import FastAPICache
        from cachegw import MemoryBackend, cached

        @asynccontextmanager
        async def lifespan(app: FastAPI):
            FastAPICache.init(MemoryBackend(max_entries=10_000))
            yield
            FastAPICache.reset()

        @app.get("/items/{item_id}")
        @cached(ttl=60, vary=["Accept-Language"])
        async def get_item(item_id: int, q: str | None = None) -> Item: ...

    The key is the route that matched (its handler, full path template and the path as
    received), the path parameters, the canonical query string, every header, cookie and
    security input the route's dependency tree declares (credentials only as a hash),
    the scheme and ``Host`` the app sees (what ``request.url_for`` builds links from), the
    values of the ``vary`` request headers and the result of ``key``. A route that takes
    a ``Request`` (in its handler or any dependency) can read inputs nobody declared: its
    entries are not shared with requests carrying credentials unless it sets ``key``,
    ``vary`` or ``shared=True``. What is stored is the response exactly as FastAPI would
    send it (``response_model`` applied), replayed byte for byte on a hit.

    Parameters:

    * **ttl** - see `CachePolicy`. Defaults to ``FastAPICache.init(expire=...)`` when
      that is set, else 60 seconds.
    * **max_ttl**, **vary**, **tags**, **stale_while_revalidate**,
      **stale_if_error**, **statuses**, **max_body**, **heuristic**, **early_refresh**,
      **ignore_request_cache_control** - see `CachePolicy`. ``statuses`` defaults to
      every 2xx but 206, plus `CachePolicy`'s defaults.
    * **key** - ``(request) -> str``, sync or async. Its result joins the key and makes
      entries per-principal: requests with ``Authorization`` or ``Cookie`` then use the
      cache (without one they bypass it).
    * **policy** - a ready `CachePolicy` instead of the individual knobs.
    * **per_host** - ``False`` shares one entry across every scheme and ``Host`` the app
      accepts. Only for a handler whose answer never depends on them (no ``url_for``,
      ``request.url`` or ``base_url`` in the body or headers): otherwise one client's
      ``Host`` ends up in every client's answer.
    * **shared** - ``True`` states that the answer depends only on the inputs the route
      declares, even though it takes a ``Request``: no warning, and requests whose
      declared credentials are keyed use the cache. Requests carrying undeclared
      credentials still bypass shared entries.
    """
    if not isinstance(per_host, bool):
        raise TypeError(f"per_host must be True or False, got {per_host!r}")
    if not isinstance(shared, bool):
        raise TypeError(f"shared must be True or False, got {shared!r}")
    policies: PolicyFor
    if policy is None:
        # Every knob parameter of this function, as given: CachePolicy validates them.
        given = locals()
        knobs = {name: _snapshot(given[name]) for name, k in KNOB_SPECS.items() if k.decorator}
        if statuses is None:
            knobs["statuses"] = DECORATOR_STATUSES

        def make(ttl: float | str) -> CachePolicy:
            return CachePolicy(**{**knobs, "ttl": ttl}, key=key)

        policies = PolicyFor(make, ttl)
    elif not isinstance(policy, CachePolicy):
        raise TypeError(f"policy must be a CachePolicy, got {policy!r}")
    else:
        policies = PolicyFor.fixed(policy)
    face = Face(name="@cached", policy=policies, per_host=per_host, shared=shared)

    def decorator(func: Callable[P, Any]) -> Callable[P, Awaitable[Any]]:
        return wrap(func, face)

    return decorator


def _snapshot(value: Any) -> Any:
    """An iterable argument as a tuple: a generator would be used up by the first policy."""
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return tuple(value)
    return value


class PolicyFor:
    """A route's policy, whose ttl may follow ``FastAPICache.init(expire=...)``.

    ``init`` usually runs in the lifespan, after the decorators, so the default ttl is
    looked up per request (and each distinct value's policy built once).
    """

    def __init__(self, make: Callable[[float | str], CachePolicy], ttl: float | str | None):
        self._make = make
        self._follows_init = ttl is None
        # Built now, so a bad value is an error where the decorator is applied.
        self._own = make(DEFAULT_TTL if ttl is None else ttl)
        self._by_expire: dict[float, CachePolicy] = {}

    @classmethod
    def fixed(cls, policy: CachePolicy) -> PolicyFor:
        return cls(lambda _ttl: policy, 0)

    def __call__(self, expire: float | None) -> CachePolicy:
        """The policy while ``FastAPICache.init(expire=...)`` is ``expire``."""
        if not self._follows_init or expire is None:
            return self._own
        policy = self._by_expire.get(expire)
        if policy is None:
            policy = self._by_expire[expire] = self._make(expire)
        return policy


#: Compat key function: ``(request, response, args, kwargs) -> (part, decides)``, or
#: None to serve uncached (it failed). ``decides``: the part is the user's own key
#: (it replaces the default key's parts and identity rule); else it joins the default key.
KeyBuilderCall = Callable[
    [Request, Response, tuple[Any, ...], dict[str, Any]], Awaitable[tuple[str, bool] | None]
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Face:
    """How one entry point (``@cached``, or the fastapi-cache2-compatible ``@cache``)
    drives the shared machinery below."""

    name: str  # in messages: "@cached", "@cache"
    policy: PolicyFor
    per_host: bool = True
    # The answer depends only on declared inputs, whatever the route can read.
    shared: bool = False
    # fastapi-cache2's namespace: keys start with ``{prefix}:{namespace}:`` so that
    # ``FastAPICache.clear(namespace=...)`` finds them.
    namespace: str = ""
    # Keys the handler's resolved arguments too (fastapi-cache2 keys on them).
    key_arguments: bool = False
    request_param: str = _REQUEST_PARAM
    response_param: str = _RESPONSE_PARAM
    # Replaces the default key's identity rule: its result is the key's own part
    # (with the route template and origin) and entries are per-principal.
    key_builder: KeyBuilderCall | None = None
    extra_tags: tuple[str, ...] = ()
    # Adjusts the outgoing response (e.g. fastapi-cache2's headers).
    finish: Callable[[Response, Request, CachePolicy, RouteInputs], None] | None = None


class _Warned:
    """Misuse warnings already given for one decorated handler (one of each kind)."""

    __slots__ = ("kinds",)

    def __init__(self) -> None:
        self.kinds: set[str] = set()

    def once(self, kind: str, message: str, *args: object) -> None:
        if kind not in self.kinds:
            self.kinds.add(kind)
            logger.warning(message, *args)


@dataclass(frozen=True, slots=True)
class Marked:
    """What a `wrap`-made handler carries for layers that answer its hits before
    routing (`cachegw.CachedHits`)."""

    face: Face
    #: The handler's identity in keys: module and qualified name (the same in every process).
    route_id: str
    #: The parameters the wrapper added to the handler's signature.
    own_params: frozenset[str]
    #: The wrapper itself: a decorator above it that copies attributes with
    #: ``functools.wraps`` (an auth check) copies this too, but is not it.
    wrapper: Callable[..., Any]


def marked(endpoint: object) -> Marked | None:
    """The `Marked` of ``endpoint`` when it *is* a cachegw handler (not a wrapper of one)."""
    mark = getattr(endpoint, "__cachegw__", None)
    return mark if isinstance(mark, Marked) and mark.wrapper is endpoint else None


def wrap(func: Callable[P, Any], face: Face) -> Callable[P, Awaitable[Any]]:
    """The route handler that serves ``func``'s responses through the engine."""
    _check_not_registered(func, face.name)
    signature = get_typed_signature(func)
    request_param = _find_param(signature, Request)
    response_param = _find_param(signature, Response)
    extra = []
    if request_param is None:
        extra.append(
            inspect.Parameter(
                face.request_param, inspect.Parameter.KEYWORD_ONLY, annotation=Request
            )
        )
    if response_param is None:
        extra.append(
            inspect.Parameter(
                face.response_param, inspect.Parameter.KEYWORD_ONLY, annotation=Response
            )
        )
    request_name = request_param or face.request_param
    response_name = response_param or face.response_param
    is_coroutine = inspect.iscoroutinefunction(func)
    warned = _Warned()
    own_params = frozenset(p.name for p in extra)
    route_id = f"{getattr(func, '__module__', '')}:{_qualname(func)}"

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
        request = kwargs.get(request_name)
        sub_response = kwargs.get(response_name)
        if request_param is None:
            kwargs.pop(face.request_param, None)
        if response_param is None:
            kwargs.pop(face.response_param, None)

        async def call() -> Any:
            if is_coroutine:
                return await cast(Callable[P, Awaitable[R]], func)(*args, **kwargs)
            return await run_in_threadpool(func, *args, **kwargs)

        if not isinstance(request, Request) or not isinstance(sub_response, Response):
            # Called as a plain function, not by FastAPI as a route: nothing to cache.
            warned.once(
                "direct",
                "cachegw: %s on %s caches route responses, but it was called directly "
                "(not by FastAPI as a route handler), so it runs uncached. Decorate the "
                "route handler, below its @app.get(...) decorator.",
                face.name,
                _qualname(func),
            )
            return await call()
        return await _serve(
            request, sub_response, face, call, warned, args, kwargs, route_id, own_params
        )

    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*_without_var_kw(signature), *extra, *_var_kw(signature)]
    )
    # How this route caches, for layers that answer its hits before routing: they must
    # apply the same policy, key rule and `finish` (fastapi-cache2's headers).
    wrapper.__cachegw__ = Marked(face, route_id, own_params, wrapper)  # type: ignore[attr-defined]
    return wrapper


def _check_not_registered(func: Callable[..., Any], name: str) -> None:
    """Warn when ``func`` is already a route's endpoint: the decorator sits above the
    route decorator, so FastAPI serves the undecorated function and nothing is cached.

    Looks at the routers in the handler's own module (where the route decorator that
    registered it usually comes from); cheap enough to run for every decoration.
    """
    plain = getattr(func, "__func__", func)
    module_globals = getattr(plain, "__globals__", None)
    if not isinstance(module_globals, dict):
        return
    for value in list(module_globals.values()):
        router = value.router if isinstance(value, FastAPI) else value
        if not isinstance(router, APIRouter):
            continue
        for route in router.routes:
            if isinstance(route, APIRoute) and route.endpoint == func:
                methods = sorted(route.methods or ())
                warnings.warn(
                    f"{name} on {_qualname(func)} is applied above "
                    f"@{'app' if isinstance(value, FastAPI) else 'router'}"
                    f".{'/'.join(methods).lower()}({route.path!r}): FastAPI "
                    "registered the undecorated function, so nothing will be cached. "
                    f"Put {name} below the route decorator.",
                    UserWarning,
                    stacklevel=4,
                )
                return


def _qualname(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


async def _serve(
    request: Request,
    sub_response: Response,
    face: Face,
    call: Callable[[], Awaitable[Any]],
    warned: _Warned,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    route_id: str,
    own_params: frozenset[str],
) -> Response:
    """A decorated route's request: answered through the engine under its key, or
    uncached (``BYPASS``) when it cannot be keyed by everything its answer depends on."""
    backend, enabled, prefix, expire = _fc2.settings()
    policy = face.policy(expire)
    route = request.scope.get("route")
    dependant, overrides = matched(request.scope)
    inputs = NO_INPUTS if dependant is None else inputs_of(dependant, own_params, overrides)
    template = route.path if isinstance(route, APIRoute) else request.scope.get("path", "")
    fetch = _fetcher(call, route, sub_response)
    refused = _unservable(request, face, warned, route, template, backend, enabled, dependant)
    if refused is not None or backend is None:
        return await _uncached(fetch, refused or "fwd=bypass")
    key_extra, keyed, own_key = await _key_part(request, sub_response, face, policy, args, kwargs)
    if key_extra is None:
        return await _uncached(fetch, "fwd=bypass")
    headers = _request_headers(request)
    refused, keyed = _sharing(request, face, policy, warned, template, inputs, headers, keyed)
    if refused is not None:
        return await _uncached(fetch, refused)
    if face.key_arguments and not own_key:
        key_extra += _arguments_key(kwargs, own_params, warned, face, template)
    if face.namespace:
        prefix = f"{prefix}:{face.namespace}"
    primary = _primary_key(request, face, prefix, route_id, template, key_extra, own_key, inputs)
    tags = [format_tag(t, request.path_params) for t in policy.tags]
    scopes = scopes_for("", request.url.path, [*tags, *face.extra_tags])
    info = RequestInfo(
        method=request.method,
        key=primary,
        headers=headers,
        per_principal=keyed,
        scopes=scopes,
        target=scopes[2],  # the path: every query, variant and principal
        read_deadline=request.scope.get(READ_DEADLINE),
        credentials=inputs.credentials,
    )
    return await _answer(engine_for(backend), info, policy, fetch, face, request, inputs)


def _fetcher(call: Callable[[], Awaitable[Any]], route: Any, sub_response: Response) -> Fetch:
    """The engine's fetch for a decorated route: run the handler, buffer its response."""

    async def fetch(validators: Sequence[tuple[bytes, bytes]] = ()) -> Fetched:
        # A handler cannot answer a conditional request: it always gives the full response.
        response = await _to_response(await call(), route, sub_response)
        body = getattr(response, "body", None)
        if not isinstance(body, bytes):
            raise _Unbuffered(response)
        return Fetched(response.status_code, list(response.raw_headers), body)

    return fetch


def _unservable(
    request: Request,
    face: Face,
    warned: _Warned,
    route: Any,
    template: str,
    backend: Backend | None,
    enabled: bool,
    dependant: Dependant | None,
) -> str | None:
    """Why no request of this route can use the cache now (the ``Cache-Status`` detail, a
    warning once), or None."""
    if (
        request.method not in ("GET", "HEAD")
        and isinstance(route, APIRoute)
        and not (route.methods or set()) & {"GET", "HEAD"}
    ):
        warned.once(
            "method",
            "cachegw: %s on %s %s never serves from the cache: only GET and HEAD requests "
            "are cached. Remove the decorator from this route.",
            face.name,
            "/".join(sorted(route.methods or ())),
            template,
        )
    if backend is None:
        warned.once(
            "init",
            "cachegw: %s on %s %s serves every request uncached (BYPASS): "
            "FastAPICache.init(backend) has not been called. Call it in the app's lifespan "
            "(see the decorator documentation).",
            face.name,
            request.method,
            template,
        )
        return "fwd=bypass; detail=no-backend"
    if not enabled:  # FastAPICache.init(..., enable=False)
        return "fwd=bypass; detail=disabled"
    if dependant is None:
        # The route that matched is unknown (a route class whose ``matches`` leaves
        # ``scope["route"]`` unset): so are its inputs, and nothing can be keyed by them.
        warned.once(
            "route",
            "cachegw: %s on %s %s serves every request uncached (BYPASS): the route that "
            "matched is not in the request's scope, so its inputs cannot be keyed.",
            face.name,
            request.method,
            template,
        )
        return "fwd=bypass; detail=route"
    return None


async def _key_part(
    request: Request,
    sub_response: Response,
    face: Face,
    policy: CachePolicy,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[str | None, bool, bool]:
    """The key's own part from a key builder (compat) or the route's ``key`` function, or
    None to serve uncached (it failed); whether it keys the principal; whether it is the
    user's own key (it replaces the default key's parts)."""
    if face.key_builder is not None:
        built = await face.key_builder(request, sub_response, args, kwargs)
        if built is None:
            return None, False, False
        return built[0], built[1], built[1]
    if policy.key is not None:
        return await principal(policy.key, request), True, False
    return "", False, False


def _sharing(
    request: Request,
    face: Face,
    policy: CachePolicy,
    warned: _Warned,
    template: str,
    inputs: RouteInputs,
    headers: dict[str, str],
    keyed: bool,
) -> tuple[str | None, bool]:
    """Whether this request's answer can be keyed by everything it depends on: the
    ``Cache-Status`` detail when not (None when it can), and whether its entries are per
    principal."""
    declares = face.shared or bool(policy.vary) or keyed
    if inputs.unseen and not declares:
        # Who the caller is cannot be seen, so no entry can be keyed by it nor shared.
        _warn_unseen(warned, face, request.method, template, inputs)
        return "fwd=bypass; detail=principal", keyed
    undeclared = bool(inputs.opaque) and not declares
    if undeclared:
        _warn_undeclared(warned, face, request.method, template, inputs)
    if (inputs.body or inputs.opaque) and _has_body(headers):
        # The answer may depend on the body, which is not in the key.
        return "fwd=bypass; detail=body", keyed
    # Declared credentials are keyed: each principal gets its own entries. A route that
    # can read undeclared inputs does not count on it (docs/decorator.md).
    return None, keyed or (inputs.keys_principal and not undeclared)


def _primary_key(
    request: Request,
    face: Face,
    prefix: str,
    route_id: str,
    template: str,
    key_extra: str,
    own_key: bool,
    inputs: RouteInputs,
) -> str:
    scope = request.scope
    if own_key:
        # The user's key builder decides what the key is made of; the route, the declared
        # inputs (a builder that leaves out the caller of a Security route must not share
        # one caller's answer) and the origin (issue 18) are kept. Its key leads, so
        # FastAPICache.clear(key=...) finds the entry (see compat).
        parts = [route_id, scope.get("root_path", "") + template, request.url.path]
        parts += inputs.parts(scope["headers"])
        if face.per_host:
            parts.append(origin(scope))
        return hash_parts(key_extra, parts)
    return handler_key(
        prefix,
        scope,
        route_id,
        template,
        request.path_params,
        key_extra,
        inputs.parts(scope["headers"]),
        per_host=face.per_host,
    )


async def _answer(
    engine: CacheEngine,
    info: RequestInfo,
    policy: CachePolicy,
    fetch: Fetch,
    face: Face,
    request: Request,
    inputs: RouteInputs,
) -> Response:
    """The engine's answer as the route's response (a streaming handler's own response,
    an exception's answer marked like every other)."""
    try:
        served = await engine.serve(info, policy, fetch)
    except _Unbuffered as unbuffered:
        _mark_bypass(unbuffered.response, "detail=streaming")
        return unbuffered.response
    except HTTPException as exc:
        # The exception handler builds the answer from exc.headers: mark it like every
        # other response of a decorated route (nothing was stored).
        status, fwd = ("BYPASS", "bypass") if _bypasses(info) else ("MISS", "uri-miss")
        exc.headers = {
            **(exc.headers or {}),
            engine.status_header.decode("latin-1"): status,
            "Cache-Status": f"{engine.cache_name}; fwd={fwd}; detail=exception",
        }
        raise
    response = _RawResponse(served)
    if face.finish is not None:
        face.finish(response, request, policy, inputs)
    return response


def _has_body(headers: dict[str, str]) -> bool:
    return "transfer-encoding" in headers or headers.get("content-length", "0") not in ("", "0")


def _warn_undeclared(
    warned: _Warned, face: Face, method: str, template: str, inputs: RouteInputs
) -> None:
    warned.once(
        "undeclared",
        "cachegw: %s on %s %s: %s can read request inputs the route does not declare, "
        "so requests carrying credentials (%s) bypass its shared entries. Declare what "
        "the answer depends on (Header(), Cookie(), Security()), or pass %s "
        "(see the decorator documentation).",
        face.name,
        method,
        template,
        "; ".join(inputs.opaque),
        ", ".join(sorted(inputs.credentials)),
        _remedies(face),
    )


def _remedies(face: Face) -> str:
    """The options of this face that say what an answer depends on."""
    if face.key_builder is not None:  # cachegw.compat.cache
        return "shared=True or a key_builder that names the caller"
    return "vary=[...], key=... or shared=True"


def _warn_unseen(
    warned: _Warned, face: Face, method: str, template: str, inputs: RouteInputs
) -> None:
    warned.once(
        "unseen",
        "cachegw: %s on %s %s serves every request uncached (BYPASS): %s can take the "
        "caller from any request input, so no entry can be keyed by the caller. If the "
        "answer depends only on the scheme's own credential, pass shared=True; else "
        "name what identifies the caller (%s); see the decorator documentation.",
        face.name,
        method,
        template,
        "; ".join(inputs.unseen),
        _remedies(face),
    )


def _arguments_key(
    kwargs: dict[str, Any],
    own_params: frozenset[str],
    warned: _Warned,
    face: Face,
    template: str,
) -> str:
    """The handler's resolved arguments with a stable encoding, as a key part
    (fastapi-cache2 keys on them); an argument without one is left out, with a warning
    naming it, instead of making every request a miss or two requests collide."""
    parts = []
    for name in sorted(kwargs):
        if name in own_params or isinstance(kwargs[name], _NOT_ARGUMENTS):
            continue
        encoded = stable_encoding(kwargs[name])
        if encoded is None:
            warned.once(
                f"argument:{name}",
                "cachegw: %s on %s: argument %r (%s) has no stable encoding, so it is "
                "not part of the key; the inputs it is built from still are. Give it a "
                "type with one (str, numbers, Pydantic models, dataclasses, ...) or use "
                "a key_builder to key it yourself.",
                face.name,
                template,
                name,
                type(kwargs[name]).__qualname__,
            )
            continue
        parts.append(f"{name}={encoded}")
    return "\x00" + "\x00".join(parts) if parts else ""


# What FastAPI injects rather than resolves from the request's inputs.
_NOT_ARGUMENTS = (HTTPConnection, Response, BackgroundTasks, SecurityScopes)


def stable_encoding(value: Any) -> str | None:
    """A text that is the same for equal values in every process, or None."""
    try:
        return json.dumps(_plain_data(value), sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return None


def _plain_data(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, enum.Enum):
        return [type(value).__qualname__, _plain_data(value.value)]
    if isinstance(value, uuid.UUID | decimal.Decimal | datetime.date | datetime.time):
        return [type(value).__qualname__, str(value)]
    if isinstance(value, datetime.timedelta):
        return ["timedelta", value.total_seconds()]
    if isinstance(value, BaseModel):
        return [type(value).__qualname__, value.model_dump(mode="json")]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return [
            type(value).__qualname__,
            {f.name: _plain_data(getattr(value, f.name)) for f in fields},
        ]
    if isinstance(value, list | tuple):
        return [_plain_data(item) for item in value]
    if isinstance(value, set | frozenset):
        return sorted((_plain_data(item) for item in value), key=repr)
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain_data(v) for k, v in value.items()}
    raise TypeError(type(value).__qualname__)


def _bypasses(info: RequestInfo) -> bool:
    """Whether the engine answered without the cache (unsafe method, credentials on a
    shared entry, a request that bypasses reads): an approximation for exceptions."""
    if info.method not in ("GET", "HEAD"):
        return True
    if info.authorized and not info.per_principal:
        return True
    cache_control = info.headers.get("cache-control", "").lower()
    return "no-cache" in cache_control or "no-store" in cache_control


async def _uncached(fetch: Callable[[], Awaitable[Fetched]], detail: str) -> Response:
    return _bypass(await fetch_or_response(fetch), detail)


async def fetch_or_response(fetch: Callable[[], Awaitable[Fetched]]) -> Fetched | Response:
    try:
        return await fetch()
    except _Unbuffered as unbuffered:
        return unbuffered.response


def _bypass(result: Fetched | Response, detail: str = "fwd=bypass") -> Response:
    """A response served without the cache (no backend, caching disabled, or the key
    function failed)."""
    if isinstance(result, Fetched):
        served = Served(result.status, result.headers, result.body or b"", cache_status="BYPASS")
        result = _RawResponse(served)
    return _mark_bypass(result, detail)


def _mark_bypass(response: Response, detail: str) -> Response:
    response.raw_headers.append((b"x-cache-status", b"BYPASS"))
    response.raw_headers.append((b"cache-status", f"cachegw; {detail}".encode()))
    return response


class _Unbuffered(Exception):
    """The handler returned a streaming response: it cannot be stored."""

    def __init__(self, response: Response) -> None:
        self.response = response


class _RawResponse(Response):
    """A response from ready status, raw headers and body: no header recomputation."""

    def __init__(self, served: Served) -> None:
        self.status_code = served.status
        self.body = served.body
        self.raw_headers = served.headers
        self.background = None


async def _to_response(result: Any, route: Any, sub_response: Response) -> Response:
    """The response FastAPI would build from a handler's return value.

    Mirrors ``fastapi.routing.get_request_handler`` so a hit replays exactly what a
    miss sent: ``response_model`` filtering, ``status_code``, ``response_class`` and
    headers set on an injected ``Response`` all apply.
    """
    if isinstance(result, Response):
        return result
    if not isinstance(route, APIRoute):
        raise TypeError("@cached must decorate a FastAPI route handler (an APIRoute)")
    use_dump_json = (
        _SERIALIZE_HAS_DUMP_JSON
        and route.response_field is not None
        and isinstance(route.response_class, DefaultPlaceholder)
    )
    extra: dict[str, Any] = {"dump_json": True} if use_dump_json else {}
    content = await serialize_response(
        field=route.response_field,
        response_content=result,
        include=route.response_model_include,
        exclude=route.response_model_exclude,
        by_alias=route.response_model_by_alias,
        exclude_unset=route.response_model_exclude_unset,
        exclude_defaults=route.response_model_exclude_defaults,
        exclude_none=route.response_model_exclude_none,
        is_coroutine=True,
        **extra,
    )
    kwargs: dict[str, Any] = {}
    status_code = sub_response.status_code or route.status_code
    if status_code:
        kwargs["status_code"] = status_code
    response: Response
    if use_dump_json:
        response = Response(content=content, media_type="application/json", **kwargs)
    else:
        response_class = route.response_class
        if isinstance(response_class, DefaultPlaceholder):
            response_class = response_class.value
        response = response_class(content, **kwargs)
    if not is_body_allowed_for_status_code(response.status_code):
        response.body = b""
    response.raw_headers.extend(sub_response.headers.raw)
    return response


def _request_headers(request: Request) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in request.scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _find_param(signature: inspect.Signature, annotation: type) -> str | None:
    """The parameter FastAPI fills with the request (or response): one annotated with the
    class or a subclass of it, as FastAPI tells them (a second such parameter added by the
    wrapper would take the request from the handler's)."""
    for param in signature.parameters.values():
        if isinstance(param.annotation, type) and issubclass(param.annotation, annotation):
            return param.name
    return None


def _without_var_kw(signature: inspect.Signature) -> list[inspect.Parameter]:
    return [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]


def _var_kw(signature: inspect.Signature) -> list[inspect.Parameter]:
    return [p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
