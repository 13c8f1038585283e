"""`create_app`: a Gateway turned into an ASGI application.

The proxy path is plain ASGI, in front of FastAPI: a request for a service is checked,
routed, looked up and answered without entering FastAPI's routing and dependency
solving. FastAPI serves only the reserved ``/_cachegw/`` admin endpoints and runs the
lifespan that opens (and closes) the backend and one pooled upstream client per service.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from cachegw import _accesslog
from cachegw._accesslog import access_sink, hit_tail, log_access
from cachegw._admin import admin_router
from cachegw._backends._memory import parse_size
from cachegw._core import SLOW_HEADERS
from cachegw._encoding import accepts_gzip
from cachegw._engine import CacheEngine
from cachegw._entry import Entry
from cachegw._gateway import Gateway, Route, Service
from cachegw._keys import format_tag, hash_parts, principal
from cachegw._models import Fetched, RequestInfo, Served
from cachegw._proxies import front
from cachegw._purge import scopes_for
from cachegw._ranges import ranged
from cachegw._reload import Reloader
from cachegw._runtime import Runtime
from cachegw._server import FastHitServer, response_bytes
from cachegw._store import DECODED_MAX_BYTES
from cachegw._target import (
    MAX_HEADER_BYTES,
    MAX_HEADER_LINE,
    BadTarget,
    check_headers,
    check_target,
    problem,
)
from cachegw._upstream import public_location, request_headers

__all__ = ["app_from_env", "create_app", "memory_budget", "serving_app"]

logger = logging.getLogger("cachegw")


# Request headers that make the upstream answer differently from the full, storable
# response: stripped from forwarded requests on the cached path, evaluated by the cache.
# Range / If-Range too: the upstream is asked for the whole representation, which is what
# the cache stores, and the range is cut from it here (see `_ranges`).
_CONDITIONAL = frozenset({b"if-none-match", b"if-modified-since", b"range", b"if-range"})
_BUFFERED_BODY = 64 * 1024
# Keys, purge scopes and checked paths are memoised per request target, for at most
# _MEMO_SIZE targets of at most _MEMO_PART_MAX bytes each (longer ones are computed every
# time): together at most MEMO_BYTES, whatever the targets clients send.
_MEMO_SIZE = 4096
_MEMO_PART_MAX = 256
# A key's memo under 1 KiB, a path's scopes under 2 KiB, a checked path under 768 bytes.
MEMO_BYTES = _MEMO_SIZE * 3840
#: Bytes counted in the L1 for a fast-path answer besides its own bytes: the memo object
#: and the access-log tail kept with it (for targets and User-Agents of at most
#: _TAIL_MEMO_MAX bytes together).
ANSWER_OVERHEAD = 3072
_TAIL_MEMO_MAX = 1024
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Tells the upstream it may target Surrogate-Control directives at this cache.
_SURROGATE_CAPABILITY = (b"surrogate-capability", b'cachegw="Surrogate/1.0"')


#: Bytes a response streamed through (larger than its route's ``max_body``) holds beyond
#: ``max_body`` (read before it was known to be too large): the upstream client's read
#: buffer and the client connection's write buffer, each paused at its high-water mark.
STREAM_BUFFER = 256 * 1024


def memory_budget(gateway: Gateway) -> list[tuple[str, int]]:
    """What one gateway process may hold, part by part, in bytes (``cachegw check``).

    The memory backend's entries (``max_bytes``), the decoded copies and the answers built
    from them (``l1_max_bytes``), the copies of Redis values kept for decoding, the key and
    scope memos, and the responses streamed through (per upstream connection: ``max_body``
    plus `STREAM_BUFFER`). Not counted: the interpreter and libraries themselves, and each
    client connection's own buffers (a request head of at most 64 KiB, a body read 64 KiB
    at a time).
    """
    parts: list[tuple[str, int]] = []
    if gateway.backend == "memory":
        parts.append(("store", parse_size(gateway.max_bytes, what="max_bytes")))
    if gateway.l1_entries:
        parts.append(("L1", int(gateway.l1_max_bytes)))
    if isinstance(gateway.backend, str) and gateway.backend != "memory":
        parts.append(("Redis values", 2 * DECODED_MAX_BYTES))
    parts.append(("memos", MEMO_BYTES))
    streams = sum(
        service.max_connections
        * (max((r.policy.max_body for r in service.routes), default=0) + STREAM_BUFFER)
        for service in gateway.services
    )
    parts.append(("streams", streams))
    return parts


def create_app(gateway: Gateway | str | Path) -> FastAPI:
    """An ASGI application serving the gateway's services through the cache.

    Usage::

        app = create_app(Gateway.from_toml("gateway.toml"))   # or create_app("gateway.toml")
        # uvicorn.run(app, date_header=False, server_header=False)

    Run it with uvicorn's ``date_header=False``: the gateway passes the upstream's
    ``Date`` through, and a second ``Date`` header breaks HTTP caches downstream.
    """
    if not isinstance(gateway, Gateway):
        gateway = Gateway.from_toml(gateway)
    runtime = Runtime(gateway)
    if gateway.source is not None:
        runtime.reloader = Reloader(runtime, gateway.source)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.open()
        try:
            yield
        finally:
            await runtime.close()

    app = _GatewayApp(
        runtime,
        title="cachegw",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.cachegw = runtime

    app.include_router(admin_router(runtime))
    if runtime.reloader is not None:
        runtime.reloader.on_swap.append(app._proxy.forget)
    return app


def serving_app(
    gateway: Gateway | str | Path, server_overrides: Mapping[str, Any] | None = None
) -> FastAPI:
    """The app ``cachegw serve`` runs: `create_app` plus reloading on ``SIGHUP``.

    ``server_overrides`` are the command line's ``[server]`` values (already applied to
    ``gateway``): a reload applies them to the file it reads as well.
    """
    app = create_app(gateway)
    runtime = app.state.cachegw
    runtime.reload_on_sighup = True
    if runtime.reloader is not None:
        runtime.reloader.server_overrides = dict(server_overrides or {})
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` with several workers: reads ``CACHEGW_CONFIG``
    (and ``CACHEGW_SERVER_LIMITS``, the command line's overrides of ``[server]``)."""
    gateway = Gateway.from_toml(os.environ["CACHEGW_CONFIG"])
    overrides = json.loads(os.environ.get("CACHEGW_SERVER_LIMITS") or "{}")
    if overrides:
        gateway.server = dataclasses.replace(gateway.server, **overrides)
    if os.environ.get("CACHEGW_SUPERVISOR"):
        # Until the lifespan installs the reload handler, a SIGHUP fanned out by the
        # supervisor must not end this worker (its default action).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        return serving_app(gateway, overrides)
    return create_app(gateway)


class _GatewayApp(FastAPI, FastHitServer):
    """FastAPI for the lifespan and the admin endpoints; proxy traffic goes first.

    A request for a service is answered before FastAPI's middleware stack and routing:
    a cache hit costs the checks, the key and the lookup, not a framework's dispatch.
    Served by cachegw's own uvicorn protocol (`cachegw._server`), plain hits do not even
    become an ASGI request: the protocol calls `fast_hit`.
    """

    def __init__(self, runtime: Runtime, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._proxy = _Proxy(runtime)
        # Enforced on client connections by cachegw's own uvicorn protocol (cachegw._server).
        self.server_limits = runtime.gateway.server

    def fast_hit(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        scheme: str,
    ) -> bytes | None:
        return _fast_hit(self._proxy, method, target, headers, client, scheme)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/_cachegw/"):
            await self._proxy(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


class _Proxy:
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
        started = time.perf_counter()
        trace = _Trace()
        # A safe request whose client leaves is let go (nginx's proxy_ignore_client_abort
        # off): its task is cancelled, which aborts its upstream request and frees the
        # pool's connection, unless other requests wait for the same fetch (`_engine`).
        # Unsafe methods run to their end: the upstream may have acted on them, and their
        # invalidations must happen.
        connection = scope.get("extensions", {}).get("cachegw.connection")
        abandon = None
        if connection is not None and scope["method"] in ("GET", "HEAD"):
            abandon = connection.abandon = _Abandon()
            if connection.gone:
                abandon()  # it left before its request began: cancelled at the first await
        try:
            try:
                served = await self._handle(scope, receive, trace)
            except _BodyEnded as ended:
                served = ended.served()
            except Exception:
                # A bug of ours: never a traceback to the client, always a log line.
                logger.exception("cachegw: error serving %s %s", scope["method"], scope["path"])
                served = _refusal(500, "Internal Server Error", "The gateway failed; see its log.")
            sent = await _send_served(send, served, scope)
        except asyncio.CancelledError:
            if abandon is None or not abandon.ours():
                raise  # not (only) ours: shutting down
            served, sent = _refusal(499, "Client Closed Request", "The client left."), 0
            engine = self.runtime.engine
            if engine is not None:
                engine.stats["abandoned"] += 1
        finally:
            if connection is not None and connection.abandon is abandon:
                connection.abandon = None
        self.runtime.metrics.request(
            trace.service, trace.route, served.cache_status, time.perf_counter() - started
        )
        log_access(
            scope,
            status=served.status,
            bytes_sent=sent,
            duration=time.perf_counter() - started,
            service=trace.service,
            route=trace.route,
            cache_status=served.cache_status,
            upstream=trace.upstream,
            key=trace.key,
        )

    async def _handle(self, scope: Scope, receive: Receive, trace: _Trace) -> Served:
        try:
            length = check_headers(scope)  # of the body: None when chunked
            raw_path = scope.get("raw_path")
            target = scope.get("extensions", {}).get("cachegw.request_target")
            if raw_path is None or (target is not None and not target.startswith(b"/")):
                path = check_target(scope)  # refuses an absolute-form target
            else:
                path = self.path(raw_path)
        except BadTarget as bad:
            return _refusal(bad.status, _TITLES.get(bad.status, "Bad Request"), bad.detail)
        matched = self.runtime.gateway.match(path)
        if matched is None:
            return _refusal(404, "Not Found", f"no route is declared for {path}")
        service, route, rest, params = matched
        trace.service, trace.route = service.name, route.path
        policy = route.policy
        method: str = scope["method"]
        if policy.methods is not None and method not in policy.methods:
            refused = _refusal(405, "Method Not Allowed", f"{method} is not allowed on {path}")
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
            return _refusal(400, "Bad Request", "The Host header names no host of this service.")
        engine = self.runtime.engine
        # Taken with the route, no await in between: a reload swaps both at once, and
        # this request finishes with the ones it started with.
        upstream = self.runtime.upstreams.get(service.name)
        if engine is None or upstream is None:
            return _refusal(503, "Service Unavailable", "the gateway is starting")

        raw_query: bytes = scope.get("query_string", b"")
        scheme = seen.scheme
        # A GET with a body must not meet shared entries: the body is not in the key (fat
        # GET poisoning). A Range request is served from the whole representation.
        has_body = length != 0
        cacheable = not (method in ("GET", "HEAD") and has_body)
        # A GET of a route that keeps nothing (ttl = 0) is forwarded as it came, without
        # the cache's work: no lookup, lock or write, the client's own Accept-Encoding,
        # conditionals and Range for the upstream to answer (issue 26).
        passes = cacheable and method in ("GET", "HEAD") and policy.stores_nothing
        cacheable = cacheable and not passes
        headers: dict[str, str] = {}
        if cacheable and method in ("GET", "HEAD"):
            # What the cache reads of the request: a forwarded GET, an unsafe method (it
            # only invalidates) and a GET with a body (bypassed) need none of it.
            for raw_name, raw_value in scope["headers"]:
                name = raw_name.decode("latin-1")
                value = raw_value.decode("latin-1")
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
        metrics = self.runtime.metrics
        negotiate = cacheable and engine.compress_min is not None
        identity = cacheable and method == "GET" and "range" in headers
        if identity:
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

        ended: list[_BodyEnded] = []

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    # The body ended early (client gone, framing error, body timeout):
                    # raising, not returning, makes the upstream request fail unfinished
                    # instead of going out as complete with what had arrived.
                    ended.append(_BodyEnded(scope))
                    raise ended[-1]
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return

        # A small body of known length is read first, so an idempotent request can be
        # sent again if a pooled upstream connection turns out to be closing.
        content: bytes | None = None
        if length is not None and 0 < length <= _BUFFERED_BODY:
            content = b"".join([chunk async for chunk in body()])

        # A HEAD that may be answered from the cache is fetched as a GET: coalesced with
        # the key's other requests and stored (nginx's proxy_cache_convert_head; Varnish's
        # builtin VCL). The client gets the headers; the body is not sent (uvicorn).
        upstream_method = "GET" if method == "HEAD" and cacheable else method

        async def fetch(validators: Sequence[tuple[bytes, bytes]] = ()) -> Fetched:
            # Built here, not up front: a cache hit never needs them.
            forward = request_headers(
                scope,
                client_ip=seen.forwarded_for,
                proto=scheme,
                host=host or None,
                allow=service.allow,
            )
            if cacheable and method in ("GET", "HEAD"):
                forward = [(n, v) for n, v in forward if n not in _CONDITIONAL]
                if negotiate or identity:
                    # The upstream gets the Accept-Encoding the cache negotiates with:
                    # gzip or nothing, so what it sends suits every client of the variant.
                    forward = [(n, v) for n, v in forward if n != b"accept-encoding"]
                    if "accept-encoding" in headers:
                        forward.append((b"accept-encoding", headers["accept-encoding"].encode()))
            forward.append(_SURROGATE_CAPABILITY)
            forward.extend(validators)
            began = time.perf_counter()
            fetched = await upstream.fetch(
                upstream_method,
                rest,
                raw_query,
                forward,
                content if content is not None else body() if has_body else None,
                max_body=policy.max_body,
            )
            took = time.perf_counter() - began
            trace.upstream = took
            if ended:
                raise ended[-1]  # not the upstream's failure
            if service.rewrite_redirects:
                _rewrite_locations(fetched, service)
            error = fetched.error or ("status_5xx" if fetched.status >= 500 else None)
            metrics.upstream(service.name, took, error)
            return fetched

        key_extra: str | None = ""
        if cacheable and policy.key is not None:
            key_extra = await principal(policy.key, Request(scope))
            cacheable = key_extra is not None
        if passes:
            return engine.passed(await fetch())
        if not cacheable:
            upstream_method = method
            return engine.bypass(await fetch())
        trace.key = self._key(service, rest, raw_query, key_extra or "", scheme, host)
        scopes = self._scopes(service, route, rest, params)
        info = RequestInfo(
            method=method,
            key=trace.key,
            headers=headers,
            per_principal=policy.key is not None,
            scopes=scopes,
            target=scopes[2],  # the path: every query string, variant and principal
            service=service.name,
            head_as_get=True,
            credentials=service.credentials,
        )
        served = await engine.serve(info, policy, fetch)
        if method == "GET" and "range" in headers and served.stream is None:
            cut = ranged(headers, served.status, served.headers, served.body)
            if cut is not None:
                served = Served(*cut, cache_status=served.cache_status)
        if method not in _SAFE_METHODS and 200 <= served.status < 400:
            await self._invalidate_locations(served, seen.host or "", engine)
        return served

    def _key(
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


_NO_HEADERS: dict[str, str] = {}
_GZIP_ACCEPTED = {"accept-encoding": "gzip"}


def _fast_hit(
    proxy: _Proxy,
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    client: Any,
    scheme: str,
) -> bytes | None:
    """A plain GET/HEAD answered from an entry already decoded in the process, as the bytes
    of a whole HTTP/1.1 response; None leaves the request to the ordinary path.

    It applies the same rules as the ordinary path for what it accepts, and accepts only
    what needs no I/O: fresh, not purged, no Vary marker, no key function, no request
    header that changes the answer.
    """
    began = time.perf_counter()
    runtime = proxy.runtime
    engine = runtime.engine
    if engine is None or method not in (b"GET", b"HEAD") or engine.purges.due():
        return None
    hosts = 0
    size = 0
    host = b""
    accept_encoding: bytes | None = None
    user_agent: bytes | None = None
    for name, value in headers:
        if name in SLOW_HEADERS:
            return None
        if name == b"host":
            hosts += 1
            host = value
        elif name == b"accept-encoding":
            if accept_encoding is not None:
                return None  # several lines: the ordinary path joins them
            accept_encoding = value
        elif name == b"user-agent" and user_agent is None:
            user_agent = value  # the first, as the ordinary path logs it
        size += len(name) + len(value)
    if hosts != 1 or size > MAX_HEADER_BYTES:
        return None  # the ordinary path refuses it (431) or joins several Host lines
    if size > MAX_HEADER_LINE and any(
        len(name) + len(value) > MAX_HEADER_LINE for name, value in headers
    ):
        # One line over its limit: a 431 on the ordinary path (looked for only when the
        # total could hold one, so a plain hit pays nothing for it).
        return None
    raw_path, _, query = target.partition(b"?")
    try:
        path = proxy.path(raw_path)
    except BadTarget:
        return None
    if b"#" in query:
        return None
    matched = runtime.gateway.match(path)
    if matched is None:
        return None
    service, route, rest, _ = matched
    if service.slow_credentials and any(n in service.slow_credentials for n, _ in headers):
        return None  # a credential header of this service's own list
    policy = route.policy
    verb = "GET" if method == b"GET" else "HEAD"
    if (policy.methods is not None and verb not in policy.methods) or policy.key is not None:
        return None
    if policy.early_refresh or policy.stores_nothing:
        # A hit may start a refresh: a task the ordinary path runs. A route that keeps
        # nothing has no hits: forwarded by the ordinary path.
        return None
    host_text: str | None = host.decode("latin-1")
    trusted = runtime.gateway.trusted
    if trusted and client and trusted.trusts(client[0]):
        # The same reading of a trusted front proxy's headers as the ordinary path's.
        seen = front(client[0], scheme, headers, trusted)
        scheme, host_text = seen.scheme, seen.host
    named = service.host_for(host_text) if service.hosts is not None else ""
    if named is None:
        return None  # refused on the ordinary path
    key = proxy._key(service, rest, query, "", scheme, named)
    entry = engine.store.peek(key)
    if not isinstance(entry, Entry):
        return None  # not decoded in this process, or a Vary marker: the ordinary path
    now = engine.clock()
    # The ordinary path's decision for a request without directives, credentials or body:
    # only a plain fresh hit is answered here.
    decision = engine.plain_hit(entry, verb, policy, now)
    if decision is None:
        return None
    left = decision.left
    # The answer depends on the entry, the method and, through Age and Cache-Status, on
    # two whole numbers of seconds: the bytes are built once for those.
    seconds = (int(entry.age(now)), int(left))
    # An entry stored compressed is answered gzip or identity by the client's
    # Accept-Encoding (see `_encoding`): one memo per form.
    gz = bool(entry.coding) and accepts_gzip(
        accept_encoding.decode("latin-1") if accept_encoding is not None else None
    )
    answers = entry.answers
    memo = answers.get((verb, gz)) if answers is not None else None
    if memo is None or memo.seconds != seconds:
        served = engine.render(
            entry,
            RequestInfo(method=verb, key=key, headers=_GZIP_ACCEPTED if gz else _NO_HEADERS),
            now,
            "HIT",
            f"hit; ttl={seconds[1]}",
        )
        built = response_bytes(served.status, served.headers, served.body)
        if built is None:
            return None
        cost = len(built) + ANSWER_OVERHEAD
        # Kept on the entry while it is in the L1, counted against the L1's bytes (an
        # identity answer of an entry stored compressed can be far larger than it).
        fresh = _Answer(seconds, built, served.status, len(served.body), cost)
        if engine.store.l1.charge(key, cost - (memo.cost if memo is not None else 0)):
            answers = entry.answers
            if answers is None:
                answers = entry.answers = {}
            answers[verb, gz] = fresh
        memo = fresh
    engine.stats["HIT"] += 1  # rendered once per second for a key: counted per answer here
    runtime.metrics.request(service.name, route.path, "HIT", time.perf_counter() - began)
    sink = _accesslog.hot_sink or access_sink()  # no call while a buffered handler takes lines
    if sink is not None:
        # The line after its time is the same from one hit of a client to the next: kept
        # with the answer for the last client (address, request target, User-Agent).
        ip = client[0] if client else None
        if memo.ip != ip or memo.target != target or memo.agent != user_agent:
            tail = hit_tail(
                verb,
                raw_path,
                query,
                user_agent or b"",
                client,
                status=memo.status,
                bytes_sent=memo.sent,
                service=service.name,
                route=route.path,
                key=key,
            )
            if len(target) + len(user_agent or b"") > _TAIL_MEMO_MAX:
                # Not kept: a long target or User-Agent would make the answer's memo
                # larger than ANSWER_OVERHEAD counts for it.
                sink.write_tail(tail, now)
                return memo.answer
            memo.tail = tail
            memo.ip, memo.target, memo.agent = ip, target, user_agent
        sink.write_tail(memo.tail, now)  # the hit's time (the engine's clock)
    return memo.answer


class _Answer:
    """A fast-path answer kept for its key, method and encoding (see `_fast_hit`), and the
    access line's tail for the last client that got it."""

    __slots__ = (
        "agent",
        "answer",
        "cost",
        "ip",
        "seconds",
        "sent",
        "status",
        "tail",
        "target",
    )

    def __init__(
        self, seconds: tuple[int, int], answer: bytes, status: int, sent: int, cost: int
    ) -> None:
        self.seconds = seconds
        self.answer = answer
        self.status = status
        self.sent = sent
        self.cost = cost  # the bytes counted for it in the L1
        self.ip: object = _NOBODY
        self.target = b""
        self.agent: bytes | None = None
        self.tail = b""


_NOBODY = object()


async def _discard_stream(served: Served) -> None:
    aclose = getattr(served.stream, "aclose", None)
    if aclose is not None:
        await aclose()


class _Abandon:
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


class _Trace:
    """What one request's metrics and access-log line need to know."""

    __slots__ = ("key", "route", "service", "upstream")

    def __init__(self) -> None:
        self.service = ""
        self.route = ""
        self.upstream: float | None = None
        self.key: str | None = None


class _BodyEnded(Exception):
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
            return _refusal(408, "Request Timeout", "The request body took too long.")
        if self.reason == "framing":
            return _refusal(400, "Bad Request", "The request body is not validly framed.")
        return _refusal(499, "Client Closed Request", "The client left before its body ended.")


def _refusal(status: int, title: str, detail: str) -> Served:
    status, headers, body = problem(status, title, detail)
    return Served(status, headers, body, cache_status="ERROR")


_TITLES = {400: "Bad Request", 404: "Not Found", 431: "Request Header Fields Too Large"}


async def _send_served(send: Send, served: Served, scope: Scope) -> int:
    """Send ``served``; the number of body bytes sent."""
    try:
        await send(
            {"type": "http.response.start", "status": served.status, "headers": served.headers}
        )
    except RuntimeError:
        # uvicorn refuses a header it cannot write (a control byte in a value); such a
        # response is never stored (cachegw._upstream), but one stored by an older
        # version may be: a 502, not a dropped connection.
        await _discard_stream(served)
        served = _refusal(502, "Bad Gateway", "The stored response has an invalid header.")
        await send(
            {"type": "http.response.start", "status": served.status, "headers": served.headers}
        )
    stream = served.stream
    if scope["method"] == "HEAD":
        # A HEAD fetched as a GET: its body is not sent, and a stream (too large to
        # store) is not read on.
        await _discard_stream(served)
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
