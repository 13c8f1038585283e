"""Exceptions raised by cachegw.

All of them derive from one base class, so ``except CacheGWError`` catches
everything cachegw raises on purpose::

    CacheGWError
    ├── ConfigError        bad policy value, bad TOML file, bad declaration
    └── BackendError       a cache backend operation failed (always failed open)

Errors in *requests* (a hostile path, a malformed header) never surface as
exceptions: they become 4xx responses.
"""

from __future__ import annotations

__all__ = ["BackendError", "CacheGWError", "ConfigError"]


class CacheGWError(Exception):
    """Base class of every exception cachegw raises on purpose."""


class ConfigError(CacheGWError, ValueError):
    """A policy, declaration or configuration file is invalid.

    The message is a sentence that quotes the bad value, says where it was found
    (file and key, when there is one) and what was expected.
    """


class BackendError(CacheGWError):
    """A cache backend operation failed or ran out of time."""
