"""The admin endpoints under the reserved prefix ``/_cachegw/``.

* ``GET /_cachegw/`` - an index of the endpoints below, no authentication.
* ``GET /_cachegw/health`` - backend state and counters, no authentication.
* ``GET /_cachegw/metrics`` - Prometheus text format.
* ``POST /_cachegw/purge`` - ``Authorization: Bearer <token>`` and one of
  ``{"tags": [...]}``, ``{"paths": [...]}``, ``{"service": "name"}``, ``{"all": true}``,
  with an optional ``"soft": true``. The token comes from the environment variable named
  by ``[admin] token_env``; while that is unset the endpoint does not exist (404).
* ``POST /_cachegw/reload`` - same token; reads the gateway file again (see `_reload`):
  200 with what changed, 422 with the reason when the file is refused.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from cachegw._backends import MemoryBackend
from cachegw._purge import scopes_for
from cachegw._target import BadTarget, check_target

if TYPE_CHECKING:
    from cachegw._gateway import Gateway
    from cachegw._runtime import Runtime

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
        try:
            # The path entries were stored under: one spelling of it (see _target).
            normal = check_target({"raw_path": path.encode("ascii")})
        except (BadTarget, UnicodeEncodeError) as exc:
            reason = exc.detail if isinstance(exc, BadTarget) else "It is not ASCII."
            raise PurgeError(400, f"The path {path!r} is refused: {reason}") from None
        matched = gateway.match(normal)
        if matched is None:
            raise PurgeError(400, f"No declared route serves the path {path!r}.")
        service, _, rest, _ = matched
        scopes.append(scopes_for(service.name, rest, ())[2])
    return PurgeRequest("paths", scopes, soft)


def _problem(
    status: int,
    detail: str,
    *,
    generation: int | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    titles = {
        400: "Bad Request",
        401: "Unauthorized",
        404: "Not Found",
        409: "Conflict",
        413: "Content Too Large",
        422: "Unprocessable Content",
        503: "Service Unavailable",
    }
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": titles.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if generation is not None:
        body["generation"] = generation
    return JSONResponse(
        body,
        status_code=status,
        media_type="application/problem+json",
        headers={"cache-control": "no-store", **(headers or {})},
    )


def _refused(runtime: Runtime, request: Request) -> JSONResponse | None:
    """The answer to an admin request without the right token, or None when it has it."""
    variable = runtime.gateway.admin_token_env
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
            headers={"www-authenticate": 'Bearer realm="cachegw"'},
        )
    return None


def _fan_out_reload() -> bool:
    """With ``cachegw serve --workers N``: have the supervisor pass SIGHUP to every
    worker, so they all reload (this one finds the file unchanged). Whether it did."""
    supervisor = os.environ.get("CACHEGW_SUPERVISOR", "")
    if not supervisor.isdigit() or int(supervisor) != os.getppid():
        return False
    os.kill(int(supervisor), signal.SIGHUP)
    return True


#: What ``GET /_cachegw/`` lists: method, path, whether the admin token is needed, what for.
_ENDPOINTS = (
    ("GET", "/_cachegw/health", False, "backend state, counters and the file in use"),
    ("GET", "/_cachegw/metrics", False, "Prometheus metrics"),
    ("POST", "/_cachegw/purge", True, 'purge by {"tags"}, {"paths"}, {"service"} or {"all"}'),
    ("POST", "/_cachegw/reload", True, "read the gateway file again"),
)


def _index(runtime: Runtime) -> JSONResponse:
    # An index instead of a 404: what an operator can ask here, and whether the
    # token-protected endpoints are on (issue 28).
    variable = runtime.gateway.admin_token_env
    admin_on = bool(variable and os.environ.get(variable))
    endpoints = [
        {
            "method": method,
            "path": path,
            "auth": "bearer token" if token else None,
            "available": admin_on or not token,
            "what": what,
        }
        for method, path, token, what in _ENDPOINTS
    ]
    return JSONResponse(
        {"service": "cachegw admin", "admin_api": admin_on, "endpoints": endpoints},
        headers={"cache-control": "no-store"},
    )


def _health(runtime: Runtime) -> JSONResponse:
    engine = runtime.engine
    backend = runtime.backend
    reloader = runtime.reloader
    info: dict[str, Any] = {
        "status": "ok",
        # With several workers: which one answered (issue 23).
        "pid": os.getpid(),
        "backend": type(backend).__name__ if backend is not None else None,
        "services": [s.name for s in runtime.gateway.services],
        "config": {
            "generation": reloader.generation if reloader is not None else 1,
            "digest": reloader.digest if reloader is not None else None,
            "file": str(reloader.path) if reloader is not None else None,
        },
    }
    if engine is not None:
        info["circuit"] = "open" if engine.store.circuit_open else "closed"
        if engine.store.open_nodes:
            info["circuit_open_nodes"] = engine.store.open_nodes
        info["stats"] = dict(engine.stats)
        info["in_flight"] = engine.in_flight()
    if isinstance(backend, MemoryBackend):
        info["memory"] = backend.stats()
    return JSONResponse(info, headers={"cache-control": "no-store"})


async def _purge(runtime: Runtime, request: Request) -> Response:
    refused = _refused(runtime, request)
    if refused is not None:
        return refused
    body = await request.body()
    if len(body) > _MAX_BODY:
        return _problem(413, "The purge request is larger than 1 MiB.")
    try:
        asked = parse_purge(body, runtime.gateway)
    except PurgeError as error:
        return _problem(error.status, error.detail)
    engine = runtime.engine
    if engine is None:
        return _problem(404, "The gateway is starting.")
    try:
        await engine.purge(asked.scopes, soft=asked.soft)
    except Exception as exc:  # the shared purge record is unreachable
        return _problem(503, f"The purge could not be recorded: the cache backend failed ({exc}).")
    runtime.metrics.purge(asked.kind)
    # Answer once every process sharing the backend is guaranteed to see the purge.
    await asyncio.sleep(engine.purges.propagation)
    return JSONResponse(
        {"purged": asked.kind, "scopes": asked.scopes, "soft": asked.soft},
        headers={"cache-control": "no-store"},
    )


async def _reload(runtime: Runtime, request: Request) -> Response:
    refused = _refused(runtime, request)
    if refused is not None:
        return refused
    reloader = runtime.reloader
    if reloader is None:
        return _problem(
            409, "This gateway was not started from a file: there is nothing to reload."
        )
    result = await reloader.reload()
    if result.outcome == "rejected":
        return _problem(
            422,
            f"{result.error} (the running configuration, generation "
            f"{result.generation}, stays in use)",
            generation=result.generation,
        )
    body = result.as_json()
    body["workers"] = "all" if _fan_out_reload() else "this process"
    return JSONResponse(body, headers={"cache-control": "no-store"})


def admin_router(runtime: Runtime) -> APIRouter:
    """The ``/_cachegw/`` endpoints of the gateway ``runtime`` runs."""
    router = APIRouter(prefix="/_cachegw")

    @router.get("/")
    async def index() -> JSONResponse:
        return _index(runtime)

    @router.get("/health")
    async def health() -> JSONResponse:
        return _health(runtime)

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = runtime.metrics.render(request.headers.get("accept", ""))
        return Response(body, media_type=content_type, headers={"cache-control": "no-store"})

    @router.post("/purge")
    async def purge(request: Request) -> Response:
        return await _purge(runtime, request)

    @router.post("/reload")
    async def reload(request: Request) -> Response:
        return await _reload(runtime, request)

    return router
