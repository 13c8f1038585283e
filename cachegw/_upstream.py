"""Forwarding to an upstream service through httpx: header hygiene, streaming, 502/504.

The URL is built from parts, never by joining strings: `URL.join("//evil/x")` and
`base + "@evil/x"` reach other hosts (docs/security.md, "Attacks and how each is handled").

Transport: httpx stays the client API (a caller may pass its own `httpx.AsyncClient`), but
without one `Upstream` sends through `_AiohttpTransport`, its own aiohttp pool: measured
by `tests/bench/upstream_transport.py`, 50 concurrent requests, httpcore's pool does ~175
req/s on this machine and aiohttp ~2.6k. It is our own rather than `httpx-aiohttp`'s
because that one passes the URL to aiohttp as a string, and yarl then re-quotes it
(`?a=%2F` becomes `?a=/`, `%ZZ` becomes `%25ZZ`); the query must reach the upstream byte
for byte. aiohttp is configured to never decompress, follow redirects, read proxy
variables, keep cookies or add `Accept`/`Accept-Encoding`/`User-Agent` headers.

Origins that send a `Content-Length` shorter than the body: aiohttp's parser refuses the
whole response and drops the connection; httpcore serves the declared bytes and then fails
the *next* request on that connection. Either way a safe request is retried once, on a
fresh unpooled httpcore connection (which serves the declared bytes and closes).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import yarl

from cachegw._errors import ConfigError
from cachegw._models import Fetched
from cachegw._target import problem

__all__ = [
    "GATEWAY_SET",
    "OVERRIDES",
    "ROUTING_OVERRIDES",
    "Upstream",
    "is_override",
    "public_location",
    "request_headers",
    "response_headers",
    "upstream_for",
    "upstream_url",
]

logger = logging.getLogger("cachegw")


def _error_text(exc: BaseException) -> str:
    """The exception's class and message, on one line (some httpx errors have none)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1, plus the non-standard Proxy-Connection and HTTP2-Settings (RFC 7540 §3.2.1).
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"http2-settings",
    }
)
# Set by the gateway itself; a client's values are not trusted. Host is set by httpx.
GATEWAY_SET = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
        b"via",
        b"x-real-ip",
        b"host",
    }
)
# Headers that make common frameworks answer for another path or method than the request
# line's (Symfony and IIS read X-Original-URL / X-Rewrite-URL; Rails, Express, Laravel
# and ASP.NET honour method overrides): forwarding one would run something other than what
# the route and its method list checked ("one path"), so none can be allowed through.
ROUTING_OVERRIDES = frozenset(
    {
        b"x-original-url",
        b"x-original-uri",
        b"x-rewrite-url",
        b"x-override-url",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-original-method",
    }
)
# Every request header that tells a framework which host, scheme, port or prefix to build
# URLs with or route on (Django's USE_X_FORWARDED_HOST/PORT, Rails and Rack, Express's
# trust proxy, Spring's ForwardedHeaderFilter, Werkzeug's ProxyFix): removed before
# forwarding unless a service's `forward_headers` lets it through *and keys it* (issue 10:
# every forwarded input is keyed or dropped). Every ``X-Forwarded-*`` header is one too.
OVERRIDES = ROUTING_OVERRIDES | frozenset(
    {
        b"x-original-host",
        b"x-host",
        b"x-http-host-override",
        b"x-scheme",
        b"x-url-scheme",
        b"front-end-https",
    }
)
# Removed from every forwarded request and response (checked first: one set lookup).
_REQUEST_DROP = _HOP_BY_HOP | GATEWAY_SET
_RESPONSE_DROP = _HOP_BY_HOP
_RESPONSE_DROP_LENGTH = _HOP_BY_HOP | {b"content-length"}
_VIA = b"1.1 cachegw"
# RFC 9110 §7.6.3: a forwarded request's Via names the protocol version the gateway
# received it in (the upstream is always spoken to in HTTP/1.1, so responses say 1.1).
_REQUEST_VIA = {"1.0": b"1.0 cachegw", "1.1": _VIA, "2": b"2 cachegw", "3": b"3 cachegw"}
# Idempotent methods (RFC 9110 §9.2.2) may be sent again when a reused connection fails.
_RETRYABLE = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Idle connections are dropped before common servers drop them (Node.js: 5 s), so a
# request is rarely sent on a connection the upstream is closing.
_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=100, keepalive_expiry=4.0)
# RFC 9110 §5.1 (a field name is a token) and §5.5 (a field value has no control byte but
# HTAB; CR, LF and NUL are never valid). A response breaking them is a 502, never stored:
# stored, it would break every later answer for its URL.
_FIELD_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_RETRY_AFTER = (b"retry-after", b"1")


def _invalid_field(raw: Headers) -> bytes | None:
    """The name of the first header that breaks RFC 9110's field rules, or None."""
    for name, value in raw:
        if not _FIELD_NAME.fullmatch(name) or _BAD_VALUE.search(value):
            return name
    return None


@functools.lru_cache(maxsize=256)
def _root(base: str) -> httpx.URL:
    return httpx.URL(base)


def upstream_url(base: str, path: str, raw_query: bytes) -> httpx.URL:
    """The upstream URL for `path` (still encoded, starting with "/") below `base`."""
    if not path.startswith("/"):
        raise ValueError(f"path must start with '/', got {path!r}")
    root = _root(base)
    raw_path = root.raw_path.partition(b"?")[0].rstrip(b"/") + path.encode("ascii")
    if raw_query:
        raw_path += b"?" + raw_query
    return httpx.URL(scheme=root.scheme, host=root.host, port=root.port, raw_path=raw_path)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def public_location(value: bytes, base: str, prefix: str) -> bytes | None:
    """A ``Location`` / ``Content-Location`` value pointing at the upstream ``base``
    (``http://host:port/base``), as the path-absolute reference the gateway's client
    reaches it by (``prefix`` + the path below the base path); None to leave it alone.

    nginx's ``proxy_redirect default``: only the upstream's own origin is rewritten (either
    scheme, the same host and port), and only below its base path. The result names no
    scheme or host, so an entry stored with it is right for every client, whatever ``Host``
    or scheme each used (RFC 9110 §10.2.2 allows a relative ``Location``). A result that
    would read as a network-path reference (``//other/x``, ``/\\other``) is not made.
    """
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.netloc or "@" in parts.netloc:
        return None
    root = _root(base)
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        return None
    if parts.hostname != root.host.lower() or port != (root.port or _DEFAULT_PORTS[root.scheme]):
        return None
    base_path = root.raw_path.partition(b"?")[0].rstrip(b"/").decode("ascii")
    path = parts.path or "/"
    if base_path:
        if path == base_path:
            path = "/"
        elif path.startswith(base_path + "/"):
            path = path[len(base_path) :]
        else:
            return None
    public = prefix + path if prefix else path
    if public[1:2] in ("/", "\\"):
        return None
    if parts.query:
        public += "?" + parts.query
    if parts.fragment:
        public += "#" + parts.fragment
    return public.encode("ascii")


def _connection_named(headers: Headers) -> set[bytes]:
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }


def is_override(name: bytes) -> bool:
    """Whether a (lower-case) request header is one the gateway removes unless allowed."""
    return name in OVERRIDES or name.startswith(b"x-forwarded-")


def request_headers(
    scope: Mapping[str, Any],
    *,
    client_ip: str,
    proto: str,
    host: str | None,
    allow: frozenset[bytes] = frozenset(),
) -> Headers:
    """Client headers to forward, plus the gateway's own X-Forwarded-* and Via.

    Removed: hop-by-hop headers, the ones the gateway sets itself, and every override
    header (`is_override`) not in ``allow`` (the service's ``forward_headers``, which its
    routes key on). ``host`` is the X-Forwarded-Host to send (a name from the service's
    ``hosts``), or None for none.

    A name spelled with underscores for one of those (``X_Forwarded_Host``) is removed
    too, allowed or not: WSGI and CGI servers read ``_`` and ``-`` alike (both become
    ``HTTP_X_FORWARDED_HOST``), so it would reach such a framework as the header itself,
    unkeyed. nginx ignores every such name by default (``underscores_in_headers off``).
    """
    raw: Headers = scope["headers"]
    drop = _REQUEST_DROP
    out = []
    for name, value in raw:
        lower = name.lower()
        if lower in drop:
            if lower == b"connection":
                drop = _REQUEST_DROP | _connection_named(raw)  # and what it names
            continue
        if (lower in OVERRIDES or lower.startswith(b"x-forwarded-")) and lower not in allow:
            continue  # `is_override`, inline: it runs for every header of every request
        if b"_" in lower:
            dashed = lower.replace(b"_", b"-")
            if dashed in drop or is_override(dashed):
                continue
        out.append((name, value))
    if drop is not _REQUEST_DROP:
        # A Connection header may name headers that came before it.
        out = [
            (n, v)
            for n, v in out
            if n.lower() not in drop and n.lower().replace(b"_", b"-") not in drop
        ]
    out += [(b"x-forwarded-for", client_ip.encode()), (b"x-forwarded-proto", proto.encode())]
    if host is not None:
        out.append((b"x-forwarded-host", host.encode("latin-1")))
    out.append((b"via", _REQUEST_VIA.get(scope.get("http_version", "1.1"), _VIA)))
    return out


def response_headers(raw: Headers, content_length: int | None = None) -> Headers:
    """Upstream headers to send on: lower-case, end-to-end only, our `Via` appended; with
    ``content_length``, the upstream's Content-Length replaced by it (placed last)."""
    drop = _RESPONSE_DROP
    if content_length is not None:
        drop = _RESPONSE_DROP_LENGTH
    out: Headers = []
    via: list[bytes] = []
    named = False
    for name, value in raw:
        name = name.lower()
        if name == b"via":
            via.append(value)
        elif name not in drop:
            out.append((name, value))
        elif name == b"connection":
            named = True
    if named:
        connection = _connection_named(raw)
        out = [(n, v) for n, v in out if n not in connection]
    out.append((b"via", b", ".join(via) + b", " + _VIA if via else _VIA))
    if content_length is not None:
        out.append((b"content-length", str(content_length).encode()))
    return out


def _mapped(exc: BaseException) -> httpx.TransportError:
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError family
        return httpx.ReadTimeout(message)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(exc, aiohttp.ClientOSError):
        return httpx.ReadError(message)
    return httpx.RemoteProtocolError(message)  # bad status line, disconnect, payload error


class _AiohttpBody(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _mapped(exc) from exc

    async def aclose(self) -> None:
        self._response.release()  # closes the connection instead when the body is unread


class _AiohttpTransport:
    """The aiohttp connection pool `Upstream` sends through when no client is passed in."""

    def __init__(self, limits: httpx.Limits, *, unbounded: bool = False) -> None:
        self._limits = limits
        self._unbounded = unbounded
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # created lazily: aiohttp wants a running loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    # Owned clients bound connections with their own queue (Upstream).
                    limit=0 if self._unbounded else self._limits.max_connections or 0,
                    keepalive_timeout=self._limits.keepalive_expiry or 4.0,
                ),
                auto_decompress=False,
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class _Reply:
    """What `Upstream.fetch` needs of a response, from httpx or straight from aiohttp."""

    __slots__ = ("_aiohttp", "_httpx", "declared", "raw_headers", "status")

    def __init__(
        self, *, httpx_response: httpx.Response | None = None, aiohttp_response: Any = None
    ) -> None:
        self._httpx = httpx_response
        self._aiohttp = aiohttp_response
        if httpx_response is not None:
            self.status = httpx_response.status_code
            self.raw_headers = list(httpx_response.headers.raw)
            self.declared = httpx_response.headers.get("content-length", "")
        else:
            self.status = aiohttp_response.status
            self.raw_headers = list(aiohttp_response.raw_headers)
            self.declared = aiohttp_response.headers.get("Content-Length", "")

    def aiter_raw(self) -> AsyncIterator[bytes]:
        if self._httpx is not None:
            return self._httpx.aiter_raw()
        return _AiohttpBody(self._aiohttp).__aiter__()

    async def aclose(self) -> None:
        if self._httpx is not None:
            await self._httpx.aclose()
        else:
            self._aiohttp.release()


class _Stream:
    """The rest of a body too large to store: the chunks already read, then the remainder.

    Holds a connection of the pool until closed; `deadline` (loop time) is the service's
    total timeout, if it has one. `contended` says whether other requests need that
    connection (the pool is full): a client that stops reading it is then cut sooner.
    """

    def __init__(
        self,
        response: _Reply,
        head: list[bytes],
        rest: AsyncIterator[bytes],
        release: _Permit,
        deadline: float | None,
        upstream: Upstream,
    ) -> None:
        self._response = response
        self._head = deque(head)
        self._rest = rest
        self._release = release
        self._deadline = deadline
        self._slots = upstream._slots

    def contended(self) -> bool:
        return self._slots.locked()

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> bytes:
        if self._head:
            return self._head.popleft()
        try:
            if self._deadline is None:
                return await self._rest.__anext__()
            async with asyncio.timeout_at(self._deadline):
                return await self._rest.__anext__()
        except BaseException:  # end of body, read error or cancellation: release the connection
            await self.aclose()
            raise

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        finally:
            self._release()


async def _written(
    body: AsyncIterator[bytes], limit: asyncio.Timeout, write_timeout: float, total: float | None
) -> AsyncIterator[bytes]:
    """`body`, with `write_timeout` running while each chunk is being written upstream.

    The client's pace is not the upstream's fault: while we wait for the client's next
    chunk only the total deadline runs (the client's own pace is `body_timeout`'s).
    """
    loop = asyncio.get_running_loop()
    async for chunk in body:
        due = loop.time() + write_timeout
        limit.reschedule(due if total is None else min(due, total))
        yield chunk  # resumed when the chunk is written
        limit.reschedule(total)


def _timed_out(who: str, exc: BaseException, phases: httpx.Timeout) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return f"{who} could not be connected to within {phases.connect:g} s."
    if isinstance(exc, httpx.ReadTimeout):
        return f"{who} did not answer within {phases.read:g} s."
    # Our own deadline: the total timeout, or the upstream not taking the request body.
    return f"{who} did not answer in time."


class _Permit:
    """One place in a service's connection pool; releasing it twice is harmless."""

    __slots__ = ("_upstream",)

    def __init__(self, upstream: Upstream) -> None:
        self._upstream: Upstream | None = upstream

    def __call__(self) -> None:
        upstream = self._upstream
        if upstream is not None:
            self._upstream = None
            upstream._slots.release()
            upstream._done()


def upstream_for(service: Any) -> Upstream:
    """The client for a `cachegw.Service` (its upstream URL, timeouts and pool)."""
    return Upstream(
        service.upstream,
        client=service.client,
        service=service.name,
        **service.client_settings,
    )


class Upstream:
    """One pooled HTTP client for one upstream service.

    ```
    upstream = Upstream("http://127.0.0.1:9001/api", timeout=10)
    fetched = await upstream.fetch("GET", "/items/42", b"a=1", headers, None, max_body=2**20)
    await upstream.aclose()
    ```

    Timeouts bound each phase, nginx's way, not the whole exchange: waiting for a place in
    the pool (`pool_timeout`, then a 503 with ``Retry-After``), connecting
    (`connect_timeout`), each write of the request body (`write_timeout`: the upstream
    not taking it) and the time between two reads of the response (`read_timeout`). A
    slow response that keeps arriving is not cut; a silent one is. `timeout` is the
    default of each; `total_timeout`, when given, bounds the whole exchange too.
    `max_connections` bounds the connections open to the service.

    A `client` passed in is used as is (its transport, its keep-alive) and is not closed
    by `aclose()`.
    """

    def __init__(
        self,
        base: str,
        *,
        timeout: float,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        write_timeout: float | None = None,
        pool_timeout: float | None = None,
        total_timeout: float | None = None,
        max_connections: int = 100,
        client: httpx.AsyncClient | None = None,
        service: str = "",
    ):
        root = httpx.URL(base)
        if root.scheme not in ("http", "https") or not root.host or root.query:
            raise ConfigError(
                f"upstream must be an http(s) URL like 'http://host:port/base', got {base!r}"
            )
        self.base = base
        # Named in error answers instead of the upstream's URL, an internal address that
        # clients have no business seeing.
        self.service = service
        self._root = root
        self._base_path = root.raw_path.partition(b"?")[0].rstrip(b"/").decode("ascii")
        connect = connect_timeout or timeout
        read = read_timeout or timeout
        self._write_timeout = write_timeout or timeout
        self._pool_timeout = pool_timeout or timeout
        self._total = total_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._owned = client is None
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=_LIMITS.keepalive_expiry,
        )
        self._transport = _AiohttpTransport(limits, unbounded=True)
        phases = httpx.Timeout(
            timeout, connect=connect, read=read, write=self._write_timeout, pool=None
        )
        self._client = client
        self._extensions = {"timeout": phases.as_dict()}
        # aiohttp's sock_read runs from the end of the request body to the first byte of
        # the response, then between reads; connect covers name resolution and connecting.
        self._aiohttp_timeout = aiohttp.ClientTimeout(
            connect=connect, sock_connect=connect, sock_read=read
        )
        self._phases = phases
        self._fresh: httpx.AsyncClient | None = None  # unpooled, for the one retry
        # Requests under way (from the pool's queue to the end of a streamed body), and
        # what `retire` waits on.
        self._busy = 0
        self._idle: asyncio.Event | None = None

    def _done(self) -> None:
        self._busy -= 1
        if not self._busy and self._idle is not None:
            self._idle.set()

    async def retire(self) -> None:
        """Close the client once every request it serves is over (a reload replaced it):
        streams in flight run to their end. Cancelled (the gateway stops): closed at once."""
        try:
            if self._busy:
                self._idle = asyncio.Event()
                await self._idle.wait()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._owned:
            await self._transport.aclose()
        if self._fresh is not None:
            await self._fresh.aclose()

    async def fetch(
        self,
        method: str,
        path: str,
        raw_query: bytes,
        headers: Headers,
        body: AsyncIterator[bytes] | bytes | None,
        *,
        max_body: int,
    ) -> Fetched:
        """Forward one request; never raises for upstream failures (they become 502/503/504).

        A body that raises (it ended early) aborts the request: the upstream sees the
        connection close before the body's end, never a complete request.
        """
        slots = self._slots
        self._busy += 1
        if slots.locked():
            try:
                async with asyncio.timeout(self._pool_timeout):
                    await slots.acquire()
            except BaseException as exc:
                self._done()
                if not isinstance(exc, TimeoutError):
                    raise
                who = f"the service {self.service!r}" if self.service else "the upstream service"
                status, out, payload = problem(
                    503, "Service Unavailable", f"No connection to {who} became free in time."
                )
                out.append(_RETRY_AFTER)
                return Fetched(
                    status, out, payload, failed=True, response_time=time.time(), error="pool"
                )
        else:
            await slots.acquire()  # free: returns at once
        release = _Permit(self)
        response: _Reply | None = None
        streamed = False
        deadline = None if self._total is None else asyncio.get_running_loop().time() + self._total
        try:
            async with asyncio.timeout_at(deadline) as limit:
                if body is not None and not isinstance(body, bytes):
                    body = _written(body, limit, self._write_timeout, deadline)
                response = await self._send(method, path, raw_query, headers, body)
                arrived = time.time()
                if not 100 <= response.status <= 599:
                    raise httpx.RemoteProtocolError(f"invalid status code {response.status}")
                bad = _invalid_field(response.raw_headers)
                if bad is not None:
                    raise httpx.RemoteProtocolError(
                        f"invalid header field {bad[:64].decode('latin-1')!r}"
                    )
                declared = response.declared
                rest = response.aiter_raw()
                chunks: list[bytes] = []
                size = 0
                streamed = declared.isdigit() and int(declared) > max_body
                if not streamed:
                    async for chunk in rest:
                        chunks.append(chunk)
                        size += len(chunk)
                        if size > max_body:
                            streamed = True
                            break
        except (httpx.TransportError, TimeoutError) as exc:
            streamed = False
            if response is not None:
                await response.aclose()
            timed_out = isinstance(exc, httpx.TimeoutException | TimeoutError)
            status, title = (504, "Gateway Timeout") if timed_out else (502, "Bad Gateway")
            kind = (
                "timeout"
                if timed_out
                else "connect"
                if isinstance(exc, httpx.ConnectError)
                else "protocol"
            )
            who = f"The service {self.service!r}" if self.service else "The upstream service"
            detail = {
                "timeout": _timed_out(who, exc, self._phases),
                "connect": f"{who} could not be reached.",
                "protocol": f"{who} sent an invalid response.",
            }[kind]
            # One line per failed request for the operator: which upstream, what went wrong
            # (the client gets the problem document without the internals).
            logger.warning(
                "cachegw: %d %s: %s %s%s failed (%s): %s",
                status,
                f"service {self.service!r}" if self.service else "upstream",
                method,
                self.base.rstrip("/"),
                path,
                kind,
                _error_text(exc),
            )
            status, out, payload = problem(status, title, detail)
            return Fetched(status, out, payload, failed=True, response_time=time.time(), error=kind)
        except BaseException:
            # Cancelled (nobody waits for the answer any more): the connection is closed,
            # not returned to the pool with a response half read.
            if response is not None and not streamed:
                await response.aclose()
            raise
        finally:
            if not streamed:
                release()
        if streamed:
            out = response_headers(response.raw_headers)
            # The permit goes with the stream: the connection is held until it is closed.
            stream = _Stream(response, chunks, rest, release, deadline, self)
            return Fetched(response.status, out, None, stream, response_time=arrived)
        await response.aclose()
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if method != "HEAD" and response.status not in (204, 304):
            # The body is exactly what we send on: say so, whatever the upstream declared.
            out = response_headers(response.raw_headers, len(data))
        else:
            out = response_headers(response.raw_headers)
        return Fetched(response.status, out, data, response_time=arrived)

    async def _send(
        self,
        method: str,
        path: str,
        raw_query: bytes,
        headers: Headers,
        body: AsyncIterator[bytes] | bytes | None,
    ) -> _Reply:
        try:
            if self._client is None:
                return await self._send_direct(method, path, raw_query, headers, body)
            url = upstream_url(self.base, path, raw_query)
            request = httpx.Request(
                method, url, headers=headers, content=body, extensions=self._extensions
            )
            response = await self._client.send(request, stream=True, follow_redirects=False)
            return _Reply(httpx_response=response)
        except (httpx.RemoteProtocolError, httpx.ReadError):
            if method not in _RETRYABLE or not (body is None or isinstance(body, bytes)):
                raise
        if self._fresh is None:
            self._fresh = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(
                    limits=httpx.Limits(max_keepalive_connections=0)
                ),
                trust_env=False,
                timeout=self._phases,
            )
        url = upstream_url(self.base, path, raw_query)
        request = httpx.Request(method, url, headers=headers, content=body)
        response = await self._fresh.send(request, stream=True, follow_redirects=False)
        return _Reply(httpx_response=response)

    async def _send_direct(
        self,
        method: str,
        path: str,
        raw_query: bytes,
        headers: Headers,
        body: AsyncIterator[bytes] | bytes | None,
    ) -> _Reply:
        """Our own client: straight to aiohttp, without httpx's per-request objects, cookie
        jar, auth and redirect layers a proxy does not want (measured: the miss path's
        client side costs about half as much CPU). The URL is built from the upstream's
        parts (host and port always the base's), the query string passed as it came."""
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        target = yarl.URL.build(
            scheme=self._root.scheme,
            host=self._root.host,
            port=self._root.port,
            path=self._base_path + path,
            query_string=raw_query.decode("latin-1"),
            encoded=True,
        )
        # A list, not a CIMultiDict: aiohttp builds its own from it either way.
        plain = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in headers
            if name != b"transfer-encoding"  # aiohttp frames the body itself
        ]
        try:
            response = await self._transport.session().request(
                method,
                target,
                headers=plain,
                data=body,
                allow_redirects=False,
                timeout=self._aiohttp_timeout,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _mapped(exc) from exc
        return _Reply(aiohttp_response=response)
