"""A decorated handler's answer as a response: the handler's return value rendered as
FastAPI would, an engine's `Served` as a response, and the marks of answers served without
the cache."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.datastructures import DefaultPlaceholder
from fastapi.routing import APIRoute, serialize_response
from fastapi.utils import is_body_allowed_for_status_code
from starlette.requests import Request
from starlette.responses import Response

from cachegw._models import Fetched, RequestInfo, Served

__all__ = [
    "RawResponse",
    "Unbuffered",
    "bypasses",
    "fetch_or_response",
    "mark_bypass",
    "request_headers",
    "to_response",
    "uncached",
]

_SERIALIZE_HAS_DUMP_JSON = "dump_json" in inspect.signature(serialize_response).parameters


def bypasses(info: RequestInfo) -> bool:
    """Whether the engine answered without the cache (unsafe method, credentials on a
    shared entry, a request that bypasses reads): an approximation for exceptions."""
    if info.method not in ("GET", "HEAD"):
        return True
    if info.authorized and not info.per_principal:
        return True
    cache_control = info.headers.get("cache-control", "").lower()
    return "no-cache" in cache_control or "no-store" in cache_control


async def uncached(fetch: Callable[[], Awaitable[Fetched]], detail: str) -> Response:
    return _bypass(await fetch_or_response(fetch), detail)


async def fetch_or_response(fetch: Callable[[], Awaitable[Fetched]]) -> Fetched | Response:
    try:
        return await fetch()
    except Unbuffered as unbuffered:
        return unbuffered.response


def _bypass(result: Fetched | Response, detail: str = "fwd=bypass") -> Response:
    """A response served without the cache (no backend, caching disabled, or the key
    function failed)."""
    if isinstance(result, Fetched):
        served = Served(result.status, result.headers, result.body or b"", cache_status="BYPASS")
        result = RawResponse(served)
    return mark_bypass(result, detail)


def mark_bypass(response: Response, detail: str) -> Response:
    response.raw_headers.append((b"x-cache-status", b"BYPASS"))
    response.raw_headers.append((b"cache-status", f"cachegw; {detail}".encode()))
    return response


class Unbuffered(Exception):
    """The handler returned a streaming response: it cannot be stored."""

    def __init__(self, response: Response) -> None:
        self.response = response


class RawResponse(Response):
    """A response from ready status, raw headers and body: no header recomputation."""

    def __init__(self, served: Served) -> None:
        self.status_code = served.status
        self.body = served.body
        self.raw_headers = served.headers
        self.background = None


async def to_response(result: Any, route: Any, sub_response: Response) -> Response:
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


def request_headers(request: Request) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in request.scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers
