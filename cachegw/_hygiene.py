"""What is forwarded to an upstream and back: header hygiene (hop-by-hop headers, the
gateway's own forwarding headers, routing overrides, our ``Via``), the RFC 9110 field
checks of a response, the upstream URL built from parts, and ``Location`` rewriting.

The URL is built from parts, never by joining strings: `URL.join("//evil/x")` and
`base + "@evil/x"` reach other hosts (docs/security.md, "Attacks and how each is handled").
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

__all__ = [
    "GATEWAY_SET",
    "OVERRIDES",
    "ROUTING_OVERRIDES",
    "Headers",
    "invalid_field",
    "is_override",
    "public_location",
    "request_headers",
    "response_headers",
    "upstream_root",
    "upstream_url",
]

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1, plus the non-standard Proxy-Connection and HTTP2-Settings (RFC 7540 §3.2.1).
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"http2-settings",
    }
)
# Set by the gateway itself; a client's values are not trusted. Host is set by httpx.
GATEWAY_SET = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
        b"via",
        b"x-real-ip",
        b"host",
    }
)
# Headers that make common frameworks answer for another path or method than the request
# line's (Symfony and IIS read X-Original-URL / X-Rewrite-URL; Rails, Express, Laravel
# and ASP.NET honour method overrides): forwarding one would run something other than what
# the route and its method list checked ("one path"), so none can be allowed through.
ROUTING_OVERRIDES = frozenset(
    {
        b"x-original-url",
        b"x-original-uri",
        b"x-rewrite-url",
        b"x-override-url",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-original-method",
    }
)
# Every request header that tells a framework which host, scheme, port or prefix to build
# URLs with or route on (Django's USE_X_FORWARDED_HOST/PORT, Rails and Rack, Express's
# trust proxy, Spring's ForwardedHeaderFilter, Werkzeug's ProxyFix): removed before
# forwarding unless a service's `forward_headers` lets it through *and keys it* (issue 10:
# every forwarded input is keyed or dropped). Every ``X-Forwarded-*`` header is one too.
OVERRIDES = ROUTING_OVERRIDES | frozenset(
    {
        b"x-original-host",
        b"x-host",
        b"x-http-host-override",
        b"x-scheme",
        b"x-url-scheme",
        b"front-end-https",
    }
)
# Removed from every forwarded request and response (checked first: one set lookup).
_REQUEST_DROP = _HOP_BY_HOP | GATEWAY_SET
_RESPONSE_DROP = _HOP_BY_HOP
_RESPONSE_DROP_LENGTH = _HOP_BY_HOP | {b"content-length"}
_VIA = b"1.1 cachegw"
# RFC 9110 §7.6.3: a forwarded request's Via names the protocol version the gateway
# received it in (the upstream is always spoken to in HTTP/1.1, so responses say 1.1).
_REQUEST_VIA = {"1.0": b"1.0 cachegw", "1.1": _VIA, "2": b"2 cachegw", "3": b"3 cachegw"}
# RFC 9110 §5.1 (a field name is a token) and §5.5 (a field value has no control byte but
# HTAB; CR, LF and NUL are never valid). A response breaking them is a 502, never stored:
# stored, it would break every later answer for its URL.
_FIELD_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Every name a token: the names joined by a space (not a token character).
_FIELD_NAMES = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?: [!#$%&'*+.^_`|~0-9A-Za-z-]+)*")


def invalid_field(raw: Headers) -> bytes | None:
    """The name of the first header that breaks RFC 9110's field rules, or None."""
    if not raw:
        return None
    # Two pattern runs over all the fields at once; the first bad one is looked for only
    # when there is one.
    names = b" ".join([n for n, _ in raw])
    if (
        _FIELD_NAMES.fullmatch(names)
        and names.count(b" ") == len(raw) - 1  # no space within a name
        and not _BAD_VALUE.search(b"".join([v for _, v in raw]))
    ):
        return None
    for name, value in raw:
        if not _FIELD_NAME.fullmatch(name) or _BAD_VALUE.search(value):
            return name
    return None


@functools.lru_cache(maxsize=256)
def upstream_root(base: str) -> httpx.URL:
    return httpx.URL(base)


def upstream_url(base: str, path: str, raw_query: bytes) -> httpx.URL:
    """The upstream URL for `path` (still encoded, starting with "/") below `base`."""
    if not path.startswith("/"):
        raise ValueError(f"path must start with '/', got {path!r}")
    root = upstream_root(base)
    raw_path = root.raw_path.partition(b"?")[0].rstrip(b"/") + path.encode("ascii")
    if raw_query:
        raw_path += b"?" + raw_query
    return httpx.URL(scheme=root.scheme, host=root.host, port=root.port, raw_path=raw_path)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def public_location(value: bytes, base: str, prefix: str) -> bytes | None:
    """A ``Location`` / ``Content-Location`` value pointing at the upstream ``base``
    (``http://host:port/base``), as the path-absolute reference the gateway's client
    reaches it by (``prefix`` + the path below the base path); None to leave it alone.

    nginx's ``proxy_redirect default``: only the upstream's own origin is rewritten (either
    scheme, the same host and port), and only below its base path. The result names no
    scheme or host, so an entry stored with it is right for every client, whatever ``Host``
    or scheme each used (RFC 9110 §10.2.2 allows a relative ``Location``). A result that
    would read as a network-path reference (``//other/x``, ``/\\other``) is not made.
    """
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.netloc or "@" in parts.netloc:
        return None
    root = upstream_root(base)
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        return None
    if parts.hostname != root.host.lower() or port != (root.port or _DEFAULT_PORTS[root.scheme]):
        return None
    base_path = root.raw_path.partition(b"?")[0].rstrip(b"/").decode("ascii")
    path = parts.path or "/"
    if base_path:
        if path == base_path:
            path = "/"
        elif path.startswith(base_path + "/"):
            path = path[len(base_path) :]
        else:
            return None
    public = prefix + path if prefix else path
    if public[1:2] in ("/", "\\"):
        return None
    if parts.query:
        public += "?" + parts.query
    if parts.fragment:
        public += "#" + parts.fragment
    return public.encode("ascii")


def _connection_named(headers: Headers) -> set[bytes]:
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }


def is_override(name: bytes) -> bool:
    """Whether a (lower-case) request header is one the gateway removes unless allowed."""
    return name in OVERRIDES or name.startswith(b"x-forwarded-")


def request_headers(
    scope: Mapping[str, Any],
    *,
    client_ip: str,
    proto: str,
    host: str | None,
    allow: frozenset[bytes] = frozenset(),
) -> Headers:
    """Client headers to forward, plus the gateway's own X-Forwarded-* and Via.

    Removed: hop-by-hop headers, the ones the gateway sets itself, and every override
    header (`is_override`) not in ``allow`` (the service's ``forward_headers``, which its
    routes key on). ``host`` is the X-Forwarded-Host to send (a name from the service's
    ``hosts``), or None for none.

    A name spelled with underscores for one of those (``X_Forwarded_Host``) is removed
    too, allowed or not: WSGI and CGI servers read ``_`` and ``-`` alike (both become
    ``HTTP_X_FORWARDED_HOST``), so it would reach such a framework as the header itself,
    unkeyed. nginx ignores every such name by default (``underscores_in_headers off``).
    """
    raw: Headers = scope["headers"]
    drop = _REQUEST_DROP
    out = []
    for name, value in raw:
        lower = name.lower()
        if lower in drop:
            if lower == b"connection":
                drop = _REQUEST_DROP | _connection_named(raw)  # and what it names
            continue
        if (lower in OVERRIDES or lower.startswith(b"x-forwarded-")) and lower not in allow:
            continue  # `is_override`, inline: it runs for every header of every request
        if b"_" in lower:
            dashed = lower.replace(b"_", b"-")
            if dashed in drop or is_override(dashed):
                continue
        out.append((name, value))
    if drop is not _REQUEST_DROP:
        # A Connection header may name headers that came before it.
        out = [
            (n, v)
            for n, v in out
            if n.lower() not in drop and n.lower().replace(b"_", b"-") not in drop
        ]
    out += [(b"x-forwarded-for", client_ip.encode()), (b"x-forwarded-proto", proto.encode())]
    if host is not None:
        out.append((b"x-forwarded-host", host.encode("latin-1")))
    out.append((b"via", _REQUEST_VIA.get(scope.get("http_version", "1.1"), _VIA)))
    return out


def response_headers(
    raw: Headers, content_length: int | None = None, *, drop_length: bool = False
) -> Headers:
    """Upstream headers to send on: lower-case, end-to-end only, our `Via` appended; with
    ``content_length``, the upstream's Content-Length replaced by it (placed last); with
    ``drop_length``, none sent on (an answer without content)."""
    drop = _RESPONSE_DROP
    if content_length is not None or drop_length:
        drop = _RESPONSE_DROP_LENGTH
    out: Headers = []
    via: list[bytes] = []
    named = False
    for name, value in raw:
        name = name.lower()
        if name == b"via":
            via.append(value)
        elif name not in drop:
            out.append((name, value))
        elif name == b"connection":
            named = True
    if named:
        connection = _connection_named(raw)
        out = [(n, v) for n, v in out if n not in connection]
    out.append((b"via", b", ".join(via) + b", " + _VIA if via else _VIA))
    if content_length is not None:
        out.append((b"content-length", str(content_length).encode()))
    return out
