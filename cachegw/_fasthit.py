"""The gateway's protocol-level hit path: a plain GET/HEAD answered from an entry already
decoded in the process, as the bytes of a whole HTTP/1.1 response, without an ASGI
cycle (`fast_hit`, called by cachegw's uvicorn protocol through the app's
``FastHitServer.fast_hit``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from cachegw import _accesslog
from cachegw._accesslog import access_sink, hit_tail
from cachegw._core import SLOW_HEADERS
from cachegw._encoding import accepts_gzip
from cachegw._entry import Entry
from cachegw._models import RequestInfo
from cachegw._proxies import front
from cachegw._server import response_bytes
from cachegw._target import MAX_HEADER_BYTES, MAX_HEADER_LINE, BadTarget

if TYPE_CHECKING:
    from cachegw._engine import CacheEngine
    from cachegw._proxy import Proxy
    from cachegw._service import Route, Service

__all__ = ["ANSWER_OVERHEAD", "Answer", "fast_hit"]

#: Bytes counted in the L1 for a fast-path answer besides its own bytes: the memo object
#: and the access-log tail kept with it (for targets and User-Agents of at most
#: _TAIL_MEMO_MAX bytes together).
ANSWER_OVERHEAD = 3072
_TAIL_MEMO_MAX = 1024
_NO_HEADERS: dict[str, str] = {}
_GZIP_ACCEPTED = {"accept-encoding": "gzip"}


def fast_hit(
    proxy: Proxy,
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
    found = _keyed(proxy, method, target, headers, client, scheme)
    if found is None:
        return None
    key, service, route, accept_encoding, user_agent = found
    entry = engine.store.peek(key)
    if not isinstance(entry, Entry):
        return None  # not decoded in this process, or a Vary marker: the ordinary path
    now = engine.clock()
    verb = "GET" if method == b"GET" else "HEAD"
    # The ordinary path's decision for a request without directives, credentials or body:
    # only a plain fresh hit is answered here.
    decision = engine.plain_hit(entry, verb, route.policy, now)
    if decision is None:
        return None
    # The answer depends on the entry, the method and, through Age and Cache-Status, on
    # two whole numbers of seconds: the bytes are built once for those.
    seconds = (int(entry.age(now)), int(decision.left))
    # An entry stored compressed is answered gzip or identity by the client's
    # Accept-Encoding (see `_encoding`): one memo per form.
    gz = bool(entry.coding) and accepts_gzip(
        accept_encoding.decode("latin-1") if accept_encoding is not None else None
    )
    answers = entry.answers
    memo: Answer | None = answers.get((verb, gz)) if answers is not None else None
    if memo is None or memo.seconds != seconds:
        memo = _build(engine, entry, key, verb, gz, seconds, memo, now)
        if memo is None:
            return None
    engine.stats["HIT"] += 1  # rendered once per second for a key: counted per answer here
    runtime.metrics.request(service.name, route.path, "HIT", time.perf_counter() - began)
    sink = _accesslog.hot_sink or access_sink()  # no call while a buffered handler takes lines
    if sink is not None:
        # The line after its time is the same from one hit of a client to the next: kept
        # with the answer for the last client (address, request target, User-Agent).
        ip = client[0] if client else None
        tail = memo.tail
        if memo.ip != ip or memo.target != target or memo.agent != user_agent:
            tail = _tail(memo, verb, target, user_agent, client, service.name, route.path, key)
        sink.write_tail(tail, now)  # the hit's time (the engine's clock)
    return memo.answer


def _keyed(
    proxy: Proxy,
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    client: Any,
    scheme: str,
) -> tuple[str, Service, Route, bytes | None, bytes | None] | None:
    """The key, service and route of a request the fast path may answer, with its
    Accept-Encoding and User-Agent; None for one the ordinary path must see (a header
    that changes the answer, one it refuses or joins, a route whose hits it serves)."""
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
    if size > MAX_HEADER_LINE and _long_line(headers):
        return None
    raw_path, _, query = target.partition(b"?")
    try:
        path = proxy.path(raw_path)
    except BadTarget:
        return None
    matched = proxy.runtime.gateway.match(path) if b"#" not in query else None
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
    trusted = proxy.runtime.gateway.trusted
    if trusted and client and trusted.trusts(client[0]):
        # The same reading of a trusted front proxy's headers as the ordinary path's.
        seen = front(client[0], scheme, headers, trusted)
        scheme, host_text = seen.scheme, seen.host
    named = service.host_for(host_text) if service.hosts is not None else ""
    if named is None:
        return None  # refused on the ordinary path
    key = proxy.key(service, rest, query, "", scheme, named)
    return key, service, route, accept_encoding, user_agent


def _long_line(headers: list[tuple[bytes, bytes]]) -> bool:
    """One line over its limit: a 431 on the ordinary path (looked for only when the
    total could hold one, so a plain hit pays nothing for it)."""
    return any(len(name) + len(value) > MAX_HEADER_LINE for name, value in headers)


def _build(
    engine: CacheEngine,
    entry: Entry,
    key: str,
    verb: str,
    gz: bool,
    seconds: tuple[int, int],
    memo: Answer | None,
    now: float,
) -> Answer | None:
    """The answer to a plain fresh hit of ``entry`` for these ``seconds`` of Age and ttl,
    kept on the entry (in place of ``memo``) while it is in the L1; None when it cannot
    be written as bytes (the ordinary path decides)."""
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
    fresh = Answer(seconds, built, served.status, len(served.body), cost)
    if engine.store.l1.charge(key, cost - (memo.cost if memo is not None else 0)):
        answers = entry.answers
        if answers is None:
            answers = entry.answers = {}
        answers[verb, gz] = fresh
    return fresh


def _tail(
    memo: Answer,
    verb: str,
    target: bytes,
    user_agent: bytes | None,
    client: Any,
    service: str,
    route: str,
    key: str,
) -> bytes:
    """The access line after its time, kept with the answer for this client when short."""
    ip = client[0] if client else None
    raw_path, _, query = target.partition(b"?")
    tail = hit_tail(
        verb,
        raw_path,
        query,
        user_agent or b"",
        client,
        status=memo.status,
        bytes_sent=memo.sent,
        service=service,
        route=route,
        key=key,
    )
    if len(target) + len(user_agent or b"") <= _TAIL_MEMO_MAX:
        # Not kept otherwise: a long target or User-Agent would make the answer's memo
        # larger than ANSWER_OVERHEAD counts for it.
        memo.tail = tail
        memo.ip, memo.target, memo.agent = ip, target, user_agent
    return tail


class Answer:
    """A fast-path answer kept for its key, method and encoding (see `fast_hit`), and the
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
