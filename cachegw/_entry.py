"""The stored entry: a final response plus what is needed to judge and replay it.

On the wire an entry is a versioned, data-only envelope::

    b"CGW" + version byte + 4-byte big-endian header length + JSON header + body bytes

JSON carries only strings, numbers, booleans and lists, so decoding a value written by
anyone who can reach the backend can at worst give a wrong response, never run code
(no pickle anywhere). A value that does not decode is treated as a miss and deleted.

Version 2 (written now) keeps the fixed cost of an entry small, since it is paid once per
entry whatever the body's size: fields at their default value are left out, common
response headers are written as small numbers (`_FIXED`, `_NAMES`; a ``Content-Length``
equal to the body's length is recomputed from it), a gateway-made ETag is written once,
and the fetch's start is written as whole milliseconds before ``stored_at``. Times are
rounded towards the past (at most 1 ms): an entry looks a little older, never younger,
and a purge is never missed. Version 1 envelopes (cachegw before this format) still
decode; a version-1 reader rejects version 2 (a miss), so no reader can misread one.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from cachegw._encoding import CODINGS, upstream_etag

__all__ = ["Entry", "HitForMiss", "Item", "VaryMarker", "decode", "encode", "strong_etag"]

MAGIC = b"CGW\x02"
_MAGIC_V1 = b"CGW\x01"
_LEN = struct.Struct(">I")
_HEAD = len(MAGIC) + _LEN.size

# Version 2 header codes. Fixed forever: a change needs a new version.
# A whole header (name and value):
_BODY_LENGTH = 0  # content-length: the body's length
_FIXED: dict[int, tuple[bytes, bytes]] = {
    1: (b"content-encoding", b"gzip"),
    2: (b"vary", b"Accept-Encoding"),
    3: (b"content-type", b"application/json"),
    4: (b"via", b"1.1 cachegw"),
}
# A name, followed by its value:
_NAMES: dict[int, bytes] = {
    10: b"content-type",
    11: b"cache-control",
    12: b"etag",
    13: b"last-modified",
    14: b"date",
    15: b"expires",
    16: b"vary",
    17: b"content-encoding",
    18: b"content-length",
    19: b"via",
    20: b"content-language",
    21: b"surrogate-key",
    22: b"cache-tag",
}
_FIXED_CODES = {pair: code for code, pair in _FIXED.items()}
_NAME_CODES = {name: code for code, name in _NAMES.items()}

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Entry:
    """A stored response.

    ``stored_at`` is wall-clock time (seconds since the epoch) because entries are shared
    by processes; ``age0`` is the response's age when it was stored (RFC 9111 §4.2.3
    ``corrected_initial_age``). Freshness fields are fixed at store time. ``tags`` holds
    the entry's purge scopes (its tags, path, service: see `_purge`) and ``fetched_at``
    when the fetch that produced it started, which purges are compared against.
    """

    status: int
    headers: Headers  # end-to-end headers, lower-case names, in order
    body: bytes
    stored_at: float
    lifetime: float
    age0: float = 0.0
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    must_revalidate: bool = False
    shared_auth: bool = False  # may answer requests with credentials (RFC 9111 §3.5)
    etag: str | None = None
    tags: list[str] = field(default_factory=list)
    fetched_at: float = 0.0
    keep: float = 0.0  # kept this long past its stale windows, to be revalidated
    fetch_time: float = 0.0  # seconds the fetch that produced it took (for XFetch)
    coding: str = ""  # how the body is compressed for negotiation (see `_encoding`)
    stored: bool = True  # in this process: whether the backend took it (not encoded)
    # Answers built from it by the fast path (see `cachegw._fasthit`), kept while the entry is
    # in the process's L1, whose byte bound they count against (not encoded).
    answers: dict[Any, Any] | None = field(default=None, compare=False, repr=False)

    def age(self, now: float) -> float:
        """Current age (RFC 9111 §4.2.3)."""
        return self.age0 + max(0.0, now - self.stored_at)

    def ttl_left(self, now: float) -> float:
        """Seconds of freshness left; negative once stale."""
        return self.lifetime - self.age(now)

    def storage_ttl(self, now: float) -> float:
        """How long the backend should keep it: freshness plus the longest of the stale
        windows and the time it is kept for revalidation."""
        return self.ttl_left(now) + max(self.stale_while_revalidate, self.stale_if_error, self.keep)


@dataclass(slots=True)
class HitForMiss:
    """Stored under a primary key whose last response could not be stored.

    Later requests for the key go straight upstream instead of queueing behind a lock
    for a response that will not be stored either (Varnish's hit-for-miss). A storable
    response replaces it.
    """

    stored_at: float


@dataclass(slots=True)
class VaryMarker:
    """Stored under a primary key when responses there vary on request headers.

    The variants live under keys made of the primary key, ``gen`` and the request's
    values of ``names``. Deleting the marker (an invalidation) makes every variant
    unreachable at once: the next marker has another ``gen``.
    """

    names: list[str]  # lower-case request header names
    stored_at: float
    gen: str = ""


Item = Entry | VaryMarker | HitForMiss


def encode(item: Item) -> bytes:
    body = b""
    if isinstance(item, VaryMarker):
        head: dict[str, object] = {"k": "v", "n": item.names, "t": item.stored_at, "g": item.gen}
    elif isinstance(item, HitForMiss):
        head = {"k": "m", "t": item.stored_at}
    else:
        body = item.body
        stored_at = item.stored_at
        if math.isfinite(stored_at):  # (not finite: written as it is, and refused when read)
            stored_at = math.floor(stored_at * 1000) / 1000
        head = {"k": "r", "s": item.status, "h": _pack_headers(item.headers, len(body))}
        head["t"] = _compact(stored_at)
        head["l"] = _compact(item.lifetime)
        for name, value in (
            ("a", item.age0),
            ("w", item.stale_while_revalidate),
            ("e", item.stale_if_error),
            ("r", item.keep),
        ):
            if value:
                head[name] = _compact(value)
        if item.must_revalidate:
            head["m"] = True
        if item.shared_auth:
            head["p"] = True
        if item.etag is not None:
            # Mostly the ETag header itself (the gateway made it up): then written once.
            head["g"] = 1 if item.etag == _header_etag(item.headers, item.coding) else item.etag
        if item.tags:
            head["x"] = item.tags
        if item.fetched_at and math.isfinite(stored_at - item.fetched_at):
            # Whole milliseconds before ``stored_at``, rounded so that the decoded time is
            # never later than the real one (a purge after the fetch began is never missed).
            before = math.ceil((stored_at - item.fetched_at) * 1000)
            if stored_at - before / 1000 > item.fetched_at:
                before += 1
            head["o"] = before
        fetch_time = round(item.fetch_time, 4)
        if fetch_time:
            head["d"] = fetch_time
        if item.coding:
            head["c"] = item.coding
    raw = json.dumps(head, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return b"".join((MAGIC, _LEN.pack(len(raw)), raw, body))


def _compact(value: float) -> float | int:
    """``value``, written without ``.0`` when whole."""
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _pack_headers(headers: Headers, body_length: int) -> list[int | str]:
    out: list[int | str] = []
    length = str(body_length).encode()
    for name, value in headers:
        fixed = _FIXED_CODES.get((name, value))
        if fixed is not None:
            out.append(fixed)
        elif name == b"content-length" and value == length:
            out.append(_BODY_LENGTH)
        else:
            code = _NAME_CODES.get(name)
            out.append(name.decode("latin-1") if code is None else code)
            out.append(value.decode("latin-1"))
    return out


def _unpack_headers(packed: object, body_length: int) -> Headers:
    if not isinstance(packed, list):
        raise ValueError(packed)
    out: Headers = []
    items = iter(packed)
    for item in items:
        if type(item) is int:
            if item == _BODY_LENGTH:
                out.append((b"content-length", str(body_length).encode()))
                continue
            if item in _FIXED:
                out.append(_FIXED[item])
                continue
            name = _NAMES[item]
        elif isinstance(item, str):
            name = item.encode("latin-1")
        else:
            raise ValueError(item)
        value = next(items)  # StopIteration: caught by the caller
        if not isinstance(value, str):
            raise ValueError(value)
        out.append((name, value.encode("latin-1")))
    return out


def _header_etag(headers: Headers, coding: str) -> str | None:
    """The upstream form's ETag as the stored ``etag`` header gives it."""
    for name, value in headers:
        if name == b"etag":
            return upstream_etag(coding, value).decode("latin-1")
    return None


def decode(data: bytes) -> Item | None:
    """The entry in ``data``, or None when it is not a well-formed envelope of this version.

    Every field is type-checked: a value that is not exactly what `encode` writes (a
    string where a number goes, ``NaN``, ``"false"`` for a flag) is rejected rather than
    coerced into a different meaning.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        return None
    version = bytes(data[:4])
    if version == _MAGIC_V1:
        return _decode_v1(data)
    if version != MAGIC:
        return None
    try:
        read = _head(data)
        if not isinstance(read, tuple):
            return read  # a Vary marker, or None
        head, end = read
        body = bytes(data[end:])
        headers = _unpack_headers(head["h"], len(body))
        status = head["s"]
        tags = head.get("x", [])
        coding = head.get("c", "")
        etag = head.get("g")
        if etag == 1 and type(etag) is int:
            etag = _header_etag(headers, coding) if coding in CODINGS else None
            if etag is None:
                return None
        if not _valid(status, etag, tags, coding):
            return None
        stored_at = _num(head["t"])
        before = head.get("o")
        if before is not None and type(before) is not int:
            return None
        return Entry(
            status=status,
            headers=headers,
            body=body,
            stored_at=stored_at,
            lifetime=_num(head["l"]),
            age0=_num(head.get("a", 0)),
            stale_while_revalidate=_num(head.get("w", 0)),
            stale_if_error=_num(head.get("e", 0)),
            must_revalidate=_flag(head.get("m", False)),
            shared_auth=_flag(head.get("p", False)),
            etag=etag,
            tags=list(tags),
            fetched_at=0.0 if before is None else stored_at - before / 1000,
            keep=_num(head.get("r", 0)),
            fetch_time=_num(head.get("d", 0)),
            coding=coding,
        )
    except (
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        struct.error,
        UnicodeError,
        StopIteration,
    ):
        return None


def _valid(status: object, etag: object, tags: object, coding: object) -> bool:
    """Whether an envelope's status, ETag, tags and coding have their types and ranges."""
    return (
        coding in CODINGS
        and type(status) is int
        and 100 <= status <= 599
        and (etag is None or isinstance(etag, str))
        and _str_list(tags)
    )


def _head(data: bytes | bytearray | memoryview) -> tuple[dict[str, Any], int] | Item | None:
    """An envelope's JSON head and where its body starts; a Vary marker is decoded whole.
    Raises what the callers catch on malformed data."""
    (size,) = _LEN.unpack_from(data, 4)
    end = _HEAD + size
    if end > len(data):
        return None
    head = json.loads(bytes(data[_HEAD:end]))
    if head["k"] != "r":
        return _marker(head)
    return head, end


def _decode_v1(data: bytes | bytearray | memoryview) -> Item | None:
    """A version-1 envelope (every field written, headers as name/value pairs)."""
    try:
        read = _head(data)
        if not isinstance(read, tuple):
            return read  # a Vary marker, or None
        head, end = read
        headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in head["h"]]
        status = head["s"]
        etag = head["g"]
        tags = head["x"]
        coding = head.get("c", "")
        if not _valid(status, etag, tags, coding):
            return None
        return Entry(
            status=status,
            headers=headers,
            body=bytes(data[end:]),
            stored_at=_num(head["t"]),
            lifetime=_num(head["l"]),
            age0=_num(head["a"]),
            stale_while_revalidate=_num(head["w"]),
            stale_if_error=_num(head["e"]),
            must_revalidate=_flag(head["m"]),
            shared_auth=_flag(head["p"]),
            etag=etag,
            tags=list(tags),
            fetched_at=_num(head["f"]),
            keep=_num(head["r"]),
            fetch_time=_num(head["d"]),
            coding=coding,
        )
    except (ValueError, KeyError, TypeError, AttributeError, struct.error, UnicodeError):
        return None


def _marker(head: dict[str, object]) -> Item | None:
    """The vary marker or hit-for-miss in ``head`` (the same in both versions)."""
    if head["k"] == "m":
        return HitForMiss(stored_at=_num(head["t"]))
    if head["k"] == "v":
        names = head["n"]
        if not _str_list(names):
            return None
        gen = head["g"]
        if not isinstance(gen, str):
            return None
        return VaryMarker(names=list(names), stored_at=_num(head["t"]), gen=gen)
    return None


def _num(value: object) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise ValueError(value)
    return float(value)  # type: ignore[arg-type]


def _flag(value: object) -> bool:
    if type(value) is not bool:
        raise ValueError(value)
    return value


def _str_list(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def strong_etag(body: bytes) -> str:
    """A quoted strong validator from the body's content: equal bodies, equal ETags, in
    every process (unlike fastapi-cache2's per-process ``hash()``)."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
