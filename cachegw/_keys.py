"""Cache keys from request parts.

A key is a stable hash (sha256) of length-prefixed parts, so no choice of part values
can make two different requests collide by concatenation, and every process computes
the same key for the same request. `principal` runs a route's own key function safely.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote_plus

from starlette.requests import Request

from cachegw._policy import KeyFunc

logger = logging.getLogger("cachegw")

__all__ = [
    "canonical_query",
    "format_tag",
    "handler_key",
    "hash_parts",
    "origin",
    "principal",
    "vary_values",
]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def hash_parts(prefix: str, parts: Iterable[str]) -> str:
    """``{prefix}:{sha256 hex}`` of the parts, each length-prefixed."""
    chunks: list[bytes] = []
    for part in parts:
        data = part.encode("utf-8", "surrogateescape")
        chunks += (b"%d:" % len(data), data)
    return f"{prefix}:{hashlib.sha256(b''.join(chunks)).hexdigest()}"


def origin(scope: Mapping[str, Any]) -> str:
    """The scheme and host Starlette builds ``request.base_url`` (and so ``url_for``)
    from: ``scheme://`` plus the ``Host`` header or, without one, the server address.

    Read from the scope as the app sees it, i.e. after any trusted-proxy handling
    (uvicorn's ``--proxy-headers``, ``ProxyHeadersMiddleware``) has rewritten the scheme.
    The ``Host`` value is kept as sent (case and port included): Starlette echoes it byte
    for byte, so two spellings can produce two different bodies.
    """
    scheme = scope.get("scheme", "http")
    for name, value in scope["headers"]:
        if name == b"host":
            return f"{scheme}://{value.decode('latin-1')}"
    server = scope.get("server")
    if server is None:
        return f"{scheme}://"
    address, port = server
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{address}"
    return f"{scheme}://{address}:{port}"


#: `handler_key` results are memoised for at most _KEY_MEMO_SIZE requests whose variable
#: parts (path, query, Host, declared inputs, key part) hold at most _KEY_MEMO_PART_MAX
#: bytes together: under 2 MiB whatever clients send; longer ones are computed each time.
_KEY_MEMO_SIZE = 1024
_KEY_MEMO_PART_MAX = 512
_key_memo: dict[tuple[Any, ...], str] = {}


def handler_key(
    prefix: str,
    scope: Mapping[str, Any],
    route: str,
    template: str,
    path_params: Mapping[str, Any],
    key_extra: str = "",
    inputs: Iterable[str] = (),
    *,
    per_host: bool = True,
) -> str:
    """The primary key of a decorated handler's response (``@cached`` and its
    fastapi-cache2-compatible face share it, and so do hits answered before routing).

    Parts (docs/decorator.md, "What the key covers"): the route that matched — its
    handler (``route``: module and qualified name), the root path (where the app is
    mounted) with the route's path template, and the concrete path as the app received
    it, so one handler reached under two include prefixes or mounts never shares an entry
    whatever the FastAPI version reports as the template — the path params, the canonical
    query, the declared header and cookie inputs (``inputs``, see `cachegw._inputs`), the
    result of the route's ``key`` function and, unless ``per_host`` is off, the request's
    `origin` (a handler that builds links with ``url_for`` answers differently per host).
    The ``vary`` headers select a variant below this key (see the engine).

    Memoised on everything it reads (bounded, see ``_KEY_MEMO_SIZE``).
    """
    inputs = tuple(inputs)
    root_path: str = scope.get("root_path", "")
    path: str = scope.get("path", "")
    query: bytes = scope.get("query_string", b"")
    host = None
    if per_host:
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
                break
    params = tuple(f"{k}={path_params[k]}" for k in sorted(path_params))
    memo = (
        prefix,
        route,
        root_path,
        template,
        path,
        query,
        key_extra,
        inputs,
        params,
        # The server address may be a list (ASGI says iterable): a tuple in the memo.
        per_host and (scope.get("scheme", "http"), host, host or tuple(scope.get("server") or ())),
    )
    found = _key_memo.get(memo)
    if found is not None:
        return found
    key = hash_parts(
        prefix,
        (
            route,
            root_path + template,
            root_path + "\x00" + path,
            *params,
            canonical_query(query),
            *inputs,
            key_extra,
            origin(scope) if per_host else "",
        ),
    )
    variable = (path, query, key_extra, host or b"", *inputs, *params)
    if sum(map(len, variable)) <= _KEY_MEMO_PART_MAX:
        if len(_key_memo) >= _KEY_MEMO_SIZE:
            _key_memo.clear()
        _key_memo[memo] = key
    return key


def canonical_query(raw: bytes) -> str:
    """A canonical form of a query string, for keys of handlers that parse it.

    Pairs are split on ``&`` only (``;`` is data, never a separator: treating it as one
    is how "parameter cloaking" poisons caches), percent-decoded the way Starlette
    decodes them (``+`` is a space, ``a`` equals ``a=``), re-encoded one way, and
    stably sorted by name, so ``?b=2&a=1`` and ``?a=1&b=2`` share an entry while the
    order of repeated values of one name, which a handler may see, is kept.
    """
    if not raw:
        return ""
    pairs: list[tuple[str, str]] = []
    for item in raw.decode("latin-1").split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        pairs.append((_norm(name), _norm(value)))
    pairs.sort(key=lambda pair: pair[0])
    return "&".join(f"{name}={value}" for name, value in pairs)


def _norm(component: str) -> str:
    return quote(
        unquote_plus(component, encoding="utf-8", errors="surrogateescape"),
        safe="",
        errors="surrogateescape",
    )


_CASELESS_VALUES = frozenset({"accept-language", "accept-encoding", "accept-charset"})


def vary_values(names: Iterable[str], headers: Mapping[str, str]) -> list[str]:
    """``name=value`` parts for the request headers a response varies on.

    Several field lines of one header are already joined by the caller; whitespace
    around list items is normalised so ``gzip,br`` and ``gzip, br`` match, and so is the
    case of headers whose values are case-insensitive (language ranges, RFC 4647 §2;
    content codings and charsets, RFC 9110 §8.4.1, §12.5.2), so ``en-US`` and ``en-us``
    match (RFC 9111 §4.1 allows such normalisation).
    """
    out = []
    for name in names:
        value = headers.get(name)
        if value is None:
            out.append(f"{name}\x00")  # absent differs from empty
        else:
            if name in _CASELESS_VALUES:
                value = value.lower()
            out.append(f"{name}={','.join(p.strip() for p in value.split(','))}")
    return out


def format_tag(template: str, params: Mapping[str, object]) -> str:
    """A tag template filled from path params: ``"item:{item_id}"`` -> ``"item:42"``.

    A template naming a param the route does not have is kept literally.
    """
    try:
        return template.format_map(params)
    except (KeyError, IndexError, ValueError, AttributeError):
        return template


async def principal(key: KeyFunc, request: Request) -> str | None:
    """The result of a route's ``key`` function, or None when it fails.

    A failing key function must not turn into a 500, nor into a shared entry: the
    request is served uncached, and the error logged naming the function.
    """
    try:
        result = key(request)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, str):
            raise TypeError(f"it returned {result!r}, not a str")
        return result
    except Exception as exc:
        logger.error(
            "cachegw: key function %s raised %s: %s on %s %s; serving uncached",
            getattr(key, "__qualname__", repr(key)),
            type(exc).__name__,
            exc,
            request.method,
            request.url.path,
        )
        return None
