"""What an access line says: one JSON object per request, formatted directly.

Only the fields below are written; no request header other than ``User-Agent`` is ever
read, so ``Authorization`` and ``Cookie`` values cannot reach the log. Strings from the
request are truncated and JSON-escaped: a hostile path cannot forge a second line.
`cachegw._accesslog` writes the lines.
"""

from __future__ import annotations

import time
from json.encoder import encode_basestring_ascii
from typing import Any

from starlette.types import Scope

__all__ = ["access_line", "access_record", "hit_tail", "now_text", "time_text"]

_MAX_PATH = 2048
_MAX_QUERY = 2048
_MAX_USER_AGENT = 512
_KEY_PREFIX = 12

_second = -1
_second_text = ""


def now_text(now: float | None = None) -> str:
    """The time (``now``, else the current time) as RFC 3339 UTC with milliseconds."""
    return time_text(int((time.time() if now is None else now) * 1000))


def time_text(ms: int) -> str:
    """A time in milliseconds since the epoch as RFC 3339 UTC with milliseconds; the
    formatting of the second is reused."""
    global _second, _second_text
    second, frac = divmod(ms, 1000)
    if second != _second:
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = second
    return f"{_second_text}.{frac:03d}Z"


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
    return f'{{"time":"{now_text()}",{tail}'


def hit_tail(
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
) -> bytes:
    """The access line of a hit answered by the protocol-level fast path (no ASGI scope,
    a duration of 0) after its time field, with its newline (ASCII: every string is
    JSON-escaped): the part a caller keeps and hands to `AccessSink.write_tail` again for
    the next identical hit."""
    return (
        _tail(
            client[0] if client else None,
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
        + "\n"
    ).encode("ascii")


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
        "time": now_text(),
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
