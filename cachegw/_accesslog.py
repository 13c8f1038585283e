"""The access log: one JSON object per line per request, on the ``cachegw.access`` logger.

What a line says, and why no credential can reach it, is `cachegw._accessline`'s; this
module writes the lines.

Like nginx's ``access_log ... buffer=64k flush=1s``, `cachegw serve` writes lines through
`BufferedAccessHandler`: each line is formatted straight to a JSON string (no
``logging.LogRecord`` per request), kept in memory and written in batches, at least once a
second (by a background thread) and whenever 64 KiB are waiting; whatever is left is
written when the gateway shuts down (SIGTERM included) and by ``logging.shutdown`` at exit.
A batch is one ``write`` to a file; on a pipe or a socket, writes of whole lines of at most
``PIPE_BUF`` bytes, so that other writers never cut a line.

Hits answered by the protocol-level fast path keep the text of their line after the time
(`hit_tail`) with the answer, per client, and hand it to the handler
(`AccessSink.write_tail`), which queues the time prefix and that text in one list step;
the time is formatted, and the buffer's size checked, once per millisecond.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import select
import stat
import sys
import threading
from typing import IO, Any, Protocol

from starlette.types import Scope

from cachegw._accessline import access_line, access_record, hit_tail, now_text, time_text

__all__ = [
    "ACCESS_LOGGER",
    "AccessSink",
    "BufferedAccessHandler",
    "access_line",
    "access_record",
    "access_sink",
    "enable_access_log",
    "flush_access_log",
    "hit_tail",
    "hot_sink",
    "log_access",
    "log_config",
]

#: The logger access lines go to, at INFO. Off unless a handler is attached to it (or
#: to the root logger) at INFO or below: see `enable_access_log`.
ACCESS_LOGGER = "cachegw.access"

_PIPE_BUF = 4096

_logger = logging.getLogger(ACCESS_LOGGER)
_INFO = logging.INFO


class BufferedAccessHandler(logging.Handler):
    """A handler writing bare lines to ``stream`` (stdout) in batches.

    While one is attached to the ``cachegw.access`` logger, `log_access` hands it the
    formatted line directly, without a ``LogRecord``. Lines wait in memory until
    ``buffer_bytes`` are waiting (the request that fills the buffer writes them) or for at
    most ``flush_interval`` seconds (a background thread writes them). `flush` writes
    everything left; the gateway calls it when it shuts down, ``logging.shutdown`` at
    exit.
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        flush_interval: float = 1.0,
        buffer_bytes: int = 64 * 1024,
    ) -> None:
        super().__init__(logging.INFO)
        self.stream = stream if stream is not None else sys.stdout
        self.flush_interval = flush_interval
        self.buffer_bytes = buffer_bytes
        # Whole lines with their newlines, or a time prefix followed by the rest of its
        # line (`write_tail`): added together, so a flush never separates them.
        self._lines: list[bytes] = []
        self._size = 0
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._fd: int | object | None = _UNKNOWN
        self._chunked = False
        self._from = self._to = 0.0  # the millisecond `_stamp` is for: [from, to)
        self._stamp = b""
        self._counted = 0  # items of `_lines` already in `_size`

    def write(self, line: str) -> None:
        """Queue one line (without its newline)."""
        self._lines.append((line + "\n").encode("utf-8", "backslashreplace"))
        self._size += len(line) + 1
        self._counted += 1
        if self._size >= self.buffer_bytes:
            self.flush()  # one write for many lines, like nginx's buffer=64k
        elif self._thread is None:
            self._start()

    def write_tail(self, tail: bytes, when: float) -> None:
        """Queue the line ``{"time":"<when>",`` + ``tail`` (from `hit_tail`, with its
        newline; ``when`` in seconds since the epoch). Per line, nothing is formatted,
        copied or counted: the first line of each millisecond does that (`_tick`)."""
        if not self._from <= when < self._to and not self._tick(tail, when):
            return
        self._lines += (self._stamp, tail)  # one step: the timer's flush takes both or neither

    def _tick(self, tail: bytes, when: float) -> bool:
        """For the first line of a millisecond: check that the handler still takes the
        lines, count those queued since the last tick, write the buffer when full, and
        format the millisecond's time. False when the line went elsewhere."""
        if hot_sink is self and _buffered() is not self:
            # Removed, or the logger was turned off or reconfigured, since `access_sink`
            # last looked: hand the line to what is there now.
            _forget(self)
            sink = access_sink()
            if sink is not self:
                if sink is not None:
                    sink.write_tail(tail, when)
                return False
        # Lines queued by `write_tail` since the last tick, sized like this one: the
        # buffer's size only decides when it is written.
        queued = len(self._lines)
        self._size += max(0, queued - self._counted) // 2 * (len(tail) + 33)
        self._counted = queued
        if self._size >= self.buffer_bytes:
            self.flush()
        elif self._thread is None:
            self._start()
        ms = int(when * 1000)
        self._stamp = f'{{"time":"{time_text(ms)}",'.encode()
        self._from, self._to = ms / 1000, (ms + 1) / 1000
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record))
        except Exception:  # pragma: no cover - logging's contract
            self.handleError(record)

    def flush(self) -> None:
        with self._write_lock:
            # Appends racing with the swap land in ``lines`` or in the new list: both are
            # written (this one now, the new one next time).
            lines = self._lines
            self._lines = []
            self._size = self._counted = 0
            if not lines:
                return
            data = b"".join(lines)
            # A closed or broken stdout: nothing sensible to do with the lines.
            with contextlib.suppress(OSError, ValueError):
                self._write(data)

    def _write(self, data: bytes) -> None:
        fd = self._descriptor()
        if fd is None:
            self.stream.write(data.decode("utf-8", "replace"))
            self.stream.flush()
            return
        if not self._chunked:
            _write_all(fd, data)  # one write for the batch, like nginx's buffer
            return
        # On a pipe or a socket, writes of at most PIPE_BUF bytes of whole lines are
        # atomic: a line is never cut by another writer (stderr sharing the pipe, other
        # worker processes).
        start, end = 0, len(data)
        while start < end:
            stop = end
            if end - start > _PIPE_BUF:
                stop = data.rfind(b"\n", start, start + _PIPE_BUF) + 1
            if stop <= start:  # one line longer than PIPE_BUF: written whole
                stop = data.find(b"\n", start) + 1 or end
            _write_all(fd, data[start:stop])
            start = stop

    def _descriptor(self) -> int | None:
        """The stream's file descriptor, when it has one (found once); None for streams
        in memory. Whatever the stream itself buffered is written first."""
        if self._fd is _UNKNOWN:
            try:
                fd = self.stream.fileno()
                mode = os.fstat(fd).st_mode
            except (AttributeError, OSError, ValueError):
                self._fd = None
            else:
                self._fd = fd
                self._chunked = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
        if self._fd is not None:
            self.stream.flush()
        return self._fd  # type: ignore[return-value]

    def close(self) -> None:
        _forget(self)
        self.flush()
        self._closed = True
        self._stop.set()
        super().close()

    def _start(self) -> None:
        with self._write_lock:
            if self._thread is not None or self._closed:
                return
            thread = threading.Thread(target=self._run, name="cachegw-access-log", daemon=True)
            self._thread = thread
        thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval):
            self.flush()


_UNKNOWN = object()


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a non-blocking descriptor waits)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)


def _buffered() -> BufferedAccessHandler | None:
    """The handler to give lines to directly: the access logger's only handler, when it is
    a `BufferedAccessHandler` and nothing else (no propagation) expects a record."""
    handlers = _logger.handlers
    if len(handlers) == 1:
        handler = handlers[0]
        if (
            isinstance(handler, BufferedAccessHandler)
            and not _logger.propagate
            and _logger.isEnabledFor(_INFO)
        ):
            return handler
    return None


class AccessSink(Protocol):
    """What `access_sink` returns: takes a line by its tail (see `hit_tail`)."""

    def write_tail(self, tail: bytes, when: float) -> None: ...


class _Records:
    """The sink when the access logger has other handlers: one log record per line."""

    @staticmethod
    def write_tail(tail: bytes, when: float) -> None:
        _logger.info(f'{{"time":"{now_text(when)}",{tail[:-1].decode("ascii")}')


_RECORDS = _Records()


#: The buffered handler `access_sink` found last. It is looked up again at most a
#: millisecond later (`BufferedAccessHandler.write_tail`), so that a hot path pays no
#: logging checks per line while the configuration stays as it is. The gateway's fast
#: path reads it directly (a function call per hit saved) before it calls `access_sink`.
hot_sink: BufferedAccessHandler | None = None


def _forget(handler: BufferedAccessHandler) -> None:
    global hot_sink
    if hot_sink is handler:
        hot_sink = None


def access_sink() -> AccessSink | None:
    """Where a hot path hands its lines (`AccessSink.write_tail`): the buffered handler
    when it alone takes them, else the logger; None when the access log is off (one
    level check)."""
    global hot_sink
    if hot_sink is not None:
        return hot_sink
    if not _logger.isEnabledFor(_INFO):
        return None
    handler = _buffered()
    if handler is not None:
        hot_sink = handler
        return handler
    return _RECORDS


def flush_access_log() -> None:
    """Write every access line still waiting in a buffer.

    Called when the application shuts down: uvicorn ends a process stopped by SIGTERM by
    raising the signal again once it has shut down, so ``atexit`` hooks (and
    ``logging.shutdown``) do not run.
    """
    for handler in _logger.handlers:
        handler.flush()


def log_access(
    scope: Scope,
    *,
    status: int,
    bytes_sent: int,
    duration: float,
    service: str = "",
    route: str = "",
    cache_status: str = "",
    upstream: float | None = None,
    key: str | None = None,
) -> None:
    """Write one access line for the request of ``scope`` (an ASGI HTTP scope).

    A no-op costing one level check when the ``cachegw.access`` logger is off.

    Parameters:
        status: the status sent to the client.
        bytes_sent: body bytes sent to the client.
        duration: seconds from receiving the request to sending the last byte.
        service, route: the service name and route template ("" when none matched).
        cache_status: HIT, MISS, STALE, BYPASS, EXPIRED or ERROR.
        upstream: seconds the upstream took, when the request was forwarded.
        key: the cache key; its first 12 hex digits are logged.
    """
    if not _logger.isEnabledFor(_INFO):
        return
    line = access_line(
        scope,
        status=status,
        bytes_sent=bytes_sent,
        duration=duration,
        service=service,
        route=route,
        cache_status=cache_status,
        upstream=upstream,
        key=key,
    )
    _emit(line)


def _emit(line: str) -> None:
    """Hand one formatted line to the buffered handler directly, else to the logger."""
    writer = _buffered()
    if writer is not None:
        writer.write(line)
    else:
        _logger.info(line)


def enable_access_log(stream: IO[str] | None = None) -> BufferedAccessHandler:
    """Send access lines, bare (no level or logger name), to ``stream`` (stdout), in
    batches (see `BufferedAccessHandler`; ``handler.flush()`` writes what waits).

    Returns the handler; ``logging.getLogger("cachegw.access").removeHandler(handler)``
    turns it off again. The lines do not also reach the root logger's handlers.
    """
    handler = BufferedAccessHandler(stream)
    _logger.addHandler(handler)
    _logger.setLevel(logging.INFO)
    _logger.propagate = False
    return handler


def log_config(access_log: bool = True) -> dict[str, Any]:
    """uvicorn's logging configuration, with the access log on or off.

    For ``uvicorn.run(..., log_config=log_config(on), access_log=False)``: uvicorn
    applies it in every worker process it starts (handlers set up in the supervisor
    would not reach spawned workers), and ``access_log=False`` silences uvicorn's own
    access lines, which would duplicate these.
    """
    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["cachegw_access"] = {"format": "%(message)s"}
    config["handlers"]["cachegw_access"] = {
        "class": "cachegw._accesslog.BufferedAccessHandler",
        "formatter": "cachegw_access",
        "stream": "ext://sys.stdout",
    }
    config["loggers"][ACCESS_LOGGER] = {
        "handlers": ["cachegw_access"] if access_log else [],
        "level": "INFO" if access_log else "WARNING",
        "propagate": False,
    }
    # cachegw's own messages (reloads, backend trouble) as uvicorn's: on stderr, with
    # their level, from INFO on.
    config["loggers"]["cachegw"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config
