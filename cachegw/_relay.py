"""Purges and fetches shared by the workers of one machine on the memory backend (issue 23).

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
event-loop reader). A busy one may let it fill up: the sender then tries again for up to
`SEND_TIMEOUT`, and if the purge still cannot be queued (or the purging request stops
waiting) it sets a *fence* in the same file: every worker treats everything fetched
before that purge as purged. A purge is thus never lost, at worst it costs a cold cache.

Fetches are shared too, one upstream request per key for the whole machine: see
`cachegw._relay_fetch` (`RelayCoordinator`, re-exported here).

The single-worker path is untouched: without ``CACHEGW_RELAY_DIR`` purges stay local and
every lock is granted.
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
import struct
import time
from collections.abc import Callable, Iterable

from cachegw._purge import RECORD_TTL, LocalPurges, Verdict

# Re-exported: the runtime builds both relays from here.
from cachegw._relay_fetch import INLINE_MAX, RelayCoordinator

__all__ = ["ENV_VAR", "INLINE_MAX", "RelayCoordinator", "RelayPurges"]

logger = logging.getLogger("cachegw")

#: The directory of the workers' sockets, set by `cachegw serve --workers N`.
ENV_VAR = "CACHEGW_RELAY_DIR"
#: How long a purge waits for a worker whose queue is full before giving up on it (and
#: fencing: see `RelayPurges._fence`).
SEND_TIMEOUT = 1.0
_FENCE = struct.Struct("<d")  # in the counter file, after the counter


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
        if os.fstat(fd).st_size < 16:
            os.ftruncate(fd, 16)
        self._counter = mmap.mmap(fd, 16)
        self._lock_fd = fd
        self._seen = self._counter[0:8]
        self._fenced = _FENCE.unpack_from(self._counter, 8)[0]
        self._sending: set[asyncio.Task[None]] = set()
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
        fence = _FENCE.unpack_from(self._counter, 8)[0]
        if fence > self._fenced:
            # A purge could not be delivered to some worker: everything fetched before
            # it is purged everywhere.
            self._fenced = fence
            self.state.apply("*", fence, False, fence + RECORD_TTL)
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
        task = asyncio.get_running_loop().create_task(self._broadcast(data, at))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller stopped waiting (a deadline, a client that left): whatever the
            # queues still hold, no worker may serve what the purge covers from now on.
            self._fence(at)
            self._bump()
            raise
        return at

    async def _broadcast(self, data: bytes, at: float) -> None:
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            logger.warning("cachegw: cannot list the other workers' sockets: %s", exc)
            return
        undelivered = False
        for name in names:
            path = os.path.join(self.directory, name)
            if path == self.path or not name.endswith(".sock"):
                continue
            try:
                await self._send(data, path)
            except (ConnectionRefusedError, FileNotFoundError):
                # A worker that exited: its socket is left behind.
                with contextlib.suppress(OSError):
                    os.unlink(path)
            except (TimeoutError, OSError) as exc:
                logger.warning("cachegw: a purge could not reach worker %s: %s", name, exc)
                undelivered = True
        if undelivered:
            self._fence(at)
        # Then the counter moves: a worker that sees it moved finds the purge queued.
        self._bump()

    async def _send(self, data: bytes, path: str) -> None:
        """Into ``path``'s queue; while it is full (a busy worker), try again for up to
        `SEND_TIMEOUT`. (A socket that is not connected polls writable whatever the
        receiver's queue, and uvloop has no ``sock_sendto``: hence the retries.)"""
        delay, deadline = 0.0005, time.monotonic() + SEND_TIMEOUT
        while True:
            try:
                self.sock.sendto(data, path)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError("its queue stayed full") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)

    def _fence(self, at: float) -> None:
        """A worker did not get a purge made at ``at``: every worker treats it as a purge
        of everything fetched before ``at`` (on its next judgement), so no write is
        undone whatever that worker missed."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            if at > _FENCE.unpack_from(self._counter, 8)[0]:
                _FENCE.pack_into(self._counter, 8, at)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _bump(self) -> None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # workers bump it one at a time
        try:
            value = int.from_bytes(self._counter[0:8], "little") + 1
            self._counter[0:8] = (value % (1 << 64)).to_bytes(8, "little")
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    async def aclose(self, grace: float = 5.0) -> None:
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=grace)
        if self._reading:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self._reading = False
        self.sock.close()
        self._counter.close()
        os.close(self._lock_fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
