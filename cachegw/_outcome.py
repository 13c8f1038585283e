"""The rules after a fetch, as pure functions (no I/O, no clock of their own).

`cachegw._core.decide` says what a request does before any fetch; these say what follows
one, as hishel keeps them as states (``CacheMiss.next(response)``):

* `after_fetch`: a fetched response merges into the stale entry (``304``), is stored,
  gives way to the stale entry (stale-if-error), is fetched again without validators, or
  is passed on unstored;
* `hit_for_miss`: whether an answer that could not be stored marks the key so that the
  next requests for it are not coalesced;
* `keep`: whether an entry built from a response is written, served without being stored
  (its fetch began before an invalidation, or too long ago), or dropped;
* `after_wait`, `landed`: what a request that waited for another fetch (in the process or
  in the fleet) does with its outcome;
* `miss_status`, `alone_status`: how a fetched answer is labelled (``X-Cache-Status`` and
  ``Cache-Status``).

The engine (`cachegw._fetcher`, `cachegw._writer`) does the I/O each outcome asks for; it
passes the arguments of the functions on a miss's path by position (CPython 3.11 calls
with keywords take its slower path).
tests/test_core_fetch.py holds their cases as tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from cachegw._core import stale_if_error_ok, vary_names
from cachegw._entry import Entry, HitForMiss, Item
from cachegw._keys import vary_values
from cachegw._models import Fetched
from cachegw._policy import CacheControl

if TYPE_CHECKING:
    from cachegw._purge import Verdict

__all__ = [
    "FetchPath",
    "Outcome",
    "after_fetch",
    "after_wait",
    "alone_status",
    "failed",
    "hit_for_miss",
    "keep",
    "landed",
    "miss_status",
    "stale_on_error",
]

#: Which fetch a response answers: ``led`` for the requests coalesced on a key (holding
#: its lock), ``timed-out`` when the wait for another process's fetch timed out (nothing
#: is stored: like nginx after ``proxy_cache_lock_timeout``), ``alone`` for a request not
#: coalesced (a GET, or a HEAD fetched as one), ``head`` for a HEAD fetched as a HEAD (no
#: body to store), ``refresh`` for a background refresh of a stale entry.
FetchPath = Literal["led", "timed-out", "alone", "head", "refresh"]

#: What to do with a fetched response:
#:
#: * ``merge``: a ``304`` to our conditional request: update the stale entry from it;
#: * ``store``: store it if the rules allow (`cachegw._storing.build_entry`) and answer;
#: * ``stale``: the upstream failed and the stale entry may stand in (stale-if-error):
#:   answer with the stale entry, discard the response;
#: * ``failed``: the upstream failed, the stale entry may not stand in: pass the error on,
#:   never replacing the good entry;
#: * ``refetch``: a ``304`` that is not ours to answer (no stale entry, or nothing may be
#:   stored): fetch again without validators and pass that on;
#: * ``pass``: pass it on unstored;
#: * ``discard``: nobody waits for it (a failed background refresh): drop it.
Outcome = Literal["merge", "store", "stale", "failed", "refetch", "pass", "discard"]


def failed(fetched: Fetched) -> bool:
    """The upstream failed: not reached, timed out, or a 5xx."""
    return fetched.failed or fetched.status >= 500


def stale_on_error(stale: Entry | None, now: float) -> bool:
    """A stale entry is at hand and may stand in for a failed fetch (RFC 5861 §4)."""
    return stale is not None and stale_if_error_ok(stale, now)


def after_fetch(fetched: Fetched, stale: Entry | None, path: FetchPath, now: float) -> Outcome:
    """What follows a fetch on ``path``; ``stale`` is the entry it was conditional on."""
    if path == "head":
        return "pass"
    if path == "refresh":
        if fetched.status == 304:
            return "merge"
        return "discard" if failed(fetched) else "store"
    if stale is not None and fetched.status == 304 and path != "timed-out":
        return "merge"
    if path == "alone":
        # Stored only when the rules allow: a response to credentials must say public,
        # s-maxage or must-revalidate (RFC 9111 §3.5). No stale-if-error here.
        return "store"
    if stale is not None and failed(fetched):
        # An error never replaces a good entry.
        return "stale" if stale_if_error_ok(stale, now) else "failed"
    if fetched.status == 304:
        return "refetch"
    return "pass" if path == "timed-out" else "store"


def hit_for_miss(
    entry: Entry | None,
    fetched: Fetched,
    empty: bool,
    path: FetchPath,
    request_cc: CacheControl,
) -> bool:
    """Whether the leader's answer marks the key hit-for-miss: it could not be stored,
    nothing was stored under the key before, and it is no failure, timed-out wait or
    ``no-store`` request (which say nothing of what the upstream would let us store)."""
    return (
        entry is None
        and empty
        and path == "led"
        and not failed(fetched)
        and "no-store" not in request_cc
    )


Keep = Literal["drop", "serve", "write"]


def keep(ttl: float, started: float, now: float, window: float, superseded: bool) -> Keep:
    """Whether an entry that may be stored for ``ttl`` seconds is written (``write``),
    answered without being stored (``serve``), or not used at all (``drop``).

    Writes are never undone: an answer whose fetch started (``started``, 0 when unknown)
    before an invalidation of its URI (``superseded``), or longer ago than the purge
    record's visibility ``window``, goes to the requests that asked for it and is not
    stored. Judged at store time against the fetch's start, so a deferred store is judged
    the same way.
    """
    if ttl <= 0:
        return "drop"
    if (started and now - started > window) or superseded:
        return "serve"
    return "write"


Joined = Literal["collapsed", "stale", "own-variant", "own"]


def after_wait(
    entry: Entry | None,
    *,
    vary: list[str] | None,
    headers: Mapping[str, str],
    failed: bool,
    stale: Entry | None,
    now: float,
) -> Joined:
    """What a request that waited for another request's fetch in this process does.

    ``entry``: the entry that fetch stored (or None); ``vary``: the values of the request
    headers it varies on, as the leader sent them (None: it does not vary); ``failed``:
    that fetch failed upstream. ``collapsed``: answer with ``entry``; ``stale``: serve
    the stale entry rather than ask a failing upstream again; ``own-variant``: the answer
    varies differently, fetch our own variant; ``own``: it could not be stored, fetch our
    own answer and pass it on.
    """
    if entry is not None and (vary is None or vary == vary_values(vary_names(entry), headers)):
        return "collapsed"
    if failed and stale_on_error(stale, now):
        return "stale"
    return "own-variant" if entry is not None else "own"


def landed(
    found: Entry | None,
    primary: Item | None,
    verdict: Verdict,
    *,
    forced: bool,
    started: float,
    now: float,
) -> Entry | HitForMiss | None:
    """What another process's fetch left under the key, as a waiter may use it: a fresh
    entry not purged since, or the hit-for-miss marker (not storable: fetch our own), or
    None (nothing yet). ``forced``: the client asked for an answer checked with the origin
    after it arrived (``started``): an entry stored before then does not do."""
    if isinstance(primary, HitForMiss):
        return primary
    if found is None or verdict is not None:
        return None
    if forced and found.stored_at < started:
        return None  # the entry the client asked to have checked, not a new answer
    return found if found.ttl_left(now) > 0 else None


def miss_status(stale: Entry | None, forced: bool) -> tuple[str, str]:
    """``X-Cache-Status`` and the Cache-Status ``fwd`` of a coalesced fetch's answer."""
    if forced:
        return "BYPASS", "fwd=request"
    if stale is not None:
        return "EXPIRED", "fwd=stale"
    return "MISS", "fwd=uri-miss"


def alone_status(
    *, bypass_read: bool, merged: bool, stored: bool, shared_only: bool
) -> tuple[str, str]:
    """The same for a request fetched alone: ``merged``, its answer is a stale entry a
    ``304`` confirmed; ``stored``, an entry came of it; ``shared_only``, the request
    carries credentials on a route not keyed per principal."""
    if not stored and shared_only:
        return "BYPASS", "fwd=bypass"
    status, detail = ("BYPASS", "fwd=request") if bypass_read else ("MISS", "fwd=uri-miss")
    return status, detail + "; fwd-status=304" if merged else detail
