"""A decorated route's request: answered through the engine under a key covering the route
that matched and every input it declares, or uncached (``BYPASS``) when it cannot be keyed
by everything its answer depends on (docs/decorator.md, "What the key covers")."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import SecurityScopes
from fastapi_cache.types import Backend
from pydantic import BaseModel
from starlette.background import BackgroundTasks
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from cachegw import _fc2
from cachegw._engine import CacheEngine
from cachegw._face import READ_DEADLINE, Face, Warned, engine_for
from cachegw._inputs import NO_INPUTS, RouteInputs, inputs_of, matched
from cachegw._keys import format_tag, handler_key, hash_parts, origin, principal
from cachegw._models import Fetch, Fetched, RequestInfo
from cachegw._policy import CachePolicy
from cachegw._purge import scopes_for
from cachegw._responses import (
    RawResponse,
    Unbuffered,
    bypasses,
    mark_bypass,
    request_headers,
    to_response,
    uncached,
)

__all__ = ["serve", "stable_encoding"]

logger = logging.getLogger("cachegw")


async def serve(
    request: Request,
    sub_response: Response,
    face: Face,
    call: Callable[[], Awaitable[Any]],
    warned: Warned,
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
        return await uncached(fetch, refused or "fwd=bypass")
    key_extra, keyed, own_key = await _key_part(request, sub_response, face, policy, args, kwargs)
    if key_extra is None:
        return await uncached(fetch, "fwd=bypass")
    headers = request_headers(request)
    refused, keyed = _sharing(request, face, policy, warned, template, inputs, headers, keyed)
    if refused is not None:
        return await uncached(fetch, refused)
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
        response = await to_response(await call(), route, sub_response)
        body = getattr(response, "body", None)
        if not isinstance(body, bytes):
            raise Unbuffered(response)
        return Fetched(response.status_code, list(response.raw_headers), body)

    return fetch


def _unservable(
    request: Request,
    face: Face,
    warned: Warned,
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
    warned: Warned,
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
    except Unbuffered as unbuffered:
        mark_bypass(unbuffered.response, "detail=streaming")
        return unbuffered.response
    except HTTPException as exc:
        # The exception handler builds the answer from exc.headers: mark it like every
        # other response of a decorated route (nothing was stored).
        status, fwd = ("BYPASS", "bypass") if bypasses(info) else ("MISS", "uri-miss")
        exc.headers = {
            **(exc.headers or {}),
            engine.status_header.decode("latin-1"): status,
            "Cache-Status": f"{engine.cache_name}; fwd={fwd}; detail=exception",
        }
        raise
    response = RawResponse(served)
    if face.finish is not None:
        face.finish(response, request, policy, inputs)
    return response


def _has_body(headers: dict[str, str]) -> bool:
    return "transfer-encoding" in headers or headers.get("content-length", "0") not in ("", "0")


def _warn_undeclared(
    warned: Warned, face: Face, method: str, template: str, inputs: RouteInputs
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
    warned: Warned, face: Face, method: str, template: str, inputs: RouteInputs
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
    warned: Warned,
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
