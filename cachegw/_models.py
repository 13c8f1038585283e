"""The request and response values passed between the faces, the engine and the upstream.

Plain data, no behaviour: `RequestInfo` (what the engine needs of a request), `Fetched`
(a response from a handler or an upstream), `Served` (what goes to the client) and the
`Fetch` callable that produces a `Fetched`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cachegw._entry import Headers, Item

__all__ = ["API_KEY_HEADERS", "CREDENTIAL_HEADERS", "Fetch", "Fetched", "RequestInfo", "Served"]

#: The common API-key headers, treated like ``Authorization`` by default (a request that
#: carries one does not meet shared entries): the gateway's ``credential_headers`` default.
API_KEY_HEADERS = ("x-api-key", "api-key", "x-auth-token", "x-access-token")
#: Request headers that carry a caller's credentials, by default.
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", *API_KEY_HEADERS})


@dataclass(slots=True)
class RequestInfo:
    """What the engine needs to know of a request."""

    method: str
    key: str  # primary key: method-independent (HEAD uses GET's entries)
    headers: Mapping[str, str]  # lower-case names, repeated fields joined with ", "
    per_principal: bool = False  # the key includes the caller's identity
    scopes: list[str] = field(default_factory=list)  # purge scopes: see _purge.scopes_for
    # The scope an unsafe request invalidates, among ``scopes``: its path (every query,
    # variant and principal). Empty: the key alone (``key:<key>``).
    target: str = ""
    service: str = ""  # for metrics
    started: float = 0.0  # when the engine began serving it (wall clock)
    # When its upstream request started (wall clock; 0: not yet): what invalidations are
    # compared with. Later than ``started`` after a wait for another fetch.
    fetch_started: float = 0.0
    # The client asked for an answer checked with the origin (no-cache, max-age=0): an
    # entry stored before it arrived does not do.
    forced: bool = False
    primary: Item | None = None  # what the primary key held when it was looked up
    # A HEAD is fetched as a GET (the fetch asks the upstream for the whole response):
    # coalesced with other GETs and HEADs, stored, and answered without the body (nginx's
    # proxy_cache_convert_head). Otherwise a HEAD is forwarded alone and not stored.
    head_as_get: bool = False
    # When its backend reads must be done (event-loop time), if a budget was started
    # before the engine saw it (cachegw.CachedHits); else the engine starts one.
    read_deadline: float | None = None
    # Header names that carry credentials for this route (docs/security.md).
    credentials: frozenset[str] = CREDENTIAL_HEADERS

    @property
    def authorized(self) -> bool:
        """The request carries credentials: a shared entry may not answer it."""
        return not self.credentials.isdisjoint(self.headers)

    @property
    def target_scope(self) -> str:
        return self.target or f"key:{self.key}"


@dataclass(slots=True)
class Fetched:
    """A response obtained from the handler or the upstream."""

    status: int
    headers: Headers  # end-to-end headers only, lower-case names
    body: bytes | None  # None when the body is streamed (too large to store)
    stream: AsyncIterator[bytes] | None = None
    failed: bool = False  # the upstream could not be reached or timed out (502/504)
    response_time: float = 0.0  # wall clock when the response arrived
    error: str | None = None  # why it failed: "connect", "timeout" or "protocol"


@dataclass(slots=True)
class Served:
    """What to send to the client."""

    status: int
    headers: Headers
    body: bytes
    stream: AsyncIterator[bytes] | None = None
    cache_status: str = "MISS"


class Fetch(Protocol):
    """Gets the response from the handler or the upstream.

    ``validators`` are conditional request headers (``If-None-Match``,
    ``If-Modified-Since``) for revalidating a stored response; a fetch that cannot send
    them (a route handler) ignores them and returns the full response.
    """

    def __call__(self, validators: Sequence[tuple[bytes, bytes]] = ...) -> Awaitable[Fetched]: ...
