"""Cache keys from request parts (pure).

A key is a stable hash (sha256) of length-prefixed parts, so no choice of part values
can make two different requests collide by concatenation, and every process computes
the same key for the same request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote_plus

__all__ = ["canonical_query", "format_tag", "hash_parts", "vary_values"]


def hash_parts(prefix: str, parts: Iterable[str]) -> str:
    """``{prefix}:{sha256 hex}`` of the parts, each length-prefixed."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8", "surrogateescape")
        digest.update(b"%d:" % len(data))
        digest.update(data)
    return f"{prefix}:{digest.hexdigest()}"


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


def vary_values(names: Iterable[str], headers: Mapping[str, str]) -> list[str]:
    """``name=value`` parts for the request headers a response varies on.

    Several field lines of one header are already joined by the caller; whitespace
    around list items is normalised so ``gzip,br`` and ``gzip, br`` match
    (RFC 9111 §4.1 allows such normalisation).
    """
    out = []
    for name in names:
        value = headers.get(name)
        if value is None:
            out.append(f"{name}\x00")  # absent differs from empty
        else:
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
