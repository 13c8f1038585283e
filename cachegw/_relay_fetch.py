"""Fetches shared by the workers of one machine on the memory backend (issue 23).

``cachegw serve --workers N`` without Redis keeps one memory cache per worker;
`RelayCoordinator` makes one upstream request per key for the whole machine, through the
directory the supervisor creates (``CACHEGW_RELAY_DIR``). A worker about to fetch a key
takes the key's *lease* in a table all workers map into memory (``locks``, under
``flock``; a lease names its worker's pid and expires, so a worker that died cannot wedge
a key). Another worker that misses on the key meanwhile asks the holder for it (a *want*
on the holder's second socket, ``.land``) and waits; once the holder has stored its answer
it sends what it stored (the entry, its Vary marker, a hit-for-miss marker) to the workers
that asked, which store it in their own memory cache and wake their waiters, and it marks
the lease *landed*. A worker that misses on a key some other worker landed asks that
worker the same way and gets the entry as it holds it now, instead of fetching it from the
upstream. Messages go only to workers that asked: a miss costs the others nothing. Waiting
is bounded like a wait on Redis's lock (the engine's ``lock_timeout``, then fetch without
storing); a message that cannot be delivered at once (the receiver's queue is full) is
dropped, costing that worker a fetch of its own, never a stale answer: entries are still
judged against every purge when read.

Purges are relayed between the same workers by `cachegw._relay.RelayPurges`, through
the same directory.
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
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from hashlib import blake2b

from cachegw import _entry
from cachegw._backends import MemoryBackend
from cachegw._flight import UNLOCKED, Coordinator, Waiters

__all__ = ["INLINE_MAX", "PROBES", "RELAY_MAX", "SLOTS", "RelayCoordinator"]

logger = logging.getLogger("cachegw")

#: Leases: one slot per key being fetched (or just landed), found by the key's digest
#: with a few probes. A key that finds every probe taken fetches without a lease.
SLOTS = 65536
PROBES = 8
_SLOT = struct.Struct("<QQQdd")  # key digest, token (pid << 32 | n), state, expires, started
_FREE, _HELD, _LANDED = 0, 1, 2
#: A landing of at most this many bytes travels in its datagram; a larger one in a
#: memory file whose descriptor the datagram carries (the kernel bounds a datagram).
INLINE_MAX = 16 * 1024
#: What one landing may carry; beyond it, the other workers only hear that it landed.
RELAY_MAX = 16 * 1024 * 1024
#: Landings received with nobody waiting yet, remembered to answer `wait` at once.
_NOTICES = 1024
#: Keys this worker landed, remembered (with what it stored) to answer other workers.
_LANDED_KEYS = 16384


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


def _number(token: str) -> int:
    try:
        return int(token, 16)
    except ValueError:
        return -1


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

    def __init__(self, directory: str, backend: MemoryBackend, *, pid: int | None = None) -> None:
        self.directory = directory
        self.backend = backend
        self.pid = os.getpid() if pid is None else pid
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
        self._deferred: dict[int, int] = {}  # slot -> the landed lease already asked for
        self._holding: dict[str, _Held] = {}  # keys this worker is fetching
        self._asked: dict[str, set[str]] = {}  # ... and the workers that asked for them
        self._landed: dict[str, list[str]] = {}  # keys it landed -> the keys it stored
        self._paths: dict[int, str] = {}  # pid -> the socket of that worker
        self._marked: set[int] = set()  # leases marked landed, not yet released
        self._notices: dict[str, None] = {}
        self._waiters = Waiters()
        self._applying = False
        self._reading = False
        backend.on_set = self._stored
        #: Landings received from other workers, sent to them, and not delivered.
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
        now = time.monotonic()
        owner = 0  # the worker to ask for the key instead of fetching it
        with self._locked():
            index, free = self._find(digest)
            if index is not None:
                _, token, state, expires, _ = self._slot(index)
                holder = token >> 32
                if state == _HELD and expires > now and _alive(holder):
                    owner = holder  # it is fetching the key: ask it for the answer
                elif (
                    state == _LANDED
                    and holder != self.pid
                    and self._deferred.get(index) != token
                    and self._path_of(holder) is not None
                ):
                    # It stored the key: ask it for its entry (once per landing), rather
                    # than ask the upstream again.
                    self._deferred[index] = token
                    owner = holder
                else:
                    free = index
            if owner:
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
                    now + ttl,
                    started if started is not None else math.nan,
                )
                answer = f"{token:x}"
        if owner and owner != self.pid:
            self._want(owner, key)
        if answer is not None:
            held = _Held(key, int(answer, 16) if answer != UNLOCKED else 0)
            _HOLDING.set(held)
            self._holding[key] = held
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
        held = self._holding.get(key)
        if held is not None and (
            held.token == _number(token) or (not held.token and token == UNLOCKED)
        ):
            self._let_go(key)
        number = _number(token)
        if number < 0:
            return  # UNLOCKED, or the engine's own markers: no lease
        if number in self._marked:
            self._marked.discard(number)
            return  # marked landed: it stays so (see landed)
        digest = _digest(key)
        with self._locked():
            index, _ = self._find(digest)
            if index is not None:
                _, holder, state, _, _ = self._slot(index)
                if holder == number and state == _HELD:
                    self._write_slot(index, 0, 0, _FREE, 0.0, 0.0)

    def _let_go(self, key: str) -> None:
        """This worker no longer fetches ``key``: whoever asked hears that (no entry)."""
        self._holding.pop(key, None)
        asked = self._asked.pop(key, None)
        if asked:
            self._send(self._landing(key, False, []), asked)

    # -- landings ----------------------------------------------------------------------

    def _stored(self, key: str, value: bytes, expire: float | None) -> None:
        """The memory backend took ``value``: note it, to send with the lease's landing."""
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
            return  # not a fetch of this task's (an unsafe method's invalidation)
        _HOLDING.set(None)
        self._holding.pop(key, None)
        items = [] if failed or held.size > RELAY_MAX else held.items
        asked = self._asked.pop(key, None)
        if asked:
            self._send(self._landing(key, failed, items), asked)
        if failed or not held.token or not items:
            return
        self._landed[key] = [name for name, _, _ in items]
        while len(self._landed) > _LANDED_KEYS:
            del self._landed[next(iter(self._landed))]
        # Then the lease says so: a worker that misses on the key asks this one for it.
        digest = _digest(key)
        with self._locked():
            index, _ = self._find(digest)
            if index is not None:
                found, token, state, expires, started = self._slot(index)
                if token == held.token and state == _HELD:
                    self._write_slot(index, found, token, _LANDED, expires, started)
                    self._marked.add(token)
                    if len(self._marked) > _LANDED_KEYS:  # (released leases never linger)
                        self._marked.clear()

    def _answer(self, key: str, path: str) -> None:
        """Another worker asks for ``key``: it hears when this worker's fetch lands, or
        gets what this worker holds of it now."""
        if key in self._holding:
            self._asked.setdefault(key, set()).add(path)
            return
        items = []
        for name in self._landed.get(key, ()):
            found = self.backend.get_with_deadline_nowait(name)
            if found is not None:
                value, left = found
                items.append((name, math.inf if left is None else time.time() + left, value))
        self._send(self._landing(key, False, items), [path])

    def _want(self, pid: int, key: str) -> None:
        path = self._path_of(pid)
        if path is not None:
            data = json.dumps({"w": key, "r": self.path}).encode()
            self._send((data, []), [path])

    def _path_of(self, pid: int) -> str | None:
        """The landing socket of worker ``pid`` (None: it has none, it exited)."""
        path = self._paths.get(pid)
        if path is not None and os.path.exists(path):
            return path
        self._paths.pop(pid, None)
        prefix = f"{pid}-"
        with contextlib.suppress(OSError):
            for name in os.listdir(self.directory):
                if name.startswith(prefix) and name.endswith(".land"):
                    path = self._paths[pid] = os.path.join(self.directory, name)
                    return path
        return None

    @staticmethod
    def _landing(
        key: str, failed: bool, items: list[tuple[str, float, bytes]]
    ) -> tuple[bytes, list[int]]:
        """A landing message: its bytes and the descriptors it carries (a memory file
        holding the items when they are larger than `INLINE_MAX`)."""
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
        return json.dumps(head).encode() + b"\n" + body, fds

    def _send(self, message: tuple[bytes, list[int]], paths: Iterable[str]) -> None:
        data, fds = message
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            for path in paths:
                try:
                    # (socket.send_fds drops the address before Python 3.12.)
                    self.sock.sendmsg([data], ancillary, 0, path)
                    self.sent += 1
                except BlockingIOError:
                    self.dropped += 1  # its queue is full: it fetches for itself
                except OSError as exc:  # a worker that exited
                    logger.debug("cachegw: a landing could not reach %s: %s", path, exc)
        finally:
            for fd in fds:
                os.close(fd)

    def drain(self) -> None:
        """Answer other workers' questions, store what they sent, wake the waiters."""
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
                logger.warning("cachegw: ignoring a malformed message from another worker: %r", exc)
            finally:
                for fd in fds:
                    os.close(fd)

    def _apply(self, data: bytes, fds: list[int]) -> None:
        header, _, body = data.partition(b"\n")
        head = json.loads(header)
        if "w" in head:
            self._answer(str(head["w"]), str(head["r"]))
            return
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
        if not self._waiters.wake(key, "failed" if failed else "landed"):
            # Nobody waits yet (the answer came before the wait began): the next wait
            # for the key returns at once.
            self._notices[key] = None
            while len(self._notices) > _NOTICES:
                del self._notices[next(iter(self._notices))]

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
            return "landed"  # it came before this wait began
        return await self._waiters.wait(key, seconds)

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
