"""Limits on connections, each declared once: `ServerLimits`, on client connections, that
`cachegw serve` enforces (the ``[server]`` table; cachegw._server's protocol enforces
them), and `UpstreamLimits`, on a service's connections to its upstream (keys of each
``[[services]]`` table and `Service` parameters; cachegw._upstream applies them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cachegw._errors import ConfigError
from cachegw._knobs import (
    Setting,
    as_whole,
    defaults_of,
    parse_duration,
    seconds_cell,
    setting,
    settings_of,
)

__all__ = ["ServerLimits", "UpstreamLimits"]


def _seconds_over_0(value: object, what: str) -> float:
    seconds = parse_duration(value, what=what)
    if seconds <= 0:
        raise ConfigError(
            f"{what} must be a number of seconds > 0 (or a string like '30s'), got {value!r}"
        )
    return seconds


def _limit(default_doc: str, kind: type, flag: str) -> dict[str, Setting]:
    """A timeout of client connections: a duration > 0 with a `cachegw serve` flag."""
    return setting(
        "server", _seconds_over_0, "duration", default_doc, cell=seconds_cell, flag=(kind, flag)
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerLimits:
    """Limits on client connections, enforced by `cachegw serve` (the ``[server]`` table).

    * **header_timeout** - seconds to receive a whole request head, counted from the
      connection's start or the request's first byte (nginx ``client_header_timeout``,
      60 s). Also bounds a connection that sends nothing at all.
    * **body_timeout** - seconds between two reads of a request body (nginx
      ``client_body_timeout``, 60 s).
    * **keepalive_timeout** - seconds an idle connection is kept open between requests
      (nginx ``keepalive_timeout``, 75 s).
    * **send_timeout** - seconds a client may go without accepting any bytes of a
      response being written (nginx ``send_timeout``, 60 s).
    * **max_header_fields** - most header fields in one request; more is a 431 (nginx
      bounds the size of headers, not their number; Apache ``LimitRequestFields``, 100).
    """

    # Each declared once (see cachegw._knobs.Setting): the [server] key, validation, the
    # `cachegw serve` flag, `cachegw check`'s settings line and the reload rule follow.
    header_timeout: float = field(
        default=10.0,
        metadata=_limit(
            "`10`",
            float,
            "Seconds to receive a request head (overrides [server] header_timeout; default 10).",
        ),
    )
    body_timeout: float = field(
        default=30.0,
        metadata=_limit(
            "`30`",
            float,
            "Seconds between two reads of a request body (overrides [server]; default 30).",
        ),
    )
    keepalive_timeout: float = field(
        default=20.0,
        metadata=_limit(
            "`20`",
            float,
            "Seconds an idle connection is kept between requests (overrides [server]; default 20).",
        ),
    )
    send_timeout: float = field(
        default=30.0,
        metadata=_limit(
            "`30`",
            float,
            "Seconds a client may take no response bytes (overrides [server]; default 30).",
        ),
    )
    max_header_fields: int = field(
        default=100,
        metadata=setting(
            "server",
            as_whole(1, 10_000),
            "integer",
            "`100`",
            flag=(
                int,
                "Most header fields in a request; more is a 431 (overrides [server]; default 100).",
            ),
        ),
    )

    def __post_init__(self) -> None:
        for name, declared in settings_of(type(self)).items():
            object.__setattr__(self, name, declared.parse(getattr(self, name), name))


def _upstream_seconds(value: object, what: str) -> float:
    seconds = parse_duration(value, what=what)
    if seconds <= 0:
        raise ConfigError(f"{what} must be > 0 seconds, got {value!r}")
    return seconds


def _upstream_phase(value: object, what: str) -> float | None:
    """A phase timeout: seconds > 0, or None for the service's ``timeout``."""
    return None if value is None else _upstream_seconds(value, what)


def _upstream(
    parse: Callable[[Any, str], Any], type_doc: str, default_doc: str
) -> dict[str, Setting]:
    return setting("services", parse, type_doc, default_doc)


@dataclass(frozen=True, kw_only=True, slots=True)
class UpstreamLimits:
    """Limits on a service's connections to its upstream: keys of its ``[[services]]``
    table and `Service` parameters of the same names, each declared once here (the
    service's TOML keys, validation, its upstream client's settings and the reload rule
    follow; docs/gateway.md has a row for each). `Service` documents each one.

    * **timeout** - the default of the four phase timeouts below.
    * **connect_timeout**, **read_timeout**, **write_timeout**, **pool_timeout** - a
      phase's timeout (None: ``timeout``).
    * **total_timeout** - seconds for the whole exchange (None: no bound).
    * **max_connections** - connections open to the upstream at most.
    """

    timeout: float = field(default=10.0, metadata=_upstream(_upstream_seconds, "duration", "`10`"))
    connect_timeout: float | None = field(
        default=None, metadata=_upstream(_upstream_phase, "duration", "`timeout`")
    )
    read_timeout: float | None = field(
        default=None, metadata=_upstream(_upstream_phase, "duration", "`timeout`")
    )
    write_timeout: float | None = field(
        default=None, metadata=_upstream(_upstream_phase, "duration", "`timeout`")
    )
    pool_timeout: float | None = field(
        default=None, metadata=_upstream(_upstream_phase, "duration", "`timeout`")
    )
    total_timeout: float | None = field(
        default=None, metadata=_upstream(_upstream_phase, "duration", "none")
    )
    max_connections: int = field(default=100, metadata=_upstream(as_whole(1), "integer", "`100`"))

    @classmethod
    def of(cls, service: str, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` (by key; the default of each one missing) checked by their
        declarations, with errors naming the key and ``service``; a phase timeout left
        None takes ``timeout``."""
        declared = settings_of(cls)
        values = values | {k: v for k, v in defaults_of(cls).items() if k not in values}
        found = {k: declared[k].parse(v, f"{k} of service {service!r}") for k, v in values.items()}
        for name in ("connect_timeout", "read_timeout", "write_timeout", "pool_timeout"):
            if name in found and found[name] is None:
                found[name] = found["timeout"]
        return found
