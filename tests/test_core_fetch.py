"""The rules after a fetch (`cachegw._outcome`): tables of cases, synchronous, no server, no
backend, no clock (``NOW`` is passed in), like the reuse decision's in tests/test_core.py."""

from __future__ import annotations

from typing import Any

import pytest

from cachegw._entry import Entry, HitForMiss, VaryMarker
from cachegw._models import Fetched
from cachegw._outcome import (
    FetchPath,
    after_fetch,
    after_wait,
    alone_status,
    hit_for_miss,
    keep,
    landed,
    miss_status,
)
from cachegw._policy import CacheControl

NOW = 1_000_000.0


def entry(age: float = 0, lifetime: float = 60, **kw: Any) -> Entry:
    """An entry stored ``age`` seconds ago, fresh for ``lifetime``."""
    headers = kw.pop("headers", [(b"content-length", b"2")])
    return Entry(200, headers, b"ok", stored_at=NOW - age, lifetime=lifetime, **kw)


OK = Fetched(200, [], b"new")
NOT_MODIFIED = Fetched(304, [], b"")
ERROR = Fetched(503, [], b"down")
UNREACHABLE = Fetched(502, [], b"", failed=True)
STALE = entry(70)  # stale by 10 s
STALE_IF_ERROR = entry(70, stale_if_error=30)  # stale by 10 s, may stand in for 30
TOO_STALE = entry(70, stale_if_error=5)
MUST_REVALIDATE = entry(70, stale_if_error=30, must_revalidate=True)

# (case, path, stale entry, fetched, outcome)
AFTER_FETCH: list[tuple[str, FetchPath, Entry | None, Fetched, str]] = [
    ("a miss: store", "led", None, OK, "store"),
    ("a stale entry, a new answer: store", "led", STALE, OK, "store"),
    ("a 304 to our validators: merge (RFC 9111 §4.3.4)", "led", STALE, NOT_MODIFIED, "merge"),
    ("a 304 with nothing to merge into: fetch again", "led", None, NOT_MODIFIED, "refetch"),
    ("a 5xx, stale-if-error allows: serve stale", "led", STALE_IF_ERROR, ERROR, "stale"),
    ("unreachable, stale-if-error allows", "led", STALE_IF_ERROR, UNREACHABLE, "stale"),
    ("a 5xx past stale-if-error: pass the error", "led", TOO_STALE, ERROR, "failed"),
    ("must-revalidate beats stale-if-error", "led", MUST_REVALIDATE, ERROR, "failed"),
    ("a 5xx without a stale entry: store (the rules refuse it)", "led", None, ERROR, "store"),
    ("timed-out wait: nothing is stored", "timed-out", None, OK, "pass"),
    ("timed-out wait: a 304 is not ours to merge", "timed-out", STALE, NOT_MODIFIED, "refetch"),
    ("timed-out wait: stale-if-error still serves", "timed-out", STALE_IF_ERROR, ERROR, "stale"),
    ("alone: store", "alone", None, OK, "store"),
    ("alone: a 304 merges", "alone", STALE, NOT_MODIFIED, "merge"),
    ("alone: no stale-if-error", "alone", STALE_IF_ERROR, ERROR, "store"),
    ("a HEAD fetched as a HEAD: no body to store", "head", STALE, OK, "pass"),
    ("refresh: a 304 merges", "refresh", STALE, NOT_MODIFIED, "merge"),
    ("refresh: a new answer is stored", "refresh", STALE, OK, "store"),
    ("refresh: a failure is dropped, the entry kept", "refresh", STALE_IF_ERROR, ERROR, "discard"),
]


@pytest.mark.parametrize(
    ("path", "stale", "fetched", "outcome"),
    [case[1:] for case in AFTER_FETCH],
    ids=[case[0] for case in AFTER_FETCH],
)
def test_after_fetch(path: FetchPath, stale: Entry | None, fetched: Fetched, outcome: str) -> None:
    assert after_fetch(fetched, stale, path=path, now=NOW) == outcome


# (case, entry stored, fetched, nothing stored before, path, request Cache-Control, marked)
HIT_FOR_MISS: list[tuple[str, Entry | None, Fetched, bool, FetchPath, str, bool]] = [
    ("not storable, key empty: mark it", None, OK, True, "led", "", True),
    ("stored: no mark", entry(), OK, True, "led", "", False),
    ("something stored before: no mark", None, OK, False, "led", "", False),
    ("an upstream failure says nothing of storability", None, ERROR, True, "led", "", False),
    ("unreachable likewise", None, UNREACHABLE, True, "led", "", False),
    ("timed-out wait: nothing was meant to be stored", None, OK, True, "timed-out", "", False),
    ("the request said no-store", None, OK, True, "led", "no-store", False),
]


@pytest.mark.parametrize(
    ("stored", "fetched", "empty", "path", "cc", "marked"),
    [case[1:] for case in HIT_FOR_MISS],
    ids=[case[0] for case in HIT_FOR_MISS],
)
def test_hit_for_miss(
    stored: Entry | None, fetched: Fetched, empty: bool, path: FetchPath, cc: str, marked: bool
) -> None:
    request_cc = CacheControl({cc: None}) if cc else CacheControl({})
    assert hit_for_miss(stored, fetched, empty=empty, path=path, request_cc=request_cc) is marked


WINDOW = 300.0
# (case, ttl, fetch started, superseded by a purge, verdict)
KEEP = [
    ("a recent fetch: write", 60.0, NOW - 1, False, "write"),
    ("no time left: drop", 0.0, NOW - 1, False, "drop"),
    ("started before a purge: serve, never store", 60.0, NOW - 1, True, "serve"),
    ("started longer ago than the record's window", 60.0, NOW - WINDOW - 1, False, "serve"),
    ("start unknown: write", 60.0, 0.0, False, "write"),
]


@pytest.mark.parametrize(
    ("ttl", "started", "superseded", "verdict"),
    [case[1:] for case in KEEP],
    ids=[case[0] for case in KEEP],
)
def test_keep(ttl: float, started: float, superseded: bool, verdict: str) -> None:
    assert keep(ttl, started=started, now=NOW, window=WINDOW, superseded=superseded) == verdict


VARIED = entry(headers=[(b"content-length", b"2"), (b"vary", b"Accept-Language")])
# (case, the leader's entry, its vary values, failed upstream, our stale entry, our headers,
#  what we do)
AFTER_WAIT: list[tuple[str, Entry | None, Any, bool, Entry | None, dict[str, str], str]] = [
    ("the leader stored it: share", entry(), None, False, None, {}, "collapsed"),
    (
        "same variant: share",
        VARIED,
        ["accept-language=de"],
        False,
        None,
        {"accept-language": "de"},
        "collapsed",
    ),
    ("another variant: fetch ours", VARIED, ["accept-language=de"], False, None, {}, "own-variant"),
    ("not storable: fetch our own", None, None, False, None, {}, "own"),
    ("it failed, our stale entry may stand in", None, None, True, STALE_IF_ERROR, {}, "stale"),
    ("it failed, past stale-if-error: fetch", None, None, True, TOO_STALE, {}, "own"),
    ("it failed, nothing stale: fetch", None, None, True, None, {}, "own"),
]


@pytest.mark.parametrize(
    ("leader", "vary", "failed", "stale", "headers", "joined"),
    [case[1:] for case in AFTER_WAIT],
    ids=[case[0] for case in AFTER_WAIT],
)
def test_after_waiting_in_the_process(
    leader: Entry | None,
    vary: Any,
    failed: bool,
    stale: Entry | None,
    headers: dict[str, str],
    joined: str,
) -> None:
    got = after_wait(leader, vary=vary, headers=headers, failed=failed, stale=stale, now=NOW)
    assert got == joined


FRESH = entry(1)
MARKER = HitForMiss(stored_at=NOW)
# (case, found, primary, purge verdict, forced, request started, what the waiter takes)
LANDED: list[tuple[str, Entry | None, Any, Any, bool, float, str]] = [
    ("a fresh entry landed: take it", FRESH, FRESH, None, False, NOW, "entry"),
    ("nothing yet", None, None, None, False, NOW, "none"),
    ("a hit-for-miss marker: fetch our own", None, MARKER, None, False, NOW, "marker"),
    ("purged since: not it", FRESH, FRESH, ("hard", NOW), False, NOW, "none"),
    ("expired: not it", entry(70), None, None, False, NOW, "none"),
    ("forced, stored before the request: not it", FRESH, FRESH, None, True, NOW, "none"),
    ("forced, stored after the request: take it", FRESH, FRESH, None, True, NOW - 5, "entry"),
    (
        "a Vary marker: the variant found",
        FRESH,
        VaryMarker(["a"], NOW, "g"),
        None,
        False,
        NOW,
        "entry",
    ),
]


@pytest.mark.parametrize(
    ("found", "primary", "verdict", "forced", "started", "taken"),
    [case[1:] for case in LANDED],
    ids=[case[0] for case in LANDED],
)
def test_what_landed_in_the_fleet(
    found: Entry | None, primary: Any, verdict: Any, forced: bool, started: float, taken: str
) -> None:
    got = landed(found, primary, verdict, forced=forced, started=started, now=NOW)
    expected = {"entry": found, "none": None, "marker": primary}[taken]
    assert got is expected


@pytest.mark.parametrize(
    ("stale", "forced", "status"),
    [
        (None, False, ("MISS", "fwd=uri-miss")),
        (STALE, False, ("EXPIRED", "fwd=stale")),
        (None, True, ("BYPASS", "fwd=request")),
        (STALE, True, ("BYPASS", "fwd=request")),
    ],
)
def test_a_coalesced_fetchs_status(
    stale: Entry | None, forced: bool, status: tuple[str, str]
) -> None:
    assert miss_status(stale, forced=forced) == status


@pytest.mark.parametrize(
    ("bypass_read", "merged", "stored", "shared_only", "status"),
    [
        (False, False, True, False, ("MISS", "fwd=uri-miss")),
        (True, False, True, False, ("BYPASS", "fwd=request")),
        (False, True, True, False, ("MISS", "fwd=uri-miss; fwd-status=304")),
        (True, True, True, True, ("BYPASS", "fwd=request; fwd-status=304")),
        (False, False, False, False, ("MISS", "fwd=uri-miss")),
        (False, False, False, True, ("BYPASS", "fwd=bypass")),
        (True, False, False, True, ("BYPASS", "fwd=bypass")),
    ],
)
def test_a_lone_fetchs_status(
    bypass_read: bool, merged: bool, stored: bool, shared_only: bool, status: tuple[str, str]
) -> None:
    got = alone_status(
        bypass_read=bypass_read, merged=merged, stored=stored, shared_only=shared_only
    )
    assert got == status
