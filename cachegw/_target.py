"""Request-target and header safety checks, applied before routing (pure, no I/O).

A caching gateway routes on the path and keys on it, so any ambiguity between what it sees
and what the upstream sees is a hole (docs/security.md, "Attacks and how each is
handled"): ASGI servers hand the app a *decoded* path (`/svc/a%2F..%2F..%2Fadmin` reads as
`/svc/a/../../admin`), httpx and upstream frameworks resolve `..`, `;` hides parameters
from the key (cloaking), `%25` decodes twice, `//x` reads as a host. So the gateway works
on `scope["raw_path"]` (bytes, as sent) and refuses every target whose meaning could
differ between two parsers.

What is left has one meaning, and one spelling is chosen for it (issue 10, "one path"):
percent-encoded unreserved characters are decoded and the remaining escapes upper-cased
(RFC 3986 §6.2.2.1-2), so `/%61dmin` is routed, method-checked, keyed and forwarded as
`/admin`. Escapes must decode to well-formed UTF-8 (RFC 3629 §3: no overlong forms, no
surrogates): `%C0%AF` is `/` to some decoders and nothing to others.

Absolute-form targets (`GET http://evil/x HTTP/1.1`): uvicorn's h11 protocol puts the whole
URL in `raw_path` (rejected here: it does not start with `/`); its httptools protocol keeps
only the path (`/x`), so such a request is indistinguishable from origin-form and is routed
on its path. The authority is dropped either way: the upstream URL is built from the
service's base URL, never from the request.

Header checks follow RFC 9112 §6.3 (message body length: `Content-Length` together with
`Transfer-Encoding`, or conflicting `Content-Length` values, are request-smuggling vectors
and must be refused), RFC 9112 §3.2 (exactly one `Host`) and RFC 6585 §5 (431). Limits:
8 KiB for one header line (name + value), 16 KiB for all of them (nginx's default
`large_client_header_buffers 4 8k` allows similar sizes); oversized headers are refused
early so that no error page built from them can be stored (CPDoS).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_HEADER_LINE",
    "BadTarget",
    "check_headers",
    "check_target",
    "problem",
]

MAX_HEADER_LINE = 8192
MAX_HEADER_BYTES = 16384

# RFC 3986 pchar plus "/", minus ";" (parameter cloaking); "%" is checked separately.
_ALLOWED = (string.ascii_letters + string.digits + "-._~!$&'()*+,=:@/%").encode()
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})?")
# Encoded "/", "\" and "%" (double encoding), and every encoded control character.
_FORBIDDEN_ESCAPES = frozenset({0x2F, 0x5C, 0x25, 0x7F, *range(0x20)})
_UNRESERVED = frozenset((string.ascii_letters + string.digits + "-._~").encode())
# Each escape's normal spelling: an unreserved character itself, else upper-case hex.
_NORMAL = {
    f"{byte:02x}".encode(): bytes([byte]) if byte in _UNRESERVED else f"%{byte:02X}".encode()
    for byte in range(256)
}
_NORMAL.update({key.upper(): value for key, value in _NORMAL.items()})
_NORMAL.update({key[:1].upper() + key[1:]: value for key, value in _NORMAL.items()})
_NORMAL.update({key[:1] + key[1:].upper(): value for key, value in _NORMAL.items()})


class BadTarget(Exception):
    """A request refused before routing; becomes a problem+json response with `status`."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def check_target(scope: Mapping[str, Any]) -> str:
    """Return the request path to route on, check, key and forward (still percent-encoded,
    in its normal form: see the module docstring), or raise `BadTarget`."""
    target = scope.get("extensions", {}).get("cachegw.request_target")
    if target is not None and not target.startswith(b"/"):
        # Kept by cachegw's uvicorn protocol: httptools alone would reduce an absolute-form
        # target to its path (see _server.py).
        raise BadTarget(400, "The request target must be a path (origin-form), not a URL.")
    raw = scope.get("raw_path")
    if raw is None:  # not every ASGI server sends it; the decoded path is the best we have
        raw = scope["path"].encode("utf-8")
    if not raw.startswith(b"/"):
        raise BadTarget(400, "The request target must be a path starting with '/'.")
    bad = raw.translate(None, _ALLOWED)  # what is left is not allowed
    if bad:
        raise BadTarget(400, f"The request path contains a forbidden character {bad[:1]!r}.")
    if b"//" in raw:
        raise BadTarget(400, "The request path contains an empty segment ('//').")
    if b"%" in raw:
        raw = _normalise(raw)
    if b"." in raw:
        for segment in raw.split(b"/"):
            if segment in (b".", b".."):
                raise BadTarget(400, "The request path contains a '.' or '..' segment.")
    path: str = raw.decode("ascii")
    return path


def _normalise(raw: bytes) -> bytes:
    """``raw`` with escapes checked and in normal form; `BadTarget` for a refused one."""
    for match in _ESCAPE.finditer(raw):
        if match.group(1) is None:
            raise BadTarget(400, "The request path contains a malformed percent escape.")
        if int(match.group(1), 16) in _FORBIDDEN_ESCAPES:
            raise BadTarget(400, f"The request path contains a forbidden escape {match.group()!r}.")
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadTarget(
            400,
            "The request path's percent escapes are not well-formed UTF-8 "
            "(overlong forms and invalid sequences are refused).",
        ) from None
    parts = raw.split(b"%")
    return parts[0] + b"".join(_NORMAL[part[:2]] + part[2:] for part in parts[1:])


def check_headers(
    scope: Mapping[str, Any], *, max_header_bytes: int = MAX_HEADER_BYTES
) -> int | None:
    """Raise `BadTarget` (400 or 431) for ambiguous framing, bad `Host` or oversized
    headers; else return the body's declared length: ``0`` without a body, None when it
    is chunked (of unknown length)."""
    line_limit = min(MAX_HEADER_LINE, max_header_bytes)
    total = 0
    hosts = 0
    lengths: set[bytes] = set()
    chunked = False
    for name, value in scope["headers"]:
        size = len(name) + len(value)
        if size > line_limit:
            raise BadTarget(431, f"A request header is larger than {line_limit} bytes.")
        total += size
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            lengths.update(v.strip() for v in value.split(b","))
        elif name == b"transfer-encoding":
            chunked = True
    if total > max_header_bytes:
        raise BadTarget(431, f"The request headers are larger than {max_header_bytes} bytes.")
    if hosts > 1 or (hosts == 0 and scope.get("http_version") != "1.0"):
        raise BadTarget(400, "An HTTP/1.1 request must carry exactly one Host header.")
    if lengths and chunked:
        raise BadTarget(400, "Content-Length and Transfer-Encoding must not be sent together.")
    if len(lengths) > 1 or not all(v.isdigit() for v in lengths):
        raise BadTarget(400, "Content-Length must be a single non-negative integer.")
    if chunked:
        return None
    return int(next(iter(lengths))) if lengths else 0


def problem(status: int, title: str, detail: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Build an RFC 9457 `application/problem+json` response: (status, headers, body)."""
    body = json.dumps(
        {"type": "about:blank", "title": title, "status": status, "detail": detail}
    ).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    return status, headers, body
