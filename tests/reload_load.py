"""Continuous load on a gateway while it reloads: raw keep-alive connections, every
answer counted per phase (one phase per reload), any failure recorded.

Used by tests/test_reload.py (a few seconds) and tests/bench/reload.py (the full run).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Phase:
    label: str
    started: float
    answers: Counter[tuple[str, str]] = field(default_factory=Counter)  # (group, status)
    failures: list[str] = field(default_factory=list)

    def count(self, group: str | None = None, status: str | None = None) -> int:
        return sum(
            n
            for (g, s), n in self.answers.items()
            if (group is None or g == group) and (status is None or s == status)
        )

    def hit_ratio(self, group: str) -> float:
        total = self.count(group)
        return self.count(group, "HIT") / total if total else 0.0


class Load:
    """``connections`` keep-alive connections, each sending GETs for ``paths`` in turn
    (a path's group is its second segment: ``/catalog/items/3`` → ``items``)."""

    def __init__(self, port: int, paths: list[str], connections: int = 50) -> None:
        self.port = port
        self.paths = paths
        self.connections = connections
        self.phases = [Phase("warm-up", time.perf_counter())]
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join(15)
        if self._error is not None:
            raise self._error

    def mark(self, label: str) -> None:
        """Start a new phase: answers from now on are counted under ``label``."""
        self.phases.append(Phase(label, time.perf_counter()))

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by __exit__
            self._error = exc

    async def _main(self) -> None:
        await asyncio.gather(*(self._connection(i) for i in range(self.connections)))

    async def _connection(self, index: int) -> None:
        turn = index
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while self._running:
            path = self.paths[turn % len(self.paths)]
            turn += 1
            group = path.split("/")[2]
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                assert reader is not None
                writer.write(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ")[1])
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                await reader.readexactly(int(headers.get("content-length", "0")))
                phase = self.phases[-1]
                if status != 200:
                    phase.failures.append(f"{path}: status {status}")
                phase.answers[(group, headers.get("x-cache-status", "-"))] += 1
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    writer = None
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                self.phases[-1].failures.append(f"{path}: {type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.close()
                writer = None
        if writer is not None:
            writer.close()
