"""Purges shared by the workers of one machine on the memory backend (issue 23).

``cachegw serve --workers N`` without Redis keeps one memory cache per worker. So that a
write's invalidation, a purge (``POST /_cachegw/purge``, ``cachegw purge``) and a reload's
soft purges reach every worker, each worker binds a Unix datagram socket in a directory
the supervisor creates (``CACHEGW_RELAY_DIR``) and sends every purge it records to the
others' sockets *before* the request that caused it is answered. A datagram on a Unix
socket is delivered into the receiver's queue when ``sendto`` returns (no loss, no
reordering), and a worker reads its queue before it judges any entry (`verdict`), so a
request that starts after the write's answer sees the write in every worker: no window.
So that judging costs no system call, the sender then increments a counter in a small
file all workers map into memory (``counter``, under ``flock``); a worker reads its queue
only when the counter moved. An idle worker reads its queue as the messages come (an
event-loop reader), so it never fills up.

The single-worker path is untouched: without ``CACHEGW_RELAY_DIR`` purges stay local.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import mmap
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable

from cachegw._purge import RECORD_TTL, LocalPurges, Verdict

__all__ = ["ENV_VAR", "RelayPurges"]

logger = logging.getLogger("cachegw")

#: The directory of the workers' sockets, set by `cachegw serve --workers N`.
ENV_VAR = "CACHEGW_RELAY_DIR"
#: How long a purge waits for a worker whose queue is full before giving up on it.
SEND_TIMEOUT = 1.0


class RelayPurges(LocalPurges):
    """Purges of this worker, sent to and received from its sibling workers."""

    def __init__(self, directory: str, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock)
        self.directory = directory
        self.path = os.path.join(directory, f"{os.getpid()}-{secrets.token_hex(4)}.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind(self.path)
        counter = os.path.join(directory, "counter")
        fd = os.open(counter, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(fd).st_size < 8:
            os.ftruncate(fd, 8)
        self._counter = mmap.mmap(fd, 8)
        self._lock_fd = fd
        self._seen = self._counter[0:8]
        self._reading = False
        #: Purges received from other workers.
        self.received = 0

    def start(self) -> None:
        if not self._reading:
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self.drain)
            self._reading = True

    def drain(self) -> None:
        """Apply every purge waiting in this worker's queue."""
        self._seen = self._counter[0:8]  # read first: what was sent before it is queued
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # closed
                return
            try:
                mode, at, until, scopes = json.loads(data)
            except (ValueError, TypeError):
                logger.warning("cachegw: ignoring a malformed purge from another worker")
                continue
            for scope in scopes:
                self.state.apply(str(scope), float(at), mode == "soft", float(until))
            self.received += 1

    def verdict(self, scopes: Iterable[str], fetched_at: float) -> Verdict:
        if self._counter[0:8] != self._seen:
            self.drain()  # another worker purged since: it counts already
        return self.state.verdict(scopes, fetched_at)

    async def purge(
        self, scopes: Iterable[str], *, soft: bool = False, keep: float = RECORD_TTL
    ) -> float:
        names = list(scopes)
        at = await super().purge(names, soft=soft, keep=keep)
        until = at + min(keep, RECORD_TTL)
        data = json.dumps(["soft" if soft else "hard", at, until, names]).encode()
        await self._broadcast(data)
        return at

    async def _broadcast(self, data: bytes) -> None:
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            logger.warning("cachegw: cannot list the other workers' sockets: %s", exc)
            return
        loop = asyncio.get_running_loop()
        for name in names:
            path = os.path.join(self.directory, name)
            if path == self.path or not name.endswith(".sock"):
                continue
            try:
                try:
                    self.sock.sendto(data, path)
                except BlockingIOError:
                    # Its queue is full (a busy worker): wait until it has room.
                    async with asyncio.timeout(SEND_TIMEOUT):
                        await loop.sock_sendto(self.sock, data, path)
            except (ConnectionRefusedError, FileNotFoundError):
                # A worker that exited: its socket is left behind.
                with contextlib.suppress(OSError):
                    os.unlink(path)
            except (TimeoutError, OSError) as exc:
                logger.warning("cachegw: a purge could not reach worker %s: %s", name, exc)
        # Then the counter moves: a worker that sees it moved finds the purge queued.
        self._bump()

    def _bump(self) -> None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # workers bump it one at a time
        try:
            value = int.from_bytes(self._counter[0:8], "little") + 1
            self._counter[0:8] = (value % (1 << 64)).to_bytes(8, "little")
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    async def aclose(self, grace: float = 5.0) -> None:
        if self._reading:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self._reading = False
        self.sock.close()
        self._counter.close()
        os.close(self._lock_fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
