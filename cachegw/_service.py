"""A service of the gateway: its upstream, the routes it exposes and their policies.

Plain validated values; nothing here opens a socket. `Gateway` (cachegw._gateway) holds
the services, `create_app` serves them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from starlette.convertors import Convertor
from starlette.routing import compile_path

from cachegw._core import SLOW_HEADERS
from cachegw._errors import ConfigError
from cachegw._knobs import settings_of
from cachegw._limits import UpstreamLimits
from cachegw._models import API_KEY_HEADERS
from cachegw._policy import CachePolicy
from cachegw._upstream import GATEWAY_SET, ROUTING_OVERRIDES, is_override

__all__ = ["Route", "Service"]

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

    The upstream's limits (the timeouts and ``max_connections``) are declared once, in
    `UpstreamLimits` (``upstream_limits``): their TOML keys and validation follow.
    """

    #: The declaration of the upstream's limits (see `cachegw._limits.UpstreamLimits`).
    upstream_limits: type[UpstreamLimits] = UpstreamLimits
    # Set from it (a phase timeout without a value of its own takes ``timeout``).
    timeout: float
    connect_timeout: float
    read_timeout: float
    write_timeout: float
    pool_timeout: float
    total_timeout: float | None
    max_connections: int

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
        upstream_limits = {
            "timeout": timeout,
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "write_timeout": write_timeout,
            "pool_timeout": pool_timeout,
            "total_timeout": total_timeout,
            "max_connections": max_connections,
        }
        # A limit declared without a parameter of its own comes in with the knobs.
        declared = settings_of(self.upstream_limits)
        upstream_limits |= {k: defaults.pop(k) for k in list(defaults) if k in declared}
        for key, value in self.upstream_limits.of(name, upstream_limits).items():
            setattr(self, key, value)
        self.client = client
        self._set_headers(hosts, forward_headers, rewrite_redirects, credential_headers)
        self.defaults = CachePolicy.from_mapping(defaults, where=f"service {name!r}")
        self._default_values = dict(defaults)
        self.routes: list[Route] = []

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
        return {name: getattr(self, name) for name in settings_of(self.upstream_limits)}

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
