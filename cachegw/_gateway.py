"""Gateway declarations: services, their routes and the policies those carry.

Plain validated values; nothing here opens a socket. `create_app` turns a `Gateway`
into an ASGI application, `Gateway.from_toml` reads the contract's TOML file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi_cache.types import Backend
from starlette.convertors import Convertor
from starlette.routing import compile_path

from cachegw._backends._base import OP_TIMEOUT
from cachegw._backends._memory import parse_size
from cachegw._config import load_gateway
from cachegw._core import SLOW_HEADERS
from cachegw._errors import ConfigError, redact
from cachegw._models import API_KEY_HEADERS
from cachegw._policy import CachePolicy, parse_duration
from cachegw._proxies import TrustedProxies
from cachegw._server import ServerLimits
from cachegw._upstream import GATEWAY_SET, ROUTING_OVERRIDES, is_override

__all__ = ["Gateway", "Route", "Service"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A DNS name or IPv4 address (or a bracketed IPv6 address), lower case, optional port.
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_HOST = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-f:.]+\])(?::[0-9]{{1,5}})?$")
_PORT = re.compile(r":[0-9]+$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


@dataclass(frozen=True, slots=True)
class Route:
    """One declared path of a service and the policy that applies to it."""

    path: str
    policy: CachePolicy
    regex: re.Pattern[str] = field(repr=False, compare=False)
    convertors: Mapping[str, Convertor[Any]] = field(repr=False, compare=False)

    def match(self, path: str) -> dict[str, Any] | None:
        """Path params when ``path`` (relative to the service prefix) matches, else None."""
        found = self.regex.match(path)
        if found is None:
            return None
        return {
            name: self.convertors[name].convert(value) for name, value in found.groupdict().items()
        }


def _check_max_connections(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"max_connections of service {name!r} must be a whole number ≥ 1, got {value!r}"
        )
    return value


class Service:
    """An upstream service exposed under a path prefix.

    Usage::

        catalog = Service("catalog", "http://127.0.0.1:9001", prefix="/catalog", ttl=30)
        catalog.route("/items/{item_id}", ttl=60, tags=["item:{item_id}"])
        catalog.route("/{rest:path}", ttl=0)  # explicit catch-all

    Only declared routes are exposed; every other path under the prefix is a 404.
    Knobs given to the service (``ttl=30``) are defaults its routes inherit.

    Parameters:

    * **name** - identifies the service in metrics, logs and purges.
    * **upstream** - base URL, ``http://host:port`` with an optional base path.
    * **prefix** - gateway path prefix stripped before forwarding (``""`` = root).
    * **hosts** - the host names (``"api.example.com"``, ``"api.example.com:8443"``) this
      service answers for. A request whose ``Host`` is not one of them gets 400; the name
      it matched is part of the key and is sent upstream as ``X-Forwarded-Host``. Without
      it (the default) any ``Host`` is served and none reaches the upstream, which gets
      its own host name (nginx's default).
    * **forward_headers** - override headers (``X-Forwarded-Prefix``, ``X-Forwarded-Port``,
      ...) that the gateway otherwise removes and lets through for this service; every
      route of the service keys on them (they join its ``vary``).
    * **rewrite_redirects** - rewrite a ``Location`` or ``Content-Location`` that points at
      the upstream's own address (below its base path) to the path clients reach it by,
      ``prefix`` included (nginx's ``proxy_redirect default``); on by default.
    * **credential_headers** - request headers that carry a caller's credentials,
      treated like ``Authorization`` and ``Cookie`` (always credentials): a request that
      carries one is neither answered from nor stored in a shared entry unless the route
      keys the principal (``key``) or the response says ``public``/``s-maxage``/
      ``must-revalidate``. Default: ``X-API-Key``, ``Api-Key``, ``X-Auth-Token``,
      ``X-Access-Token``.
    * **timeout** - the default of the four phase timeouts below (10 s).
    * **connect_timeout** - seconds to connect to the upstream (nginx
      ``proxy_connect_timeout``); past it, a 504.
    * **read_timeout** - seconds between two reads of the response, and from the end of the
      request to the response's first byte (``proxy_read_timeout``); past it, a 504. A
      response that keeps arriving, however slowly, is not cut.
    * **write_timeout** - seconds for the upstream to take each piece of a request body
      (``proxy_send_timeout``); past it, a 504.
    * **pool_timeout** - seconds to wait for one of the ``max_connections`` connections to
      become free; past it, a 503 with ``Retry-After``.
    * **total_timeout** - if given, seconds for the whole exchange, streamed bodies
      included (Envoy's route timeout); none by default.
    * **max_connections** - connections open to the upstream at most (100).
    * **client** - an ``httpx.AsyncClient`` to use instead of the one cachegw opens.
    * any `CachePolicy` knob - the default for this service's routes.
    """

    def __init__(
        self,
        name: str,
        upstream: str,
        *,
        prefix: str = "",
        timeout: float | str = 10.0,
        hosts: Iterable[str] | None = None,
        forward_headers: Iterable[str] = (),
        rewrite_redirects: bool = True,
        credential_headers: Iterable[str] = API_KEY_HEADERS,
        connect_timeout: float | str | None = None,
        read_timeout: float | str | None = None,
        write_timeout: float | str | None = None,
        pool_timeout: float | str | None = None,
        total_timeout: float | str | None = None,
        max_connections: int = 100,
        client: httpx.AsyncClient | None = None,
        **defaults: Any,
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"service name must be letters, digits, '_', '.' or '-', got {name!r}"
            )
        self.name = name
        self.upstream = _check_upstream(upstream, name)
        self.prefix = _check_prefix(prefix, name)
        self._set_timeouts(
            timeout, connect_timeout, read_timeout, write_timeout, pool_timeout, total_timeout
        )
        self.max_connections = _check_max_connections(max_connections, name)
        self.client = client
        self._set_headers(hosts, forward_headers, rewrite_redirects, credential_headers)
        self.defaults = CachePolicy.from_mapping(defaults, where=f"service {name!r}")
        self._default_values = dict(defaults)
        self.routes: list[Route] = []

    def _set_timeouts(
        self,
        timeout: float | str,
        connect: float | str | None,
        read: float | str | None,
        write: float | str | None,
        pool: float | str | None,
        total: float | str | None,
    ) -> None:
        name = self.name
        self.timeout = _positive(timeout, "timeout", name)
        self.connect_timeout = _positive(connect, "connect_timeout", name, self.timeout)
        self.read_timeout = _positive(read, "read_timeout", name, self.timeout)
        self.write_timeout = _positive(write, "write_timeout", name, self.timeout)
        self.pool_timeout = _positive(pool, "pool_timeout", name, self.timeout)
        self.total_timeout = None if total is None else _positive(total, "total_timeout", name)

    def _set_headers(
        self,
        hosts: Iterable[str] | None,
        forward_headers: Iterable[str],
        rewrite_redirects: bool,
        credential_headers: Iterable[str],
    ) -> None:
        name = self.name
        self.hosts = _check_hosts(hosts, name)
        # Request Host (lower case) -> the listed name it matches; a name listed without a
        # port also matches it with any port.
        self._host_names = {h: h for h in self.hosts or ()}
        self._any_port = frozenset(h for h in self.hosts or () if not _PORT.search(h))
        self.forward_headers = _check_forward_headers(forward_headers, name)
        self.allow = frozenset(h.encode("latin-1") for h in self.forward_headers)
        if not isinstance(rewrite_redirects, bool):
            raise ConfigError(
                f"rewrite_redirects of service {name!r} must be true or false, "
                f"got {rewrite_redirects!r}"
            )
        self.rewrite_redirects = rewrite_redirects
        self.credential_headers = _check_credential_headers(credential_headers, name)
        #: Lower-case names of every request header that carries credentials here.
        self.credentials = frozenset(
            {"authorization", "cookie", *(h.lower() for h in self.credential_headers)}
        )
        #: Those the protocol-level hit path does not already leave to the ordinary one.
        self.slow_credentials = (
            frozenset(h.encode("latin-1") for h in self.credentials) - SLOW_HEADERS
        )

    @property
    def client_settings(self) -> dict[str, Any]:
        """What the service's upstream client is built from, besides its URL and client."""
        return {
            "timeout": self.timeout,
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "write_timeout": self.write_timeout,
            "pool_timeout": self.pool_timeout,
            "total_timeout": self.total_timeout,
            "max_connections": self.max_connections,
        }

    @property
    def exchange_bound(self) -> float:
        """Seconds an ordinary exchange with the upstream may take: the total timeout, or
        waiting for the pool, connecting and waiting for the answer."""
        if self.total_timeout is not None:
            return self.total_timeout
        return self.pool_timeout + self.connect_timeout + self.read_timeout

    def route(self, path: str, **knobs: Any) -> Service:
        """Declare a route; knobs it does not set come from the service. Returns the service."""
        where = f"route {path!r} of service {self.name!r}"
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigError(f"path must start with '/', got {path!r} in {where}")
        try:
            regex, _, convertors = compile_path(path)
        except (AssertionError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"path {path!r} is not a valid route template ({exc}) in {where}"
            ) from None
        if any(route.path == path for route in self.routes):
            raise ConfigError(f"route {path!r} is declared twice in service {self.name!r}")
        policy = CachePolicy.from_mapping({**self._default_values, **knobs}, where=where)
        if self.forward_headers:
            # Keyed or dropped: a header the upstream gets from the client is in the key.
            policy = dataclasses.replace(policy, vary=(*policy.vary, *self.forward_headers))
        self.routes.append(Route(path, policy, regex, convertors))
        return self

    def host_for(self, host: str | None) -> str | None:
        """The name from ``hosts`` that a request's ``Host`` value matches: ``""`` when
        the service has no ``hosts`` (any host, none keyed or forwarded), None when the
        request must be refused."""
        if self.hosts is None:
            return ""
        if host is None:
            return None
        host = host.lower()
        found = self._host_names.get(host)
        if found is None:
            name, colon, port = host.rpartition(":")
            if colon and port.isdigit() and name in self._any_port:
                found = name
            if len(self._host_names) < 1024 and len(host) <= 256:  # bounded, in bytes too
                self._host_names[host] = found or ""
        return found or None

    def __repr__(self) -> str:
        return f"Service({self.name!r}, {self.upstream!r}, prefix={self.prefix!r})"


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
    backend: str | Backend = "memory"
    prefix: str = "cachegw"
    max_entries: int = 10_000
    max_bytes: int | str = 64 * 1024 * 1024
    admin_token_env: str | None = None
    status_header: str = "X-Cache-Status"
    expose_tag_headers: bool = False
    l1_entries: int = 4096
    l1_max_bytes: int | str = 32 * 1024 * 1024
    l1_ttl: float | str = 1.0
    op_timeout: float | str = OP_TIMEOUT
    server: ServerLimits = field(default_factory=ServerLimits)
    compress: bool = True
    compress_min: int | str = 1024
    trusted_proxies: Iterable[str] = ()
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
        if (
            isinstance(self.l1_entries, bool)
            or not isinstance(self.l1_entries, int)
            or (self.l1_entries < 0)
        ):
            raise ConfigError(
                f"l1_entries must be a whole number ≥ 0, got {self.l1_entries!r}{self._in()}"
            )
        self.l1_ttl = parse_duration(self.l1_ttl, what="l1_ttl")
        self.op_timeout = parse_duration(self.op_timeout, what="op_timeout")
        if self.op_timeout <= 0:
            raise ConfigError(f"op_timeout must be a duration > 0, got 0{self._in()}")
        self.l1_max_bytes = parse_size(self.l1_max_bytes, what="l1_max_bytes")
        if not isinstance(self.compress, bool):
            raise ConfigError(f"compress must be true or false, got {self.compress!r}{self._in()}")
        try:
            self.compress_min = parse_size(self.compress_min, what="compress_min")
        except ConfigError as exc:
            raise ConfigError(f"{exc}{self._in()}") from None
        try:
            self.trusted = TrustedProxies(self.trusted_proxies)
        except ConfigError as exc:
            raise ConfigError(f"{exc}{self._in()}") from None
        self.trusted_proxies = tuple(str(n) for n in self.trusted.networks)
        # Longest prefix first: computed once, not per request.
        self._ordered = sorted(self.services, key=lambda s: len(s.prefix), reverse=True)
        self._matches: dict[str, tuple[Service, Route, str, dict[str, Any]] | None] = {}
        if isinstance(self.backend, str):
            self.backend = _expand_env(self.backend, "backend", self._in())
        if isinstance(self.backend, str) and not (
            self.backend == "memory"
            or self.backend.split("://", 1)[0]
            in (
                "redis",
                "rediss",
                "unix",
                "redis+cluster",
                "rediss+cluster",
                "redis+sentinel",
                "rediss+sentinel",
            )
        ):
            raise ConfigError(
                f"backend must be 'memory' or a redis://, rediss://, unix://, "
                f"redis+cluster:// or redis+sentinel:// URL, got {self.backend!r}{self._in()}"
            )

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


def _positive(value: object, what: str, service: str, default: float | None = None) -> float:
    if value is None and default is not None:
        return default
    where = f"{what} of service {service!r}"
    seconds = parse_duration(value, what=where)
    if seconds <= 0:
        raise ConfigError(f"{where} must be > 0 seconds, got {value!r}")
    return seconds


def _check_upstream(upstream: object, name: str) -> str:
    where = f"upstream of service {name!r}"
    if not isinstance(upstream, str):
        raise ConfigError(f"{where} must be a URL like 'http://127.0.0.1:9001', got {upstream!r}")
    parts = urlsplit(upstream)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.password is not None
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(
            f"{where} must be an http:// or https:// URL with a host and no user, query or "
            f"fragment, like 'http://127.0.0.1:9001', got {upstream!r}"
        )
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(f"{where} has an invalid port: {upstream!r}") from None
    return upstream.rstrip("/")


def _check_hosts(hosts: object, name: str) -> tuple[str, ...] | None:
    if hosts is None:
        return None
    form = (
        "a list of host names like ['api.example.com', 'www.example.com:8443'] "
        "(no scheme, path or wildcard)"
    )
    if isinstance(hosts, str) or not isinstance(hosts, Iterable):
        raise ConfigError(f"hosts of service {name!r} must be {form}, got {hosts!r}")
    out: list[str] = []
    for host in hosts:
        if not isinstance(host, str) or not _HOST.match(host.lower()):
            raise ConfigError(f"hosts of service {name!r} must be {form}, got {host!r}")
        out.append(host.lower())
    if not out:
        raise ConfigError(
            f"hosts of service {name!r} must name at least one host (leave it out to serve "
            f"any host), got []"
        )
    return tuple(dict.fromkeys(out))


def _check_credential_headers(headers: object, name: str) -> tuple[str, ...]:
    where = f"credential_headers of service {name!r}"
    expected = "a list of header names like ['X-API-Key']"
    if isinstance(headers, str) or not isinstance(headers, Iterable):
        raise ConfigError(f"{where} must be {expected}, got {headers!r}")
    out = []
    for header in headers:
        if not isinstance(header, str) or not _TOKEN.match(header):
            raise ConfigError(f"{where} must be {expected}, got {header!r}")
        out.append(header)
    return tuple(out)


def _check_forward_headers(headers: object, name: str) -> tuple[str, ...]:
    where = f"forward_headers of service {name!r}"
    if isinstance(headers, str) or not isinstance(headers, Iterable):
        raise ConfigError(
            f"{where} must be a list of header names like ['X-Forwarded-Prefix'], got {headers!r}"
        )
    out: list[str] = []
    for header in headers:
        if not isinstance(header, str) or not _TOKEN.match(header):
            raise ConfigError(
                f"{where} must be a list of header names like ['X-Forwarded-Prefix'], "
                f"got {header!r}"
            )
        lower = header.lower()
        raw = lower.encode("latin-1")
        if raw in GATEWAY_SET:
            hint = " (use hosts to serve and key client hosts)" if "host" in lower else ""
            raise ConfigError(
                f"{where} cannot include {header!r}: the gateway sets it itself{hint}"
            )
        if raw in ROUTING_OVERRIDES:
            raise ConfigError(
                f"{where} cannot include {header!r}: it makes the upstream run another path "
                f"or method than the one the route checked"
            )
        if not is_override(raw):
            raise ConfigError(
                f"{where} lists {header!r}, which is forwarded anyway; only the override "
                f"headers the gateway removes (X-Forwarded-Prefix, X-Forwarded-Port, "
                f"X-Forwarded-Scheme, X-Original-Host, ...) need listing; to key on another "
                f"header use vary"
            )
        out.append(lower)
    return tuple(sorted(set(out)))


def _check_prefix(prefix: object, name: str) -> str:
    if prefix == "" or prefix == "/":
        return ""
    if (
        not isinstance(prefix, str)
        or not prefix.startswith("/")
        or prefix.endswith("/")
        or "//" in prefix
        or any(seg in (".", "..") for seg in prefix.split("/"))
        or not re.match(r"^[A-Za-z0-9/_.~-]+$", prefix)
    ):
        raise ConfigError(
            f"prefix of service {name!r} must be '' or a path like '/catalog' (no trailing "
            f"slash, no '..', unreserved characters only), got {prefix!r}"
        )
    return prefix


def policy_table(gateway: Gateway) -> list[tuple[str, str, str, CachePolicy]]:
    """(service, gateway path, upstream URL, effective policy) for every route."""
    rows = []
    for service in gateway.services:
        for route in service.routes:
            rows.append((service.name, service.prefix + route.path, service.upstream, route.policy))
    return rows
