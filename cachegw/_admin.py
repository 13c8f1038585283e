"""The admin endpoints under the reserved prefix ``/_cachegw/``.

* ``GET /_cachegw/health`` - backend state and counters, no authentication.
* ``GET /_cachegw/metrics`` - Prometheus text format.
* ``POST /_cachegw/purge`` - ``Authorization: Bearer <token>`` and one of
  ``{"tags": [...]}``, ``{"paths": [...]}``, ``{"service": "name"}``, ``{"all": true}``,
  with an optional ``"soft": true``. The token comes from the environment variable named
  by ``[admin] token_env``; while that is unset the endpoint does not exist (404).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from cachegw._backends import MemoryBackend
from cachegw._purge import scopes_for

if TYPE_CHECKING:
    from cachegw._app import _Runtime
    from cachegw._gateway import Gateway

__all__ = ["PurgeRequest", "admin_router", "parse_purge"]

PurgeKind = Literal["tags", "paths", "service", "all"]
_FIELDS = ("tags", "paths", "service", "all", "soft")
_MAX_BODY = 1024 * 1024


class PurgeError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class PurgeRequest:
    kind: PurgeKind
    scopes: list[str]
    soft: bool


def parse_purge(body: bytes, gateway: Gateway) -> PurgeRequest:
    """The purge asked for in a request body, or `PurgeError` (400) saying what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PurgeError(400, f"The body is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise PurgeError(400, "The body must be a JSON object.")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise PurgeError(
            400, f"Unknown field {unknown[0]!r}; expected one of {', '.join(_FIELDS)}."
        )
    soft = data.get("soft", False)
    if not isinstance(soft, bool):
        raise PurgeError(400, f"'soft' must be true or false, got {soft!r}.")
    selectors = [name for name in ("tags", "paths", "service", "all") if name in data]
    if len(selectors) != 1:
        raise PurgeError(
            400,
            "Give exactly one of 'tags', 'paths', 'service' or 'all' (got "
            f"{', '.join(selectors) or 'none'}).",
        )
    kind: PurgeKind = selectors[0]  # type: ignore[assignment]
    value = data[kind]
    if kind == "all":
        if value is not True:
            raise PurgeError(400, f"'all' must be true, got {value!r}.")
        return PurgeRequest("all", ["*"], soft)
    if kind == "service":
        names = {s.name for s in gateway.services}
        if not isinstance(value, str) or value not in names:
            raise PurgeError(
                400, f"'service' must name a service ({', '.join(sorted(names))}), got {value!r}."
            )
        return PurgeRequest("service", [f"svc:{value}"], soft)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise PurgeError(400, f"{kind!r} must be a non-empty list of strings, got {value!r}.")
    if kind == "tags":
        return PurgeRequest("tags", [f"tag:{tag}" for tag in value], soft)
    scopes = []
    for path in value:
        if not path.startswith("/") or "?" in path or "#" in path:
            raise PurgeError(
                400,
                f"paths must be gateway paths like '/catalog/items/42' without a query "
                f"(a path purge covers every query string), got {path!r}.",
            )
        matched = gateway.match(path)
        if matched is None:
            raise PurgeError(400, f"No declared route serves the path {path!r}.")
        service, _, rest, _ = matched
        scopes.append(scopes_for(service.name, rest, ())[2])
    return PurgeRequest("paths", scopes, soft)


def _problem(status: int, detail: str, **headers: str) -> JSONResponse:
    titles = {
        400: "Bad Request",
        401: "Unauthorized",
        404: "Not Found",
        413: "Content Too Large",
        503: "Service Unavailable",
    }
    return JSONResponse(
        {
            "type": "about:blank",
            "title": titles.get(status, "Error"),
            "status": status,
            "detail": detail,
        },
        status_code=status,
        media_type="application/problem+json",
        headers={"cache-control": "no-store", **headers},
    )


def admin_router(runtime: _Runtime) -> APIRouter:
    router = APIRouter(prefix="/_cachegw")
    gateway = runtime.gateway

    @router.get("/health")
    async def health() -> JSONResponse:
        engine = runtime.engine
        backend = runtime.backend
        info: dict[str, Any] = {
            "status": "ok",
            "backend": type(backend).__name__ if backend is not None else None,
            "services": [s.name for s in gateway.services],
        }
        if engine is not None:
            info["circuit"] = "open" if engine.store.breaker.open else "closed"
            info["stats"] = dict(engine.stats)
        if isinstance(backend, MemoryBackend):
            info["memory"] = backend.stats()
        return JSONResponse(info, headers={"cache-control": "no-store"})

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = runtime.metrics.render(request.headers.get("accept", ""))
        return Response(body, media_type=content_type, headers={"cache-control": "no-store"})

    @router.post("/purge")
    async def purge(request: Request) -> Response:
        variable = gateway.admin_token_env
        token = os.environ.get(variable) if variable else None
        if not token:
            return _problem(404, "The admin API is off: no admin token is configured.")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return _problem(
                401,
                "A valid 'Authorization: Bearer <token>' is required.",
                **{"www-authenticate": 'Bearer realm="cachegw"'},
            )
        body = await request.body()
        if len(body) > _MAX_BODY:
            return _problem(413, "The purge request is larger than 1 MiB.")
        try:
            asked = parse_purge(body, gateway)
        except PurgeError as error:
            return _problem(error.status, error.detail)
        engine = runtime.engine
        if engine is None:
            return _problem(404, "The gateway is starting.")
        try:
            await engine.purge(asked.scopes, soft=asked.soft)
        except Exception as exc:  # the shared purge record is unreachable
            return _problem(
                503, f"The purge could not be recorded: the cache backend failed ({exc})."
            )
        runtime.metrics.purge(asked.kind)
        # Answer once every process sharing the backend is guaranteed to see the purge.
        await asyncio.sleep(engine.purges.propagation)
        return JSONResponse(
            {"purged": asked.kind, "scopes": asked.scopes, "soft": asked.soft},
            headers={"cache-control": "no-store"},
        )

    return router
