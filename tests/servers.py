"""Loopback servers for tests: a real uvicorn in a background thread and a stub upstream app.

    stub = StubUpstream()
    stub.route("/slow", delay=0.5, body=b"late")
    with run_uvicorn(stub) as base:  # "http://127.0.0.1:<port>"
        ...
    assert stub.hits["/slow"] == 1

Paths not given a route get an echo: a JSON body describing the request exactly as received
(method, raw path, raw query, raw header pairs, body), strings decoded as latin-1.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with free_socket() as sock:
        return int(sock.getsockname()[1])


@contextmanager
def run_uvicorn(app: ASGIApp, *, http: str = "httptools", **config: Any) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 in a background thread; yield its base URL.

    Runs with `date_header=False, server_header=False` (as the gateway does) unless overridden.
    """
    sock = free_socket()
    options: dict[str, Any] = {
        "log_level": "warning",
        "lifespan": "off",
        "date_header": False,
        "server_header": False,
        **config,
    }
    server = uvicorn.Server(uvicorn.Config(app, http=http, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn failed to start")
            threading.Event().wait(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    delay: float = 0.0


class StubUpstream:
    """ASGI upstream that counts hits per path and answers as told per path (echo otherwise)."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.replies: dict[str, Reply] = {}
        self.requests: list[dict[str, Any]] = []

    def route(
        self,
        path: str,
        *,
        status: int = 200,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
        delay: float = 0.0,
    ) -> None:
        self.replies[path] = Reply(status, headers or [], body, delay)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen = {
            "method": scope["method"],
            "raw_path": scope["raw_path"].decode("latin-1"),
            "query_string": scope["query_string"].decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "body": body.decode("latin-1"),
        }
        self.requests.append(seen)
        self.hits[scope["path"]] += 1
        reply = self.replies.get(scope["path"])
        if reply is None:
            reply = Reply(200, [(b"content-type", b"application/json")], json.dumps(seen).encode())
        if reply.delay:
            await asyncio.sleep(reply.delay)
        headers = list(reply.headers)
        if not any(k.lower() == b"content-length" for k, _ in headers):
            headers.append((b"content-length", str(len(reply.body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: RawHandler) -> AsyncIterator[str]:
    """A raw asyncio TCP server on 127.0.0.1 for origins that misbehave; yields its base URL.

    On exit, waits (up to 2 s) for open connections to end, then cancels them, so that no
    handler task outlives the event loop.
    """
    tasks: set[asyncio.Task[None]] = set()

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for _ in range(200):
            if not tasks:
                break
            await asyncio.sleep(0.01)
        for task in list(tasks):
            task.cancel()
        await server.wait_closed()
