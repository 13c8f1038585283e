"""What the client gets, and how it is counted (no I/O).

`Answers` turns a stored entry into the response (Age, the cache status headers, the form
the client's Accept-Encoding takes, ``304`` for matching validators, no body for
``HEAD``) and a fetched response into the response passed on, and counts each answer.
`CacheEngine` is one (it extends `Answers`): the engine and both protocol-level hit paths
render through its `render` and `hit`, methods of its class (no call more on a hit).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from cachegw._core import StaleReason
from cachegw._encoding import for_client, valid_etag
from cachegw._entry import Entry, Headers
from cachegw._models import Fetched, RequestInfo, Served
from cachegw._policy import parse_http_date, split_header_list

if TYPE_CHECKING:
    from cachegw._metrics import Metrics

__all__ = ["COUNTERS", "Answers", "not_modified", "stored"]

#: The engine's counters (`CacheEngine.stats`).
COUNTERS = (
    "HIT",
    "MISS",
    "STALE",
    "BYPASS",
    "EXPIRED",
    "coalesced",
    "backend_errors",
    "writes_dropped",
    "abandoned",
)
# Headers kept on a 304 built from a stored response (RFC 9110 §15.4.5).
_NOT_MODIFIED_KEEP = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary", b"last-modified"}
)


class Answers:
    """Renders and counts the engine's answers."""

    def __init__(
        self,
        *,
        status_header: bytes,
        cache_name: str,
        unpassed: frozenset[bytes],
        stats: dict[str, int],
        metrics: Metrics | None,
    ) -> None:
        self.status_header = status_header
        self.cache_name = cache_name
        self.unpassed = unpassed  # response headers never passed on
        self.stats = stats
        self.metrics = metrics
        self.passed_headers: dict[tuple[str, str], Headers] = {}

    def cache_headers(self, cache_status: str, detail: str) -> Headers:
        return [
            (self.status_header, cache_status.encode("ascii")),
            (b"cache-status", f"{self.cache_name}; {detail}".encode("latin-1")),
        ]

    def render(
        self, entry: Entry, request: RequestInfo, now: float, cache_status: str, detail: str
    ) -> Served:
        """What the client gets from a stored entry: its headers with Age and the cache
        status headers, the form its Accept-Encoding takes, 304 for matching validators, no
        body for HEAD."""
        extra = self.cache_headers(cache_status, detail)
        age = int(entry.age(now))
        # RFC 9111 §5.1: Age says the response was not generated for this request; a
        # response just fetched carries only the age it arrived with.
        if age or cache_status in ("HIT", "STALE"):
            extra.insert(0, (b"age", str(age).encode("ascii")))
        headers, body = entry.headers, entry.body
        if entry.coding:  # the form this client accepts (see `_encoding`)
            headers, body = for_client(
                entry.coding, headers, body, request.headers.get("accept-encoding")
            )
        if not_modified(entry.status, headers, request.headers):
            kept = [(n, v) for n, v in headers if n in _NOT_MODIFIED_KEEP]
            return Served(304, kept + extra, b"", cache_status=cache_status)
        if request.method == "HEAD":
            body = b""
        return Served(entry.status, headers + extra, body, cache_status=cache_status)

    def passed_on(self, fetched: Fetched, cache_status: str, detail: str) -> Served:
        """A fetched response as it is passed on (not from the cache), uncounted."""
        unpassed = self.unpassed
        headers = [h for h in fetched.headers if h[0] not in unpassed]
        # A few fixed (status, detail) pairs reach here: their headers are built once.
        extra = self.passed_headers.get((cache_status, detail))
        if extra is None:
            extra = self.passed_headers[cache_status, detail] = self.cache_headers(
                cache_status, detail
            )
        headers += extra
        return Served(
            fetched.status, headers, fetched.body or b"", fetched.stream, cache_status=cache_status
        )

    def counted(self, fetched: Fetched, cache_status: str, detail: str) -> Served:
        """`passed_on`, counted under ``cache_status``."""
        self.stats[cache_status] += 1
        return self.passed_on(fetched, cache_status, detail)

    def fetched(
        self,
        entry: Entry | None,
        fetched: Fetched,
        request: RequestInfo,
        now: float,
        status: str,
        detail: str,
    ) -> Served:
        """A fetch's answer, counted: from the entry stored of it (``stored`` said when the
        backend took it), else the response itself."""
        self.stats[status] += 1
        if entry is None:
            return self.passed_on(fetched, status, detail)
        return self.render(entry, request, now, status, detail + stored(entry))

    def hit(self, entry: Entry, request: RequestInfo, now: float, left: float) -> Served:
        """A fresh hit's answer (counted), on every path."""
        self.stats["HIT"] += 1
        return self.render(entry, request, now, "HIT", f"hit; ttl={int(left)}")

    def stale(
        self, entry: Entry, request: RequestInfo, now: float, left: float, reason: StaleReason
    ) -> Served:
        """A stale entry's answer (counted), served for ``reason``."""
        self.stats["STALE"] += 1
        if self.metrics is not None:
            self.metrics.stale(request.service, reason)
        detail = f"hit; ttl={int(left)}"
        if reason == "stale-while-revalidate":
            detail += "; fwd=stale; fwd-status=0"
        return self.render(entry, request, now, "STALE", detail)

    def stale_on_error(self, stale: Entry, request: RequestInfo, now: float, status: int) -> Served:
        """The stale entry instead of an upstream failure (RFC 5861 stale-if-error);
        ``status``: the upstream's (0: the failure was another request's)."""
        self.stats["STALE"] += 1
        if self.metrics is not None:
            self.metrics.stale(request.service, "stale-if-error")
        detail = f"hit; ttl={int(stale.ttl_left(now))}; fwd=stale; fwd-status={status}"
        return self.render(stale, request, now, "STALE", detail)

    def collapsed(self, entry: Entry, request: RequestInfo, now: float) -> Served:
        """The answer of another request's fetch, shared (counted as a coalesced hit)."""
        self.stats["coalesced"] += 1
        self.stats["HIT"] += 1
        if self.metrics is not None:
            self.metrics.coalesced(request.service)
        return self.render(
            entry, request, now, "HIT", f"hit; ttl={int(entry.ttl_left(now))}; collapsed"
        )

    def unavailable(self) -> Served:
        """``only-if-cached`` and nothing usable in cache: 504 (RFC 9111 §5.2.1.7)."""
        headers = [(b"content-length", b"0"), *self.cache_headers("MISS", "fwd=miss")]
        return Served(504, headers, b"", cache_status="MISS")


def stored(entry: Entry) -> str:
    """RFC 9211 ``stored``, only when the backend really took the entry."""
    return "; stored" if entry.stored else ""


def not_modified(status: int, stored: Headers, headers: Mapping[str, str]) -> bool:
    """Whether the request's validators match a stored response with ``status`` and
    ``stored`` headers (RFC 9110 §13.1.2, §13.1.3)."""
    if status != 200:
        return False
    inm = headers.get("if-none-match")
    if inm is not None:
        etag = next((v for n, v in stored if n == b"etag"), None)
        if etag is None or not valid_etag(etag):
            return False  # an unquoted ETag (stored by an older version) is no validator
        if inm.strip() == "*":
            return True
        ours = _weak(etag.decode("latin-1"))
        return any(_weak(tag) == ours for tag in split_header_list(inm))
    ims = headers.get("if-modified-since")
    if ims is not None:
        since = parse_http_date(ims)
        modified = next((v for n, v in stored if n == b"last-modified"), None)
        if modified is None:
            # No Last-Modified: the Date it was generated at stands in (RFC 9111 §4.3.2).
            modified = next((v for n, v in stored if n == b"date"), None)
        stamp = parse_http_date(modified.decode("latin-1")) if modified else None
        return since is not None and stamp is not None and stamp <= since
    return False


def _weak(tag: str) -> str:
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag
