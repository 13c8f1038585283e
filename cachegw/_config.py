"""TOML gateway file → `Gateway` (through `Gateway.from_toml`).

This module checks the *shape* of the file (tables, key names, required keys) and
leaves every value rule to `Service`, `Gateway`, `CachePolicy` and `MemoryBackend`
(the first two are handed in by `Gateway.from_toml`: this module does not import them).
Their messages start with the name of the bad value ("ttl must be ..."); here that
name becomes the dotted key of the file, so ``ttl must be ..., got -5`` reads::

    gateway.toml: services[0].routes[2].ttl must be a number of seconds ≥ 0 ..., got -5
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import json
import math
import re
import tomllib
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from redis.asyncio.connection import parse_url

from cachegw._backends._redis import check_url
from cachegw._errors import ConfigError
from cachegw._knobs import Setting, settings_of
from cachegw._limits import ServerLimits, UpstreamLimits
from cachegw._policy import KNOBS

__all__ = ["field_names", "load_gateway", "service_keys", "setting_tables"]

_TABLES = frozenset({"cache", "admin", "server", "services"})
_OWN_SERVICE_KEYS = frozenset(
    {
        "name",
        "upstream",
        "prefix",
        "hosts",
        "forward_headers",
        "credential_headers",
        "rewrite_redirects",
        "routes",
    }
)
_SERVICE_KEYS = _OWN_SERVICE_KEYS | frozenset(settings_of(UpstreamLimits)) | KNOBS
_ROUTE_KEYS = frozenset({"path"}) | KNOBS
_REQUIRED = {
    "name": "a name like 'catalog'",
    "upstream": "the base URL of the service, like 'http://127.0.0.1:9001'",
    "path": "a route template like '/items/{item_id}'",
}
# An HTTP field name (RFC 9110 §5.1) and a POSIX environment variable name.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Braces would turn into Redis Cluster hash tags.
_KEY_PREFIX = re.compile(r"^[^\s{}]+$")


class _Service(Protocol):
    def route(self, path: str, **knobs: Any) -> object: ...


class _Gateway(Protocol):
    backend: Any  # the URL with ${NAME} references replaced

    def add(self, service: Any) -> object: ...


G = TypeVar("G", bound=_Gateway)


def load_gateway(
    path: str | Path, gateway: Callable[..., G], service: Callable[..., _Service]
) -> G:
    """Read a gateway TOML file (schema in the docs) into a validated gateway, built with
    ``gateway(...)`` and ``service(...)`` (`Gateway` and `Service`).

    Raises `ConfigError` whose message names the file, the key (``services[0].routes[2].ttl``)
    and the expected form.
    """
    return _Loader(str(path), gateway, service).load()


class _Loader(Generic[G]):
    def __init__(
        self, source: str, gateway: Callable[..., G], service: Callable[..., _Service]
    ) -> None:
        self.source = source
        self.gateway = gateway
        self.service = service

    def load(self) -> G:
        data = self._read()
        self._check_keys(data, _TABLES, "", what="table")
        cache = self._table(data, "cache")
        admin = self._table(data, "admin")
        server = self._table(data, "server")
        declared = setting_tables(self.gateway)
        self._check_keys(cache, declared["cache"], "cache")
        self._check_keys(admin, declared["admin"], "admin")
        self._check_keys(server, declared["server"], "server")
        settings = {
            **self._server(server, declared["server"]),
            **self._settings("cache", cache, declared["cache"]),
            **self._settings("admin", admin, declared["admin"]),
        }
        backend = cache.get("backend", "memory")
        if not isinstance(backend, str):
            raise self._error(
                "cache.backend must be 'memory' or a redis:// URL as a string, "
                f"got {_toml(backend)}"
            )
        with self._at("cache", declared["cache"], values=cache):
            gateway = self.gateway(backend=backend, source=self.source, **settings)
        if backend != "memory":
            self._check_redis_url(gateway.backend)
        self._add_services(gateway, data.get("services", []))
        return gateway

    def _server(self, server: Mapping[str, Any], declared: Mapping[str, Setting]) -> dict[str, Any]:
        """The gateway's settings from the ``[server]`` table: its own, and the limits on
        client connections (`ServerLimits`, or what the gateway's ``server`` holds)."""
        limits = _limits_class(self.gateway)
        own = {k: v for k, v in declared.items() if k not in settings_of(limits)}
        settings = self._settings("server", server, own)
        with self._at("server", declared, values=server):
            settings["server"] = limits(**{k: v for k, v in server.items() if k not in own})
        return settings

    def _settings(
        self, table: str, values: Mapping[str, Any], declared: Mapping[str, Setting]
    ) -> dict[str, Any]:
        """The gateway's settings of ``table`` (``cache.backend`` aside: `load` reads it),
        each checked by its declaration (the gateway checks them again, in Python too)."""
        settings: dict[str, Any] = {}
        with self._at(table, declared, values=values):
            for key, value in values.items():
                if key in declared and key != "backend":
                    settings[field_names(self.gateway).get(key, key)] = declared[key].parse(
                        value, key
                    )
        return settings

    def _add_services(self, gateway: G, services: Any) -> None:
        if services == []:
            raise self._error(
                "declares no services; add a [[services]] table with name, upstream and "
                "[[services.routes]]"
            )
        if not _is_array_of_tables(services):
            raise self._error(
                f"services must be an array of tables: write each service as [[services]], "
                f"got {_toml(services)}"
            )
        for index, values in enumerate(services):
            service = self._service(values, f"services[{index}]")
            # Added one by one so a duplicate name or prefix is blamed on the later service.
            with self._at(f"services[{index}]", ("name", "prefix"), values=values):
                gateway.add(service)

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.source, "rb") as file:
                return tomllib.load(file)
        except OSError as exc:
            raise self._error(f"cannot read the file: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise self._error(f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except tomllib.TOMLDecodeError as exc:
            # The message carries "(at line L, column C)".
            raise self._error(f"invalid TOML: {exc}") from None

    def _service(self, values: Mapping[str, Any], where: str) -> _Service:
        keys = service_keys(self.service)
        self._check_keys(values, keys, where)
        self._require(values, ("name", "upstream"), where)
        routes = values.get("routes")
        name = values["name"]
        # The declarations add "of service 'x'" / "in route ..." to their messages;
        # the key path already says where.
        strip = [f" of service {name!r}", f" in service {name!r}"]
        with self._at(where, keys, strip, values=values):
            service = self.service(
                name,
                values["upstream"],
                **{k: v for k, v in values.items() if k not in ("name", "upstream", "routes")},
            )
        if routes is None or routes == []:
            raise self._error(
                f"{where} (service {name!r}) declares no routes; add [[services.routes]] — "
                f'e.g. path = "/{{rest:path}}" for a catch-all'
            )
        if not _is_array_of_tables(routes):
            raise self._error(
                f"{where}.routes must be an array of tables: write each route as "
                f"[[services.routes]], got {_toml(routes)}"
            )
        for index, route in enumerate(routes):
            route_where = f"{where}.routes[{index}]"
            self._check_keys(route, _ROUTE_KEYS, route_where)
            self._require(route, ("path",), route_where)
            path = route["path"]
            # An error about a knob the route inherits is blamed on the route (the
            # combination is wrong) and says where the inherited value is set.
            inherited = {k: where for k in values if k in KNOBS and k not in route}
            with self._at(
                route_where, route.keys(), [f" in route {path!r}", *strip], inherited, route
            ):
                service.route(path, **{k: v for k, v in route.items() if k != "path"})
        return service

    def _check_redis_url(self, url: str) -> None:
        # redis-py's own URL parser, without connecting; the Gateway checked the scheme.
        scheme, _, rest = url.partition("://")
        if scheme.endswith("+sentinel") or "," in rest.partition("/")[0]:
            # Several hosts (sentinels, cluster seed nodes): checked by cachegw's parser.
            try:
                check_url(url)
            except ConfigError as exc:
                raise self._error(f"cache.backend is not a valid Redis URL: {exc}") from None
            return
        try:
            parse_url(f"{scheme.removesuffix('+cluster')}://{rest}")
        except ValueError as exc:
            raise self._error(
                f"cache.backend is not a valid Redis URL ({exc}); expected a URL like "
                f"'redis://127.0.0.1:6379/0', got {_toml(url)}"
            ) from None

    # --- shape checks -------------------------------------------------------------

    def _table(self, data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
        table = data.get(name, {})
        if not isinstance(table, Mapping):
            raise self._error(
                f"{name} must be a table: write [{name}] on its own line, got {_toml(table)}"
            )
        return table

    def _check_keys(
        self, table: Mapping[str, Any], allowed: Collection[str], where: str, what: str = "key"
    ) -> None:
        for key in table:
            if key in allowed:
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            place = f"{what} {key!r} in {where}" if where else f"top-level {what} {key!r}"
            raise self._error(
                f"unknown {place}; {hint}expected one of: {', '.join(sorted(allowed))}"
            )

    def _require(self, table: Mapping[str, Any], keys: Collection[str], where: str) -> None:
        for key in keys:
            if key not in table:
                raise self._error(
                    f"{where} is missing the required key {key!r}: {key} = {_REQUIRED[key]}"
                )

    # --- messages ---------------------------------------------------------------------

    def _error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message}")

    @contextmanager
    def _at(
        self,
        where: str,
        keys: Collection[str],
        strip: Collection[str] = (),
        inherited: Mapping[str, str] | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> Iterator[None]:
        """Re-raise a declaration's `ConfigError` with the file and the key path, and
        the value as written in ``values`` (the table), spelt as TOML."""
        try:
            yield
        except ConfigError as exc:
            message = str(exc)
            for suffix in (*strip, f" in {self.source}"):
                message = message.replace(suffix, "")
            located = _locate(message, where, keys, inherited or {}, values or {})
            raise self._error(located) from None


def setting_tables(gateway: object) -> dict[str, dict[str, Setting]]:
    """The keys of the ``[cache]``, ``[admin]`` and ``[server]`` tables and their
    declarations: the settings of ``gateway`` (the class) and of the `ServerLimits` its
    ``server`` holds."""
    tables: dict[str, dict[str, Setting]] = {"cache": {}, "admin": {}, "server": {}}
    for owner in (gateway, _limits_class(gateway)):
        for name, declared in settings_of(owner).items():
            tables[declared.table][declared.key or name] = declared
    return tables


def field_names(gateway: object) -> dict[str, str]:
    """TOML key -> the gateway's field, for the settings whose key is not their name."""
    return {d.key: name for name, d in settings_of(gateway).items() if d.key}


def service_keys(service: object) -> frozenset[str]:
    """The keys of a ``[[services]]`` table: the service's own, the upstream limits it
    declares (`UpstreamLimits`, its ``upstream_limits``) and the policy knobs."""
    limits = getattr(service, "upstream_limits", UpstreamLimits)
    return _OWN_SERVICE_KEYS | frozenset(settings_of(limits)) | KNOBS


def _limits_class(gateway: object) -> Callable[..., Any]:
    """What the gateway's ``server`` field holds: `ServerLimits` (or a subclass)."""
    if dataclasses.is_dataclass(gateway):
        for f in dataclasses.fields(gateway):
            if f.name == "server" and f.default_factory is not dataclasses.MISSING:
                return f.default_factory
    return ServerLimits


def _locate(
    message: str,
    where: str,
    keys: Collection[str],
    inherited: Mapping[str, str],
    values: Mapping[str, Any],
) -> str:
    """``ttl must be ...`` → ``services[0].ttl must be ...`` when ``ttl`` is one of ``keys``.

    The declarations quote the value they were given in Python's spelling, after
    conversion (``True``, ``300``); the file's reader wrote TOML (``true``, ``"5m"``), so
    the ``got ...`` that ends the message becomes the value as written. A message about a
    knob the table inherits says where that knob is set.
    """
    for lead in ("", "service "):
        for key in sorted(keys, key=len, reverse=True):
            if message.startswith(f"{lead}{key} "):
                rest = message[len(lead) + len(key) :]
                got = rest.rfind(", got ")
                if got >= 0 and key in values:
                    rest = f"{rest[:got]}, got {_toml(values[key])}"
                if key == "max_ttl" and "ttl" in values:  # "≥ ttl (300)": as written too
                    found = re.search(r" ttl \([^)]*\)", rest)
                    if found is not None:
                        written = f" ttl ({_toml(values['ttl'])})"
                        rest = rest[: found.start()] + written + rest[found.end() :]
                return f"{where}.{key}{rest}"
    for key, origin in inherited.items():
        if message.startswith(f"{key} "):
            return f"{where}: {message} ({key} is inherited from {origin}.{key})"
    return f"{where}: {message}"


def _toml(value: object) -> str:
    """``value`` spelt as TOML: ``true``, ``"5m"``, ``["GET", true]``, ``{ a = 1 }``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # A literal string when it can be one (what most people write), else a basic one.
        return f"'{value}'" if "'" not in value and value.isprintable() else json.dumps(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + " }"
    return repr(value)


def _is_array_of_tables(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, Mapping) for item in value)
