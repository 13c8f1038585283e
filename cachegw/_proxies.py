"""Trusted front proxies: whose ``X-Forwarded-For`` / ``-Proto`` / ``-Host`` the gateway believes.

Pure functions over plain data. By default no peer is trusted: the client's forwarding
headers are dropped and the gateway sets its own from the socket (docs/security.md,
"Keyed or dropped"). A peer whose address is in ``trusted_proxies`` (an nginx or load
balancer in front, terminating TLS) is believed about the client it forwards:

* the scheme is its last ``X-Forwarded-Proto`` value (``http`` or ``https``; anything
  else is ignored): keyed and sent upstream, as the socket's scheme is otherwise;
* the host is its last ``X-Forwarded-Host`` value (a valid ``host[:port]``), else its
  ``Host``: checked against the service's ``hosts`` and keyed when it has them, dropped
  when it does not (as a client's ``Host`` is);
* ``X-Forwarded-For`` is its value with the peer's address appended (what nginx's
  ``$proxy_add_x_forwarded_for`` does): not keyed, as the socket peer is not.

The *last* value counts because a proxy that appends leaves what the client wrote in
front of its own.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cachegw._errors import ConfigError

__all__ = ["Front", "TrustedProxies", "front"]

Headers = list[tuple[bytes, bytes]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?$")
_MEMO_SIZE = 1024


@dataclass(frozen=True, slots=True)
class Front:
    """What the client of the front proxy used, as far as the gateway believes it."""

    scheme: str
    host: str | None  # the Host the client used (None: none sent)
    forwarded_for: str  # the X-Forwarded-For value to send upstream


class TrustedProxies:
    """The addresses and networks (``"10.0.0.0/8"``, ``"127.0.0.1"``, ``"::1"``) whose
    forwarding headers are believed."""

    def __init__(self, entries: Iterable[str] = (), *, what: str = "trusted_proxies") -> None:
        form = "a list of IP addresses or CIDR networks like ['127.0.0.1', '10.0.0.0/8']"
        if isinstance(entries, str) or not isinstance(entries, Iterable):
            raise ConfigError(f"{what} must be {form}, got {entries!r}")
        networks: list[Network] = []
        for entry in entries:
            if not isinstance(entry, str):
                raise ConfigError(f"{what} must be {form}, got {entry!r}")
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ConfigError(f"{what} must be {form}, got {entry!r}") from None
        self.networks = tuple(networks)
        self._memo: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustedProxies) and other.networks == self.networks

    def __hash__(self) -> int:
        return hash(self.networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({[str(n) for n in self.networks]!r})"

    def trusts(self, peer: str) -> bool:
        """Whether the socket peer ``peer`` (an address) is a trusted proxy."""
        found = self._memo.get(peer)
        if found is None:
            try:
                address = ipaddress.ip_address(peer)
            except ValueError:
                found = False  # a Unix socket or no peer at all
            else:
                mapped = getattr(address, "ipv4_mapped", None)
                address = mapped or address
                found = any(address in network for network in self.networks)
            if len(self._memo) >= _MEMO_SIZE:  # bounded: a flood of peers can't grow it
                self._memo.clear()
            self._memo[peer] = found
        return found


def _last(headers: Headers, name: bytes) -> str | None:
    found: str | None = None
    for n, v in headers:
        if n.lower() == name:
            for item in v.split(b","):
                item = item.strip()
                if item:
                    found = item.decode("latin-1")
    return found


def _joined(headers: Headers, name: bytes) -> str:
    values = [v.decode("latin-1").strip() for n, v in headers if n.lower() == name]
    return ", ".join(v for v in values if v)


def front(peer: str, scheme: str, headers: Headers, trusted: TrustedProxies) -> Front:
    """The client-facing scheme and host and the ``X-Forwarded-For`` to send, for a
    request with ``headers`` from the socket peer ``peer`` over ``scheme``."""
    # The request's own Host as it came (two Host fields were refused before routing).
    host = None
    for name, value in headers:
        if name.lower() == b"host":
            host = value.decode("latin-1")
            break
    if not trusted or not trusted.trusts(peer):
        return Front(scheme, host, peer)
    proto = _last(headers, b"x-forwarded-proto")
    if proto is not None and proto.lower() in ("http", "https"):
        scheme = proto.lower()
    forwarded_host = _last(headers, b"x-forwarded-host")
    if forwarded_host is not None and _HOST.match(forwarded_host):
        host = forwarded_host
    chain = _joined(headers, b"x-forwarded-for")
    return Front(scheme, host, f"{chain}, {peer}" if chain else peer)
