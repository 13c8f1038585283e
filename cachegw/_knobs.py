"""Declaring a configuration knob once: its parser, its `cachegw check` cell, its docs.

A `CachePolicy` field carries ``metadata=knob(...)`` (cachegw._policy); a `Gateway` field
of the ``[cache]`` or ``[server]`` table, or a `ServerLimits` one, ``metadata=setting(...)``
(cachegw._gateway, cachegw._limits). The parsers and cells here are shared by every
declaration. A parser takes the value as given and its
name, and returns the value held or raises `ConfigError` whose message starts with the
name ("ttl must be ...").
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cachegw._errors import ConfigError

__all__ = [
    "Knob",
    "Setting",
    "as_beta",
    "as_bytes",
    "as_duration",
    "as_flag",
    "as_fraction",
    "as_header_names",
    "as_matching",
    "as_methods",
    "as_optional_duration",
    "as_positive_duration",
    "as_size",
    "as_statuses",
    "as_str_list",
    "as_whole",
    "defaults_of",
    "flag_cell",
    "knob",
    "list_cell",
    "number_cell",
    "parse_duration",
    "seconds_cell",
    "setting",
    "settings_of",
    "size_cell",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def parse_duration(value: object, *, what: str) -> float:
    """Seconds from a number or a string like ``"90"``, ``"90s"``, ``"5m"``, ``"1h"``, ``"2d"``.

    Raises `ConfigError` quoting the bad value when it is not a duration ≥ 0.
    """
    seconds: float | None = None
    if isinstance(value, bool):
        seconds = None
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            seconds = float(match.group(1)) * _UNIT[(match.group(2) or "s").lower()]
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(
            f"{what} must be a number of seconds ≥ 0 (or a string like '90s', '5m', '1h'), "
            f"got {value!r}"
        )
    return seconds


def as_header_names(value: object, what: str) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, Iterable):
        raise ConfigError(f"{what} must be a list of header names, got {value!r}")
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise ConfigError(f"{what} must be a list of header names, got {name!r} in {value!r}")
        out.append(name.lower())
    return tuple(sorted(set(out)))


def as_str_list(value: object, what: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, Iterable) or not all(isinstance(i, str) and i for i in items):
        raise ConfigError(f"{what} must be a list of non-empty strings, got {value!r}")
    return tuple(items)


# -- parsers: (value as given, its name) -> the value held; ConfigError naming it ---------


def as_duration(value: object, what: str) -> float:
    return parse_duration(value, what=what)


def as_optional_duration(value: object, what: str) -> float | None:
    return None if value is None else parse_duration(value, what=what)


def as_methods(value: object, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    methods = as_str_list(value, what)
    if not all(_TOKEN.match(m) for m in methods):
        raise ConfigError(f"{what} must be a list of HTTP methods, got {value!r}")
    return tuple(sorted({m.upper() for m in methods}))


def as_statuses(value: object, what: str) -> frozenset[int]:
    if (
        isinstance(value, str | bytes)
        or not isinstance(value, Iterable)
        or not all(
            isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599 for s in value
        )
    ):
        raise ConfigError(f"{what} must be a list of HTTP status codes (100-599), got {value!r}")
    return frozenset(value)


def as_size(value: object, what: str) -> int:
    if isinstance(value, str):
        # Imported here: the size parser lives with the memory backend's byte bounds.
        from cachegw._backends._memory import parse_size

        value = parse_size(value, what=what)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{what} must be a whole number of bytes ≥ 0, got {value!r}")
    return value


def as_fraction(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"{what} must be a fraction from 0 to 1, got {value!r}")
    return float(value)


def as_beta(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise ConfigError(f"{what} must be a number from 0 to 100, got {value!r}")
    return float(value)


def as_flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    return value


# -- knob cells: the value as `cachegw check` shows it -------------------------------------


def seconds_cell(value: float) -> str:
    return f"{value:g}s"


def size_cell(value: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= factor and value % factor == 0:
            return f"{value // factor}{unit}"
    return f"{value}B"


def list_cell(value: tuple[str, ...]) -> str:
    return ",".join(value) or "-"


def number_cell(value: float) -> str:
    return f"{value:g}" if value else "-"


@dataclass(frozen=True, slots=True)
class Knob:
    """How one `CachePolicy` field appears everywhere else. Declared with the field
    (``field(metadata=knob(...))``), so that a knob's type, default, parser, TOML key
    (its name), ``@cached`` parameter, ``cachegw check`` column and docs line all come
    from one place; tests/test_knobs.py fails when one of them is missing.
    """

    parse: Callable[[Any, str], Any]  # validates and normalises; ConfigError naming the knob
    column: str  # its `cachegw check` column
    cell: Callable[[Any], str]  # its value in that column
    default_doc: str  # the default as docs/policies.md writes it
    decorator: bool = True  # a parameter of @cached (methods is not: the route says it)


def knob(
    parse: Callable[[Any, str], Any],
    column: str,
    cell: Callable[[Any], str],
    default_doc: str,
    *,
    decorator: bool = True,
) -> dict[str, Knob]:
    return {"knob": Knob(parse, column, cell, default_doc, decorator)}


@dataclass(frozen=True, slots=True)
class Setting:
    """How one gateway-wide setting appears everywhere else. Declared with its field, on
    `Gateway` or on `ServerLimits` (``field(metadata=setting(...))``), so that its TOML
    table and key (its name), validation, ``cachegw check`` line, ``cachegw serve`` flag,
    reload rule and docs row all come from one place; tests/test_knobs.py fails when one
    of them is missing.
    """

    table: str  # its TOML table: "cache", "admin", "server" or "services" (`UpstreamLimits`)
    parse: Callable[[Any, str], Any]  # validates and normalises; ConfigError naming it
    type_doc: str  # its type as docs/gateway.md's TOML reference writes it
    default_doc: str  # its default, likewise
    cell: Callable[[Any], str] = str  # its value in `cachegw check`'s settings line
    live: bool = False  # a reload applies a change (else the reload asks for a restart)
    flag: tuple[type, str] | None = None  # `cachegw serve --<name>`: click type and help
    key: str = ""  # its TOML key, when it is not the field's name (admin_token_env: token_env)


def setting(
    table: str,
    parse: Callable[[Any, str], Any],
    type_doc: str,
    default_doc: str,
    *,
    cell: Callable[[Any], str] = str,
    live: bool = False,
    flag: tuple[type, str] | None = None,
    key: str = "",
) -> dict[str, Setting]:
    return {"setting": Setting(table, parse, type_doc, default_doc, cell, live, flag, key)}


def settings_of(cls: object) -> dict[str, Setting]:
    """The settings a dataclass declares, in declaration order, by field name."""
    if not dataclasses.is_dataclass(cls):
        return {}
    return {
        f.name: f.metadata["setting"] for f in dataclasses.fields(cls) if "setting" in f.metadata
    }


def defaults_of(cls: object) -> dict[str, Any]:
    """The defaults of the settings a dataclass declares."""
    if not dataclasses.is_dataclass(cls):
        return {}
    found: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if "setting" in f.metadata:
            if f.default_factory is not dataclasses.MISSING:
                found[f.name] = f.default_factory()
            else:
                found[f.name] = f.default
    return found


# -- parsers of settings ---------------------------------------------------------------------


def as_bytes(value: object, what: str) -> int:
    """A size: a number of bytes, or a string like ``"64MiB"``."""
    from cachegw._backends._memory import parse_size

    return parse_size(value, what=what)  # type: ignore[arg-type]  # it checks the type


def as_whole(low: int, high: int | None = None) -> Callable[[object, str], int]:
    """A whole number from ``low`` (to ``high``)."""

    def parse(value: object, what: str) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            span = f"≥ {low}" if high is None else f"from {low} to {high}"
            raise ConfigError(f"{what} must be a whole number {span}, got {value!r}")
        return value

    return parse


def as_positive_duration(value: object, what: str) -> float:
    """A duration > 0."""
    seconds = parse_duration(value, what=what)
    if seconds <= 0:
        raise ConfigError(f"{what} must be a duration > 0, got 0")
    return seconds


def as_matching(pattern: str, form: str) -> Callable[[object, str], str]:
    """A string matching ``pattern``, described as ``form`` in the error."""
    compiled = re.compile(pattern)

    def parse(value: object, what: str) -> str:
        if not isinstance(value, str) or not compiled.match(value):
            raise ConfigError(f"{what} must be {form}, got {value!r}")
        return value

    return parse


def flag_cell(value: bool) -> str:
    return "true" if value else "false"
