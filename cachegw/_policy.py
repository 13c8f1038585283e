"""Caching rules as pure functions: policy knobs, Cache-Control parsing, freshness.

Nothing here does I/O. The engine feeds plain data in and acts on what comes out,
so every rule can be tested state by state (the hishel way).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from email.utils import parsedate_to_datetime
from typing import Any

from starlette.requests import Request

from cachegw._errors import ConfigError
from cachegw._knobs import (
    Knob,
    as_beta,
    as_duration,
    as_flag,
    as_fraction,
    as_header_names,
    as_methods,
    as_optional_duration,
    as_size,
    as_statuses,
    as_str_list,
    knob,
    list_cell,
    number_cell,
    parse_duration,
    seconds_cell,
    size_cell,
)

__all__ = [
    "DEFAULT_STATUSES",
    "CacheControl",
    "CachePolicy",
    "KeyFunc",
    "parse_cache_control",
    "parse_duration",  # re-exported from cachegw._knobs
]

#: Statuses a response may have heuristic freshness for (RFC 9110 §15.1).
HEURISTIC_STATUSES: frozenset[int] = frozenset(
    {200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501}
)

#: Statuses a shared cache may store by default (RFC 9110 §15.1 "heuristically
#: cacheable" plus 308, as nginx and Varnish do).
DEFAULT_STATUSES: frozenset[int] = frozenset(
    {200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501}
)
DEFAULT_MAX_BODY = 1024 * 1024

#: Statuses whose caching rules cachegw understands (RFC 9111 §5.2.2.3 ``must-understand``):
#: those RFC 9110 defines.
UNDERSTOOD_STATUSES: frozenset[int] = frozenset(
    {100, 101, *range(200, 207), *range(300, 306), 307, 308, *range(400, 418), 421, 422, 426}
    | set(range(500, 506))
)

KeyFunc = Callable[[Request], "str | Awaitable[str]"]


@dataclass(frozen=True, kw_only=True, slots=True)
class CachePolicy:
    """Every per-route caching knob, validated at construction.

    Usage::

        policy = CachePolicy(ttl=60, vary=["Accept-Language"], tags=["item:{item_id}"])

    Parameters:

    * **ttl** - seconds of freshness when the response carries no explicit freshness
      (`max-age`, `s-maxage`, `Expires`). `0` means such responses are not stored.
      A number or a string like `"90s"`, `"5m"`, `"1h"`.
    * **max_ttl** - ceiling on any freshness, the upstream's own included. Defaults to `ttl`.
    * **stale_while_revalidate** - seconds past freshness during which a stale entry is
      served while one background refresh runs.
    * **stale_if_error** - seconds past freshness during which a stale entry is served when
      the upstream fails (5xx, connect error, timeout).
    * **vary** - request header names that are part of the key.
    * **tags** - surrogate keys for purging; may use path params: `"item:{item_id}"`.
    * **methods** - methods the route accepts (gateway routes); `None` means all.
    * **max_body** - largest body stored, in bytes; larger ones pass through uncached.
    * **statuses** - statuses that may be stored.
    * **heuristic** - fraction (0 to 1) of a response's age since ``Last-Modified`` it is
      fresh for when it carries no explicit freshness (RFC 9111 §4.2.2; ``0.1`` is
      customary). ``0``, the default, leaves such responses to ``ttl``.
    * **early_refresh** - XFetch's ``beta`` (Vattani et al., VLDB 2015): a fresh hit starts
      one background refresh early with a probability that rises as expiry nears and with
      how long the fetch took, so a hot key is refreshed before it expires instead of all
      at once after. ``1`` is the paper's default; ``0``, the default, turns it off.
    * **ignore_request_cache_control** - ``True`` ignores the request's ``Cache-Control``
      and ``Pragma`` (as nginx and Varnish do by default). By default they are honoured:
      ``no-cache``, ``Pragma: no-cache`` and ``max-age=0`` make the cache ask the origin,
      with at most one upstream request per key in flight for all such requests.
    * **key** - `(request) -> str` (may be async) whose result is part of the key. Giving
      one declares the entries per-principal: requests with `Authorization` or `Cookie`
      may then use them.

    Adding a knob: declare its field here with ``metadata=knob(...)`` (and a line in the
    docstring above), add the parameter to `cachegw.cached` and its row to
    docs/policies.md. The TOML key, the ``check`` column and the validation follow.
    """

    ttl: float = field(default=60.0, metadata=knob(as_duration, "TTL", seconds_cell, "`60`"))
    max_ttl: float | None = field(
        default=None, metadata=knob(as_optional_duration, "MAX_TTL", seconds_cell, "`ttl`")
    )
    stale_while_revalidate: float = field(
        default=0.0, metadata=knob(as_duration, "SWR", seconds_cell, "`0`")
    )
    stale_if_error: float = field(
        default=0.0, metadata=knob(as_duration, "SIE", seconds_cell, "`0`")
    )
    vary: tuple[str, ...] = field(
        default=(), metadata=knob(as_header_names, "VARY", list_cell, "`()`")
    )
    tags: tuple[str, ...] = field(default=(), metadata=knob(as_str_list, "TAGS", list_cell, "`()`"))
    methods: tuple[str, ...] | None = field(
        default=None,
        metadata=knob(
            as_methods,
            "METHODS",
            lambda v: ",".join(v) if v is not None else "*",
            "`None` (all)",
            decorator=False,
        ),
    )
    max_body: int = field(
        default=DEFAULT_MAX_BODY,
        metadata=knob(as_size, "MAX_BODY", size_cell, "`1MiB` (1,048,576 bytes)"),
    )
    statuses: frozenset[int] = field(
        default=DEFAULT_STATUSES,
        metadata=knob(
            as_statuses,
            "STATUSES",
            lambda v: "default" if v == DEFAULT_STATUSES else ",".join(map(str, sorted(v))),
            "`200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501`",
        ),
    )
    heuristic: float = field(
        default=0.0, metadata=knob(as_fraction, "HEURISTIC", number_cell, "`0`")
    )
    early_refresh: float = field(
        default=0.0, metadata=knob(as_beta, "EARLY_REFRESH", number_cell, "`0`")
    )
    ignore_request_cache_control: bool = field(
        default=False,
        metadata=knob(as_flag, "IGNORE_REQUEST_CC", lambda v: "yes" if v else "-", "`false`"),
    )
    key: KeyFunc | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name, declared in KNOB_SPECS.items():
            value = declared.parse(getattr(self, name), name)
            if name == "max_ttl":
                # Follows ttl unless set; never below it.
                value = self.ttl if value is None else value
                if value < self.ttl:
                    raise ConfigError(f"max_ttl must be ≥ ttl ({self.ttl:g}), got {value:g}")
            object.__setattr__(self, name, value)
        if self.key is not None and not callable(self.key):
            raise ConfigError(f"key must be a callable (request) -> str, got {self.key!r}")

    def __repr__(self) -> str:
        assert self.max_ttl is not None  # resolved at construction
        parts = [f"ttl={self.ttl:g}", f"max_ttl={self.max_ttl:g}"]
        for name in KNOB_SPECS:
            value = getattr(self, name)
            if name not in ("ttl", "max_ttl") and value != _DEFAULTS[name]:
                parts.append(f"{name}={_repr_value(value)}")
        if self.key is not None:
            parts.append(f"key={getattr(self.key, '__qualname__', repr(self.key))}")
        return f"CachePolicy({', '.join(parts)})"

    @property
    def stale_window(self) -> float:
        """How long past freshness an entry stays useful for stale serving."""
        return max(self.stale_while_revalidate, self.stale_if_error)

    @property
    def stores_nothing(self) -> bool:
        """No response of such a route can be kept (``max_ttl = 0`` and no stale
        windows: ``ttl = 0`` alone, as ``max_ttl`` follows ``ttl``). Its ``GET``s are
        forwarded without a lookup, coalescing or a write (issue 26), answered as a miss
        that is not stored."""
        return self.max_ttl == 0 and self.stale_window == 0

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], *, where: str, base: CachePolicy | None = None
    ) -> CachePolicy:
        """Build a policy from config values, inheriting what they do not set from ``base``.

        ``where`` names the place in the configuration (``services[0].routes[2] of
        gateway.toml``) so errors point at it.
        """
        unknown = sorted(set(values) - KNOBS - {"key"})
        if unknown:
            raise ConfigError(
                f"unknown policy knob {unknown[0]!r} in {where}; expected one of "
                f"{', '.join(sorted(KNOBS))}"
            )
        merged: dict[str, Any] = {}
        if base is not None:
            merged = {name: getattr(base, name) for name in (*KNOBS, "key")}
            if base.max_ttl == base.ttl and "ttl" in values and "max_ttl" not in values:
                # max_ttl follows ttl unless it was set on its own.
                merged["max_ttl"] = None
        merged.update(values)
        try:
            return cls(**merged)
        except ConfigError as exc:
            raise ConfigError(f"{exc} in {where}") from None


#: Every knob, in declaration order, with how it appears everywhere else.
KNOB_SPECS: dict[str, Knob] = {
    f.name: f.metadata["knob"] for f in fields(CachePolicy) if "knob" in f.metadata
}
#: The knobs' names: CachePolicy fields, TOML keys of services and routes.
KNOBS = frozenset(KNOB_SPECS)
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(CachePolicy)}


def _repr_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return repr(list(value))
    if isinstance(value, frozenset):
        return repr(sorted(value))
    return repr(value)


@dataclass(frozen=True, slots=True)
class CacheControl:
    """Parsed ``Cache-Control`` directives (RFC 9111 §5.2).

    Names are lower-cased; a directive without an argument maps to ``None``.
    An argument that should be a number but is not makes the directive count as
    absent for arithmetic (`seconds` returns ``None``), which errs towards not caching.
    """

    directives: Mapping[str, str | None] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.directives

    def seconds(self, name: str) -> int | None:
        """The delta-seconds argument of ``name`` (RFC 9111 §1.2.2), or None."""
        value = self.directives.get(name)
        # isascii(): str.isdigit() also accepts e.g. "\xb2" (superscript two, valid latin-1
        # in a header), which int() rejects.
        if value is None or not (value.isascii() and value.isdigit()):
            return None
        return min(int(value), 2**31)

    def __bool__(self) -> bool:
        return bool(self.directives)


_EMPTY_CC = CacheControl({})


def parse_cache_control(values: Iterable[str]) -> CacheControl:
    """Parse every ``Cache-Control`` field value of a message into one `CacheControl`.

    Directives are comma-separated and case-insensitive; arguments may be tokens or
    quoted strings (``no-cache="Set-Cookie, Foo"``). When a directive repeats, the
    first occurrence wins, except that a *malformed* number never wins.
    """
    directives: dict[str, str | None] = {}
    for value in values:
        for item in _split_list(value):
            name, sep, arg = item.partition("=")
            name = name.strip().lower()
            if not name:
                continue
            argument: str | None = None
            if sep:
                argument = arg.strip()
                if len(argument) >= 2 and argument[0] == argument[-1] == '"':
                    argument = argument[1:-1].replace('\\"', '"')
            directives.setdefault(name, argument)
    return CacheControl(directives) if directives else _EMPTY_CC


def _split_list(value: str) -> list[str]:
    """Split a comma-separated header value, keeping commas inside quoted strings."""
    if '"' not in value:
        return [part for part in (p.strip() for p in value.split(",")) if part]
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return [part for part in parts if part]


def split_header_list(value: str) -> list[str]:
    """Items of a comma-separated header value (``Vary``, ``Connection``, ``If-None-Match``)."""
    return _split_list(value)


def parse_http_date(value: str | None) -> float | None:
    """Seconds since the epoch from an HTTP-date (RFC 9110 §5.6.7), or None if invalid."""
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


@dataclass(frozen=True, slots=True)
class Freshness:
    """How long a response may be served from cache, decided at store time."""

    lifetime: float  # seconds fresh from the response's birth (RFC 9111 §4.2.1)
    explicit: bool  # the upstream said how long (s-maxage / max-age / Expires)
    stale_while_revalidate: float
    stale_if_error: float
    must_revalidate: bool  # must-revalidate / proxy-revalidate / s-maxage: never serve stale


def freshness(
    response_cc: CacheControl,
    *,
    expires: str | None,
    date: str | None,
    policy: CachePolicy,
    received: float | None = None,
    last_modified: str | None = None,
    status: int = 200,
) -> Freshness:
    """Freshness lifetime of a response for a shared cache (RFC 9111 §4.2.1).

    ``s-maxage`` beats ``max-age`` beats ``Expires - Date``; any of them is capped at
    ``policy.max_ttl``. Without explicit freshness the route's ``ttl`` applies.
    Stale windows come from the policy, or from the response's RFC 5861 directives when
    those are longer, and are dropped when the response forbids serving stale.
    A ``max-age``/``s-maxage`` that is not a number makes the response stale, as does an
    invalid ``Expires`` (RFC 9111 §4.2.1, §5.3); without ``Date``, ``Expires`` counts from
    ``received``, the time the response arrived. With ``policy.heuristic`` > 0, a response
    without explicit freshness but with ``Last-Modified`` is fresh for that fraction of
    its age at ``Date`` (RFC 9111 §4.2.2; 10% is customary), when its status is
    heuristically cacheable or it says ``public``. ``no-cache`` makes a response stale on
    arrival: it is kept only to be revalidated.
    """
    lifetime: float | None = None
    for name in ("s-maxage", "max-age"):
        if name in response_cc:
            lifetime = response_cc.seconds(name)
            if lifetime is None:
                lifetime = 0  # present but invalid: stale
            break
    if lifetime is None and expires is not None:
        expires_at = parse_http_date(expires)
        # An invalid Expires (e.g. "0") means "already expired" (RFC 9111 §5.3).
        if expires_at is None:
            lifetime = 0
        else:
            date_at = parse_http_date(date)
            if date_at is None:
                date_at = received
            lifetime = max(0.0, expires_at - date_at) if date_at is not None else None
    explicit = lifetime is not None
    if (
        lifetime is None
        and policy.heuristic
        and last_modified is not None
        and (status in HEURISTIC_STATUSES or "public" in response_cc)
    ):
        modified_at = parse_http_date(last_modified)
        date_at = parse_http_date(date)
        if date_at is None:
            date_at = received
        if modified_at is not None and date_at is not None and date_at > modified_at:
            lifetime = policy.heuristic * (date_at - modified_at)
    if lifetime is None:
        lifetime = policy.ttl
    if "no-cache" in response_cc:
        lifetime = 0
    assert policy.max_ttl is not None
    lifetime = min(float(lifetime), policy.max_ttl)
    must_revalidate = (
        "must-revalidate" in response_cc
        or "proxy-revalidate" in response_cc
        or "s-maxage" in response_cc
        or "no-cache" in response_cc
    )
    if must_revalidate:
        swr = sie = 0.0
    else:
        swr = max(
            policy.stale_while_revalidate, float(response_cc.seconds("stale-while-revalidate") or 0)
        )
        sie = max(policy.stale_if_error, float(response_cc.seconds("stale-if-error") or 0))
    return Freshness(lifetime, explicit, swr, sie, must_revalidate)


def storable_response(
    *,
    method: str,
    status: int,
    response_cc: CacheControl,
    set_cookie: bool,
    vary: Iterable[str],
    request_cc: CacheControl,
    authorized: bool,
    per_principal: bool,
    policy: CachePolicy,
    explicit: bool = False,
) -> str | None:
    """Why a response must not be stored in a shared cache, or None when it may be.

    Implements RFC 9111 §3 and §3.5 plus the contract's safety rules: ``no-store``,
    ``private`` and ``Set-Cookie`` responses and ``Vary: *`` are never stored; responses
    to requests with ``Authorization``/``Cookie`` only when the entry is per-principal or
    the response says ``public``, ``s-maxage`` or ``must-revalidate``.

    ``explicit``: the response has explicit freshness (``max-age``, ``s-maxage``,
    ``Expires``). With the default ``statuses``, such a response - or one marked
    ``public`` - may be stored whatever its final status below 500 (RFC 9111 §3);
    5xx only when listed in ``statuses``.
    """
    if method not in ("GET", "HEAD"):
        return "method"
    if status == 206:
        return "partial"  # never stored as if it were the whole representation
    if "must-understand" in response_cc and status not in UNDERSTOOD_STATUSES:
        return "status not understood"  # RFC 9111 §5.2.2.3
    if status not in policy.statuses and not (
        policy.statuses == DEFAULT_STATUSES
        and 200 <= status < 500
        and status != 304
        and (explicit or "public" in response_cc)
    ):
        return "status"
    if "no-store" in request_cc:
        return "request no-store"
    if "no-store" in response_cc:
        return "no-store"
    if "private" in response_cc:
        return "private"
    if set_cookie:
        return "set-cookie"
    if any(v.strip() == "*" for v in vary):
        return "vary-star"
    if authorized and not per_principal and not shareable_for_authorized(response_cc):
        return "authorization"
    return None


def shareable_for_authorized(response_cc: CacheControl) -> bool:
    """Whether a stored response may answer a request carrying credentials (RFC 9111 §3.5)."""
    return "public" in response_cc or "s-maxage" in response_cc or "must-revalidate" in response_cc


def surrogate_control(values: Iterable[str], target: str) -> CacheControl | None:
    """The ``Surrogate-Control`` directives meant for the surrogate named ``target``.

    Directives may be targeted: ``max-age=60;cachegw`` is for cachegw, ``no-store;cdn``
    for another device, an untargeted one for every surrogate (W3C Edge Architecture
    Specification). None when the response says nothing to us.
    """
    kept: list[str] = []
    for value in values:
        for item in _split_list(value):
            directive, _, aimed = item.partition(";")
            if not aimed or aimed.strip().lower() == target:
                kept.append(directive)
    return parse_cache_control([", ".join(kept)]) if kept else None
