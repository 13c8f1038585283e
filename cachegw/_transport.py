"""The aiohttp connection pool `Upstream` sends through when no client is passed in, and
what a response read from it looks like to `Upstream.fetch` (see `cachegw._upstream`):
its head (`Reply`), the rest of a body too large to store (`Stream`), a request body
written under the write timeout (`written`), aiohttp's errors as httpx's (`mapped`)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import httpx

__all__ = ["AiohttpTransport", "Reply", "Stream", "mapped", "written"]


def mapped(exc: BaseException) -> httpx.TransportError:
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
            raise mapped(exc) from exc

    async def aclose(self) -> None:
        self._response.release()  # closes the connection instead when the body is unread


class AiohttpTransport:
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


class Reply:
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


class Stream:
    """The rest of a body too large to store: the chunks already read, then the remainder.

    Holds a connection of the pool until closed; `deadline` (loop time) is the service's
    total timeout, if it has one. `contended` says whether other requests need that
    connection (the pool is full): a client that stops reading it is then cut sooner.
    """

    def __init__(
        self,
        response: Reply,
        head: list[bytes],
        rest: AsyncIterator[bytes],
        release: Callable[[], None],
        deadline: float | None,
        slots: asyncio.Semaphore,
    ) -> None:
        self._response = response
        self._head = deque(head)
        self._rest = rest
        self._release = release
        self._deadline = deadline
        self._slots = slots

    def contended(self) -> bool:
        return self._slots.locked()

    def __aiter__(self) -> Stream:
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


async def written(
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
