"""The state of one request's fetch and of one fetch others wait on: plain values the
engine's steps after the reuse decision pass along (`cachegw._fetcher`, `cachegw._writer`)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cachegw._entry import Entry, VaryMarker
from cachegw._models import Fetch, RequestInfo, Served
from cachegw._policy import CacheControl, CachePolicy

__all__ = ["Flight", "Job", "Writes"]

#: A request's backend writes, queued to run in order after its answer (`Writer.behind`).
Writes = list[Callable[[], Awaitable[Any]]]


@dataclass(slots=True)
class Flight:
    """One in-process fetch for a key that other requests may wait on."""

    # When the leader's upstream request started (inf until it does): what invalidations
    # are compared with before joining.
    started: float = math.inf
    done: asyncio.Event = field(default_factory=asyncio.Event)
    entry: Entry | None = None
    vary: list[str] | None = None  # vary values of the leader's request, if it varied
    marker: VaryMarker | None = None  # the Vary marker the leader's entry is stored under
    failed: bool = False  # the upstream failed: waiters holding a stale entry serve it
    # The requests waiting for this fetch (its leader included) and, for a miss, the
    # task fetching: when the last of them leaves (its client went away), the fetch is
    # let go (see `Fetcher.leave`). A background refresh has no task: it runs on.
    waiters: int = 0
    task: asyncio.Task[Served] | None = None
    fetching: bool = False  # its upstream request is under way
    abandoned: bool = False


@dataclass(slots=True)
class Job:
    """One request's fetch: what every step after the reuse decision needs, in one value
    (instead of seven to nine parameters handed down from step to step)."""

    request: RequestInfo
    policy: CachePolicy
    fetch: Fetch
    cc: CacheControl  # the request's Cache-Control, as storing reads it
    stale: Entry | None = None  # the entry the fetch revalidates, or falls back on
    empty: bool = False  # nothing was stored under the key: no entry, no marker
    writes: Writes | None = None  # its writes after the answer; None: written at once
    flight: Flight | None = None  # the fetch it leads for requests coalesced with it
    token: str = ""  # the key's lock, held across processes
