"""Everything cachegw knows of uvicorn's insides, in one module.

* `uvicorn_options`: the settings a caching gateway runs with;
* `GatewayHttpToolsProtocol`: uvicorn's httptools protocol keeping the raw request target,
  handing plain hits to the app's fast path and enforcing client limits, both declared by
  the app as a `FastHitServer`;
* `response_bytes`: a response as HTTP/1.1 bytes, with uvicorn's own header checks.

These use uvicorn internals (``HttpToolsProtocol``'s parser, cycle, pipeline, flow and
server state, ``STATUS_LINE``, ``HEADER_RE``): `VERIFIED_UVICORN` names the uvicorn
versions they were checked against, and tests/test_server.py is the contract that fails
on a uvicorn that changed them. On any other uvicorn, `uvicorn_options` serves with
uvicorn's own httptools protocol and logs one warning: every request then takes the
ordinary ASGI path (no hits answered in the protocol, no ``[server]`` limits), so
installing cachegw never needs a particular uvicorn (issue 28).

Client-side limits (`ServerLimits`, the ``[server]`` table) are enforced by the protocol
below, nginx's way: a deadline per connection for the phase it is in (reading a request
head, reading a body, idle between requests), and a send deadline while the client is
not reading what we write. One timer per event loop checks every connection's deadline a
few times a second, so a request costs a few attribute writes, not timers of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import httptools
import uvicorn
from uvicorn.middleware.message_logger import MessageLoggerMiddleware
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
)

from cachegw._deadlines import Sweeper
from cachegw._entry import Headers
from cachegw._forwarding import ForwardCycle, Forwarder
from cachegw._limits import ServerLimits

__all__ = [
    "VERIFIED_UVICORN",
    "FastHitServer",
    "GatewayHttpToolsProtocol",
    "ServerLimits",
    "fast_path_of",
    "protocol_verified",
    "response_bytes",
    "uvicorn_options",
]

logger = logging.getLogger("cachegw")

#: The uvicorn releases `GatewayHttpToolsProtocol` was checked against by
#: tests/test_server.py: (major, minor) of the first and of the last, both included.
VERIFIED_UVICORN = ((0, 54), (0, 55))


def protocol_verified(version: str | None = None) -> bool:
    """Whether uvicorn ``version`` (default: the installed one) is one `VERIFIED_UVICORN`
    covers."""
    parts = (version or uvicorn.__version__).split(".")
    try:
        minor = (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        return False
    low, high = VERIFIED_UVICORN
    return low <= minor <= high


@functools.cache
def _warn_unverified(version: str) -> None:
    low, high = VERIFIED_UVICORN
    logger.warning(
        "cachegw: uvicorn %s is not one cachegw's server protocol was verified on "
        "(%d.%d to %d.%d): serving every request through the ordinary ASGI path, "
        "without the protocol-level hit path and without the [server] client limits",
        version,
        *low,
        *high,
    )


# A request head (request line + headers) larger than this is refused with 431 while it is
# still arriving: the gateway's own check (16 KiB of headers, cachegw._target) runs only
# once a head is complete, and httptools itself has no bound.
MAX_HEAD_BYTES = 64 * 1024
#: Seconds a client may take no bytes of a streamed response while the upstream
#: connection it holds is wanted by other requests (the service's pool is full).
STALLED_CONTENDED = 1.0


_DEFAULT_LIMITS = ServerLimits()


class FastHitServer:
    """Base of an ASGI app served by `GatewayHttpToolsProtocol` that answers plain cache
    hits without an ASGI cycle (cachegw's gateway app is one), and declares the limits
    on its client connections."""

    #: Enforced by the protocol on every connection (None: the defaults).
    server_limits: ServerLimits | None = None

    def fast_hit(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        scheme: str,
    ) -> bytes | None:
        """The bytes of a whole HTTP/1.1 response to this request, or None to leave it to
        the ordinary (ASGI) path."""
        raise NotImplementedError

    def fast_forward(self, scope: dict[str, Any]) -> Forwarder | None:
        """For a request to forward without an ASGI cycle (its ``scope`` complete but for
        the body): the coroutine function to run with its `ForwardCycle` once the body is
        in; None (the default) to leave it to the ordinary path."""
        return None


def fast_path_of(app: object) -> FastHitServer | None:
    """The `FastHitServer` uvicorn serves, seen through the middleware uvicorn itself may
    wrap it in (``--log-level trace``, ``--proxy-headers``); None for any other app."""
    while isinstance(app, MessageLoggerMiddleware | ProxyHeadersMiddleware):
        app = app.app
    return app if isinstance(app, FastHitServer) else None


def response_bytes(status: int, headers: Headers, body: bytes) -> bytes | None:
    """The HTTP/1.1 bytes of a response, with uvicorn's own header checks; None when a
    header would not pass them or the length is not declared (the ordinary path decides)."""
    parts = [STATUS_LINE[status]]
    length = False
    for name, value in headers:
        if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
            return None
        if name == b"content-length":
            length = True
        parts += (name, b": ", value, b"\r\n")
    if not length:
        return None
    parts += (b"\r\n", body)
    return b"".join(parts)


class _NoEvent:
    def set(self) -> None:
        pass


class _Answered:
    """Stands for the cycle of a request answered by the fast path: already complete."""

    response_complete = True
    more_body = False
    message_event = _NoEvent()


_ANSWERED = _Answered()

# The phase a connection is in, for its deadline. Between requests a connection stays in
# the phase of the last one until its next byte arrives; uvicorn's keep-alive timer
# (keepalive_timeout) bounds that idle time.
_HEAD = 1  # receiving a request head: header_timeout
_BODY = 2  # receiving a request body: body_timeout since the last bytes
_BUSY = 3  # the request is read; the gateway is answering
# A deadline of 0 means "the clock starts at the next sweep": the hot path sets it
# without reading the time, and a limit acts at most one sweep interval late.
_UNSET = 0.0
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close with a reset


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that is refused."""


class GatewayHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, keeping the request target as the client sent it,
    answering plain cache hits itself, and enforcing `ServerLimits`.

    httptools reduces an absolute-form target (``GET http://evil/x``) to its path, so the
    application could not tell it from ``GET /x``. The raw target goes into the scope's
    ``extensions`` and `check_target` refuses anything but origin-form.

    A plain ``GET``/``HEAD`` that the app (a `FastHitServer`) can answer from an entry
    already decoded in the process (`cachegw._fasthit`: no credentials, conditionals, cache
    directives or body; fresh; no Vary) is answered here, with one write, without an ASGI
    cycle. A request the app forwards as it came (`FastHitServer.fast_forward`, see
    `cachegw._fastpass`) runs without one too (`cachegw._forwarding`). Everything else, and
    any doubt, takes the ordinary path.

    The connection is in the scope's extensions too (``cachegw.connection``): the
    application reads `gone` to stop streaming to a client that left or was cut off, and
    `abort_reason` to tell why a request body ended early. An application that sets
    `abandon` (a callable) has it called once when the client goes away while its request
    is being answered: it lets go of work nobody waits for (see `cachegw._proxy`).
    """

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._fast = fast_path_of(self.app)
        limits = self._fast.server_limits if self._fast is not None else None
        self.limits: ServerLimits = limits or _DEFAULT_LIMITS
        # uvicorn's keep-alive timer runs between requests; call_later takes any float.
        self.timeout_keep_alive = self.limits.keepalive_timeout  # type: ignore[assignment]
        self.gone = False
        self.abort_reason: str | None = None  # "timeout" or "framing" when we cut a body
        self.abandon: Callable[[], object] | None = None
        # Set by the application while it streams a response that holds an upstream
        # connection: whether others wait for that connection (see check_deadlines).
        self.contended: Callable[[], bool] | None = None
        self._phase = _HEAD
        self._deadline = _UNSET
        self._head_bytes = 0  # received since the current head began
        self._refusal: bytes | None = None
        self._send_since: float | None = None
        self._send_buffered = 0

    # --- connection lifetime -----------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A connection that sends nothing is bounded like a slow head.
        Sweeper.watch(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        super().connection_lost(exc)
        abandon = self.abandon
        if abandon is not None:
            self.abandon = None
            abandon()

    def data_received(self, data: bytes) -> None:
        # Bytes since the last complete head; the common case costs an addition.
        self._head_bytes += len(data)
        HttpToolsProtocol.data_received(self, data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._check_head()

    def _check_head(self) -> None:
        """Over `MAX_HEAD_BYTES` since the last head: a head that long gets a 431 (httptools
        buffers a header line without bound until it ends); body bytes do not count."""
        if self._phase != _HEAD and not self._between_requests():
            self._head_bytes = 0  # reading a body (a pipelined head is bounded at its turn)
        elif not self.gone:
            busy = self.cycle is not None and not self.cycle.response_complete
            detail = f"The request head is larger than {MAX_HEAD_BYTES} bytes."
            self._cut(None if busy else self._response(431, detail))

    def _between_requests(self) -> bool:
        cycle = self.cycle
        return cycle is None or (cycle.response_complete and not cycle.more_body)

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to a parser error: ours when a callback refused the request.
        if self.cycle is not None and not self.cycle.response_complete:
            self.abort_reason = "framing"  # the body being read is cut: see _proxy
        if self._refusal is not None:
            self.transport.write(self._refusal)
            self.transport.close()
            return
        super().send_400_response(msg)

    # --- parser callbacks ----------------------------------------------------------------

    def on_headers_complete(self) -> None:
        if len(self.headers) > self.limits.max_header_fields:
            # Counted here, not per header: the head's size bounds the list meanwhile.
            self._refuse(
                431, f"The request has more than {self.limits.max_header_fields} header fields."
            )
        parser = self.parser
        # Until the message is complete (at once for a request without a body; the
        # sweeper notices).
        self._phase = _BODY
        self._deadline = _UNSET
        self._head_bytes = 0
        fast = self._fast
        if (
            fast is not None
            and (self.cycle is None or self.cycle.response_complete)
            and not self.pipeline
            and self.limit_concurrency is None
            and not self.server_state.default_headers
            and parser.get_http_version() == "1.1"
            and parser.should_keep_alive()
            and not parser.should_upgrade()
        ):
            answer = fast.fast_hit(
                parser.get_method(), self.url, self.headers, self.client, self.scheme or "http"
            )
            if answer is not None:
                self.transport.write(answer)
                self.cycle = _ANSWERED  # type: ignore[assignment]
                self._phase = _BUSY
                self.on_response_complete()
                return
            if not self.expect_100_continue and self._forwarded(fast):
                return
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions["cachegw.request_target"] = self.url
        extensions["cachegw.connection"] = self
        super().on_headers_complete()

    def _forwarded(self, fast: FastHitServer) -> bool:
        """Offer the request to the app's pass-through at the protocol level (see
        `cachegw._forwarding`), with the scope uvicorn would build; True when taken."""
        scope: dict[str, Any] = self.scope  # type: ignore[assignment]
        try:
            parsed = httptools.parse_url(self.url)
            path = parsed.path.decode("ascii")
        except (httptools.HttpParserError, UnicodeDecodeError):
            return False  # uvicorn's own handling
        scope["method"] = self.parser.get_method().decode("ascii")
        scope["path"] = self.root_path + (unquote(path) if "%" in path else path)
        scope["raw_path"] = self.root_path.encode("ascii") + parsed.path
        scope["query_string"] = parsed.query or b""
        scope["extensions"] = {"cachegw.request_target": self.url, "cachegw.connection": self}
        run = fast.fast_forward(scope)
        if run is None:
            return False
        self.cycle = ForwardCycle(self, scope, run)  # type: ignore[assignment]
        return True

    def on_body(self, body: bytes) -> None:
        self._deadline = _UNSET  # progress: body_timeout starts again
        self._head_bytes = 0  # body bytes are not head bytes
        HttpToolsProtocol.on_body(self, body)

    # --- send timeout ---------------------------------------------------------------------

    def pause_writing(self) -> None:
        self._send_since = self.loop.time()
        self._send_buffered = self.transport.get_write_buffer_size()
        super().pause_writing()

    def resume_writing(self) -> None:
        self._send_since = None
        super().resume_writing()

    # --- deadlines ------------------------------------------------------------------------

    def check_deadlines(self, now: float) -> None:
        """Called by the sweeper: cut the connection whose client is past a deadline."""
        if self.gone or self.transport.is_closing():
            return
        if self._send_since is not None and now - self._send_since > self._send_limit():
            buffered = self.transport.get_write_buffer_size()
            if buffered < self._send_buffered:  # the client took some bytes: not stalled
                self._send_since, self._send_buffered = now, buffered
            else:
                self._cut(None)
                return
        phase = self._phase
        if (
            phase != _HEAD
            and self.timeout_keep_alive_task is None
            and self._between_requests()
            and self.cycle is not None
        ):
            # uvicorn's keep-alive timer, armed when a response completes, is cancelled by
            # the next bytes: a new request (even bare CRLFs, which the parser skips
            # without starting a message) has begun, bounded like any head.
            self._phase = phase = _HEAD
            self._deadline = _UNSET
        if phase == _BODY:
            cycle = self.cycle
            if cycle is None or not cycle.more_body or cycle.response_complete:
                self._phase = phase = _BUSY  # the body is read (or no longer wanted)
            elif self.flow.read_paused:
                # We stopped reading (the upstream is slow to take the body, or a
                # pipelined request waits): not the client's delay.
                self._deadline = _UNSET
        if phase == _BUSY:
            return
        if self._deadline == _UNSET:
            limits = self.limits
            self._deadline = now + (
                limits.header_timeout if phase == _HEAD else limits.body_timeout
            )
            return
        if now < self._deadline:
            return
        if phase == _HEAD:
            # Close silently when no request has begun (nginx does the same); a partial
            # head gets its 408.
            late = self._response(408, "The request head took too long.")
            self._cut(late if self._head_bytes else None)
        else:
            self.abort_reason = "timeout"
            started = self.cycle is not None and self.cycle.response_started
            self._cut(None if started else self._response(408, "The request body took too long."))

    def _send_limit(self) -> float:
        """How long the client may take no bytes: `send_timeout`, or `STALLED_CONTENDED`
        while it holds an upstream connection that other requests wait for (a crowd of
        stalled readers must not pin a service's connection pool)."""
        contended = self.contended
        if contended is not None and contended():
            return min(self.limits.send_timeout, STALLED_CONTENDED)
        return self.limits.send_timeout

    def cut(self) -> None:
        """Drop the connection now: a response already started cannot be completed (its
        upstream broke off), and the client must see it end rather than wait."""
        if not self.gone:
            self._cut(None)

    def _cut(self, answer: bytes | None) -> None:
        self.gone = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the application's sends stop, its receive ends
            cycle.message_event.set()
        if answer is None:
            # Nothing worth flushing to a client that does not read: a reset, so that the
            # kernel drops the unsent bytes now rather than after its own timeouts (nginx's
            # reset_timedout_connection).
            sock = self.transport.get_extra_info("socket")
            with contextlib.suppress(AttributeError, OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            self.transport.abort()
        else:
            self.transport.write(answer)
            self.transport.close()

    def _refuse(self, status: int, detail: str) -> None:
        self._refusal = self._response(status, detail)
        raise _Refused(detail)

    @staticmethod
    def _response(status: int, detail: str) -> bytes:
        from cachegw._target import problem  # pure; imported late to keep this module light

        _, headers, body = problem(status, STATUS_LINE[status][13:-2].decode(), detail)
        lines = [STATUS_LINE[status]]
        lines += [name + b": " + value + b"\r\n" for name, value in headers]
        lines.append(b"connection: close\r\n\r\n")
        return b"".join(lines) + body


def uvicorn_options(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config`` / ``uvicorn.run`` serving a gateway.

    * no ``Date`` or ``Server`` header of uvicorn's own: the upstream's ``Date`` passes
      through, and a second one breaks HTTP caches downstream;
    * ``proxy_headers=False``: ``X-Forwarded-For`` from a client is not trusted, the
      gateway sets it from the socket peer;
    * the httptools parser with the raw request target kept and the client limits of the
      application's ``server_limits`` (a `FastHitServer`) enforced (see above), on the
      uvicorn versions this was verified on; uvicorn's own httptools protocol (and one
      warning) on others;
    * a bounded graceful shutdown (10 s for requests in flight).
    """
    http: type[GatewayHttpToolsProtocol] | str = GatewayHttpToolsProtocol
    if not protocol_verified():
        _warn_unverified(uvicorn.__version__)
        http = "httptools"
    options: dict[str, Any] = {
        "http": http,
        "date_header": False,
        "server_header": False,
        "proxy_headers": False,
        "h11_max_incomplete_event_size": 64 * 1024,
        # On SIGTERM: stop accepting, let requests in flight finish for up to 10 s, then
        # close; the lifespan then waits (bounded) for background refreshes.
        "timeout_graceful_shutdown": 10,
    }
    try:
        import uvloop  # noqa: F401

        options["loop"] = "uvloop"
    except ImportError:  # pragma: no cover - uvicorn[standard] installs it
        options["loop"] = "asyncio"
    options.update(overrides)
    return options
