"""Gateway declarations: the services (`Service`, cachegw._service) and the gateway-wide
settings.

Plain validated values; nothing here opens a socket. `create_app` turns a `Gateway`
into an ASGI application, `Gateway.from_toml` reads the contract's TOML file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi_cache.types import Backend

from cachegw._backends._base import OP_TIMEOUT
from cachegw._config import load_gateway
from cachegw._errors import ConfigError, redact
from cachegw._knobs import (
    as_bytes,
    as_duration,
    as_flag,
    as_matching,
    as_positive_duration,
    as_whole,
    flag_cell,
    list_cell,
    seconds_cell,
    setting,
    settings_of,
    size_cell,
)
from cachegw._limits import ServerLimits
from cachegw._policy import CachePolicy
from cachegw._proxies import TrustedProxies
from cachegw._service import Route, Service

__all__ = ["Gateway", "Route", "Service"]


_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)


def _backend(value: object, what: str) -> object:
    """``"memory"``, a Redis URL with its ``${NAME}`` references replaced, or a ready
    fastapi-cache2 backend (not checked)."""
    if not isinstance(value, str):
        return value
    value = _expand_env(value, what, "")
    if not (value == "memory" or value.split("://", 1)[0] in _SCHEMES):
        raise ConfigError(
            f"{what} must be 'memory' or a redis://, rediss://, unix://, "
            f"redis+cluster:// or redis+sentinel:// URL, got {value!r}"
        )
    return value


# Braces would turn into Redis Cluster hash tags.
_key_prefix = as_matching(r"^[^\s{}]+$", "a non-empty string without spaces or braces")
_header_name = as_matching(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", "a header name like 'X-Cache-Status'")


_env_var = as_matching(r"^[A-Za-z_][A-Za-z0-9_]*$", "an environment variable name")


def _env_name(value: object, what: str) -> str | None:
    """The name of an environment variable, or None."""
    return None if value is None else _env_var(value, what)


def _trusted_proxies(value: object, what: str) -> tuple[str, ...]:
    return tuple(str(n) for n in TrustedProxies(value, what=what).networks)  # type: ignore[arg-type]


@dataclass(kw_only=True, repr=False)
class Gateway:
    """Services plus gateway-wide cache settings.

    Usage::

        gateway = Gateway(services=[catalog], backend="memory", max_entries=10_000)
        app = create_app(gateway)

    Parameters:

    * **services** - the `Service` declarations; prefixes must not overlap ambiguously.
    * **backend** - ``"memory"``, a ``redis://``/``rediss://``/``redis+cluster://``/
      ``redis+sentinel://`` URL, or
      a ready fastapi-cache2 ``Backend`` instance. ``${NAME}`` in the URL is replaced by
      the environment variable ``NAME`` (``"${CACHEGW_REDIS_URL}"``,
      ``"rediss://app:${REDIS_PASSWORD}@redis.internal:6380/0"``); the password is never
      printed (``repr``, error messages).
    * **prefix** - namespace of every key cachegw writes.
    * **max_entries**, **max_bytes** - bounds of the memory backend.
    * **admin_token_env** - name of the environment variable holding the admin token;
      the admin API is on only when that variable is set.
    * **status_header** - name of the header carrying HIT / MISS / ...
    * **l1_entries**, **l1_ttl** - the in-process copy of hot entries: how many, and for
      how long a copy of a Redis entry is used without asking Redis (changes made by
      other gateway processes reach it at once through Redis pub/sub, and after
      ``l1_ttl`` at the latest). ``l1_entries = 0`` turns it off.
    * **op_timeout** - deadline of each Redis operation (and of all of one request's reads
      together, at least 250 ms); past it the cache fails open (default 250 ms).
    * **l1_max_bytes** - the most bytes those copies, and the answers built from them, keep
      alive in each process (everything counts: keys, bodies, headers, tags).
    * **expose_tag_headers** - pass the upstream's ``Surrogate-Key`` / ``Cache-Tag``
      headers on to clients (by default they are read as tags and stripped).
    * **server** - `ServerLimits` on client connections (timeouts, header fields), enforced
      when the gateway is served by ``cachegw serve``.
    * **trusted_proxies** - addresses and networks (``["127.0.0.1", "10.0.0.0/8"]``) of
      front proxies whose ``X-Forwarded-For``, ``-Proto`` and ``-Host`` are believed (see
      the gateway page, "Trusted proxies"); from any other peer they are dropped. None by
      default.
    * **compress**, **compress_min** - store uncompressed text bodies of at least
      ``compress_min`` bytes gzip-compressed, and serve gzip or identity to each client
      as its ``Accept-Encoding`` asks (see the policies page). ``compress = false`` stores
      and serves bodies as the upstream sent them.
    """

    services: list[Service] = field(default_factory=list)
    # The [cache] and [server] settings: each declared once, here or on ServerLimits (see
    # cachegw._knobs.Setting); the TOML keys, validation, `cachegw check`'s settings
    # line, `cachegw serve`'s flags and the reload rule follow from the declaration.
    backend: str | Backend = field(
        default="memory", metadata=setting("cache", _backend, "string", '`"memory"`')
    )
    prefix: str = field(
        default="cachegw", metadata=setting("cache", _key_prefix, "string", '`"cachegw"`')
    )
    max_entries: int = field(
        default=10_000, metadata=setting("cache", as_whole(1), "integer", "`10000`")
    )
    max_bytes: int | str = field(
        default=64 * 1024 * 1024,
        metadata=setting("cache", as_bytes, "size", '`"64MiB"`', cell=size_cell),
    )
    admin_token_env: str | None = field(
        default=None,
        metadata=setting("admin", _env_name, "string", "none", live=True, key="token_env"),
    )
    status_header: str = field(
        default="X-Cache-Status",
        metadata=setting("cache", _header_name, "string", '`"X-Cache-Status"`'),
    )
    expose_tag_headers: bool = field(
        default=False,
        metadata=setting("cache", as_flag, "boolean", "`false`", cell=flag_cell),
    )
    l1_entries: int = field(
        default=4096, metadata=setting("cache", as_whole(0), "integer", "`4096`")
    )
    l1_max_bytes: int | str = field(
        default=32 * 1024 * 1024,
        metadata=setting("cache", as_bytes, "size", '`"32MiB"`', cell=size_cell),
    )
    l1_ttl: float | str = field(
        default=1.0, metadata=setting("cache", as_duration, "duration", "`1`", cell=seconds_cell)
    )
    op_timeout: float | str = field(
        default=OP_TIMEOUT,
        metadata=setting("cache", as_positive_duration, "duration", "`250ms`", cell=seconds_cell),
    )
    server: ServerLimits = field(default_factory=ServerLimits)
    compress: bool = field(
        default=True, metadata=setting("cache", as_flag, "boolean", "`true`", cell=flag_cell)
    )
    compress_min: int | str = field(
        default=1024, metadata=setting("cache", as_bytes, "size", '`"1KiB"`', cell=size_cell)
    )
    trusted_proxies: Iterable[str] = field(
        default=(),
        metadata=setting(
            "server",
            _trusted_proxies,
            "list of addresses / CIDRs",
            "`[]`",
            cell=list_cell,
            live=True,
        ),
    )
    source: str | None = None  # the file this came from, for messages
    trusted: TrustedProxies = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.services = list(self.services)
        names = [s.name for s in self.services]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"service name {name!r} is used twice{self._in()}")
        prefixes = [s.prefix for s in self.services]
        for prefix in prefixes:
            if prefixes.count(prefix) > 1:
                raise ConfigError(f"service prefix {prefix!r} is used twice{self._in()}")
            if prefix == "/_cachegw" or prefix.startswith("/_cachegw/"):
                raise ConfigError(f"service prefix {prefix!r} is reserved for the admin API")
        for name, declared in settings_of(type(self)).items():
            try:
                setattr(self, name, declared.parse(getattr(self, name), name))
            except ConfigError as exc:
                raise ConfigError(f"{exc}{self._in()}") from None
        self.trusted = TrustedProxies(self.trusted_proxies)
        # Longest prefix first: computed once, not per request.
        self._ordered = sorted(self.services, key=lambda s: len(s.prefix), reverse=True)
        self._matches: dict[str, tuple[Service, Route, str, dict[str, Any]] | None] = {}

    def _in(self) -> str:
        return f" in {self.source}" if self.source else ""

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr
        )
        return redact(f"Gateway({shown})")

    def add(self, service: Service) -> Gateway:
        """Add a service; returns the gateway."""
        self.services.append(service)
        self.__post_init__()
        return self

    def match(self, path: str) -> tuple[Service, Route, str, dict[str, Any]] | None:
        """The service and route for a (raw, already validated) request path.

        Longest prefix wins; within a service the first declared route that matches.
        Returns the service, the route, the path relative to the prefix, and path params
        (shared between calls for the same path: read them, don't change them).
        """
        found = self._matches.get(path, _UNMATCHED)
        if found is not _UNMATCHED:
            return found  # type: ignore[return-value]
        found = self._match(path)
        if len(self._matches) >= 4096:  # a bounded memo: hot paths stay, a flood can't grow it
            self._matches.clear()
        self._matches[path] = found
        return found

    def _match(self, path: str) -> tuple[Service, Route, str, dict[str, Any]] | None:
        for service in self._ordered:
            prefix = service.prefix
            if prefix and not (path == prefix or path.startswith(prefix + "/")):
                continue
            rest = path[len(prefix) :] or "/"
            for route in service.routes:
                params = route.match(rest)
                if params is not None:
                    return service, route, rest, params
            # The longest matching prefix owns the path: a route it does not declare is a
            # 404, never another (shorter-prefix) service's route.
            return None
        return None

    @classmethod
    def from_toml(cls, path: str | Path) -> Gateway:
        """Read a gateway file (see the TOML reference in the docs).

        Raises `ConfigError` naming the file, the key and the expected form.
        """
        return load_gateway(path, cls, Service)


_UNMATCHED = object()
_REFERENCE = re.compile(r"\$\{([^}]*)\}?")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _expand_env(value: str, what: str, where: str) -> str:
    """``value`` with each ``${NAME}`` replaced by the environment variable ``NAME``."""

    def variable(found: re.Match[str]) -> str:
        name = found.group(1)
        if not found.group(0).endswith("}") or not _ENV_NAME.match(name):
            raise ConfigError(
                f"{what} has {found.group(0)!r}, which is no environment variable "
                f"reference: write ${{NAME}}, NAME made of letters, digits and '_'{where}"
            )
        text = os.environ.get(name)
        if text is None:
            raise ConfigError(
                f"{what} reads the environment variable {name}, which is not set{where}"
            )
        return text

    return _REFERENCE.sub(variable, value) if "${" in value else value


def policy_table(gateway: Gateway) -> list[tuple[str, str, str, CachePolicy]]:
    """(service, gateway path, upstream URL, effective policy) for every route."""
    rows = []
    for service in gateway.services:
        for route in service.routes:
            rows.append((service.name, service.prefix + route.path, service.upstream, route.policy))
    return rows
