"""The gateway's proxy path: a request for a service checked, routed, looked up or
forwarded, and answered, with its access line and metrics (`Proxy`).

The same steps serve an ASGI request (`Proxy.__call__`) and a request the protocol
forwards itself (`Proxy.plan`, then `Proxy.serve`, see `cachegw._fastpass`): the checks
and the route (`Proxy.route`), then forwarding (`Proxy.forward`, through `Exchange`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from cachegw._accesslog import log_access
from cachegw._engine import CacheEngine
from cachegw._exchange import (
    TITLES,
    Abandon,
    BodyEnded,
    Exchange,
    Routed,
    Trace,
    refusal,
    send_served,
)
from cachegw._gateway import Route, Service
from cachegw._keys import format_tag, hash_parts, principal
from cachegw._models import RequestInfo, Served
from cachegw._proxies import front
from cachegw._purge import scopes_for
from cachegw._ranges import ranged
from cachegw._runtime import Runtime
from cachegw._target import BadTarget, check_headers, check_target

__all__ = ["BUFFERED_BODY", "MEMO_BYTES", "Proxy"]

logger = logging.getLogger("cachegw")

#: A request body of known length up to this size is read before it is forwarded (so an
#: idempotent request can be sent again on a fresh connection); a larger one is streamed.
BUFFERED_BODY = 64 * 1024
# Keys, purge scopes and checked paths are memoised per request target, for at most
# _MEMO_SIZE targets of at most _MEMO_PART_MAX bytes each (longer ones are computed every
# time): together at most MEMO_BYTES, whatever the targets clients send.
_MEMO_SIZE = 4096
_MEMO_PART_MAX = 256
# A key's memo under 1 KiB, a path's scopes under 2 KiB, a checked path under 768 bytes.
MEMO_BYTES = _MEMO_SIZE * 3840
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class Proxy:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._keys: dict[tuple[str, str, bytes, str, str, str], str] = {}
        self._scope_memo: dict[tuple[str, str, str], list[str]] = {}
        self._paths: dict[bytes, str] = {}

    def path(self, raw_path: bytes) -> str:
        """`check_target` of a request path, memoised for accepted paths like keys (a
        pass-through GET is checked by the fast path, then by the ordinary one)."""
        path = self._paths.get(raw_path)
        if path is None:
            path = check_target({"raw_path": raw_path})
            if len(raw_path) <= _MEMO_PART_MAX:
                if len(self._paths) >= _MEMO_SIZE:  # bounded: a flood can't grow it
                    self._paths.clear()
                self._paths[raw_path] = path
        return path

    def forget(self) -> None:
        """Drop what was memoised from the previous configuration (after a reload)."""
        self._scope_memo = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def handle(trace: Trace) -> Served:
            routed = self.route(scope, trace)
            if isinstance(routed, Served):
                return routed
            return await self.forward(routed, scope, trace, receive)

        async def respond(served: Served) -> int:
            return await send_served(send, served, scope)

        await self.serve(scope, Trace(), handle, respond)

    async def serve(
        self,
        scope: Scope,
        trace: Trace,
        handle: Callable[[Trace], Awaitable[Served]],
        respond: Callable[[Served], Awaitable[int]],
        started: float | None = None,
    ) -> None:
        """Answer one request: ``handle`` it, ``respond`` with what it served, and write
        its metrics and access line, whatever happens on the way. ``started``: when its
        head was complete (`time.perf_counter`), if before now."""
        if started is None:
            started = time.perf_counter()
        # A safe request whose client leaves is let go (nginx's proxy_ignore_client_abort
        # off): its task is cancelled, which aborts its upstream request and frees the
        # pool's connection, unless other requests wait for the same fetch (`_engine`).
        # Unsafe methods run to their end: the upstream may have acted on them, and their
        # invalidations must happen.
        connection = scope.get("extensions", {}).get("cachegw.connection")
        abandon = None
        if connection is not None and scope["method"] in ("GET", "HEAD"):
            abandon = connection.abandon = Abandon()
            if connection.gone:
                abandon()  # it left before its request began: cancelled at the first await
        try:
            try:
                served = await handle(trace)
            except BodyEnded as ended:
                served = ended.served()
            except Exception:
                # A bug of ours: never a traceback to the client, always a log line.
                logger.exception("cachegw: error serving %s %s", scope["method"], scope["path"])
                served = refusal(500, "Internal Server Error", "The gateway failed; see its log.")
            sent = await respond(served)
        except asyncio.CancelledError:
            if abandon is None or not abandon.ours():
                raise  # not (only) ours: shutting down
            served, sent = refusal(499, "Client Closed Request", "The client left."), 0
            engine = self.runtime.engine
            if engine is not None:
                engine.stats["abandoned"] += 1
        finally:
            if connection is not None and connection.abandon is abandon:
                connection.abandon = None
        took = time.perf_counter() - started
        self.runtime.metrics.request(trace.service, trace.route, served.cache_status, took)
        log_access(
            scope,
            status=served.status,
            bytes_sent=sent,
            duration=took,
            service=trace.service,
            route=trace.route,
            cache_status=served.cache_status,
            upstream=trace.upstream,
            key=trace.key,
        )

    def route(self, scope: Scope, trace: Trace) -> Routed | Served:
        """The request's checks and route: a `Routed`, or the refusal to answer with."""
        try:
            length = check_headers(scope)  # of the body: None when chunked
            raw_path = scope.get("raw_path")
            target = scope.get("extensions", {}).get("cachegw.request_target")
            if raw_path is None or (target is not None and not target.startswith(b"/")):
                path = check_target(scope)  # refuses an absolute-form target
            else:
                path = self.path(raw_path)
        except BadTarget as bad:
            return refusal(bad.status, TITLES.get(bad.status, "Bad Request"), bad.detail)
        matched = self.runtime.gateway.match(path)
        if matched is None:
            return refusal(404, "Not Found", f"no route is declared for {path}")
        service, route, rest, params = matched
        trace.service, trace.route = service.name, route.path
        policy = route.policy
        method: str = scope["method"]
        if policy.methods is not None and method not in policy.methods:
            refused = refusal(405, "Method Not Allowed", f"{method} is not allowed on {path}")
            refused.headers.append((b"allow", ", ".join(policy.methods).encode("latin-1")))
            return refused
        client = scope.get("client")
        # The scheme and host the client used, and its X-Forwarded-For: from the socket, or
        # from a trusted front proxy's headers (see `_proxies`).
        seen = front(
            client[0] if client else "",
            scope.get("scheme", "http"),
            scope["headers"],
            self.runtime.gateway.trusted,
        )
        host = service.host_for(seen.host) if service.hosts is not None else ""
        if host is None:
            return refusal(400, "Bad Request", "The Host header names no host of this service.")
        engine = self.runtime.engine
        # Taken with the route, no await in between (see `Routed`).
        upstream = self.runtime.upstreams.get(service.name)
        if engine is None or upstream is None:
            return refusal(503, "Service Unavailable", "the gateway is starting")
        return Routed(service, route, rest, params, method, length, seen, host, engine, upstream)

    async def forward(
        self,
        routed: Routed,
        scope: Scope,
        trace: Trace,
        receive: Receive | None,
        content: bytes | None = None,
    ) -> Served:
        """Serve a routed request: forwarded as it came, or through the cache. ``content``
        is its body when already read (``receive`` is then not called)."""
        exchange = Exchange(self.runtime, routed, scope, trace)
        method = routed.method
        policy = routed.route.policy
        if content is None and receive is not None:
            exchange.receive = receive
            # A small body of known length is read first, so an idempotent request can be
            # sent again if a pooled upstream connection turns out to be closing.
            length = routed.length
            if length is not None and 0 < length <= BUFFERED_BODY:
                content = b"".join([chunk async for chunk in exchange.body()])
        exchange.content = content
        key_extra: str | None = ""
        if exchange.cacheable and policy.key is not None:
            key_extra = await principal(policy.key, Request(scope))
            exchange.cacheable = key_extra is not None
        if exchange.passes:
            return routed.engine.passed(await exchange.fetch())
        if not exchange.cacheable:
            exchange.upstream_method = method
            return routed.engine.bypass(await exchange.fetch())
        return await self._cached(routed, exchange, key_extra or "")

    async def _cached(self, routed: Routed, exchange: Exchange, key_extra: str) -> Served:
        """A request the cache answers, or an unsafe one that invalidates what it changed."""
        service, route, rest, method = routed.service, routed.route, routed.rest, routed.method
        scheme = routed.seen.scheme
        raw_query: bytes = exchange.scope.get("query_string", b"")
        exchange.trace.key = self.key(service, rest, raw_query, key_extra, scheme, routed.host)
        scopes = self._scopes(service, route, rest, routed.params)
        headers = exchange.headers
        info = RequestInfo(
            method=method,
            key=exchange.trace.key,
            headers=headers,
            per_principal=route.policy.key is not None,
            scopes=scopes,
            target=scopes[2],  # the path: every query string, variant and principal
            service=service.name,
            head_as_get=True,
            credentials=service.credentials,
        )
        served = await routed.engine.serve(info, route.policy, exchange.fetch)
        if method == "GET" and "range" in headers and served.stream is None:
            cut = ranged(headers, served.status, served.headers, served.body)
            if cut is not None:
                served = Served(*cut, cache_status=served.cache_status)
        if method not in _SAFE_METHODS and 200 <= served.status < 400:
            await self._invalidate_locations(served, routed.seen.host or "", routed.engine)
        return served

    def key(
        self, service: Service, rest: str, raw_query: bytes, key_extra: str, scheme: str, host: str
    ) -> str:
        """The primary key: every request input that reaches the upstream (issue 10) —
        the path and query, the scheme (sent as X-Forwarded-Proto) and the host from the
        service's ``hosts`` (sent as X-Forwarded-Host; ``""`` without ``hosts``). The
        route's `vary` headers (``forward_headers`` among them) are not in it: like the
        upstream's Vary they select a variant below it (so invalidating the key drops
        them all)."""
        memo = (service.name, rest, raw_query, key_extra, scheme, host)
        key = self._keys.get(memo)
        if key is None:
            parts = (service.name, rest, raw_query.decode("latin-1"), key_extra, scheme, host)
            key = hash_parts(self.runtime.gateway.prefix, parts)
            if len(rest) + len(raw_query) + len(key_extra) + len(host) <= _MEMO_PART_MAX:
                if len(self._keys) >= _MEMO_SIZE:  # bounded: a flood can't grow it
                    self._keys.clear()
                self._keys[memo] = key
        return key

    def _scopes(
        self, service: Service, route: Route, rest: str, params: dict[str, Any]
    ) -> list[str]:
        """The purge scopes of entries stored for this path (memoised like keys)."""
        memo = (service.name, route.path, rest)
        scopes = self._scope_memo.get(memo)
        if scopes is None:
            tags = (format_tag(t, params) for t in route.policy.tags)
            scopes = scopes_for(service.name, rest, tags, route.path)
            if len(rest) <= _MEMO_PART_MAX:
                if len(self._scope_memo) >= _MEMO_SIZE:
                    self._scope_memo.clear()
                self._scope_memo[memo] = scopes
        return scopes

    async def _invalidate_locations(self, served: Served, host: str, engine: CacheEngine) -> None:
        """RFC 9111 §4.4: a non-error answer to an unsafe method also invalidates the URIs
        in its ``Location`` and ``Content-Location``, when they are on the same origin."""
        for name, value in served.headers:
            if name not in (b"location", b"content-location"):
                continue
            target = _same_origin_target(value.decode("latin-1"), host)
            if target is None:
                continue
            raw = target.partition("?")[0]  # a path invalidation covers every query
            try:
                path = check_target({"raw_path": raw.encode("ascii")})
            except (BadTarget, UnicodeEncodeError):
                continue
            matched = self.runtime.gateway.match(path)
            if matched is None:
                continue
            service, route, rest, _ = matched
            if service.host_for(host) is None:
                continue
            # The same invalidation as the request's own: by path, ordered against the
            # start of fetches in flight, for every query, variant, principal and host.
            await engine.invalidate([scopes_for(service.name, rest, ())[2]], route.policy)


def _same_origin_target(location: str, host: str) -> str | None:
    """The path and query a Location-like value names on this gateway (reached by the
    client as ``host``), or None."""
    parts = urlsplit(location.strip())
    if (parts.scheme or parts.netloc) and (
        parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower()
    ):
        return None
    path = parts.path or "/"
    if not path.startswith("/"):
        return None  # a relative reference: resolving it is not worth the ambiguity
    return f"{path}?{parts.query}" if parts.query else path
