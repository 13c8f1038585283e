"""The caching decisions, as pure functions (no I/O, no clock, no randomness of their own).

* `decide`: given what is stored for a request, the request's directives, the purge
  verdict, the policy and the time → serve fresh / serve stale (and why) / fetch
  (revalidating a stale entry or not, coalesced or not) / answer 504. Both hit paths ask
  it: the engine (`cachegw._engine`) and the protocol-level fast path (`cachegw._app`), so
  the fresh-hit rule exists once.
* `build_entry`: the entry to store for a fetched response, or None (not storable).
* `merge_not_modified`: a stored response updated by a ``304`` (RFC 9111 §4.3.4).

The engine is the I/O loop around them: lookups, fetches, locks, writes, counters.
tests/test_core.py holds the RFC 9111 rules as tables of cases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from cachegw._encoding import encoded, for_storage, upstream_etag, valid_etag, with_vary
from cachegw._encoding import revalidated as recoded
from cachegw._entry import Entry, Headers, HitForMiss, Item, strong_etag
from cachegw._models import API_KEY_HEADERS, Fetched
from cachegw._policy import (
    CacheControl,
    CachePolicy,
    freshness,
    parse_cache_control,
    parse_http_date,
    shareable_for_authorized,
    split_header_list,
    storable_response,
    surrogate_control,
)

if TYPE_CHECKING:
    from cachegw._purge import Verdict

__all__ = [
    "NO_DIRECTIVES",
    "SLOW_HEADERS",
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
#: The name Surrogate-Control directives are targeted at (``max-age=60;cachegw``).
SURROGATE_TARGET = "cachegw"
# Never stored: computed per hit, or belonging to one connection / one caller.
UNSTORED = frozenset({b"age", b"set-cookie", b"x-cache-status", b"cache-status"})
# Headers a 304 does not update: they describe the stored body (RFC 9111 §3.2).
_NOT_UPDATED = frozenset(
    {b"content-length", b"content-encoding", b"content-md5", b"content-range", b"etag"}
)


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


# -- storing --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Scanned:
    """The response headers storing looks at, read in one pass."""

    cc_values: list[str]
    vary: list[str]
    ages: list[str]
    surrogate: list[str]
    upstream_tags: list[str]
    set_cookie: bool = False
    etag_present: bool = False
    bad_etag: bool = False  # an ETag that is no entity-tag (unquoted): treated as absent
    expires: str | None = None
    date: str | None = None
    last_modified: str | None = None


def _scan(headers: Headers) -> _Scanned:
    s = _Scanned([], [], [], [], [])
    for name, value in headers:
        if name == b"surrogate-control":
            s.surrogate.append(value.decode("latin-1"))
        elif name == b"last-modified":
            s.last_modified = value.decode("latin-1")
        elif name == b"surrogate-key":
            s.upstream_tags += value.decode("latin-1").split()
        elif name == b"cache-tag":
            s.upstream_tags += [t.strip() for t in value.decode("latin-1").split(",")]
        elif name == b"cache-control":
            s.cc_values.append(value.decode("latin-1"))
        elif name == b"vary":
            s.vary.extend(split_header_list(value.decode("latin-1")))
        elif name == b"set-cookie":
            s.set_cookie = True
        elif name == b"expires":
            s.expires = value.decode("latin-1")
        elif name == b"date":
            s.date = value.decode("latin-1")
        elif name == b"age":
            s.ages.append(value.decode("latin-1"))
        elif name == b"etag":
            if valid_etag(value):
                s.etag_present = True
            else:
                s.bad_etag = True
    return s


@dataclass(frozen=True, slots=True)
class Storing:
    """What storing a response needs to know of its request and of the cache."""

    authorized: bool
    per_principal: bool
    scopes: list[str]  # its purge scopes
    target_scope: str | None  # added to the tags when not among the scopes
    started: float  # when its upstream request started (wall clock); 0: unknown
    request_cc: CacheControl
    unstored: frozenset[bytes] = UNSTORED  # headers never stored
    compress_min: int | None = None  # bodies this large are stored compressed; None: never


def build_entry(
    fetched: Fetched,
    request: Storing,
    policy: CachePolicy,
    now: float,
    *,
    revalidated: Entry | None = None,
) -> tuple[Entry | None, list[str]]:
    """The entry to store for ``fetched`` (None when the rules forbid it: RFC 9111 §3 and
    the contract's safety rules) and the names of the request headers it varies on (the
    upstream's ``Vary`` and the route's ``vary``).

    ``revalidated``: the entry a 304 just confirmed; its policy-derived settings (tags,
    ETag, sharing, stored coding) carry over.
    """
    if fetched.body is None or fetched.failed or len(fetched.body) > policy.max_body:
        return None, []
    s = _scan(fetched.headers)
    response_cc = parse_cache_control(s.cc_values)
    # Surrogate-Control (W3C Edge Architecture) speaks to caches like this one and,
    # when it says anything to us, replaces Cache-Control for storing and freshness.
    targeted = surrogate_control(s.surrogate, SURROGATE_TARGET)
    if targeted is not None:
        response_cc = targeted
    reason = storable_response(
        method="GET",
        status=fetched.status,
        response_cc=response_cc,
        set_cookie=s.set_cookie,
        vary=s.vary,
        request_cc=request.request_cc,
        authorized=request.authorized,
        per_principal=request.per_principal,
        policy=policy,
        explicit=s.expires is not None or "max-age" in response_cc or "s-maxage" in response_cc,
    )
    if reason is not None:
        return None, []
    response_time = fetched.response_time or now
    fresh = freshness(
        response_cc,
        expires=s.expires,
        date=s.date,
        policy=policy,
        received=response_time,
        last_modified=s.last_modified,
        status=fetched.status,
    )
    lifetime = fresh.lifetime
    age_value = _age(s.ages)
    if age_value is None:
        lifetime = 0.0  # an invalid Age: treat the response as stale (RFC 9111 §5.1)
    # A response with a validator is kept past its freshness (up to max_ttl) so that
    # it can be revalidated with a conditional request instead of fetched again.
    has_validator = s.last_modified is not None or (s.etag_present and fetched.status == 200)
    assert policy.max_ttl is not None
    keep = policy.max_ttl if has_validator else 0.0
    if lifetime + max(fresh.stale_while_revalidate, fresh.stale_if_error, keep) <= 0:
        return None, []
    stored_headers = [(n, v) for n, v in fetched.headers if n not in request.unstored]
    if s.bad_etag:
        stored_headers = [(n, v) for n, v in stored_headers if n != b"etag" or valid_etag(v)]
    etag = None
    if not s.etag_present and fetched.status == 200:
        etag = strong_etag(fetched.body)
        stored_headers.append((b"etag", etag.encode("ascii")))
    if policy.vary:
        missing = [v for v in policy.vary if v not in {x.lower() for x in s.vary}]
        if missing:
            stored_headers.append((b"vary", ", ".join(missing).encode("latin-1")))
    body = fetched.body
    coding = ""
    if revalidated is not None:
        coding = revalidated.coding  # the stored body, as it was stored
        stored_headers = recoded(stored_headers, coding)
    elif request.compress_min is not None:
        stored_headers, body, coding = for_storage(
            fetched.status,
            stored_headers,
            body,
            no_transform="no-transform" in response_cc,
            min_size=request.compress_min,
            max_size=policy.max_body,
        )
    varies = {v.lower() for v in s.vary} | set(policy.vary)
    if not coding and encoded(stored_headers):
        # A coding the gateway cannot undo for a client that did not accept it: the entry
        # is for requests with this one's Accept-Encoding only (issue 25).
        stored_headers = with_vary(stored_headers)
        varies.add("accept-encoding")
    started = request.started
    entry = Entry(
        status=fetched.status,
        headers=stored_headers,
        body=body,
        stored_at=response_time,
        lifetime=lifetime,
        age0=_initial_age(age_value or 0, s.date, response_time),
        stale_while_revalidate=fresh.stale_while_revalidate,
        stale_if_error=fresh.stale_if_error,
        must_revalidate=fresh.must_revalidate,
        shared_auth=request.per_principal or shareable_for_authorized(response_cc),
        etag=etag,
        tags=[*request.scopes, *(f"tag:{t}" for t in s.upstream_tags if t)],
        fetched_at=started,
        keep=keep,
        fetch_time=max(0.0, response_time - started) if started else 0.0,
        coding=coding,
    )
    if request.target_scope is not None:
        entry.tags.append(request.target_scope)
    if revalidated is not None:
        entry.tags = revalidated.tags
        entry.etag = revalidated.etag
        entry.shared_auth = revalidated.shared_auth or entry.shared_auth
    return entry, sorted(varies)


def merge_not_modified(
    stale: Entry, fetched: Fetched, *, unstored: frozenset[bytes] = UNSTORED
) -> Fetched:
    """The stored response updated from a 304 to our conditional request (RFC 9111 §4.3.4):
    the 304's headers replace the stored ones of the same name, except those that describe
    the stored body. Storing it again computes freshness from the merged headers."""
    skip = _NOT_UPDATED | {n for n, _ in fetched.headers if n in UNSTORED}
    replaced = {n for n, _ in fetched.headers if n not in skip}
    headers = [(n, v) for n, v in stale.headers if n not in replaced]
    headers += [(n, v) for n, v in fetched.headers if n not in skip and n not in unstored]
    return Fetched(stale.status, headers, stale.body, response_time=fetched.response_time)


def _age(values: list[str]) -> float | None:
    """The upstream's Age: 0 when absent, None when invalid (not one plain number)."""
    if not values:
        return 0.0
    if len(values) > 1:
        return None
    value = values[0].strip()
    # isascii(): "²".isdigit() is true.
    return float(value) if value.isascii() and value.isdigit() else None


def _initial_age(age_value: float, date: str | None, response_time: float) -> float:
    """RFC 9111 §4.2.3 corrected_initial_age, without request-delay correction."""
    date_value = parse_http_date(date)
    apparent = max(0.0, response_time - date_value) if date_value is not None else 0.0
    return max(apparent, age_value)
