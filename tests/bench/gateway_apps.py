"""Servers compared by ``gateway.py``, all answering with the same ~1 KiB JSON as ``apps.py``.

Factories for ``uvicorn --factory --app-dir tests/bench gateway_apps:<factory>``:

  upstream     raw ASGI origin behind the gateway and the naive proxy:
               ``/cached/...`` with ``Cache-Control: max-age=3600``,
               ``/uncached/...`` with no freshness information at all,
               ``/__hits`` the number of ``/uncached/`` requests served so far (JSON).
  raw_asgi     a raw ASGI callable returning the same bytes (REFERENCE.md's 40k row).
  naive_proxy  FastAPI + httpx, the seed article's proxy done minimally: a ``/{path:path}``
               route forwarding with ONE shared ``httpx.AsyncClient`` opened in the lifespan
               (default httpcore transport), answering ``Response(r.content, ...)``.

The gateway itself is not a uvicorn factory: cachegw runs it with
``cachegw._server.uvicorn_options()`` (a custom httptools protocol class, no ``Date``
header), which the uvicorn CLI cannot express. ``python gateway_apps.py PORT UPSTREAM
BACKEND [L1_ENTRIES]`` serves it: a Python-declared `Gateway` (``l1_entries=0``: no
in-process L1 in front of Redis) with one service ``bench`` under
``/svc``, route ``/cached/{rest:path}`` (ttl 3600; the upstream also says max-age=3600)
and route ``/uncached/{rest:path}`` (``ttl = 0``: every request is forwarded).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
from apps import PAYLOAD
from fastapi import FastAPI, Request, Response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The body every target sends: what FastAPI's JSONResponse makes of PAYLOAD.
BODY = json.dumps(PAYLOAD, ensure_ascii=False, separators=(",", ":")).encode()
UPSTREAM_ENV = "CACHEGW_BENCH_UPSTREAM"
KEEPALIVE_ENV = "CACHEGW_BENCH_NAIVE_KEEPALIVE"

_JSON_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
]
_CACHED_HEADERS = [*_JSON_HEADERS, (b"cache-control", b"max-age=3600")]


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def raw_asgi() -> ASGIApp:
    """The same bytes from a bare ASGI callable: the ceiling for Python on uvicorn."""
    start = {"type": "http.response.start", "status": 200, "headers": _JSON_HEADERS}
    body = {"type": "http.response.body", "body": BODY}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await _lifespan(receive, send)
            return
        await send(start)
        await send(body)

    return app


def upstream() -> ASGIApp:
    """The origin: cacheable and uncacheable copies of the body, and a hit counter."""
    hits = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal hits
        if scope["type"] != "http":
            await _lifespan(receive, send)
            return
        path: str = scope["path"]
        if path.startswith("/cached/"):
            headers, body = _CACHED_HEADERS, BODY
        elif path.startswith("/uncached/"):
            hits += 1
            headers, body = _JSON_HEADERS, BODY
        elif path == "/__hits":
            body = json.dumps({"uncached": hits}).encode()
            headers = [(b"content-type", b"application/json")]
        else:
            headers, body = [(b"content-length", b"0")], b""
            await send({"type": "http.response.start", "status": 404, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


# Not forwarded by the naive proxy: hop-by-hop, and the framing Response sets itself.
_NAIVE_DROP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}
)


def naive_proxy() -> FastAPI:
    """FastAPI + httpx without a cache: the miss-path baseline (REFERENCE.md's 480 req/s
    was measured this way). One client shared by all requests, the stronger baseline: a
    client per request would also pay a TCP connect each time.

    With ``CACHEGW_BENCH_NAIVE_KEEPALIVE=N`` the client keeps up to N idle connections
    instead of httpx's default 20 (beyond which, under more concurrent requests, every
    request closes its connection and the next one connects anew)."""
    base = os.environ[UPSTREAM_ENV].rstrip("/")
    keepalive = os.environ.get(KEEPALIVE_ENV)
    limits = (
        httpx.Limits(max_connections=100, max_keepalive_connections=int(keepalive))
        if keepalive
        else httpx.Limits(max_connections=100, max_keepalive_connections=20)  # the defaults
    )
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(limits=limits) as client:
            state["client"] = client
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/{path:path}")
    async def proxy(path: str, request: Request) -> Response:
        query = request.url.query
        r = await state["client"].get(f"{base}/{path}?{query}" if query else f"{base}/{path}")
        headers = {k: v for k, v in r.headers.items() if k.lower() not in _NAIVE_DROP}
        return Response(r.content, status_code=r.status_code, headers=headers)

    return app


def gateway_app(upstream_url: str, backend: str, l1_entries: int | None = None) -> Any:
    from cachegw import Gateway, Service, create_app

    service = Service("bench", upstream_url, prefix="/svc")
    service.route("/cached/{rest:path}", ttl=3600)
    service.route("/uncached/{rest:path}", ttl=0)
    l1 = {} if l1_entries is None else {"l1_entries": l1_entries}
    return create_app(Gateway(services=[service], backend=backend, **l1))


def serve_gateway(
    port: int, upstream_url: str, backend: str, l1_entries: int | None = None
) -> None:
    """Run the gateway the way ``cachegw serve --no-access-log`` does."""
    import uvicorn

    from cachegw._accesslog import log_config
    from cachegw._server import uvicorn_options

    options = uvicorn_options(
        host="127.0.0.1",
        port=port,
        log_level="warning",
        log_config=log_config(False),
        access_log=False,
    )
    uvicorn.run(gateway_app(upstream_url, backend, l1_entries), **options)


if __name__ == "__main__":
    serve_gateway(
        int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]) if sys.argv[4:] else None
    )
