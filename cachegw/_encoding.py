"""Compression the gateway negotiates: store gzip once, give each client what it accepts.

Pure functions over plain data. When a response is stored (`for_storage`):

* an uncompressed ``200`` of a compressible type (text, JSON, XML, JavaScript, SVG) of at
  least ``min_size`` bytes is stored gzip-compressed (coding `GZIP`): smaller entries, and
  no compression per hit;
* a ``200`` the upstream sent as ``gzip`` is stored as it came (coding `ORIGIN`), checked
  to decompress within a bound;
* anything else, and any response with ``Cache-Control: no-transform`` (RFC 9111
  §5.2.2.6), is stored as it came (no coding). Such a body with a ``Content-Encoding``
  the gateway cannot decode for a client (another coding, a gzip body that inflates past
  the bound or is several members) is stored as a variant for the ``Accept-Encoding`` it
  was fetched with (`encoded`; the engine keys it), never served to other clients.

When an entry with a coding is served (`for_client`), a client whose ``Accept-Encoding``
takes gzip (RFC 9110 §12.5.3) gets the stored bytes as they are; any other client gets
them decompressed, without ``Content-Encoding``. Both forms say ``Vary: Accept-Encoding``
and carry different ETags (RFC 9110 §8.8.3): the upstream's ETag stays on the form the
upstream sent, the other gets a suffix (``"abc"`` → ``"abc-gzip"`` or ``"abc-identity"``).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable

__all__ = [
    "GZIP",
    "ORIGIN",
    "accepts_gzip",
    "encoded",
    "for_client",
    "for_storage",
    "upstream_etag",
    "valid_etag",
    "with_vary",
]

Headers = list[tuple[bytes, bytes]]

GZIP = "gzip"  # the gateway compressed the body: the identity form is the upstream's
ORIGIN = "origin"  # the upstream sent the body gzip-compressed
CODINGS = frozenset({"", GZIP, ORIGIN})

_GZIP_SUFFIX = b"-gzip"
_IDENTITY_SUFFIX = b"-identity"
_LEVEL = 6  # zlib's default: most of level 9's ratio at a fraction of its time
_WORTH = 0.9  # keep the compressed form only when it saves at least 10 %
_TYPES = (
    "text/",
    "application/json",
    "application/javascript",
    "application/x-javascript",
    "application/ecmascript",
    "application/xml",
    "application/xhtml+xml",
    "application/rss+xml",
    "application/atom+xml",
    "application/ld+json",
    "application/problem+json",
    "application/graphql-response+json",
    "image/svg+xml",
)
_SUFFIXES = ("+json", "+xml")
# Headers describing the bytes of the body, rewritten for the other form.
_BODY_BOUND = frozenset({b"content-length", b"content-encoding", b"content-md5", b"etag"})
# RFC 9110 §8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE.
_ENTITY_TAG = re.compile(rb'(?:W/)?"[\x21\x23-\x7e\x80-\xff]*"')
_accepts_memo: dict[str, bool] = {}
_MEMO_SIZE = 1024
# The identity forms of recently served entries, by the id of the stored body (checked
# to be that very object): bounded in count and bytes, emptied when full.
_identity_memo: dict[int, tuple[bytes, Headers, Headers, bytes]] = {}
_identity_bytes = 0
_IDENTITY_MEMO_BYTES = 8 << 20


def compressible_type(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` names a textual type worth compressing."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media.startswith(_TYPES) or media.endswith(_SUFFIXES)


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an ``Accept-Encoding`` value accepts ``gzip`` (RFC 9110 §12.5.3).

    ``gzip`` or ``x-gzip`` with a non-zero weight accepts it, and so does ``*`` when gzip
    is not listed itself; an absent header is taken as identity only (a cache may not
    assume more).
    """
    if not accept_encoding:
        return False
    found = _accepts_memo.get(accept_encoding)
    if found is None:
        found = _parse_accepts_gzip(accept_encoding)
        if len(_accepts_memo) >= _MEMO_SIZE:  # bounded: common values stay, a flood can't grow it
            _accepts_memo.clear()
        _accepts_memo[accept_encoding] = found
    return found


def _parse_accepts_gzip(value: str) -> bool:
    star: bool | None = None
    for item in value.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        weight = _weight(params)
        if coding in ("gzip", "x-gzip"):
            return weight > 0
        if coding == "*":
            star = weight > 0
    return bool(star)


def _weight(params: str) -> float:
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                weight = float(value.strip())
            except ValueError:
                return 0.0
            return weight if 0.0 <= weight <= 1.0 else 0.0
    return 1.0


def gzip(body: bytes) -> bytes:
    """``body`` as a gzip member; the same bytes give the same output (no timestamp)."""
    packer = zlib.compressobj(_LEVEL, zlib.DEFLATED, 31)
    return packer.compress(body) + packer.flush()


def gunzip(body: bytes, limit: int) -> bytes | None:
    """``body`` decompressed, or None when it is not one whole gzip stream or would
    decompress to more than ``limit`` bytes (a decompression bomb)."""
    unpacker = zlib.decompressobj(31)
    try:
        out = unpacker.decompress(body, limit + 1)
    except zlib.error:
        return None
    if len(out) > limit or not unpacker.eof or unpacker.unused_data:
        return None
    return out


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    values = [v.decode("latin-1") for n, v in headers if n == name]
    return ", ".join(values) if values else None


def _suffixed(etag: bytes, suffix: bytes) -> bytes:
    quote = etag.rfind(b'"')
    if quote <= 0:
        return etag  # not a quoted entity-tag: left alone
    return etag[:quote] + suffix + etag[quote:]


def _unsuffixed(etag: bytes, suffix: bytes) -> bytes:
    tail = suffix + b'"'
    return etag[: -len(tail)] + b'"' if etag.endswith(tail) else etag


def valid_etag(value: bytes) -> bool:
    """Whether an ``ETag`` value is an entity-tag (RFC 9110 §8.8.3): quoted, optionally
    weak. An unquoted one is treated as absent: it cannot be compared, nor told apart per
    encoding."""
    return _ENTITY_TAG.fullmatch(value.strip()) is not None


def encoded(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the body has a ``Content-Encoding`` other than identity."""
    coding = _header(headers, b"content-encoding")
    return coding is not None and coding.strip().lower() not in ("", "identity")


def with_vary(headers: Headers) -> Headers:
    """``headers`` with ``Accept-Encoding`` among its ``Vary`` names."""
    return _with_vary(headers)


def _with_vary(headers: Headers) -> Headers:
    """``headers`` with ``Accept-Encoding`` among its ``Vary`` names."""
    for name, value in headers:
        if name == b"vary":
            names = {v.strip().lower() for v in value.split(b",")}
            if b"accept-encoding" in names or b"*" in names:
                return headers
    return [*headers, (b"vary", b"Accept-Encoding")]


def for_storage(
    status: int,
    headers: Headers,
    body: bytes,
    *,
    no_transform: bool,
    min_size: int,
    max_size: int,
) -> tuple[Headers, bytes, str]:
    """The headers, body and coding to store for a response about to be stored.

    ``max_size`` bounds the identity form of an upstream-compressed body.
    """
    if status != 200 or no_transform or _header(headers, b"content-range") is not None:
        return headers, body, ""
    encoding = _header(headers, b"content-encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        if encoding.strip().lower() in ("gzip", "x-gzip") and gunzip(body, max_size) is not None:
            # An exact length, even if the upstream sent the body chunked.
            kept = [(n, v) for n, v in headers if n != b"content-length"]
            kept.append((b"content-length", str(len(body)).encode()))
            return _with_vary(kept), body, ORIGIN
        return headers, body, ""
    if len(body) < min_size or not compressible_type(_header(headers, b"content-type")):
        return headers, body, ""
    packed = gzip(body)
    if len(packed) > len(body) * _WORTH:
        return headers, body, ""
    out: Headers = []
    for name, value in headers:
        if name == b"etag":
            out.append((name, _suffixed(value, _GZIP_SUFFIX)))
        elif name not in _BODY_BOUND:
            out.append((name, value))
    out += [(b"content-encoding", b"gzip"), (b"content-length", str(len(packed)).encode())]
    return _with_vary(out), packed, GZIP


def revalidated(headers: Headers, coding: str) -> Headers:
    """The headers of an entry with ``coding`` after a 304 updated them."""
    return _with_vary(headers) if coding else headers


def for_client(
    coding: str, headers: Headers, body: bytes, accept_encoding: str | None
) -> tuple[Headers, bytes]:
    """The form of a stored entry to send to a client with ``accept_encoding``."""
    if not coding or accepts_gzip(accept_encoding):
        return headers, body
    # Hot entries are the same objects hit after hit (the in-process L1): their identity
    # form is remembered instead of decompressed every time.
    remembered = _identity_memo.get(id(body))
    if remembered is not None and remembered[0] is body and remembered[1] is headers:
        return remembered[2], remembered[3]
    out_headers, plain = _identity(coding, headers, body)
    global _identity_bytes
    if _identity_bytes + len(plain) > _IDENTITY_MEMO_BYTES or len(_identity_memo) >= _MEMO_SIZE:
        _identity_memo.clear()
        _identity_bytes = 0
    _identity_memo[id(body)] = (body, headers, out_headers, plain)
    _identity_bytes += len(plain)
    return out_headers, plain


def _identity(coding: str, headers: Headers, body: bytes) -> tuple[Headers, bytes]:
    plain = gunzip(body, len(body) * 1032 + 64)  # deflate expands at most ~1032:1
    if plain is None:
        return headers, body  # checked when stored; never expected
    suffix_in, suffix_out = (_GZIP_SUFFIX, b"") if coding == GZIP else (b"", _IDENTITY_SUFFIX)
    out: Headers = []
    for name, value in headers:
        if name == b"etag":
            tag = _unsuffixed(value, suffix_in) if suffix_in else _suffixed(value, suffix_out)
            out.append((name, tag))
        elif name not in _BODY_BOUND:
            out.append((name, value))
    out.append((b"content-length", str(len(plain)).encode()))
    return out, plain


def upstream_etag(coding: str, etag: bytes) -> bytes:
    """The ETag the upstream gave the stored entry (to revalidate it with)."""
    return _unsuffixed(etag, _GZIP_SUFFIX) if coding == GZIP else etag
