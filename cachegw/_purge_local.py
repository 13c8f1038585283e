"""Purges within one process: scopes, verdicts, the record, and the `Purges` interface.

Every entry carries *scopes* (`scopes_for`): ``*`` (everything), ``svc:NAME``,
``path:NAME:/path``, ``tag:T`` for each of its tags and, in a gateway,
``route:NAME:/template``; and the time its fetch started. A purge records, per scope, the
time it happened (`PurgeState.apply`); an entry is purged when one of its scopes was
purged after its fetch started (`PurgeState.verdict`). `Purges` is what the engine asks;
`LocalPurges` keeps the record in the process (the memory backend is per process too).
How processes share it: `cachegw._purge` (Redis), `cachegw._relay` (the workers of one
machine).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Literal

__all__ = [
    "RECORD_TTL",
    "STORE_WINDOW",
    "LocalPurges",
    "PurgeState",
    "Purges",
    "Verdict",
    "scopes_for",
]

#: ("hard" | "soft", time of that purge), or None when an entry is untouched.
Verdict = tuple[Literal["hard", "soft"], float] | None

#: How long Redis keeps the purge record. Entries are never stored longer (see Entry).
RECORD_TTL = 31 * 86400
#: Record size at which purges that can match nothing any more are dropped from a
#: process's copy.
_PRUNE_SIZE = 10_000
#: A response is stored only within this many seconds of the start of its fetch (a slower
#: one is answered, not stored), so a purge record needs to outlive a purge by no more
#: than this plus the life of the entries it covers.
STORE_WINDOW = 300.0


def scopes_for(service: str, path: str, tags: Iterable[str], route: str | None = None) -> list[str]:
    """The scopes an entry answers to (``route:NAME:/template`` when the route is given:
    a reload soft-purges the entries of the routes it changes)."""
    scopes = ["*", f"svc:{service}", f"path:{service}:{path}", *(f"tag:{t}" for t in tags)]
    if route is not None:
        scopes.append(f"route:{service}:{route}")
    return scopes


class PurgeState:
    """Per scope, the time of the last hard and of the last soft purge (pure), and until
    when each must be remembered."""

    def __init__(self) -> None:
        self.hard: dict[str, float] = {}
        self.soft: dict[str, float] = {}
        self._until: tuple[dict[str, float], dict[str, float]] = ({}, {})
        self._prune_at = _PRUNE_SIZE

    def apply(self, scope: str, at: float, soft: bool, until: float | None = None) -> None:
        """Record a purge of ``scope`` at ``at``, to be remembered until ``until``
        (default: ``at + RECORD_TTL``)."""
        table = self.soft if soft else self.hard
        ends = self._until[soft]
        if at > table.get(scope, 0.0):
            table[scope] = at
        end = at + RECORD_TTL if until is None else until
        if end > ends.get(scope, 0.0):
            ends[scope] = end
        if len(self.hard) + len(self.soft) >= self._prune_at:
            # Purges past their end can no longer match any entry.
            for old, old_ends in ((self.hard, self._until[False]), (self.soft, self._until[True])):
                for name in [name for name, end in old_ends.items() if end < at]:
                    del old_ends[name]
                    old.pop(name, None)
            self._prune_at = max(_PRUNE_SIZE, 2 * (len(self.hard) + len(self.soft)))

    def verdict(self, scopes: Iterable[str], fetched_at: float) -> Verdict:
        """Whether an entry fetched at ``fetched_at`` with ``scopes`` was purged since:
        ``("hard", t)`` (absent), ``("soft", t)`` (stale since ``t``), or None."""
        if not self.hard and not self.soft:
            return None
        soft = 0.0
        for scope in scopes:
            at = self.hard.get(scope, 0.0)
            if at > fetched_at:
                return ("hard", at)
            soft = max(soft, self.soft.get(scope, 0.0))
        return ("soft", soft) if soft > fetched_at else None


class Purges:
    """Where purges are recorded and read; see `LocalPurges` and `RedisPurges`."""

    #: Seconds after `purge` returns before every process is guaranteed to see it.
    propagation: float = 0.0

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.state = PurgeState()
        self.clock = clock

    def verdict(self, scopes: Iterable[str], fetched_at: float) -> Verdict:
        return self.state.verdict(scopes, fetched_at)

    async def purge(
        self, scopes: Iterable[str], *, soft: bool = False, keep: float = RECORD_TTL
    ) -> float:
        """Record a purge of ``scopes`` now, remembered for ``keep`` seconds (the longest
        an entry it covers can still be found); returns its time."""
        at = self.clock()
        for scope in scopes:
            self.state.apply(scope, at, soft, at + keep)
        return at

    def due(self) -> bool:
        """Whether `refresh` should run before serving a request."""
        return False

    async def refresh(self) -> None:
        """Apply purges made elsewhere (no-op when there is no elsewhere)."""

    def start(self) -> None:
        """Begin listening for purges made elsewhere (needs a running loop)."""

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop background work (giving it up to ``grace`` seconds to finish)."""


class LocalPurges(Purges):
    """Purges of one process (the memory backend is per process too)."""
