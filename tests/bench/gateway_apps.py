"""Servers compared by ``gateway.py``, all answering with the same ~1 KiB JSON as ``apps.py``.

Factories for ``uvicorn --factory --app-dir tests/bench gateway_apps:<factory>``:

  upstream     raw ASGI origin behind the gateway and the naive proxy:
               ``/cached/...`` with ``Cache-Control: max-age=3600``,
               ``/uncached/...`` with no freshness information at all,
               any method (a request body is read to its end, then the same answer),
               ``/__hits`` the requests served so far (JSON: ``uncached`` and ``cached``
               count requests under those paths, ``posted`` the request body bytes read);
               ``/__hits?probe=P`` the same for requests whose query has ``probe=P``
               only (the checks' own requests: exact while other load drains).
  raw_asgi     a raw ASGI callable returning the same bytes (REFERENCE.md's 40k row).
  floor        the Python floor of a pass-through proxy on cachegw's libraries: a raw ASGI
               callable forwarding method, path, query, body and headers (minus hop-by-hop)
               with ONE shared ``aiohttp.ClientSession`` (opened at startup, keep-alive
               pool) to ``$CACHEGW_BENCH_UPSTREAM``, answering status, headers and body.
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
from urllib.parse import parse_qs

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
#: The request body of the POST targets: 1 KiB of JSON.
POST_BODY = b'{"note":"' + b"x" * (1024 - len(b'{"note":""}')) + b'"}'
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


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def upstream() -> ASGIApp:
    """The origin: cacheable and uncacheable copies of the body, and hit counters."""
    hits = {"uncached": 0, "cached": 0, "posted": 0}
    probes: dict[str, dict[str, int]] = {}

    def _probe(query: bytes) -> str | None:
        if b"probe=" not in query:  # the loads never carry one: one search per request
            return None
        return parse_qs(query.decode("latin-1")).get("probe", [None])[0]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await _lifespan(receive, send)
            return
        path: str = scope["path"]
        probe = _probe(scope["query_string"])
        counts = (
            hits
            if probe is None or path == "/__hits"
            else probes.setdefault(probe, {"uncached": 0, "cached": 0, "posted": 0})
        )
        if path.startswith(("/cached/", "/uncached/")) and scope["method"] not in ("GET", "HEAD"):
            counts["posted"] += len(await _read_body(receive))
        if path.startswith("/cached/"):
            counts["cached"] += 1
            headers, body = _CACHED_HEADERS, BODY
        elif path.startswith("/uncached/"):
            counts["uncached"] += 1
            headers, body = _JSON_HEADERS, BODY
        elif path == "/__hits":
            body = json.dumps(
                hits if probe is None else probes.get(probe, dict.fromkeys(hits, 0))
            ).encode()
            headers = [(b"content-type", b"application/json")]
        else:
            headers, body = [(b"content-length", b"0")], b""
            await send({"type": "http.response.start", "status": 404, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


# Not forwarded by the floor, either way: hop-by-hop (RFC 9110 §7.6.1), the framing and
# Host its client sets itself, and the Date uvicorn adds to every answer.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_FLOOR_DROP_REQUEST = _HOP_BY_HOP | {"host", "content-length"}
_FLOOR_DROP_RESPONSE = frozenset(n.encode() for n in _HOP_BY_HOP | {"content-length", "date"})


def floor() -> ASGIApp:
    """The Python floor of pass-through: a raw ASGI callable and ONE shared aiohttp
    session (opened at startup: its connector keeps a keep-alive pool of up to 100
    connections), forwarding the request (method, path, query, body, headers minus
    hop-by-hop) and answering the upstream's status, headers and body. Nothing else: no
    routing, no limits, no timeouts beyond aiohttp's defaults, no log."""
    import aiohttp

    base = os.environ[UPSTREAM_ENV].rstrip("/")
    state: dict[str, aiohttp.ClientSession] = {}

    async def lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # Bytes pass through as they are: no decompression.
                state["session"] = aiohttp.ClientSession(auto_decompress=False)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await state["session"].close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await lifespan(receive, send)
            return
        query = scope["query_string"].decode("latin-1")
        url = base + scope["raw_path"].decode("latin-1") + ("?" + query if query else "")
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1") not in _FLOOR_DROP_REQUEST
        ]
        body = await _read_body(receive)
        async with state["session"].request(
            scope["method"], url, headers=headers, data=body or None
        ) as resp:
            data = await resp.read()
            out = [(k, v) for k, v in resp.raw_headers if k.lower() not in _FLOOR_DROP_RESPONSE]
        out.append((b"content-length", str(len(data)).encode()))
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        await send({"type": "http.response.body", "body": data})

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
