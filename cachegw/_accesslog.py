"""The access log: one JSON object per line per request, on the ``cachegw.access`` logger.

Only the fields below are written; no request header other than ``User-Agent`` is ever
read, so ``Authorization`` and ``Cookie`` values cannot reach the log. Strings from the
request are truncated and JSON-escaped: a hostile path cannot forge a second line.

Like nginx's ``access_log ... buffer=64k flush=1s``, `cachegw serve` writes lines through
`BufferedAccessHandler`: each line is formatted straight to a JSON string (no
``logging.LogRecord`` per request), kept in memory and written in batches, at least once a
second (by a background thread) and whenever 64 KiB are waiting; whatever is left is
written when the gateway shuts down (SIGTERM included) and by ``logging.shutdown`` at exit.
"""

from __future__ import annotations

import copy
import logging
import sys
import threading
import time
from json.encoder import encode_basestring_ascii
from typing import IO, Any

from starlette.types import Scope

__all__ = [
    "ACCESS_LOGGER",
    "BufferedAccessHandler",
    "access_line",
    "access_log_enabled",
    "access_record",
    "enable_access_log",
    "flush_access_log",
    "log_access",
    "log_config",
    "log_hit",
]

#: The logger access lines go to, at INFO. Off unless a handler is attached to it (or
#: to the root logger) at INFO or below: see `enable_access_log`.
ACCESS_LOGGER = "cachegw.access"

_MAX_PATH = 2048
_MAX_QUERY = 2048
_MAX_USER_AGENT = 512
_KEY_PREFIX = 12
_PIPE_BUF = 4096

_logger = logging.getLogger(ACCESS_LOGGER)


class BufferedAccessHandler(logging.Handler):
    """A handler writing bare lines to ``stream`` (stdout) in batches.

    While one is attached to the ``cachegw.access`` logger, `log_access` hands it the
    formatted line directly, without a ``LogRecord``. Lines wait in memory until
    ``buffer_bytes`` are waiting (the request that fills the buffer writes it, in one
    write per 4 KiB) or for at most ``flush_interval`` seconds (a background thread
    writes them). `flush` writes everything left; the gateway calls it when it shuts
    down, ``logging.shutdown`` at exit.
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
        self._lines: list[str] = []
        self._size = 0
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def write(self, line: str) -> None:
        """Queue one line (without its newline)."""
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size >= self.buffer_bytes:
            self.flush()  # one write for many lines, like nginx's buffer=64k
        elif self._thread is None:
            self._start()

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
            self._size = 0
            if not lines:
                return
            try:
                # Writes of at most PIPE_BUF bytes, each of whole lines, are atomic on a
                # pipe: a line is never cut by another writer (stderr sharing the pipe,
                # other worker processes).
                chunk: list[str] = []
                size = 0
                for line in lines:
                    if size + len(line) >= _PIPE_BUF and chunk:
                        self._write(chunk)
                        chunk, size = [], 0
                    chunk.append(line)
                    size += len(line) + 1
                self._write(chunk)
            except (OSError, ValueError):
                pass  # a closed or broken stdout: nothing sensible to do with the lines

    def _write(self, lines: list[str]) -> None:
        lines.append("")
        self.stream.write("\n".join(lines))
        self.stream.flush()

    def close(self) -> None:
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


def _buffered() -> BufferedAccessHandler | None:
    """The handler to give lines to directly: the access logger's only handler, when it is
    a `BufferedAccessHandler` and nothing else (no propagation) expects a record."""
    handlers = _logger.handlers
    if len(handlers) == 1 and not _logger.propagate and _logger.isEnabledFor(logging.INFO):
        handler = handlers[0]
        if isinstance(handler, BufferedAccessHandler):
            return handler
    return None


def flush_access_log() -> None:
    """Write every access line still waiting in a buffer.

    Called when the application shuts down: uvicorn ends a process stopped by SIGTERM by
    raising the signal again once it has shut down, so ``atexit`` hooks (and
    ``logging.shutdown``) do not run.
    """
    for handler in _logger.handlers:
        handler.flush()


def access_log_enabled() -> bool:
    """Whether access lines are written (a cheap check for hot paths)."""
    return _logger.isEnabledFor(logging.INFO)


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
    if not _logger.isEnabledFor(logging.INFO):
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


_second = -1
_second_text = ""


def _now() -> str:
    """The time as RFC 3339 UTC with milliseconds; the formatting of the second is reused."""
    global _second, _second_text
    now = time.time()
    second = int(now)
    if second != _second:
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = second
    return f"{_second_text}.{int((now - second) * 1000):03d}Z"


def access_line(
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
) -> str:
    """The JSON line `log_access` writes: `access_record`'s fields, formatted directly."""
    client = scope.get("client")
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else scope.get("path", "")
    user_agent = ""
    for name, value in scope.get("headers", ()):
        if name == b"user-agent":
            user_agent = value.decode("latin-1")
            break
    tail = _tail(
        client[0] if client else None,
        scope.get("method", ""),
        path,
        scope.get("query_string", b"").decode("latin-1"),
        status,
        bytes_sent,
        duration,
        service,
        route,
        cache_status,
        upstream,
        key,
        user_agent,
    )
    return f'{{"time":"{_now()}",{tail}'


def log_hit(
    method: str,
    raw_path: bytes,
    query: bytes,
    user_agent: bytes,
    client: tuple[str, int] | None,
    *,
    status: int,
    bytes_sent: int,
    service: str,
    route: str,
    key: str,
) -> None:
    """`log_access` for a hit answered by the protocol-level fast path (no ASGI scope, a
    duration of 0): all but the time is the same from one hit of a client to the next,
    so that part of the line is formatted once and reused."""
    if not _logger.isEnabledFor(logging.INFO):
        return
    ip = client[0] if client else None
    memo = (method, raw_path, query, user_agent, ip, status, bytes_sent, service, route, key)
    tail = _tails.get(memo)
    if tail is None:
        tail = _tail(
            ip,
            method,
            raw_path.decode("latin-1"),
            query.decode("latin-1"),
            status,
            bytes_sent,
            0.0,
            service,
            route,
            "HIT",
            None,
            key,
            user_agent.decode("latin-1"),
        )
        if len(_tails) >= _TAILS:  # bounded: a flood of distinct requests can't grow it
            _tails.clear()
        _tails[memo] = tail
    line = f'{{"time":"{_now()}",{tail}'
    _emit(line)


_TAILS = 4096
_tails: dict[tuple[Any, ...], str] = {}


def _tail(
    client: str | None,
    method: str,
    path: str,
    query: str,
    status: int,
    bytes_sent: int,
    duration: float,
    service: str,
    route: str,
    cache_status: str,
    upstream: float | None,
    key: str | None,
    user_agent: str,
) -> str:
    """The line after its time field (see `access_record` for the fields)."""
    esc = encode_basestring_ascii
    extra = ""
    if upstream is not None:
        extra = f',"upstream_ms":{round(upstream * 1000, 3)!r}'
    if key:
        extra += f',"key":{esc(key.rpartition(":")[2][:_KEY_PREFIX])}'
    return (
        f'"client":{"null" if client is None else esc(client)},'
        f'"method":{esc(method)},"path":{esc(path[:_MAX_PATH])},'
        f'"query":{esc(query[:_MAX_QUERY])},"status":{int(status)},'
        f'"bytes":{int(bytes_sent)},"duration_ms":{round(duration * 1000, 3)!r},'
        f'"service":{esc(service)},"route":{esc(route)},"cache_status":{esc(cache_status)}'
        f'{extra},"user_agent":{esc(user_agent[:_MAX_USER_AGENT])}}}'
    )


def access_record(
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
) -> dict[str, Any]:
    """The fields `log_access` writes, as a dict (see `log_access`)."""
    client = scope.get("client")
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else scope.get("path", "")
    query: bytes = scope.get("query_string", b"")
    user_agent = ""
    for name, value in scope.get("headers", ()):
        if name == b"user-agent":
            user_agent = value.decode("latin-1")
            break
    record: dict[str, Any] = {
        "time": _now(),
        "client": client[0] if client else None,
        "method": scope.get("method", ""),
        "path": path[:_MAX_PATH],
        "query": query[:_MAX_QUERY].decode("latin-1"),
        "status": status,
        "bytes": bytes_sent,
        "duration_ms": round(duration * 1000, 3),
        "service": service,
        "route": route,
        "cache_status": cache_status,
    }
    if upstream is not None:
        record["upstream_ms"] = round(upstream * 1000, 3)
    if key:
        # Keys are "{prefix}:{sha256 hex}": the hash's start identifies the entry.
        record["key"] = key.rpartition(":")[2][:_KEY_PREFIX]
    record["user_agent"] = user_agent[:_MAX_USER_AGENT]
    return record


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
