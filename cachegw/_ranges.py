"""Byte ranges served from a complete response (RFC 9110 §14).

Pure functions over plain data: the gateway asks its upstream for whole representations
on cacheable routes and cuts the range a client asked for out of the complete ``200``,
whether it came from the cache or was just fetched.

* one range (``bytes=0-99``, ``bytes=100-``, ``bytes=-100``) → ``206`` with
  ``Content-Range: bytes first-last/length``;
* no satisfiable range → ``416`` with ``Content-Range: bytes */length``;
* several ranges, a range unit other than ``bytes``, a syntax error, an ``If-Range``
  that does not match strongly, or a body with a ``Content-Encoding`` → the full ``200``
  (§14.2 lets a server ignore ``Range``;
  ``multipart/byteranges`` is not produced).
"""

from __future__ import annotations

from collections.abc import Mapping

from cachegw._encoding import encoded
from cachegw._policy import parse_http_date

__all__ = ["ranged", "select_range"]

Headers = list[tuple[bytes, bytes]]

# Headers that describe the whole body, not the part sent (RFC 9110 §15.3.7).
_WHOLE_BODY = frozenset({b"content-length", b"content-range"})
# A 416 carries no representation: only what describes the exchange stays.
_KEPT_ON_416 = frozenset(
    {b"date", b"age", b"cache-control", b"etag", b"last-modified", b"vary", b"via"}
)
_MAX_DIGITS = 18  # larger positions are no byte offset of any stored body


def select_range(value: str, length: int) -> tuple[int, int] | bool | None:
    """The one range ``value`` (a ``Range`` field value) asks of a ``length``-byte body.

    ``(first, last)`` inclusive when exactly one satisfiable byte range is asked for;
    ``False`` when the ranges are well formed but none is satisfiable (a ``416``); ``None``
    when the header is to be ignored: another unit, a syntax error, several ranges.
    """
    unit, sep, spec = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = [p.strip() for p in spec.split(",")]
    if not parts or any(not p for p in parts):
        return None
    parsed: list[tuple[int | None, int | None]] = []
    for part in parts:
        first, dash, last = part.partition("-")
        first, last = first.strip(), last.strip()
        if not dash or not _digits(first, empty=True) or not _digits(last, empty=True):
            return None
        if not first and not last:
            return None
        a = int(first) if first else None
        b = int(last) if last else None
        if a is not None and b is not None and b < a:
            return None  # invalid range-spec: the whole header is ignored (§14.1.1)
        parsed.append((a, b))
    if len(parsed) != 1:
        return None
    a, b = parsed[0]
    if a is None:  # suffix: the last b bytes
        assert b is not None
        if b == 0 or length == 0:
            return False
        return max(0, length - b), length - 1
    if a >= length:
        return False
    return a, length - 1 if b is None or b >= length else b


def _digits(text: str, *, empty: bool) -> bool:
    if not text:
        return empty
    return text.isascii() and text.isdigit() and len(text) <= _MAX_DIGITS


def if_range_matches(value: str, headers: Headers) -> bool:
    """Whether an ``If-Range`` precondition holds for a response with ``headers``
    (RFC 9110 §13.1.5): a strong ETag equal to the response's strong ETag, or a date equal
    to a ``Last-Modified`` that is strong (at least a second before ``Date``)."""
    value = value.strip()
    if value.startswith('"') or value.startswith("W/"):
        if value.startswith("W/"):
            return False
        etag = _header(headers, b"etag")
        return etag is not None and not etag.startswith("W/") and etag.strip() == value
    since = parse_http_date(value)
    modified = parse_http_date(_header(headers, b"last-modified"))
    date = parse_http_date(_header(headers, b"date"))
    return (
        since is not None
        and modified is not None
        and modified == since
        and date is not None
        and date - modified >= 1
    )


def _header(headers: Headers, name: bytes) -> str | None:
    for n, v in headers:
        if n == name:
            return v.decode("latin-1")
    return None


def ranged(
    request: Mapping[str, str], status: int, headers: Headers, body: bytes
) -> tuple[int, Headers, bytes] | None:
    """The ``206`` or ``416`` answering a ``GET`` with ``Range`` from the complete
    response (``status``, ``headers``, ``body``); None when the full response is the answer.

    ``request`` holds the request's headers (lower-case names). Only a ``200`` is cut.
    """
    value = request.get("range")
    if value is None or status != 200 or encoded(headers):
        # A part of a compressed body is useless to real clients (they decode each
        # response whole): the full response, as nginx answers (issue 25).
        return None
    if_range = request.get("if-range")
    if if_range is not None and not if_range_matches(if_range, headers):
        return None
    length = len(body)
    chosen = select_range(value, length)
    if chosen is None:
        return None
    if chosen is False:
        kept = [(n, v) for n, v in headers if n in _KEPT_ON_416 or not _is_content(n)]
        kept = [(n, v) for n, v in kept if n not in _WHOLE_BODY]
        kept += [
            (b"content-range", f"bytes */{length}".encode("ascii")),
            (b"content-length", b"0"),
        ]
        return 416, kept, b""
    assert chosen is not True
    first, last = chosen
    part = body[first : last + 1]
    out = [(n, v) for n, v in headers if n not in _WHOLE_BODY]
    out += [
        (b"content-range", f"bytes {first}-{last}/{length}".encode("ascii")),
        (b"content-length", str(len(part)).encode("ascii")),
    ]
    return 206, out, part


def _is_content(name: bytes) -> bool:
    return name.startswith(b"content-")
