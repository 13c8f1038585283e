"""Exceptions raised by cachegw.

All of them derive from one base class, so ``except CacheGWError`` catches
everything cachegw raises on purpose::

    CacheGWError
    └── ConfigError        bad policy value, bad TOML file, bad declaration

No message carries a secret: `redact` takes the password out of every URL in it
(``redis://app:***@host``), so a bad or changed Redis URL can be reported in logs, the
admin API and the command line's output.

Errors in *requests* (a hostile path, a malformed header) never surface as
exceptions: they become 4xx responses. A failing cache backend raises nothing either:
cachegw fails open (see `cachegw._store`).
"""

from __future__ import annotations

import re

__all__ = ["CacheGWError", "ConfigError", "redact"]

# The password of a URL's userinfo (``scheme://user:password@``; it runs to the last "@"
# before a space or quote: more than the password when a later "@" follows, never less)
# and password-like query parameters.
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@'\"]*):[^\s'\"]*@")
_QUERY_SECRET = re.compile(r"([?&](?:password|passwd|pass|pwd|secret|token)=)[^&\s'\"#]*", re.I)


def redact(text: str) -> str:
    """``text`` with every URL password in it replaced by ``***``."""
    if "://" not in text and "=" not in text:
        return text
    return _QUERY_SECRET.sub(r"\1***", _USERINFO.sub(r"\1:***@", text))


class CacheGWError(Exception):
    """Base class of every exception cachegw raises on purpose."""


class ConfigError(CacheGWError, ValueError):
    """A policy, declaration or configuration file is invalid.

    The message is a sentence that quotes the bad value, says where it was found
    (file and key, when there is one) and what was expected; passwords in it are
    redacted (`redact`).
    """

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))
