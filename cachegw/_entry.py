"""The stored entry: a final response plus what is needed to judge and replay it.

On the wire an entry is a versioned, data-only envelope::

    b"CGW" + version byte + 4-byte big-endian header length + JSON header + body bytes

JSON carries only strings, numbers, booleans and lists, so decoding a value written by
anyone who can reach the backend can at worst give a wrong response, never run code
(no pickle anywhere). A value that does not decode is treated as a miss and deleted.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field

from cachegw._encoding import CODINGS

__all__ = ["Entry", "HitForMiss", "Item", "VaryMarker", "decode", "encode", "strong_etag"]

MAGIC = b"CGW\x01"
_LEN = struct.Struct(">I")
_HEAD = len(MAGIC) + _LEN.size

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
        head = {
            "k": "r",
            "s": item.status,
            "h": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in item.headers],
            "t": item.stored_at,
            "l": item.lifetime,
            "a": item.age0,
            "w": item.stale_while_revalidate,
            "e": item.stale_if_error,
            "m": item.must_revalidate,
            "p": item.shared_auth,
            "g": item.etag,
            "x": item.tags,
            "f": item.fetched_at,
            "r": item.keep,
            "d": item.fetch_time,
        }
        if item.coding:
            head["c"] = item.coding
        body = item.body
    raw = json.dumps(head, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return b"".join((MAGIC, _LEN.pack(len(raw)), raw, body))


def decode(data: bytes) -> Item | None:
    """The entry in ``data``, or None when it is not a well-formed envelope of this version.

    Every field is type-checked: a value that is not exactly what `encode` writes (a
    string where a number goes, ``NaN``, ``"false"`` for a flag) is rejected rather than
    coerced into a different meaning.
    """
    if not isinstance(data, bytes | bytearray | memoryview) or data[:4] != MAGIC:
        return None
    try:
        (size,) = _LEN.unpack_from(data, 4)
        end = _HEAD + size
        if end > len(data):
            return None
        head = json.loads(bytes(data[_HEAD:end]))
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
        if head["k"] != "r":
            return None
        headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in head["h"]]
        status = head["s"]
        etag = head["g"]
        tags = head["x"]
        coding = head.get("c", "")
        if (
            coding not in CODINGS
            or type(status) is not int
            or not 100 <= status <= 599
            or not (etag is None or isinstance(etag, str))
            or not _str_list(tags)
        ):
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


def _num(value: object) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise ValueError(value)
    return float(value)  # type: ignore[arg-type]


def _flag(value: object) -> bool:
    if type(value) is not bool:
        raise ValueError(value)
    return value


def _str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def strong_etag(body: bytes) -> str:
    """A quoted strong validator from the body's content: equal bodies, equal ETags, in
    every process (unlike fastapi-cache2's per-process ``hash()``)."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
