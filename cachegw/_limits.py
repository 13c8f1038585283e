"""`ServerLimits`: the limits on client connections that `cachegw serve` enforces (the
``[server]`` table), each declared once. cachegw._server's protocol enforces them."""

from __future__ import annotations

from dataclasses import dataclass, field

from cachegw._errors import ConfigError
from cachegw._knobs import Setting, as_whole, parse_duration, seconds_cell, setting, settings_of

__all__ = ["ServerLimits"]


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
