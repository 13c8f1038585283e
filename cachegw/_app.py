"""`create_app`: a Gateway turned into an ASGI application.

The proxy path is plain ASGI, in front of FastAPI: a request for a service is checked,
routed, looked up and answered without entering FastAPI's routing and dependency
solving. FastAPI serves only the reserved ``/_cachegw/`` admin endpoints and runs the
lifespan that opens (and closes) the backend and one pooled upstream client per service.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from cachegw._admin import admin_router
from cachegw._backends._memory import parse_size
from cachegw._fasthit import fast_hit
from cachegw._fastpass import plan
from cachegw._forwarding import Forwarder
from cachegw._gateway import Gateway
from cachegw._proxy import MEMO_BYTES, Proxy
from cachegw._reload import Reloader
from cachegw._runtime import Runtime
from cachegw._server import FastHitServer
from cachegw._store import DECODED_MAX_BYTES

__all__ = ["app_from_env", "create_app", "memory_budget", "serving_app"]

#: Bytes a response streamed through (larger than its route's ``max_body``) holds beyond
#: ``max_body`` (read before it was known to be too large): the upstream client's read
#: buffer and the client connection's write buffer, each paused at its high-water mark.
STREAM_BUFFER = 256 * 1024


def memory_budget(gateway: Gateway) -> list[tuple[str, int]]:
    """What one gateway process may hold, part by part, in bytes (``cachegw check``).

    The memory backend's entries (``max_bytes``), the decoded copies and the answers built
    from them (``l1_max_bytes``), the copies of Redis values kept for decoding, the key and
    scope memos, and the responses streamed through (per upstream connection: ``max_body``
    plus `STREAM_BUFFER`). Not counted: the interpreter and libraries themselves, and each
    client connection's own buffers (a request head of at most 64 KiB, a body read 64 KiB
    at a time).
    """
    parts: list[tuple[str, int]] = []
    if gateway.backend == "memory":
        parts.append(("store", parse_size(gateway.max_bytes, what="max_bytes")))
    if gateway.l1_entries:
        parts.append(("L1", int(gateway.l1_max_bytes)))
    if isinstance(gateway.backend, str) and gateway.backend != "memory":
        parts.append(("Redis values", 2 * DECODED_MAX_BYTES))
    parts.append(("memos", MEMO_BYTES))
    streams = sum(
        service.max_connections
        * (max((r.policy.max_body for r in service.routes), default=0) + STREAM_BUFFER)
        for service in gateway.services
    )
    parts.append(("streams", streams))
    return parts


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
    runtime = Runtime(gateway)
    if gateway.source is not None:
        runtime.reloader = Reloader(runtime, gateway.source)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.open()
        try:
            yield
        finally:
            await runtime.close()

    app = _GatewayApp(
        runtime,
        title="cachegw",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.cachegw = runtime

    app.include_router(admin_router(runtime))
    if runtime.reloader is not None:
        runtime.reloader.on_swap.append(app._proxy.forget)
    return app


def serving_app(
    gateway: Gateway | str | Path, server_overrides: Mapping[str, Any] | None = None
) -> FastAPI:
    """The app ``cachegw serve`` runs: `create_app` plus reloading on ``SIGHUP``.

    ``server_overrides`` are the command line's ``[server]`` values (already applied to
    ``gateway``): a reload applies them to the file it reads as well.
    """
    app = create_app(gateway)
    runtime = app.state.cachegw
    runtime.reload_on_sighup = True
    if runtime.reloader is not None:
        runtime.reloader.server_overrides = dict(server_overrides or {})
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` with several workers: reads ``CACHEGW_CONFIG``
    (and ``CACHEGW_SERVER_LIMITS``, the command line's overrides of ``[server]``)."""
    gateway = Gateway.from_toml(os.environ["CACHEGW_CONFIG"])
    overrides = json.loads(os.environ.get("CACHEGW_SERVER_LIMITS") or "{}")
    if overrides:
        gateway.server = dataclasses.replace(gateway.server, **overrides)
    if os.environ.get("CACHEGW_SUPERVISOR"):
        # Until the lifespan installs the reload handler, a SIGHUP fanned out by the
        # supervisor must not end this worker (its default action).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        return serving_app(gateway, overrides)
    return create_app(gateway)


class _GatewayApp(FastAPI, FastHitServer):
    """FastAPI for the lifespan and the admin endpoints; proxy traffic goes first.

    A request for a service is answered before FastAPI's middleware stack and routing:
    a cache hit costs the checks, the key and the lookup, not a framework's dispatch.
    Served by cachegw's own uvicorn protocol (`cachegw._server`), plain hits do not even
    become an ASGI request: the protocol calls `fast_hit`; nor do requests forwarded as
    they came (`fast_forward`, see `cachegw._fastpass`).
    """

    def __init__(self, runtime: Runtime, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._proxy = Proxy(runtime)
        # Enforced on client connections by cachegw's own uvicorn protocol (cachegw._server).
        self.server_limits = runtime.gateway.server

    def fast_hit(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        scheme: str,
    ) -> bytes | None:
        return fast_hit(self._proxy, method, target, headers, client, scheme)

    def fast_forward(self, scope: dict[str, Any]) -> Forwarder | None:
        if scope["path"].startswith("/_cachegw/"):
            return None
        return plan(self._proxy, scope)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/_cachegw/"):
            await self._proxy(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)
