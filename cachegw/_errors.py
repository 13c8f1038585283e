"""Exceptions raised by cachegw.

All of them derive from one base class, so ``except CacheGWError`` catches
everything cachegw raises on purpose::

    CacheGWError
    └── ConfigError        bad policy value, bad TOML file, bad declaration

Errors in *requests* (a hostile path, a malformed header) never surface as
exceptions: they become 4xx responses. A failing cache backend raises nothing either:
cachegw fails open (see `cachegw._store`).
"""

from __future__ import annotations

__all__ = ["CacheGWError", "ConfigError"]


class CacheGWError(Exception):
    """Base class of every exception cachegw raises on purpose."""


class ConfigError(CacheGWError, ValueError):
    """A policy, declaration or configuration file is invalid.

    The message is a sentence that quotes the bad value, says where it was found
    (file and key, when there is one) and what was expected.
    """
