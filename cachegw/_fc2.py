"""What cachegw reads of fastapi-cache2's ``FastAPICache`` settings: the one adapter.

fastapi-cache2's public getters ``assert`` that ``init`` ran (and ``get_backend`` that the
backend is truthy: a backend with ``__len__`` is "not initialised" while empty), so the
decorator reads the class attributes behind them here, and nowhere else. Verified on the
versions pyproject.toml allows (``fastapi-cache2>=0.2.2,<0.3``); tests/test_fc2.py is the
contract that fails when a release changes them.
"""

from __future__ import annotations

from fastapi_cache import FastAPICache
from fastapi_cache.types import Backend, KeyBuilder

__all__ = [
    "DEFAULT_PREFIX",
    "backend",
    "enabled",
    "expire",
    "key_builder",
    "prefix",
    "settings",
    "status_header",
]

#: The key prefix when ``FastAPICache.init`` sets none.
DEFAULT_PREFIX = "cachegw"


def backend() -> Backend | None:
    """The backend given to ``FastAPICache.init``, or None before it."""
    return FastAPICache._backend


def enabled() -> bool:
    """``FastAPICache.init(enable=...)``: False turns caching off."""
    return FastAPICache._enable


def prefix(default: str = DEFAULT_PREFIX) -> str:
    """``FastAPICache.init(prefix=...)``, or ``default`` when it is unset or empty."""
    return FastAPICache._prefix or default


def settings() -> tuple[Backend | None, bool, str, float | None]:
    """``backend()``, ``enabled()``, ``prefix()`` and ``expire()`` in one read: what a
    decorated route's request needs, per request (``init`` may run again)."""
    return (
        FastAPICache._backend,
        FastAPICache._enable,
        FastAPICache._prefix or DEFAULT_PREFIX,
        FastAPICache._expire,
    )


def expire() -> float | None:
    """``FastAPICache.init(expire=...)``: the default ttl, if set."""
    return FastAPICache._expire


def key_builder() -> KeyBuilder | None:
    """``FastAPICache.init(key_builder=...)``, or None before ``init``."""
    return FastAPICache._key_builder


def status_header() -> str:
    """``FastAPICache.init(cache_status_header=...)``, fastapi-cache2's default otherwise."""
    return FastAPICache._cache_status_header or "X-FastAPI-Cache"
