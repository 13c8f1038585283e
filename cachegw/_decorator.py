"""``@cached``: per-route response caching for FastAPI handlers, on fastapi-cache2's backend."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.utils import get_typed_signature
from fastapi.routing import APIRoute, APIRouter
from fastapi_cache.types import Backend
from starlette.requests import Request
from starlette.responses import Response

from cachegw import _fc2
from cachegw._errors import ConfigError
from cachegw._face import (
    DECORATOR_STATUSES,
    DEFAULT_TTL,
    READ_DEADLINE,
    Face,
    PolicyFor,
    Warned,
    engine_for,
)
from cachegw._policy import KNOB_SPECS, CachePolicy, KeyFunc
from cachegw._purge import scopes_for
from cachegw._serving import serve

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


P = ParamSpec("P")
R = TypeVar("R")


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
    warned = Warned()
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
        return await serve(
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
