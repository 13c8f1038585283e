"""One timer per event loop that checks every client connection's deadlines (`Sweeper`):
a request costs a few attribute writes, not timers of its own (see `cachegw._server`)."""

from __future__ import annotations

import asyncio
from typing import Protocol

__all__ = ["Sweeper"]


class Watched(Protocol):
    """A connection the sweeper checks (cachegw's uvicorn protocol)."""

    loop: asyncio.AbstractEventLoop
    gone: bool

    def check_deadlines(self, now: float) -> None: ...


class Sweeper:
    """One timer per event loop that checks every connection's deadlines."""

    INTERVAL = 0.25

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.connections: set[Watched] = set()
        self.handle: asyncio.TimerHandle | None = None

    _by_loop: dict[int, Sweeper] = {}

    @classmethod
    def watch(cls, connection: Watched) -> None:
        loop = connection.loop
        sweeper = cls._by_loop.get(id(loop))
        if sweeper is None or sweeper.loop is not loop:
            sweeper = cls._by_loop[id(loop)] = Sweeper(loop)
        sweeper.connections.add(connection)
        if sweeper.handle is None:
            sweeper.handle = loop.call_later(cls.INTERVAL, sweeper.sweep)

    def sweep(self) -> None:
        now = self.loop.time()
        for connection in list(self.connections):
            if connection.gone:
                self.connections.discard(connection)
            else:
                connection.check_deadlines(now)
        if self.connections:
            self.handle = self.loop.call_later(self.INTERVAL, self.sweep)
        else:
            self.handle = None
            Sweeper._by_loop.pop(id(self.loop), None)
