"""One gateway request, shared by the ASGI path and the protocol-level pass-through
(see `cachegw._proxy`): its route (`Routed`) and its forwarding (`Exchange`), what its
access line and metrics need (`Trace`), letting go of a request whose client left
(`Abandon`), a request body that ended early (`BodyEnded`), refusals as problem
documents, and sending what was served through an ASGI ``send``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.types import Receive, Scope, Send

from cachegw._encoding import accepts_gzip
from cachegw._engine import CacheEngine
from cachegw._hygiene import public_location, request_headers
from cachegw._models import Fetched, Served
from cachegw._proxies import Front
from cachegw._runtime import Runtime
from cachegw._service import Route, Service
from cachegw._target import problem
from cachegw._upstream import Upstream

__all__ = [
    "TITLES",
    "Abandon",
    "BodyEnded",
    "Exchange",
    "Routed",
    "Trace",
    "discard_stream",
    "refusal",
    "send_served",
]

logger = logging.getLogger("cachegw")

# Request headers that make the upstream answer differently from the full, storable
# response: stripped from forwarded requests on the cached path, evaluated by the cache.
# Range / If-Range too: the upstream is asked for the whole representation, which is what
# the cache stores, and the range is cut from it here (see `_ranges`).
_CONDITIONAL = frozenset({b"if-none-match", b"if-modified-since", b"range", b"if-range"})
# Tells the upstream it may target Surrogate-Control directives at this cache.
_SURROGATE_CAPABILITY = (b"surrogate-capability", b'cachegw="Surrogate/1.0"')


class Routed:
    """A request that passed the checks and matched a route, with what serving it takes:
    the engine and upstream client taken with the route (a reload swaps them all at
    once, and the request finishes with the ones it started with)."""

    __slots__ = (
        "engine",
        "host",
        "length",
        "method",
        "params",
        "rest",
        "route",
        "seen",
        "service",
        "upstream",
    )

    def __init__(
        self,
        service: Service,
        route: Route,
        rest: str,
        params: dict[str, Any],
        method: str,
        length: int | None,
        seen: Front,
        host: str,
        engine: CacheEngine,
        upstream: Upstream,
    ) -> None:
        self.service = service
        self.route = route
        self.rest = rest  # the path below the service's prefix
        self.params = params
        self.method = method
        self.length = length  # of the body: None when chunked
        self.seen = seen
        self.host = host  # from the service's hosts ("" without hosts)
        self.engine = engine
        self.upstream = upstream


class Exchange:
    """One routed request's forwarding: what the cache reads of its headers, its body,
    and `fetch`, the callable the engine forwards it with (built only when needed: a
    cache hit never calls it)."""

    def __init__(self, runtime: Runtime, routed: Routed, scope: Scope, trace: Trace) -> None:
        self.runtime = runtime
        self.routed = routed
        self.scope = scope
        self.trace = trace
        self.receive: Receive | None = None
        self.content: bytes | None = None
        self.ended: list[BodyEnded] = []
        method = routed.method
        get = method in ("GET", "HEAD")
        # A GET with a body must not meet shared entries: the body is not in the key (fat
        # GET poisoning). A Range request is served from the whole representation.
        self.has_body = routed.length != 0
        cacheable = not (get and self.has_body)
        # A GET of a route that keeps nothing (ttl = 0) is forwarded as it came, without
        # the cache's work: no lookup, lock or write, the client's own Accept-Encoding,
        # conditionals and Range for the upstream to answer (issue 26).
        self.passes = cacheable and get and routed.route.policy.stores_nothing
        self.cacheable = cacheable and not self.passes
        # A HEAD that may be answered from the cache is fetched as a GET: coalesced with
        # the key's other requests and stored (nginx's proxy_cache_convert_head; Varnish's
        # builtin VCL). The client gets the headers; the body is not sent (uvicorn).
        self.upstream_method = "GET" if method == "HEAD" and self.cacheable else method
        self.headers: dict[str, str] = {}
        self.negotiate = self.identity = False
        if self.cacheable and get:
            self._read_headers(routed.engine.compress_min is not None)

    def _read_headers(self, negotiate: bool) -> None:
        """What the cache reads of a cacheable GET's headers: a forwarded GET, an unsafe
        method (it only invalidates) and a GET with a body (bypassed) need none of it."""
        headers = self.headers
        for raw_name, raw_value in self.scope["headers"]:
            name = raw_name.decode("latin-1")
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.negotiate = negotiate
        self.identity = self.routed.method == "GET" and "range" in headers
        if self.identity:
            # A range is cut from the identity form: a part of a compressed body is
            # useless to real clients, which decode each response whole (issue 25). The
            # request is an identity client's throughout: variant, upstream request, form.
            headers.pop("accept-encoding", None)
        elif negotiate:
            # Varnish's http_gzip_support: a client's Accept-Encoding is reduced to "gzip"
            # or nothing, for the variant key and the upstream alike (see `_encoding`).
            if accepts_gzip(headers.get("accept-encoding")):
                headers["accept-encoding"] = "gzip"
            else:
                headers.pop("accept-encoding", None)

    async def body(self) -> AsyncIterator[bytes]:
        """The request body, as the client sends it."""
        receive = self.receive
        assert receive is not None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The body ended early (client gone, framing error, body timeout):
                # raising, not returning, makes the upstream request fail unfinished
                # instead of going out as complete with what had arrived.
                self.ended.append(BodyEnded(self.scope))
                raise self.ended[-1]
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    def _forwarded_headers(self, validators: Sequence[tuple[bytes, bytes]]) -> list[Any]:
        routed = self.routed
        forward = request_headers(
            self.scope,
            client_ip=routed.seen.forwarded_for,
            proto=routed.seen.scheme,
            host=routed.host or None,
            allow=routed.service.allow,
        )
        if self.cacheable and routed.method in ("GET", "HEAD"):
            forward = [(n, v) for n, v in forward if n not in _CONDITIONAL]
            if self.negotiate or self.identity:
                # The upstream gets the Accept-Encoding the cache negotiates with: gzip or
                # nothing, so what it sends suits every client of the variant.
                forward = [(n, v) for n, v in forward if n != b"accept-encoding"]
                if "accept-encoding" in self.headers:
                    forward.append((b"accept-encoding", self.headers["accept-encoding"].encode()))
        forward.append(_SURROGATE_CAPABILITY)
        forward.extend(validators)
        return forward

    async def fetch(self, validators: Sequence[tuple[bytes, bytes]] = ()) -> Fetched:
        """Forward the request to the service's upstream (`Fetch`)."""
        routed = self.routed
        service = routed.service
        forward = self._forwarded_headers(validators)
        content = self.content
        began = time.perf_counter()
        fetched = await routed.upstream.fetch(
            self.upstream_method,
            routed.rest,
            self.scope.get("query_string", b""),
            forward,
            content if content is not None else self.body() if self.has_body else None,
            max_body=routed.route.policy.max_body,
        )
        took = time.perf_counter() - began
        self.trace.upstream = took
        if self.ended:
            raise self.ended[-1]  # not the upstream's failure
        if service.rewrite_redirects:
            _rewrite_locations(fetched, service)
        error = fetched.error or ("status_5xx" if fetched.status >= 500 else None)
        self.runtime.metrics.upstream(service.name, took, error)
        return fetched


def _rewrite_locations(fetched: Fetched, service: Service) -> None:
    """The upstream's own address in ``Location`` / ``Content-Location`` becomes the path
    clients use (see `public_location`): done before the answer is stored, so a stored
    entry holds no client's host or scheme."""
    headers = fetched.headers
    for index, (name, value) in enumerate(headers):
        if name == b"location" or name == b"content-location":
            public = public_location(value, service.upstream, service.prefix)
            if public is not None:
                headers[index] = (name, public)


async def discard_stream(served: Served) -> None:
    aclose = getattr(served.stream, "aclose", None)
    if aclose is not None:
        await aclose()


class Abandon:
    """Cancels the request's task when its client goes away (called by the protocol)."""

    __slots__ = ("fired", "task")

    def __init__(self) -> None:
        self.task = asyncio.current_task()
        self.fired = False

    def __call__(self) -> None:
        if self.task is not None and not self.task.done():
            self.fired = True
            self.task.cancel()

    def ours(self) -> bool:
        """Whether the cancellation being handled was only this one (then it is undone)."""
        return self.fired and self.task is not None and self.task.uncancel() == 0


class Trace:
    """What one request's metrics and access-log line need to know."""

    __slots__ = ("key", "route", "service", "upstream")

    def __init__(self) -> None:
        self.service = ""
        self.route = ""
        self.upstream: float | None = None
        self.key: str | None = None


class BodyEnded(Exception):
    """A request body ended before its end: the client left, broke the framing or was
    too slow (body_timeout). The upstream request, if one started, was aborted."""

    def __init__(self, scope: Scope) -> None:
        super().__init__("request body ended early")
        connection = scope.get("extensions", {}).get("cachegw.connection")
        self.reason: str | None = getattr(connection, "abort_reason", None)

    def served(self) -> Served:
        # What the access log records; the protocol already answered (400 for framing,
        # 408 for a timeout) or the client is gone (nginx logs 499).
        if self.reason == "timeout":
            return refusal(408, "Request Timeout", "The request body took too long.")
        if self.reason == "framing":
            return refusal(400, "Bad Request", "The request body is not validly framed.")
        return refusal(499, "Client Closed Request", "The client left before its body ended.")


def refusal(status: int, title: str, detail: str) -> Served:
    status, headers, body = problem(status, title, detail)
    return Served(status, headers, body, cache_status="ERROR")


TITLES = {400: "Bad Request", 404: "Not Found", 431: "Request Header Fields Too Large"}


async def send_served(send: Send, served: Served, scope: Scope) -> int:
    """Send ``served``; the number of body bytes sent."""
    try:
        await send(
            {"type": "http.response.start", "status": served.status, "headers": served.headers}
        )
    except RuntimeError:
        # uvicorn refuses a header it cannot write (a control byte in a value); such a
        # response is never stored (cachegw._upstream), but one stored by an older
        # version may be: a 502, not a dropped connection.
        await discard_stream(served)
        served = refusal(502, "Bad Gateway", "The stored response has an invalid header.")
        await send(
            {"type": "http.response.start", "status": served.status, "headers": served.headers}
        )
    stream = served.stream
    if scope["method"] == "HEAD":
        # A HEAD fetched as a GET: its body is not sent, and a stream (too large to
        # store) is not read on.
        await discard_stream(served)
        await send({"type": "http.response.body", "body": b""})
        return 0
    if stream is None:
        await send({"type": "http.response.body", "body": served.body})
        return len(served.body)
    # Set by cachegw's protocol when the client left or was cut off (send_timeout):
    # uvicorn's send then does nothing, and the upstream stream must not be read on.
    connection = scope.get("extensions", {}).get("cachegw.connection")
    if connection is not None:
        # A client that stops reading is cut sooner while others wait for its upstream
        # connection (see cachegw._server.STALLED_CONTENDED).
        connection.contended = getattr(stream, "contended", None)
    sent = 0
    try:
        if served.body:
            await send({"type": "http.response.body", "body": served.body, "more_body": True})
            sent += len(served.body)
        async for chunk in stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sent += len(chunk)
            if connection is not None and connection.gone:
                return sent
        await send({"type": "http.response.body", "body": b""})
    except Exception as exc:
        # The upstream broke off mid-stream (a read timeout, a reset, its client closed
        # as the gateway stops): the client sees its connection end, not a hang.
        if connection is None:
            raise
        logger.warning("cachegw: a streamed response broke off after %d bytes: %r", sent, exc)
        connection.cut()
    finally:
        if connection is not None:
            connection.contended = None
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
    return sent
