"""The bundled demo: a small upstream service and the gateway declared in front of it.

``cachegw demo`` serves both; nothing else needs to be installed or running.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cachegw._gateway import Gateway, Service

__all__ = ["demo_gateway", "demo_upstream"]

#: Artificial latency of the upstream, so a MISS and a HIT feel different.
ITEM_DELAY = 0.1
SLOW_DELAY = 1.0


def _stamp(**values: object) -> dict[str, object]:
    return {
        **values,
        "generated_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "served_by": "demo upstream",
    }


async def _index(request: Request) -> JSONResponse:
    return JSONResponse(
        _stamp(endpoints=["/items/{id}", "/slow", "/private", "/fresh", "/pages/{name}"]),
        headers={"Cache-Control": "no-store"},
    )


async def _item(request: Request) -> JSONResponse:
    item_id: int = request.path_params["item_id"]
    await asyncio.sleep(ITEM_DELAY)
    return JSONResponse(_stamp(id=item_id, name=f"Item {item_id}"))


async def _slow(request: Request) -> JSONResponse:
    started = time.monotonic()
    await asyncio.sleep(SLOW_DELAY)
    return JSONResponse(_stamp(took_seconds=round(time.monotonic() - started, 3)))


async def _private(request: Request) -> JSONResponse:
    return JSONResponse(_stamp(account="alice"), headers={"Cache-Control": "private"})


async def _fresh(request: Request) -> JSONResponse:
    return JSONResponse(_stamp(note="fresh for 5 s"), headers={"Cache-Control": "max-age=5"})


async def _page(request: Request) -> JSONResponse:
    # Declared by no route of the gateway: its catch-all stores it for the max-age.
    name: str = request.path_params["name"]
    return JSONResponse(
        _stamp(page=name, note="fresh for 60 s"), headers={"Cache-Control": "max-age=60"}
    )


def demo_upstream() -> ASGIApp:
    """The demo upstream: JSON endpoints stamped with the time they were generated. Each
    request that reaches it prints one ``upstream: GET /path -> status`` line, so the demo's
    log shows which of the gateway's requests went upstream."""
    app = Starlette(
        routes=[
            Route("/", _index),
            Route("/items/{item_id:int}", _item),
            Route("/slow", _slow),
            Route("/private", _private),
            Route("/fresh", _fresh),
            Route("/pages/{name:path}", _page),
        ]
    )

    async def logged(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                print(
                    f"upstream: {scope['method']} {scope['path']} -> {message['status']}",
                    flush=True,
                )
            await send(message)

        await app(scope, receive, sending)

    return logged


def demo_gateway(upstream: str) -> Gateway:
    """The gateway in front of the demo upstream, on the in-memory backend."""
    catalog = Service("catalog", upstream, prefix="/catalog", ttl=30, timeout=5)
    catalog.route(
        "/items/{item_id:int}",
        tags=["items", "item:{item_id}"],
        stale_while_revalidate=30,
        stale_if_error=300,
    )
    catalog.route("/slow", ttl=10, stale_while_revalidate=60)
    # Catch-all as a standards-following shared cache: store only what the upstream
    # marks fresh (/fresh and /pages/... for their max-age), never /private.
    catalog.route("/{rest:path}", ttl=0, max_ttl=3600)
    return Gateway(services=[catalog], backend="memory", max_entries=1000, max_bytes="16MiB")
