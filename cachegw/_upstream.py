"""Forwarding to an upstream service: pool and phase timeouts, streaming, 502/503/504
(header hygiene in `cachegw._hygiene`, the aiohttp pool in `cachegw._transport`).

Transport: httpx stays the client API (a caller may pass its own `httpx.AsyncClient`), but
without one `Upstream` sends through `AiohttpTransport`, its own aiohttp pool: measured
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
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import yarl

from cachegw._errors import ConfigError
from cachegw._hygiene import (
    GATEWAY_SET,
    OVERRIDES,
    ROUTING_OVERRIDES,
    Headers,
    invalid_field,
    is_override,
    public_location,
    request_headers,
    response_headers,
    upstream_url,
)
from cachegw._models import Fetched
from cachegw._target import problem
from cachegw._transport import AiohttpTransport, Reply, Stream, mapped, written

# Header hygiene lives in `cachegw._hygiene`; its names are imported from here too.
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


# Idempotent methods (RFC 9110 §9.2.2) may be sent again when a reused connection fails.
_RETRYABLE = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Idle connections are dropped before common servers drop them (Node.js: 5 s), so a
# request is rarely sent on a connection the upstream is closing.
_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=100, keepalive_expiry=4.0)
_RETRY_AFTER = (b"retry-after", b"1")


def _timed_out(who: str, exc: BaseException, phases: httpx.Timeout) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return f"{who} could not be connected to within {phases.connect:g} s."
    if isinstance(exc, httpx.ReadTimeout):
        return f"{who} did not answer within {phases.read:g} s."
    # Our own deadline: the total timeout, or the upstream not taking the request body.
    return f"{who} did not answer in time."


def _check_head(response: Reply) -> None:
    """Raise for a response head no client may get: a status out of range, or a header
    breaking RFC 9110's field rules (never stored: it would break every later answer)."""
    if not 100 <= response.status <= 599:
        raise httpx.RemoteProtocolError(f"invalid status code {response.status}")
    bad = invalid_field(response.raw_headers)
    if bad is not None:
        raise httpx.RemoteProtocolError(f"invalid header field {bad[:64].decode('latin-1')!r}")


async def _read_up_to(
    declared: str, rest: AsyncIterator[bytes], chunks: list[bytes], max_body: int
) -> bool:
    """Read the body into ``chunks`` up to ``max_body`` bytes; True when it is larger (a
    declared length over it reads nothing): the rest is then streamed."""
    if declared.isdigit() and int(declared) > max_body:
        return True
    size = 0
    async for chunk in rest:
        chunks.append(chunk)
        size += len(chunk)
        if size > max_body:
            return True
    return False


class _Got:
    """What one exchange with the upstream got so far (see `Upstream.fetch`)."""

    __slots__ = ("arrived", "chunks", "response", "rest", "streamed")

    def __init__(self) -> None:
        self.response: Reply | None = None
        self.rest: AsyncIterator[bytes] | None = None
        self.chunks: list[bytes] = []
        self.arrived = 0.0
        self.streamed = False


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
        self._transport = AiohttpTransport(limits, unbounded=True)
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
        self._busy += 1
        if self._slots.locked():
            full = await self._queue()
            if full is not None:
                return full
        else:
            await self._slots.acquire()  # free: returns at once
        release = _Permit(self)
        got = _Got()
        deadline = None if self._total is None else asyncio.get_running_loop().time() + self._total
        try:
            if deadline is None and (body is None or isinstance(body, bytes)):
                # No deadline to keep and no body to write under the write timeout: no
                # timeout scope (the phase timeouts are aiohttp's).
                await self._exchange(got, method, path, raw_query, headers, body, max_body)
            else:
                async with asyncio.timeout_at(deadline) as limit:
                    if body is not None and not isinstance(body, bytes):
                        body = written(body, limit, self._write_timeout, deadline)
                    await self._exchange(got, method, path, raw_query, headers, body, max_body)
        except (httpx.TransportError, TimeoutError) as exc:
            got.streamed = False
            if got.response is not None:
                await got.response.aclose()
            return self._failed(exc, method, path)
        except BaseException:
            # Cancelled (nobody waits for the answer any more): the connection is closed,
            # not returned to the pool with a response half read.
            if got.response is not None and not got.streamed:
                await got.response.aclose()
            raise
        finally:
            if not got.streamed:
                release()
        response = got.response
        assert response is not None and got.rest is not None
        if got.streamed:
            out = response_headers(response.raw_headers)
            # The permit goes with the stream: the connection is held until it is closed.
            stream = Stream(response, got.chunks, got.rest, release, deadline, self._slots)
            return Fetched(response.status, out, None, stream, response_time=got.arrived)
        await response.aclose()
        chunks = got.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if method == "HEAD":
            out = response_headers(response.raw_headers)
        elif response.status in (204, 304):
            # No content follows, whatever the upstream declared (a 304 may carry the
            # representation's Content-Length): sent on, uvicorn would wait for that many
            # bytes and fail the response.
            out = response_headers(response.raw_headers, drop_length=True)
        else:
            # The body is exactly what we send on: say so, whatever the upstream declared.
            out = response_headers(response.raw_headers, len(data))
        return Fetched(response.status, out, data, response_time=got.arrived)

    async def _exchange(
        self,
        got: _Got,
        method: str,
        path: str,
        raw_query: bytes,
        headers: Headers,
        body: AsyncIterator[bytes] | bytes | None,
        max_body: int,
    ) -> None:
        """Send the request and read the response into ``got``: its head, and its body up
        to ``max_body`` bytes (a larger one is left to stream)."""
        response = got.response = await self._send(method, path, raw_query, headers, body)
        got.arrived = time.time()
        _check_head(response)
        rest = got.rest = response.aiter_raw()
        got.streamed = await _read_up_to(response.declared, rest, got.chunks, max_body)

    async def _queue(self) -> Fetched | None:
        """Wait for a place in the pool (`pool_timeout`): None once one is taken, else the
        503 to answer with."""
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._slots.acquire()
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
        return None

    def _failed(self, exc: BaseException, method: str, path: str) -> Fetched:
        """The 502 or 504 for a failed exchange, and the operator's log line about it."""
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

    async def _send(
        self,
        method: str,
        path: str,
        raw_query: bytes,
        headers: Headers,
        body: AsyncIterator[bytes] | bytes | None,
    ) -> Reply:
        try:
            if self._client is None:
                return await self._send_direct(method, path, raw_query, headers, body)
            url = upstream_url(self.base, path, raw_query)
            request = httpx.Request(
                method, url, headers=headers, content=body, extensions=self._extensions
            )
            response = await self._client.send(request, stream=True, follow_redirects=False)
            return Reply(httpx_response=response)
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
        return Reply(httpx_response=response)

    async def _send_direct(
        self,
        method: str,
        path: str,
        raw_query: bytes,
        headers: Headers,
        body: AsyncIterator[bytes] | bytes | None,
    ) -> Reply:
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
            raise mapped(exc) from exc
        return Reply(aiohttp_response=response)
