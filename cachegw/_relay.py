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

Fetches are shared the same way (`RelayCoordinator`): one upstream request per key for
the whole machine. A worker about to fetch a key takes the key's lease in a table all
workers map into memory (``locks``, under ``flock``; a lease names its worker's pid and
expires, so a worker that died cannot wedge a key); the others wait. Once the leader has
stored the answer it sends what it stored (the entry, its Vary marker, a hit-for-miss
marker) to every other worker's second socket, which stores it in its own memory cache
and wakes its waiters, and only then marks the lease *landed*. A worker that finds a key
landed by another reads its queue before it decides (the entry is there) instead of
fetching again. Waiting is bounded like a wait on Redis's lock (the engine's
``lock_timeout``, then fetch without storing); a landing that cannot be delivered at once
(the receiver's queue is full) is dropped, costing that worker a fetch of its own, never
a stale answer: entries are still judged against every purge when read.

The single-worker path is untouched: without ``CACHEGW_RELAY_DIR`` purges stay local and
every lock is granted.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import json
import logging
import math
import mmap
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from hashlib import blake2b

from cachegw import _entry
from cachegw._backends import MemoryBackend
from cachegw._flight import UNLOCKED, Coordinator
from cachegw._purge import RECORD_TTL, LocalPurges, Verdict

__all__ = ["ENV_VAR", "RelayCoordinator", "RelayPurges"]

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


# --- one fetch per key for the machine ------------------------------------------------

#: Leases: one slot per key being fetched (or just landed), found by the key's digest
#: with a few probes. A key that finds every probe taken fetches without a lease.
SLOTS = 4096
PROBES = 8
_SLOT = struct.Struct("<QQQdd")  # key digest, token (pid << 32 | n), state, expires, started
_FREE, _HELD, _LANDED = 0, 1, 2
#: A landing of at most this many bytes travels in its datagram; a larger one in a
#: memory file whose descriptor the datagram carries (the kernel bounds a datagram).
INLINE_MAX = 16 * 1024
#: What one landing may carry; beyond it, the other workers only hear that it landed.
RELAY_MAX = 16 * 1024 * 1024
#: Leases that were found landed and deferred to, remembered to answer `wait` at once.
_NOTICES = 1024


@dataclass(slots=True)
class _Held:
    """A lease this task holds, and what it stored under it (to send along)."""

    key: str
    token: int
    items: list[tuple[str, float, bytes]] = field(default_factory=list)
    size: int = 0


_HOLDING: ContextVar[_Held | None] = ContextVar("cachegw_relay_holding", default=None)


def _digest(key: str) -> int:
    return int.from_bytes(blake2b(key.encode(), digest_size=8).digest(), "little") | 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: it exists
    return True


class RelayCoordinator(Coordinator):
    """Fetch leases and landings shared by the workers of one machine (see above)."""

    shared = True

    def __init__(self, directory: str, backend: MemoryBackend) -> None:
        self.directory = directory
        self.backend = backend
        self.pid = os.getpid()
        self.path = os.path.join(directory, f"{self.pid}-{secrets.token_hex(4)}.land")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        # Datagrams in the receivers' queues count against the sender's buffer.
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.sock.bind(self.path)
        fd = os.open(os.path.join(directory, "locks"), os.O_RDWR | os.O_CREAT, 0o600)
        size = SLOTS * _SLOT.size
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        self._fd = fd
        self._table = mmap.mmap(fd, size)
        self._n = 0
        self._deferred = [0] * SLOTS  # per slot: the landed lease already deferred to
        self._notices: dict[str, None] = {}
        self._waiters: dict[str, list[asyncio.Future[str]]] = {}
        self._applying = False
        self._reading = False
        backend.on_set = self._stored
        #: Landings received from (and sent to) other workers.
        self.received = 0
        self.sent = 0
        self.dropped = 0

    # -- the lease table ---------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # workers read and write it one at a time
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _slot(self, index: int) -> tuple[int, int, int, float, float]:
        return _SLOT.unpack_from(self._table, index * _SLOT.size)

    def _write_slot(
        self, index: int, digest: int, token: int, state: int, expires: float, started: float
    ) -> None:
        _SLOT.pack_into(self._table, index * _SLOT.size, digest, token, state, expires, started)

    def _find(self, digest: int) -> tuple[int | None, int | None]:
        """The key's slot, and the first slot free for it (call under `_locked`)."""
        now = time.monotonic()
        free = None
        start = digest % SLOTS
        for probe in range(PROBES):
            index = (start + probe) % SLOTS
            found, token, state, expires, _ = self._slot(index)
            if found == digest and state != _FREE:
                return index, free
            if free is None and (state != _HELD or expires <= now or not _alive(token >> 32)):
                free = index
        return None, free

    async def acquire(self, key: str, ttl: float, started: float | None = None) -> str | None:
        digest = _digest(key)
        answer: str | None
        with self._locked():
            index, free = self._find(digest)
            deferred = False
            if index is not None:
                _, token, state, expires, _ = self._slot(index)
                if state == _HELD and expires > time.monotonic() and _alive(token >> 32):
                    index = -1  # another worker is fetching it
                elif (
                    state == _LANDED and token >> 32 != self.pid and self._deferred[index] != token
                ):
                    # Another worker stored it since this one looked: its landing is
                    # queued here. Read it rather than fetch (once per landing).
                    self._deferred[index] = token
                    deferred = True
                else:
                    free = index
            if index == -1 or deferred:
                answer = None
            elif free is None:
                answer = UNLOCKED  # the table is crowded here: fetch without a lease
            else:
                self._n = (self._n + 1) & 0xFFFFFFFF
                token = self.pid << 32 | self._n
                self._write_slot(
                    free,
                    digest,
                    token,
                    _HELD,
                    time.monotonic() + ttl,
                    started if started is not None else math.nan,
                )
                answer = f"{token:x}"
        # What was sent before the lease was seen as it is, is queued now.
        self.drain()
        if deferred:
            self._notices[key] = None
            while len(self._notices) > _NOTICES:
                del self._notices[next(iter(self._notices))]
        if answer is not None:
            _HOLDING.set(_Held(key, int(answer, 16) if answer != UNLOCKED else 0))
        return answer

    async def holder_started(self, key: str) -> float | None:
        digest = _digest(key)
        with self._locked():
            index, _ = self._find(digest)
            if index is None:
                return None
            _, _, state, expires, started = self._slot(index)
        if state != _HELD or expires <= time.monotonic() or math.isnan(started):
            return None
        return started

    async def release(self, key: str, token: str) -> None:
        try:
            number = int(token, 16)
        except ValueError:
            return  # UNLOCKED, or the engine's own markers: no lease
        digest = _digest(key)
        with self._locked():
            index, _ = self._find(digest)
            if index is not None:
                _, held, state, _, _ = self._slot(index)
                if held == number and state == _HELD:
                    self._write_slot(index, 0, 0, _FREE, 0.0, 0.0)

    # -- landings --------------------------------------------------------------------

    def _stored(self, key: str, value: bytes, expire: float | None) -> None:
        """The memory backend took ``value``: keep it to send with the lease's landing."""
        held = _HOLDING.get()
        if held is None or self._applying:
            return
        held.size += len(key) + len(value)
        if held.size <= RELAY_MAX:
            deadline = math.inf if expire is None else time.time() + expire
            held.items.append((key, deadline, value))

    async def landed(self, key: str, *, failed: bool = False) -> None:
        held = _HOLDING.get()
        if held is None or held.key != key:
            if failed:
                self._broadcast(key, failed, [])
            return  # not a fetch of this task's (an unsafe method's invalidation)
        _HOLDING.set(None)
        items = [] if failed or held.size > RELAY_MAX else held.items
        self._broadcast(key, failed, items)
        if failed or not held.token:
            return
        # Then the lease says so: a worker that sees it landed finds the landing queued.
        digest = _digest(key)
        with self._locked():
            index, _ = self._find(digest)
            if index is not None:
                found, token, state, expires, started = self._slot(index)
                if token == held.token and state == _HELD:
                    self._write_slot(index, found, token, _LANDED, expires, started)

    def _broadcast(self, key: str, failed: bool, items: list[tuple[str, float, bytes]]) -> None:
        head: dict[str, object] = {
            "k": key,
            "f": failed,
            "i": [[name, None if math.isinf(at) else at, len(data)] for name, at, data in items],
        }
        body = b"".join(data for _, _, data in items)
        fds: list[int] = []
        if len(body) > INLINE_MAX:
            fd = os.memfd_create("cachegw-landing", os.MFD_CLOEXEC)
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                os.close(fd)
                raise
            head["m"] = len(body)
            fds, body = [fd], b""
        data = json.dumps(head).encode() + b"\n" + body
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            logger.warning("cachegw: cannot list the other workers' sockets: %s", exc)
            names = []
        try:
            for name in names:
                path = os.path.join(self.directory, name)
                if path == self.path or not name.endswith(".land"):
                    continue
                try:
                    # (socket.send_fds drops the address before Python 3.12.)
                    self.sock.sendmsg([data], ancillary, 0, path)
                    self.sent += 1
                except BlockingIOError:
                    self.dropped += 1  # its queue is full: it fetches for itself (see above)
                except (ConnectionRefusedError, FileNotFoundError):
                    with contextlib.suppress(OSError):
                        os.unlink(path)  # a worker that exited
                except OSError as exc:
                    logger.debug("cachegw: a landing could not reach worker %s: %s", name, exc)
        finally:
            for fd in fds:
                os.close(fd)

    def drain(self) -> None:
        """Store what other workers landed, and wake this worker's waiters."""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, INLINE_MAX + (64 << 10), 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # closed
                return
            try:
                self._apply(data, fds)
            except (ValueError, TypeError, KeyError, OSError) as exc:
                logger.warning("cachegw: ignoring a malformed landing from another worker: %r", exc)
            finally:
                for fd in fds:
                    os.close(fd)

    def _apply(self, data: bytes, fds: list[int]) -> None:
        header, _, body = data.partition(b"\n")
        head = json.loads(header)
        key = str(head["k"])
        failed = bool(head["f"])
        if "m" in head:
            size = int(head["m"])
            body = os.pread(fds[0], size, 0) if fds else b""
            if len(body) != size:
                raise ValueError("a landing shorter than it says")
        self.received += 1
        now = time.time()
        offset = 0
        for name, at, length in head["i"]:
            value = body[offset : offset + int(length)]
            offset += int(length)
            ttl = None if at is None else float(at) - now
            if ttl is not None and ttl <= 0:
                continue
            if self._newer_here(str(name), value):
                continue
            self._applying = True
            try:
                self.backend.set_nowait(str(name), value, ttl)
            finally:
                self._applying = False
        for future in self._waiters.get(key, ()):
            if not future.done():
                future.set_result("failed" if failed else "landed")

    def _newer_here(self, key: str, value: bytes) -> bool:
        """Whether this worker holds a newer item under ``key`` than ``value``."""
        here = self.backend.get_nowait(key)
        if here is None:
            return False
        mine, theirs = _entry.decode(here), _entry.decode(value)
        return mine is not None and theirs is not None and mine.stored_at > theirs.stored_at

    async def wait(self, key: str, seconds: float) -> str | None:
        if key in self._notices:
            del self._notices[key]
            return "landed"  # deferred to a landing already read (see acquire)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(key, [])
        waiters.append(future)
        try:
            try:
                return await asyncio.wait_for(future, seconds)
            except TimeoutError:
                return None
        finally:
            waiters.remove(future)
            if not waiters:
                del self._waiters[key]

    def start(self) -> None:
        if not self._reading:
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self.drain)
            self._reading = True

    async def aclose(self) -> None:
        if self._reading:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self._reading = False
        if self.backend.on_set == self._stored:
            self.backend.on_set = None
        self.sock.close()
        self._table.close()
        os.close(self._fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
