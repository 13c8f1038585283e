"""The access log: one JSON object per line per request, on the ``cachegw.access`` logger.

Only the fields below are written; no request header other than ``User-Agent`` is ever
read, so ``Authorization`` and ``Cookie`` values cannot reach the log. Strings from the
request are truncated and JSON-escaped: a hostile path cannot forge a second line.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import IO, Any

__all__ = [
    "ACCESS_LOGGER",
    "access_log_enabled",
    "access_record",
    "enable_access_log",
    "log_access",
    "log_config",
]

#: The logger access lines go to, at INFO. Off unless a handler is attached to it (or
#: to the root logger) at INFO or below: see `enable_access_log`.
ACCESS_LOGGER = "cachegw.access"

_MAX_PATH = 2048
_MAX_QUERY = 2048
_MAX_USER_AGENT = 512
_KEY_PREFIX = 12

_logger = logging.getLogger(ACCESS_LOGGER)


def access_log_enabled() -> bool:
    """Whether access lines are written (a cheap check for hot paths)."""
    return _logger.isEnabledFor(logging.INFO)


def log_access(
    scope: MutableMapping[str, Any],
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
    record = access_record(
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
    _logger.info(json.dumps(record, separators=(",", ":")))


def access_record(
    scope: MutableMapping[str, Any],
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
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
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


def enable_access_log(stream: IO[str] | None = None) -> logging.Handler:
    """Send access lines, bare (no level or logger name), to ``stream`` (stdout).

    Returns the handler; ``logging.getLogger("cachegw.access").removeHandler(handler)``
    turns it off again. The lines do not also reach the root logger's handlers.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
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
        "class": "logging.StreamHandler",
        "formatter": "cachegw_access",
        "stream": "ext://sys.stdout",
    }
    config["loggers"][ACCESS_LOGGER] = {
        "handlers": ["cachegw_access"] if access_log else [],
        "level": "INFO" if access_log else "WARNING",
        "propagate": False,
    }
    return config
