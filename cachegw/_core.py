"""The caching decisions, as pure functions (no I/O, no clock, no randomness of their own).

* `decide`: given what is stored for a request, the request's directives, the purge
  verdict, the policy and the time → serve fresh / serve stale (and why) / fetch
  (revalidating a stale entry or not, coalesced or not) / answer 504. Both hit paths ask
  it: the engine (`cachegw._engine`) and the protocol-level fast path (`cachegw._fasthit`), so
  the fresh-hit rule exists once.
* `build_entry`, `merge_not_modified`: what is stored after a fetch (in `cachegw._storing`,
  re-exported here).

The engine is the I/O loop around them: lookups, fetches, locks, writes, counters.
tests/test_core.py holds the RFC 9111 rules as tables of cases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from cachegw._encoding import upstream_etag, valid_etag
from cachegw._entry import Entry, Headers, HitForMiss, Item
from cachegw._models import API_KEY_HEADERS
from cachegw._policy import (
    CacheControl,
    CachePolicy,
    parse_cache_control,
    split_header_list,
)

# Re-exported: the engine asks this module for the rules before and after a fetch.
from cachegw._storing import UNSTORED, Storing, build_entry, merge_not_modified

if TYPE_CHECKING:
    from cachegw._purge import Verdict

__all__ = [
    "NO_DIRECTIVES",
    "SLOW_HEADERS",
    "UNSTORED",
    "Decision",
    "Directives",
    "Storing",
    "build_entry",
    "decide",
    "directives",
    "merge_not_modified",
    "stale_if_error_ok",
    "validators",
    "vary_names",
]

#: Request headers whose presence leaves a request to the ordinary path, on both fast
#: paths (the gateway's protocol-level one and `CachedHits`): credentials (a shared entry
#: may not answer them), cache directives, conditionals, ranges and bodies all need rules
#: only the ordinary path applies.
SLOW_HEADERS = frozenset(
    {
        b"authorization",
        b"cookie",
        *(name.encode("ascii") for name in API_KEY_HEADERS),
        b"cache-control",
        b"pragma",
        b"if-none-match",
        b"if-modified-since",
        b"if-match",
        b"if-unmodified-since",
        b"if-range",
        b"range",
        b"content-length",
        b"transfer-encoding",
        b"expect",
        b"upgrade",
    }
)


StaleReason = Literal["stale-while-revalidate", "stale-if-error", "max-stale"]


# -- the request's side ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Directives:
    """What the request asks of the cache (RFC 9111 §5.2.1)."""

    cc: CacheControl
    #: ``no-cache``, ``max-age=0`` or (without Cache-Control) ``Pragma: no-cache``: an
    #: answer checked with the origin (RFC 9111 §5.2.1.4, §5.4).
    bypass_read: bool = False


NO_DIRECTIVES = Directives(CacheControl({}))


def directives(headers: Mapping[str, str], policy: CachePolicy) -> Directives:
    """The request's directives, or none when the route ignores them."""
    if policy.ignore_request_cache_control:
        return NO_DIRECTIVES
    value = headers.get("cache-control")
    cc = parse_cache_control((value,)) if value else CacheControl({})
    bypass_read = (
        "no-cache" in cc
        or cc.seconds("max-age") == 0
        or (not cc and "no-cache" in headers.get("pragma", "").lower())
    )
    return Directives(cc, bypass_read) if cc or bypass_read else NO_DIRECTIVES


# -- the reuse decision ---------------------------------------------------------------------

Action = Literal["fresh", "stale", "fetch", "unavailable"]


@dataclass(slots=True)  # not frozen: built on every hit, and frozen costs ~4x to build
class Decision:
    """What to do with a ``GET``/``HEAD``.

    * ``fresh``: serve ``entry`` (``HIT``); ``refresh``: also refresh it in the background
      (early refresh).
    * ``stale``: serve ``entry`` stale (``STALE``) for ``reason``; ``refresh`` under
      stale-while-revalidate.
    * ``fetch``: ask upstream, with ``entry``'s validators when there is one (it is then
      stale, or not good enough for the request); ``coalesce``: share one upstream
      request per key with concurrent requests (in process and across the fleet).
    * ``unavailable``: ``only-if-cached`` and nothing usable: ``504`` (RFC 9111 §5.2.1.7).

    ``left`` is the entry's freshness left in seconds (negative: stale for that long).
    """

    action: Action
    entry: Entry | None = None
    left: float = 0.0
    reason: StaleReason | None = None
    refresh: bool = False
    coalesce: bool = True


def decide(
    found: Entry | None,
    *,
    method: str,
    directives: Directives,
    shared_only: bool,
    verdict: Verdict,
    policy: CachePolicy,
    now: float,
    primary: Item | None = None,
    draw: float = 0.0,
) -> Decision:
    """The reuse decision for a ``GET``/``HEAD`` (RFC 9111 §4).

    ``found``: the entry stored for the request (Vary resolved); ``primary``: what the
    primary key holds (a `HitForMiss` marker turns coalescing off). ``shared_only``: the
    request carries credentials and the route is not keyed per principal, so only entries
    marked shareable answer it (RFC 9111 §3.5). ``verdict``: the purge verdict on
    ``found`` (`cachegw._purge`). ``draw``: a uniform number in [0, 1) for early refresh.
    """
    cc = directives.cc
    if found is not None and shared_only and not found.shared_auth:
        found = None
    if found is not None and verdict is not None and verdict[0] == "hard":
        found = None
    stale: Entry | None = None
    left = 0.0
    if found is not None and directives.bypass_read:
        # The client wants an answer checked with the origin: revalidate if we can.
        stale = found if validators(found) else None
    elif found is not None:
        left = found.ttl_left(now)
        if verdict is not None:  # soft-purged: stale since the purge
            left = min(left, verdict[1] - now)
        if fresh_enough(found, left, cc):
            refresh = bool(policy.early_refresh) and refresh_early(
                found, left, policy.early_refresh, draw
            )
            return Decision("fresh", found, left, refresh=refresh)
        stale = found
        if -left <= found.stale_while_revalidate and "max-age" not in cc and "min-fresh" not in cc:
            return Decision("stale", found, left, "stale-while-revalidate", refresh=True)
        if "only-if-cached" not in cc and max_stale_ok(found, left, cc):
            return Decision("stale", found, left, "max-stale")
    if "only-if-cached" in cc:
        return Decision("unavailable", left=left)
    # Not coalesced: a HEAD (unless the engine fetches it as a GET, which it then passes
    # as ``method``) has no body to store, a request with credentials may get a
    # private answer, and the last response for this key could not be stored
    # (hit-for-miss). A client asking for an answer checked with the origin is
    # coalesced: a response obtained after it arrived satisfies it (RFC 9111 §4; issue 10).
    coalesce = not (method == "HEAD" or shared_only or isinstance(primary, HitForMiss))
    return Decision("fetch", stale, left, coalesce=coalesce)


def fresh_enough(entry: Entry, left: float, cc: CacheControl) -> bool:
    """RFC 9111 §4.2 with the request's ``max-age`` / ``min-fresh`` constraints."""
    if left <= 0:
        return False
    if cc:
        max_age = cc.seconds("max-age")
        if max_age is not None and entry.lifetime - left > max_age:
            return False
        min_fresh = cc.seconds("min-fresh")
        if min_fresh is not None and left < min_fresh:
            return False
    return True


def max_stale_ok(entry: Entry, left: float, cc: CacheControl) -> bool:
    """A request's ``max-stale`` lets it take a stale entry (RFC 9111 §5.2.1.2)."""
    if entry.must_revalidate or "max-stale" not in cc:
        return False
    limit = cc.seconds("max-stale")
    return limit is None or -left <= limit


def stale_if_error_ok(entry: Entry, now: float) -> bool:
    """The entry may stand in for a failed fetch (RFC 5861 §4)."""
    return not entry.must_revalidate and -entry.ttl_left(now) <= entry.stale_if_error


def refresh_early(entry: Entry, left: float, beta: float, draw: float) -> bool:
    """XFetch (Vattani, Chierichetti, Lowenstein, VLDB 2015): refresh when
    ``now - delta * beta * ln(u) >= expiry``, i.e. ``-delta * beta * ln(u) >= left``,
    with ``u = 1 - draw`` uniform in (0, 1]."""
    delta = entry.fetch_time or 0.001
    return -delta * beta * math.log(1.0 - draw) >= left


def validators(entry: Entry | None) -> Headers:
    """Conditional request headers that revalidate ``entry`` with its origin.

    Only the upstream's own validators: an ETag cachegw made up, or the suffixed ETag of
    a form it compressed itself, means nothing there.
    """
    if entry is None:
        return []
    out: Headers = []
    for name, value in entry.headers:
        if name == b"etag" and entry.etag is None and valid_etag(value):
            # The upstream's ETag, not the one of the form the gateway made (issue 25).
            out.append((b"if-none-match", upstream_etag(entry.coding, value)))
        elif name == b"last-modified":
            out.append((b"if-modified-since", value))
    return out


def vary_names(entry: Entry) -> list[str]:
    """The request headers the entry varies on (lower-case, sorted)."""
    names: set[str] = set()
    for name, value in entry.headers:
        if name == b"vary":
            names.update(v.lower() for v in split_header_list(value.decode("latin-1")))
    return sorted(names)
