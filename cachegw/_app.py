"""`create_app`: a Gateway turned into an ASGI application.

The proxy path is plain ASGI, in front of FastAPI: a request for a service is checked,
routed, looked up and answered without entering FastAPI's routing and dependency
solving. FastAPI serves only the reserved ``/_cachegw/`` admin endpoints and runs the
lifespan that opens (and closes) the backend and one pooled upstream client per service.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi_cache.types import Backend
from starlette.middleware import Middleware
from starlette.requests import Request

from cachegw._backends import MemoryBackend, RedisBackend
from cachegw._engine import CacheEngine, Fetched, RequestInfo, Served
from cachegw._gateway import Gateway, Service
from cachegw._keys import format_tag, hash_parts, principal, vary_values
from cachegw._target import BadTarget, check_headers, check_target, problem
from cachegw._upstream import Upstream, request_headers

__all__ = ["app_from_env", "create_app"]


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Request headers that make the upstream answer differently from the full, storable
# response: stripped from forwarded requests on the cached path, evaluated by the cache.
_CONDITIONAL = frozenset({b"if-none-match", b"if-modified-since"})


class _Runtime:
    """What the lifespan opens and the proxy path uses."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.backend: Backend | None = None
        self.engine: CacheEngine | None = None
        self.upstreams: dict[str, Upstream] = {}

    async def open(self) -> None:
        gateway = self.gateway
        backend: Backend
        if isinstance(gateway.backend, Backend):
            backend = gateway.backend
        elif gateway.backend == "memory":
            backend = MemoryBackend(max_entries=gateway.max_entries, max_bytes=gateway.max_bytes)
        else:
            backend = RedisBackend.from_url(gateway.backend)
        self.backend = backend
        self.engine = CacheEngine(backend, status_header=gateway.status_header)
        for service in gateway.services:
            self.upstreams[service.name] = Upstream(
                service.upstream, timeout=service.timeout, client=service.client
            )

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.aclose()
        for upstream in self.upstreams.values():
            await upstream.aclose()
        self.upstreams.clear()
        if isinstance(self.backend, RedisBackend) and not isinstance(self.gateway.backend, Backend):
            await self.backend.aclose()


def create_app(gateway: Gateway | str | Path) -> FastAPI:
    """An ASGI application serving the gateway's services through the cache.

    Usage::

        app = create_app(Gateway.from_toml("gateway.toml"))   # or create_app("gateway.toml")
        # uvicorn.run(app, date_header=False, server_header=False)

    Run it with uvicorn's ``date_header=False``: the gateway passes the upstream's
    ``Date`` through, and a second ``Date`` header breaks HTTP caches downstream.
    """
    if not isinstance(gateway, Gateway):
        gateway = Gateway.from_toml(gateway)
    runtime = _Runtime(gateway)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.open()
        try:
            yield
        finally:
            await runtime.close()

    app = FastAPI(
        title="cachegw",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        middleware=[Middleware(_GatewayMiddleware, runtime=runtime)],
    )
    app.state.cachegw = runtime

    @app.get("/_cachegw/health")
    async def health() -> JSONResponse:
        engine = runtime.engine
        backend = runtime.backend
        info: dict[str, Any] = {
            "status": "ok",
            "backend": type(backend).__name__ if backend is not None else None,
            "services": [s.name for s in gateway.services],
        }
        if engine is not None:
            info["stats"] = dict(engine.stats)
        if isinstance(backend, MemoryBackend):
            info["memory"] = backend.stats()
        return JSONResponse(info)

    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` with several workers: reads ``CACHEGW_CONFIG``."""
    return create_app(os.environ["CACHEGW_CONFIG"])


class _GatewayMiddleware:
    def __init__(self, app: ASGIApp, runtime: _Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/_cachegw/"):
            await self.app(scope, receive, send)
            return
        try:
            check_headers(scope)
            path = check_target(scope)
        except BadTarget as bad:
            await _send(
                send, *problem(bad.status, _TITLES.get(bad.status, "Bad Request"), bad.detail)
            )
            return
        matched = self.runtime.gateway.match(path)
        if matched is None:
            await _send(send, *problem(404, "Not Found", f"no route is declared for {path}"))
            return
        service, route, rest, params = matched
        policy = route.policy
        method: str = scope["method"]
        if policy.methods is not None and method not in policy.methods:
            status, headers, body = problem(
                405, "Method Not Allowed", f"{method} is not allowed on {route.path}"
            )
            headers.append((b"allow", ", ".join(policy.methods).encode("latin-1")))
            await _send(send, status, headers, body)
            return
        engine = self.runtime.engine
        upstream = self.runtime.upstreams.get(service.name)
        if engine is None or upstream is None:
            await _send(send, *problem(503, "Service Unavailable", "the gateway is starting"))
            return
        await self._proxy(scope, receive, send, service, rest, params, engine, upstream, route)

    async def _proxy(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        service: Service,
        rest: str,
        params: dict[str, Any],
        engine: CacheEngine,
        upstream: Upstream,
        route: Any,
    ) -> None:
        policy = route.policy
        method: str = scope["method"]
        raw_query: bytes = scope.get("query_string", b"")
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name = raw_name.decode("latin-1")
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        has_body = "transfer-encoding" in headers or headers.get("content-length", "0") != "0"
        # A GET with a body, or a Range request, must not meet shared entries: the body is
        # not in the key (fat GET poisoning) and a partial response is not storable.
        cacheable = not (method in ("GET", "HEAD") and (has_body or "range" in headers))
        client = scope.get("client")
        forward_headers = request_headers(
            scope,
            client_ip=client[0] if client else "",
            proto=scope.get("scheme", "http"),
            host=headers.get("host"),
        )
        if cacheable and method in ("GET", "HEAD"):
            forward_headers = [(n, v) for n, v in forward_headers if n not in _CONDITIONAL]

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return

        def fetch() -> Awaitable[Fetched]:
            return upstream.fetch(
                method,
                rest,
                raw_query,
                forward_headers,
                body() if has_body else None,
                max_body=policy.max_body,
            )

        key_extra: str | None = ""
        if cacheable and policy.key is not None:
            key_extra = await principal(policy.key, Request(scope))
            cacheable = key_extra is not None
        if not cacheable:
            served = engine.bypass(await fetch())
        else:
            key = hash_parts(
                self.runtime.gateway.prefix,
                (
                    service.name,
                    rest,
                    raw_query.decode("latin-1"),
                    *vary_values(policy.vary, headers),
                    key_extra or "",
                ),
            )
            info = RequestInfo(
                method=method,
                key=key,
                headers=headers,
                per_principal=policy.key is not None,
                tags=[format_tag(t, params) for t in policy.tags],
            )
            served = await engine.serve(info, policy, fetch)
        await _send_served(send, served)


_TITLES = {400: "Bad Request", 404: "Not Found", 431: "Request Header Fields Too Large"}


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_served(send: Send, served: Served) -> None:
    await send({"type": "http.response.start", "status": served.status, "headers": served.headers})
    stream = served.stream
    if stream is None:
        await send({"type": "http.response.body", "body": served.body})
        return
    try:
        if served.body:
            await send({"type": "http.response.body", "body": served.body, "more_body": True})
        async for chunk in stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
