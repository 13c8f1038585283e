"""Storing a fetched response, as pure functions (no I/O, no clock of their own).

* `build_entry`: the entry to store for a fetched response and the request headers it
  varies on, or None when the rules forbid storing it (RFC 9111 §3 and the contract's
  safety rules).
* `merge_not_modified`: a stored response updated by a ``304`` (RFC 9111 §4.3.4).

`cachegw._core` decides, before a fetch, whether a stored entry may answer; this module
decides, after one, what is stored. tests/test_core.py holds their cases as tables.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from cachegw._encoding import encoded, for_storage, valid_etag, with_vary
from cachegw._encoding import revalidated as recoded
from cachegw._entry import Entry, Headers, strong_etag
from cachegw._models import Fetched
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

__all__ = ["SURROGATE_TARGET", "UNSTORED", "Storing", "build_entry", "merge_not_modified"]

#: The name Surrogate-Control directives are targeted at (``max-age=60;cachegw``).
SURROGATE_TARGET = "cachegw"
# Never stored: computed per hit, or belonging to one connection / one caller.
UNSTORED = frozenset({b"age", b"set-cookie", b"x-cache-status", b"cache-status"})
# Headers a 304 does not update: they describe the stored body (RFC 9111 §3.2).
_NOT_UPDATED = frozenset(
    {b"content-length", b"content-encoding", b"content-md5", b"content-range", b"etag"}
)


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
    if _unstorable(fetched.status, s, response_cc, request, policy) is not None:
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
    stored = _stored(fetched, s, response_cc, request, policy, revalidated)
    started = request.started
    entry = Entry(
        status=fetched.status,
        headers=stored.headers,
        body=stored.body,
        stored_at=response_time,
        lifetime=lifetime,
        age0=_initial_age(age_value or 0, s.date, response_time),
        stale_while_revalidate=fresh.stale_while_revalidate,
        stale_if_error=fresh.stale_if_error,
        must_revalidate=fresh.must_revalidate,
        shared_auth=stored.shared_auth,
        etag=stored.etag,
        tags=stored.tags,
        fetched_at=started,
        keep=keep,
        fetch_time=max(0.0, response_time - started) if started else 0.0,
        coding=stored.coding,
    )
    return entry, sorted(stored.varies)


def _unstorable(
    status: int, s: _Scanned, response_cc: CacheControl, request: Storing, policy: CachePolicy
) -> str | None:
    """Why the response may not be stored (RFC 9111 §3 and the contract), or None."""
    return storable_response(
        method="GET",
        status=status,
        response_cc=response_cc,
        set_cookie=s.set_cookie,
        vary=s.vary,
        request_cc=request.request_cc,
        authorized=request.authorized,
        per_principal=request.per_principal,
        policy=policy,
        explicit=s.expires is not None or "max-age" in response_cc or "s-maxage" in response_cc,
    )


@dataclass(frozen=True, slots=True)
class _Stored:
    """A response as it is stored, with what the entry says of it besides freshness."""

    headers: Headers
    body: bytes
    coding: str
    etag: str | None  # the ETag the cache made for it (None: the upstream's, or none)
    varies: set[str]  # the request headers it varies on
    tags: list[str]
    shared_auth: bool


def _stored(
    fetched: Fetched,
    s: _Scanned,
    response_cc: CacheControl,
    request: Storing,
    policy: CachePolicy,
    revalidated: Entry | None,
) -> _Stored:
    assert fetched.body is not None
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
    tags = [*request.scopes, *(f"tag:{t}" for t in s.upstream_tags if t)]
    if request.target_scope is not None:
        tags.append(request.target_scope)
    shared_auth = request.per_principal or shareable_for_authorized(response_cc)
    if revalidated is not None:  # what the policy decided when it was stored carries over
        tags, etag = revalidated.tags, revalidated.etag
        shared_auth = revalidated.shared_auth or shared_auth
    return _Stored(stored_headers, body, coding, etag, varies, tags, shared_auth)


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
    # Every response of one second has the same Date: parsed once (issue 26: the email
    # module's parser was a tenth of a stored miss's own CPU); 64 values of <= 64 chars.
    date_value = _date(date) if date is not None and len(date) <= 64 else parse_http_date(date)
    apparent = max(0.0, response_time - date_value) if date_value is not None else 0.0
    return max(apparent, age_value)


_date = functools.lru_cache(maxsize=64)(parse_http_date)
