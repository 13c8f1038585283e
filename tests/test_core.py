"""The pure core (`cachegw._core`): RFC 9111 rules as tables of cases, synchronous, no
server, no backend, no clock (``NOW`` is passed in)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from cachegw import CachePolicy
from cachegw._core import (
    NO_DIRECTIVES,
    Decision,
    decide,
    directives,
    stale_if_error_ok,
    validators,
)
from cachegw._entry import Entry, HitForMiss
from cachegw._models import Fetched
from cachegw._policy import CacheControl
from cachegw._storing import Storing, build_entry, merge_not_modified

NOW = 1_000_000.0
POLICY = CachePolicy(ttl=60)


def entry(age: float = 0, lifetime: float = 60, **kw: Any) -> Entry:
    """An entry stored ``age`` seconds ago, fresh for ``lifetime``."""
    headers = kw.pop("headers", [(b"content-length", b"2")])
    return Entry(200, headers, b"ok", stored_at=NOW - age, lifetime=lifetime, **kw)


def ask(
    found: Entry | None,
    cc: str = "",
    *,
    method: str = "GET",
    pragma: str = "",
    shared_only: bool = False,
    verdict: Any = None,
    policy: CachePolicy = POLICY,
    primary: Any = None,
    draw: float = 0.0,
) -> Decision:
    headers = {"cache-control": cc} if cc else {}
    if pragma:
        headers["pragma"] = pragma
    return decide(
        found,
        method=method,
        directives=directives(headers, policy),
        shared_only=shared_only,
        verdict=verdict,
        policy=policy,
        now=NOW,
        primary=primary if primary is not None else found,
        draw=draw,
    )


VALIDATED = [(b"content-length", b"2"), (b"etag", b'"v1"')]

# (case, entry, request Cache-Control, expected action, expected reason, entry kept?)
REUSE = [
    ("nothing stored: fetch", None, "", "fetch", None, False),
    ("fresh: hit (§4.2)", entry(10), "", "fresh", None, True),
    ("stale, no window: fetch with it (§4.3)", entry(61), "", "fetch", None, True),
    ("request max-age below the age (§5.2.1.1)", entry(10), "max-age=5", "fetch", None, True),
    ("request max-age above the age", entry(10), "max-age=30", "fresh", None, True),
    (
        "request min-fresh above what is left (§5.2.1.3)",
        entry(50),
        "min-fresh=20",
        "fetch",
        None,
        True,
    ),
    (
        "within stale-while-revalidate (RFC 5861 §3)",
        entry(65, stale_while_revalidate=10),
        "",
        "stale",
        "stale-while-revalidate",
        True,
    ),
    ("past stale-while-revalidate", entry(75, stale_while_revalidate=10), "", "fetch", None, True),
    (
        "swr, but the request sets max-age",
        entry(65, stale_while_revalidate=10),
        "max-age=100",
        "fetch",
        None,
        True,
    ),
    ("max-stale without a value (§5.2.1.2)", entry(500), "max-stale", "stale", "max-stale", True),
    ("max-stale=5, stale by 10", entry(70), "max-stale=5", "fetch", None, True),
    ("max-stale=20, stale by 10", entry(70), "max-stale=20", "stale", "max-stale", True),
    (
        "must-revalidate beats max-stale (§5.2.2.2)",
        entry(70, must_revalidate=True),
        "max-stale",
        "fetch",
        None,
        True,
    ),
    (
        "only-if-cached, nothing stored (§5.2.1.7)",
        None,
        "only-if-cached",
        "unavailable",
        None,
        False,
    ),
    ("only-if-cached, fresh", entry(10), "only-if-cached", "fresh", None, True),
    ("only-if-cached, stale", entry(70), "only-if-cached", "unavailable", None, False),
    (
        "no-cache with validators: revalidate (§5.2.1.4)",
        entry(1, headers=VALIDATED),
        "no-cache",
        "fetch",
        None,
        True,
    ),
    ("no-cache without validators: fetch anew", entry(1), "no-cache", "fetch", None, False),
    ("max-age=0 is no-cache", entry(1, headers=VALIDATED), "max-age=0", "fetch", None, True),
]


@pytest.mark.parametrize(
    ("found", "cc", "action", "reason", "kept"),
    [case[1:] for case in REUSE],
    ids=[case[0] for case in REUSE],
)
def test_reuse(found: Entry | None, cc: str, action: str, reason: str | None, kept: bool) -> None:
    decision = ask(found, cc)
    assert (decision.action, decision.reason) == (action, reason)
    assert (decision.entry is found and found is not None) is kept
    if action == "stale" and reason == "stale-while-revalidate":
        assert decision.refresh


def test_pragma_no_cache_counts_only_without_cache_control() -> None:
    stored = entry(1)
    assert ask(stored, pragma="no-cache").action == "fetch"  # RFC 9111 §5.4
    assert ask(stored, "max-stale", pragma="no-cache").action == "fresh"


def test_ignoring_request_directives() -> None:
    policy = CachePolicy(ttl=60, ignore_request_cache_control=True)
    assert directives({"cache-control": "no-cache"}, policy) is NO_DIRECTIVES
    assert ask(entry(1), "no-cache", policy=policy).action == "fresh"


@pytest.mark.parametrize(
    ("verdict", "action"),
    [
        (None, "fresh"),
        (("hard", NOW - 5), "fetch"),  # gone
        (("soft", NOW - 5), "fetch"),  # stale since the purge, no stale window
    ],
)
def test_purge_verdicts(verdict: Any, action: str) -> None:
    decision = ask(entry(10), verdict=verdict)
    assert decision.action == action
    if verdict is not None and verdict[0] == "hard":
        assert decision.entry is None


def test_a_soft_purged_entry_is_served_stale_within_its_window() -> None:
    decision = ask(entry(10, stale_while_revalidate=30), verdict=("soft", NOW - 5))
    assert (decision.action, decision.reason, decision.left) == (
        "stale",
        "stale-while-revalidate",
        -5,
    )


@pytest.mark.parametrize(("shared_auth", "action"), [(False, "fetch"), (True, "fresh")])
def test_credentials_take_only_shareable_entries(shared_auth: bool, action: str) -> None:
    # RFC 9111 §3.5: a request with Authorization is answered only by an entry stored with
    # public, s-maxage or must-revalidate (or per principal).
    decision = ask(entry(1, shared_auth=shared_auth), shared_only=True)
    assert decision.action == action
    if action == "fetch":
        assert decision.entry is None and not decision.coalesce  # may be private: own fetch


@pytest.mark.parametrize(
    ("method", "primary", "coalesce"),
    [
        ("GET", None, True),
        ("HEAD", None, False),  # no body to store
        ("GET", HitForMiss(stored_at=NOW), False),  # last answer could not be stored
    ],
)
def test_coalescing(method: str, primary: Any, coalesce: bool) -> None:
    assert ask(None, method=method, primary=primary).coalesce is coalesce


def test_early_refresh_rises_as_expiry_nears() -> None:
    policy = CachePolicy(ttl=60, early_refresh=1)
    hot = entry(59.9, fetch_time=0.5)  # 0.1 s left; the fetch took 0.5 s
    assert ask(hot, policy=policy, draw=0.0).refresh is False  # u = 1: never
    assert ask(hot, policy=policy, draw=0.9).refresh is True
    cold = entry(0, fetch_time=0.5)  # 60 s left
    assert ask(cold, policy=policy, draw=0.9).refresh is False
    assert ask(hot, draw=0.9).refresh is False  # off by default


def test_stale_if_error_window() -> None:
    assert stale_if_error_ok(entry(70, stale_if_error=20), NOW)
    assert not stale_if_error_ok(entry(90, stale_if_error=20), NOW)
    assert not stale_if_error_ok(entry(70, stale_if_error=20, must_revalidate=True), NOW)


def test_validators_are_the_upstreams_own() -> None:
    stored = entry(
        headers=[(b"etag", b'"1"'), (b"last-modified", b"Sun, 06 Nov 1994 08:49:37 GMT")]
    )
    assert validators(stored) == [
        (b"if-none-match", b'"1"'),
        (b"if-modified-since", b"Sun, 06 Nov 1994 08:49:37 GMT"),
    ]
    # An ETag cachegw made up (from the body) means nothing upstream.
    assert validators(entry(headers=[(b"etag", b'"x"')], etag='"x"')) == []


# -- storing --------------------------------------------------------------------------------

REQUEST = Storing(
    authorized=False,
    per_principal=False,
    scopes=["*"],
    target_scope=None,
    started=NOW - 1,
    request_cc=CacheControl({}),
)


def fetched(*headers: tuple[bytes, bytes], status: int = 200, body: bytes = b"ok") -> Fetched:
    return Fetched(status, list(headers), body, response_time=NOW)


CC = b"cache-control"
STORING = [
    ("max-age sets freshness", fetched((CC, b"max-age=30")), POLICY, 30.0),
    ("no freshness: the route's ttl", fetched(), POLICY, 60.0),
    (
        "ttl capped by max_ttl",
        fetched((CC, b"max-age=9999")),
        CachePolicy(ttl=60, max_ttl=120),
        120.0,
    ),
    ("no-store (§3)", fetched((CC, b"no-store")), POLICY, None),
    ("private (§3)", fetched((CC, b"private, max-age=60")), POLICY, None),
    ("Set-Cookie (contract)", fetched((b"set-cookie", b"a=1")), POLICY, None),
    ("Vary: * (§4.1)", fetched((b"vary", b"*")), POLICY, None),
    ("206 never stored", fetched((CC, b"max-age=60"), status=206), POLICY, None),
    ("too large", fetched(body=b"x" * 11), CachePolicy(ttl=60, max_body=10), None),
    ("invalid Age: stale at once (§5.1)", fetched((b"age", b"1x"), (b"etag", b'"e"')), POLICY, 0.0),
    (
        "Surrogate-Control for us wins",
        fetched((CC, b"max-age=5"), (b"surrogate-control", b"max-age=40;cachegw")),
        POLICY,
        40.0,
    ),
    ("ttl=0 and nothing explicit: not stored", fetched(), CachePolicy(ttl=0), None),
]


@pytest.mark.parametrize(
    ("response", "policy", "lifetime"),
    [case[1:] for case in STORING],
    ids=[case[0] for case in STORING],
)
def test_storing(response: Fetched, policy: CachePolicy, lifetime: float | None) -> None:
    built, _ = build_entry(response, REQUEST, policy, NOW)
    assert (None if built is None else built.lifetime) == lifetime


def test_credentials_need_a_shareable_response() -> None:
    authorized = replace(REQUEST, authorized=True)
    assert build_entry(fetched((CC, b"max-age=60")), authorized, POLICY, NOW)[0] is None
    shared, _ = build_entry(fetched((CC, b"public, max-age=60")), authorized, POLICY, NOW)
    assert shared is not None and shared.shared_auth


def test_a_stored_entry_gets_an_etag_tags_and_the_vary_names() -> None:
    response = fetched((CC, b"max-age=60"), (b"vary", b"Accept"), (b"surrogate-key", b"a b"))
    built, names = build_entry(response, REQUEST, CachePolicy(ttl=60, vary=["X-Tenant"]), NOW)
    assert built is not None
    assert built.etag is not None and (b"etag", built.etag.encode()) in built.headers
    assert built.tags == ["*", "tag:a", "tag:b"]
    assert names == ["accept", "x-tenant"]
    assert (b"vary", b"x-tenant") in built.headers  # the route's vary is declared downstream
    assert built.fetch_time == 1.0


def test_a_304_updates_the_headers_but_not_the_body() -> None:
    stale = entry(
        100,
        headers=[
            (CC, b"max-age=60"),
            (b"content-length", b"2"),
            (b"etag", b'"1"'),
            (b"x-a", b"old"),
        ],
    )
    answer = Fetched(
        304,
        [(CC, b"max-age=600"), (b"content-length", b"0"), (b"x-a", b"new"), (b"etag", b'"2"')],
        b"",
        response_time=NOW,
    )
    merged = merge_not_modified(stale, answer)
    assert merged.status == 200 and merged.body == b"ok"
    assert (CC, b"max-age=600") in merged.headers and (b"x-a", b"new") in merged.headers
    assert (b"content-length", b"2") in merged.headers and (b"etag", b'"1"') in merged.headers
    rebuilt, _ = build_entry(
        merged, REQUEST, CachePolicy(ttl=60, max_ttl=3600), NOW, revalidated=stale
    )
    assert rebuilt is not None and rebuilt.lifetime == 600
