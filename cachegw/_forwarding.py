"""The protocol's side of the pass-through at the protocol level (with `cachegw._server`,
what cachegw knows of uvicorn's insides).

A request the app decides early to forward as it came (`FastHitServer.fast_forward`: a
``GET`` of a route that keeps nothing, an unsafe method with a small body) runs without an
ASGI cycle: `ForwardCycle` stands for uvicorn's ``RequestResponseCycle`` while the parser
collects the body, starts the app's forwarder once the body is complete (or the client
is gone), and writes a whole response at once (`ForwardCycle.write`). Anything it cannot
write the way uvicorn would (no ``Content-Length``, a stream, a client that is not
reading, a connection closing) goes through a real ``RequestResponseCycle`` made on the
spot (`ForwardCycle.asgi_send`), so the bytes on the wire are uvicorn's in every case.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)

from cachegw._entry import Headers

__all__ = ["ForwardCycle", "Forwarder", "whole_response"]

#: What the app returns to forward a request: run with the cycle once its body is in.
Forwarder = Callable[["ForwardCycle"], Awaitable[None]]

# uvicorn's answer when the application fails before starting its response.
_FAILED = (
    b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 21\r\nconnection: close\r\n\r\nInternal Server Error"
)


def whole_response(status: int, headers: Headers, body: bytes, head: bool) -> bytes | None:
    """The bytes uvicorn writes for this response when it has a ``Content-Length`` that
    the body matches (a ``HEAD``: no body); None for any other (uvicorn decides)."""
    parts = [STATUS_LINE[status]]
    declared = None
    for name, value in headers:
        name = name.lower()
        if name == b"content-length":
            if declared is None:
                declared = value
        elif name == b"transfer-encoding" or name == b"connection":
            return None
        parts += (name, b": ", value, b"\r\n")
    if declared is None or not declared.isdigit():
        return None
    if not head and int(declared) != len(body):
        return None
    # uvicorn's checks of every name and value, each pattern run once over them all.
    if HEADER_RE.search(b"".join(parts[1::4])) or HEADER_VALUE_RE.search(b"".join(parts[3::4])):
        return None
    parts += (b"\r\n", body)
    return b"".join(parts)


class ForwardCycle:
    """Stands for uvicorn's cycle of a request the protocol forwards itself: the parser
    callbacks fill `body` and clear `more_body`; the protocol's deadlines and
    `connection_lost` set `disconnected` and `keep_alive` as on uvicorn's cycle."""

    __slots__ = (
        "asgi",
        "body",
        "disconnected",
        "keep_alive",
        "more_body",
        "protocol",
        "response_complete",
        "response_started",
        "run",
        "scope",
        "started",
    )

    def __init__(self, protocol: Any, scope: dict[str, Any], run: Forwarder) -> None:
        self.protocol = protocol
        self.scope = scope
        self.run = run
        self.body = bytearray()
        self.more_body = True
        self.disconnected = False
        self.keep_alive = True
        self.response_started = False
        self.response_complete = False
        self.started = False
        self.asgi: RequestResponseCycle | None = None

    @property
    def message_event(self) -> ForwardCycle:
        return self

    def set(self) -> None:
        """uvicorn's ``message_event.set()``: the body grew, ended, or the client left.
        The forwarder starts once, when the body is complete or will never be."""
        if not self.started and (not self.more_body or self.disconnected):
            self.started = True
            protocol = self.protocol
            task = protocol.loop.create_task(self._forward())
            task.add_done_callback(protocol.tasks.discard)
            protocol.tasks.add(task)

    async def _forward(self) -> None:
        try:
            await self.run(self)
        except BaseException as exc:  # as uvicorn's run_asgi
            protocol = self.protocol
            protocol.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started and not self.disconnected:
                protocol.transport.write(_FAILED)
            protocol.transport.close()

    def write(self, status: int, headers: Headers, body: bytes) -> bool:
        """Write the whole response at once, as uvicorn would; False when it cannot (then
        `asgi_send`). True, writing nothing, when the client is gone (uvicorn's send does
        nothing then either)."""
        if self.disconnected:
            return True
        protocol = self.protocol
        if not self.keep_alive or protocol.flow.write_paused:
            return False
        data = whole_response(status, headers, body, self.scope["method"] == "HEAD")
        if data is None:
            return False
        self.response_started = True
        protocol.transport.write(data)
        self.response_complete = True
        protocol.on_response_complete()
        return True

    def asgi_send(self) -> Callable[[Any], Awaitable[None]]:
        """The ``send`` of a uvicorn cycle made now for this request (its body already
        read), which takes the connection's state over from this stand-in."""
        protocol = self.protocol
        cycle = RequestResponseCycle(
            scope=self.scope,  # type: ignore[arg-type]
            transport=protocol.transport,
            flow=protocol.flow,
            logger=protocol.logger,
            access_logger=protocol.access_logger,
            access_log=protocol.access_log,
            default_headers=protocol.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=self.keep_alive,
            on_response=protocol.on_response_complete,
        )
        cycle.more_body = False
        cycle.disconnected = self.disconnected
        self.asgi = cycle
        if protocol.cycle is self:
            protocol.cycle = cycle
        return cycle.send
