"""``@cached``: per-route response caching for FastAPI handlers, on fastapi-cache2's backend."""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar, cast

from fastapi.concurrency import run_in_threadpool
from fastapi.datastructures import DefaultPlaceholder
from fastapi.dependencies.utils import get_typed_signature
from fastapi.routing import APIRoute, serialize_response
from fastapi.utils import is_body_allowed_for_status_code
from fastapi_cache import FastAPICache
from fastapi_cache.types import Backend
from starlette.requests import Request
from starlette.responses import Response

from cachegw._engine import CacheEngine, Fetched, RequestInfo, Served
from cachegw._errors import ConfigError
from cachegw._keys import format_tag, handler_key, principal
from cachegw._policy import DEFAULT_STATUSES, CachePolicy, KeyFunc
from cachegw._purge import purges_for, scopes_for
from cachegw._store import L1

__all__ = ["DECORATOR_STATUSES", "cached", "engine_for", "purge"]


P = ParamSpec("P")
R = TypeVar("R")

_REQUEST_PARAM = "__cachegw_request"
_RESPONSE_PARAM = "__cachegw_response"
_SERIALIZE_HAS_DUMP_JSON = "dump_json" in inspect.signature(serialize_response).parameters

#: A handler's 2xx answers are its deliberate responses (errors arrive as exceptions), so
#: the decorator stores them all by default, plus the shared-cache defaults. 206 is a
#: partial body and never stored.
DECORATOR_STATUSES = DEFAULT_STATUSES | (frozenset(range(200, 300)) - {206})

_engines: weakref.WeakKeyDictionary[Backend, CacheEngine] = weakref.WeakKeyDictionary()


def engine_for(backend: Backend) -> CacheEngine:
    """The engine (coalescing state, counters) that serves `@cached` routes on ``backend``."""
    engine = _engines.get(backend)
    if engine is None:
        prefix = FastAPICache._prefix or "cachegw"
        # No L1 copies in front of a shared backend: without the gateway's landing channel
        # another process's refresh would only be seen after the L1's ttl. (In front of
        # the memory backend the L1 only saves decoding and is never stale.)
        l1 = None if getattr(backend, "inline", False) else L1(max_entries=0, max_bytes=0, ttl=0)
        engine = _engines[backend] = CacheEngine(backend, purges=purges_for(backend, prefix), l1=l1)
    return engine


async def purge(
    *,
    tags: Iterable[str] = (),
    paths: Iterable[str] = (),
    all: bool = False,
    soft: bool = False,
    backend: Backend | None = None,
) -> None:
    """Take back `@cached` entries before they expire.

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
    backend = backend if backend is not None else FastAPICache._backend
    if backend is None:
        raise ConfigError("purge() needs a backend: call FastAPICache.init(backend) first")
    await engine_for(backend).purge(scopes, soft=soft)


def _strings(values: Iterable[str], what: str) -> list[str]:
    if isinstance(values, str):
        raise TypeError(f"{what} must be a list of strings, got the string {values!r}")
    return list(values)


def cached(
    ttl: float | str = 60,
    *,
    key: KeyFunc | None = None,
    max_ttl: float | str | None = None,
    vary: Iterable[str] = (),
    tags: Iterable[str] = (),
    stale_while_revalidate: float | str = 0,
    stale_if_error: float | str = 0,
    statuses: Iterable[int] | None = None,
    max_body: int | str = 1024 * 1024,
    policy: CachePolicy | None = None,
    per_host: bool = True,
) -> Callable[[Callable[P, Any]], Callable[P, Awaitable[Any]]]:
    """Cache a FastAPI route handler's final response in the fastapi-cache2 backend.

    Usage::

        from fastapi_cache import FastAPICache
        from cachegw import MemoryBackend, cached

        FastAPICache.init(MemoryBackend(max_entries=10_000))

        @app.get("/items/{item_id}")
        @cached(ttl=60, vary=["Accept-Language"])
        async def get_item(item_id: int, q: str | None = None) -> Item: ...

    The key is the method, the route's path template, the path parameters, the canonical
    query string, the scheme and ``Host`` the app sees (what ``request.url_for`` builds
    links from), the values of the ``vary`` request headers and the result of ``key``.
    What is stored is the response exactly as FastAPI would send it (``response_model``
    applied), replayed byte for byte on a hit.

    Parameters:

    * **ttl**, **max_ttl**, **vary**, **tags**, **stale_while_revalidate**,
      **stale_if_error**, **statuses**, **max_body** - see `CachePolicy`. ``statuses``
      defaults to every 2xx but 206, plus `CachePolicy`'s defaults.
    * **key** - ``(request) -> str``, sync or async. Its result joins the key and makes
      entries per-principal: requests with ``Authorization`` or ``Cookie`` then use the
      cache (without one they bypass it).
    * **policy** - a ready `CachePolicy` instead of the individual knobs.
    * **per_host** - ``False`` shares one entry across every scheme and ``Host`` the app
      accepts. Only for a handler whose answer never depends on them (no ``url_for``,
      ``request.url`` or ``base_url`` in the body or headers): otherwise one client's
      ``Host`` ends up in every client's answer.
    """
    if not isinstance(per_host, bool):
        raise TypeError(f"per_host must be True or False, got {per_host!r}")
    if policy is None:
        policy = CachePolicy(
            ttl=ttl,  # type: ignore[arg-type]  # validated (and converted) by CachePolicy
            max_ttl=max_ttl,  # type: ignore[arg-type]
            vary=tuple(vary) if not isinstance(vary, str) else vary,  # type: ignore[arg-type]
            tags=tuple(tags) if not isinstance(tags, str) else tags,  # type: ignore[arg-type]
            stale_while_revalidate=stale_while_revalidate,  # type: ignore[arg-type]
            stale_if_error=stale_if_error,  # type: ignore[arg-type]
            statuses=DECORATOR_STATUSES if statuses is None else frozenset(statuses),
            max_body=max_body,  # type: ignore[arg-type]
            key=key,
        )
    elif not isinstance(policy, CachePolicy):
        raise TypeError(f"policy must be a CachePolicy, got {policy!r}")
    frozen_policy = policy

    def decorator(func: Callable[P, Any]) -> Callable[P, Awaitable[Any]]:
        signature = get_typed_signature(func)
        request_param = _find_param(signature, Request)
        response_param = _find_param(signature, Response)
        extra = []
        if request_param is None:
            extra.append(
                inspect.Parameter(
                    _REQUEST_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=Request
                )
            )
        if response_param is None:
            extra.append(
                inspect.Parameter(
                    _RESPONSE_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=Response
                )
            )
        is_coroutine = inspect.iscoroutinefunction(func)

        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            request = cast(Request, kwargs.pop(_REQUEST_PARAM, None) or kwargs[request_param or ""])
            sub_response = cast(
                Response, kwargs.pop(_RESPONSE_PARAM, None) or kwargs[response_param or ""]
            )

            async def call() -> Any:
                if is_coroutine:
                    return await cast(Callable[P, Awaitable[R]], func)(*args, **kwargs)
                return await run_in_threadpool(func, *args, **kwargs)

            return await _serve(request, sub_response, frozen_policy, call, per_host)

        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*_without_var_kw(signature), *extra, *_var_kw(signature)]
        )
        return wrapper

    return decorator


async def _serve(
    request: Request,
    sub_response: Response,
    policy: CachePolicy,
    call: Callable[[], Awaitable[Any]],
    per_host: bool = True,
) -> Response:
    backend = FastAPICache._backend
    headers = _request_headers(request)
    route = request.scope.get("route")

    async def fetch(validators: Sequence[tuple[bytes, bytes]] = ()) -> Fetched:
        # A handler cannot answer a conditional request: it always gives the full response.
        response = await _to_response(await call(), route, sub_response)
        body = getattr(response, "body", None)
        if not isinstance(body, bytes):
            raise _Unbuffered(response)
        return Fetched(response.status_code, list(response.raw_headers), body)

    key_extra: str | None = ""
    if policy.key is not None:
        key_extra = await principal(policy.key, request)
        if key_extra is None:
            backend = None
    if backend is None:
        return _bypass(await fetch_or_response(fetch))

    engine = engine_for(backend)
    template = route.path if isinstance(route, APIRoute) else request.scope.get("path", "")
    path_params = request.path_params
    primary = handler_key(
        FastAPICache._prefix or "cachegw",
        request.scope,
        template,
        path_params,
        key_extra or "",
        per_host=per_host,
    )
    info = RequestInfo(
        method=request.method,
        key=primary,
        headers=headers,
        per_principal=policy.key is not None,
        scopes=scopes_for("", request.url.path, (format_tag(t, path_params) for t in policy.tags)),
    )
    try:
        served = await engine.serve(info, policy, fetch)
    except _Unbuffered as unbuffered:
        _mark_bypass(unbuffered.response, "detail=streaming")
        return unbuffered.response
    return _RawResponse(served)


async def fetch_or_response(fetch: Callable[[], Awaitable[Fetched]]) -> Fetched | Response:
    try:
        return await fetch()
    except _Unbuffered as unbuffered:
        return unbuffered.response


def _bypass(result: Fetched | Response) -> Response:
    """A response served without the cache (no backend, or the key function failed)."""
    if isinstance(result, Fetched):
        served = Served(result.status, result.headers, result.body or b"", cache_status="BYPASS")
        result = _RawResponse(served)
    return _mark_bypass(result, "fwd=bypass")


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
    for param in signature.parameters.values():
        if param.annotation is annotation:
            return param.name
    return None


def _without_var_kw(signature: inspect.Signature) -> list[inspect.Parameter]:
    return [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]


def _var_kw(signature: inspect.Signature) -> list[inspect.Parameter]:
    return [p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
