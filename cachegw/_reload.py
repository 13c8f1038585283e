"""Reloading a running gateway's file: ``SIGHUP``, ``POST /_cachegw/reload``, ``cachegw reload``.

A reload reads the file again and, when it is valid, swaps the running configuration
in one step: a request takes its service, route and upstream client when it is routed,
so requests in flight finish under the configuration they started with and new ones use
the new one. A file that fails validation changes nothing.

What happens to the cache (see docs/operations.md):

* a route is *unchanged* when its service keeps its name, upstream, prefix, hosts and
  forwarded headers, and the service's routes up to and including it are the same paths
  with the same policies in the same order (routes match first to last, so only then
  does it answer the same requests with the same rules). Its entries keep serving hits;
* every entry of a route that changed or went away is soft-purged (stale from the
  reload on: served only under ``stale_while_revalidate`` / ``stale_if_error`` while it
  is fetched again), and so is every entry of a service whose upstream, prefix, hosts
  or forwarded headers changed.

The ``[cache]`` table (backend, key prefix, bounds, L1, header names) and the ``[server]``
table (client connection limits) are fixed when the gateway starts, as the listen address
is: a reload that changes them is rejected with an error saying to restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from uvicorn.supervisors import Multiprocess

from cachegw._errors import ConfigError, redact
from cachegw._gateway import Gateway, Service
from cachegw._knobs import settings_of
from cachegw._upstream import Upstream, upstream_for

if TYPE_CHECKING:
    from cachegw._engine import CacheEngine
    from cachegw._metrics import Metrics

__all__ = [
    "ReloadError",
    "ReloadResult",
    "Reloader",
    "ReloadingSupervisor",
    "route_scope",
    "stale_scopes",
]

logger = logging.getLogger("cachegw")


class ReloadError(Exception):
    """A reload that was refused; the running configuration is unchanged."""


def route_scope(service: str, route: str) -> str:
    """The purge scope every entry stored through ``route`` of ``service`` carries."""
    return f"route:{service}:{route}"


def stale_scopes(old: Gateway, new: Gateway) -> list[str]:
    """The purge scopes whose entries must not outlive a change from ``old`` to ``new``
    (pure; the rule is in the module docstring)."""
    kept = {service.name: service for service in new.services}
    scopes: list[str] = []
    for service in old.services:
        after = kept.get(service.name)
        if after is None:
            scopes.extend(route_scope(service.name, r.path) for r in service.routes)
            continue
        if _entries_differ(service, after):
            scopes.append(f"svc:{service.name}")
            continue
        same = True
        for index, route in enumerate(service.routes):
            if same:
                theirs = after.routes[index] if index < len(after.routes) else None
                same = (
                    theirs is not None
                    and theirs.path == route.path
                    and theirs.policy == route.policy
                )
            if not same:
                scopes.append(route_scope(service.name, route.path))
    return scopes


def restart_needed(old: Gateway, new: Gateway) -> str | None:
    """Why ``new`` cannot replace ``old`` without a restart, or None."""
    # A setting not declared live shapes the backend and every stored key ([cache]), or
    # what uvicorn's protocol was given when it started ([server]).
    for name, declared in settings_of(type(old)).items():
        before, after = getattr(old, name), getattr(new, name)
        if not declared.live and before != after:
            # redact: a changed Redis URL is most often a rotated password.
            return redact(
                f"{declared.table}.{declared.key or name} changed from {before!r} to "
                f"{after!r}; the "
                f"[{declared.table}] table is fixed when the gateway starts: restart the "
                f"gateway (cachegw serve) to change it"
            )
    # The [server] table's client limits go to uvicorn's protocol when it starts.
    limits = settings_of(type(old.server)).items()
    if any(not d.live and getattr(old.server, n) != getattr(new.server, n) for n, d in limits):
        return (
            f"the [server] table changed from {old.server!r} to {new.server!r}; client "
            f"connection limits are fixed when the gateway starts, as its listen address "
            f"(--host, --port): restart the gateway (cachegw serve) to change them"
        )
    return None


def digest(data: bytes) -> str:
    """A short name for one version of the file (sha256, 12 hex digits)."""
    return hashlib.sha256(data).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload did: ``outcome`` is ``reloaded``, ``unchanged`` or ``rejected``."""

    outcome: Literal["reloaded", "unchanged", "rejected"]
    generation: int
    digest: str
    seconds: float
    stale_scopes: list[str] = field(default_factory=list)
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "outcome": self.outcome,
            "generation": self.generation,
            "digest": self.digest,
            "seconds": round(self.seconds, 6),
        }
        if self.outcome == "reloaded":
            answer["soft_purged"] = self.stale_scopes
        if self.error is not None:
            answer["error"] = self.error
        return answer


class Reloadable(Protocol):
    """What a reload swaps (`cachegw._runtime.Runtime` is one)."""

    gateway: Gateway
    upstreams: dict[str, Upstream]
    engine: CacheEngine | None
    metrics: Metrics


class Reloader:
    """Reloads a running gateway from its file, one reload at a time."""

    def __init__(self, runtime: Reloadable, path: str | Path, data: bytes | None = None) -> None:
        self.runtime = runtime
        self.path = Path(path)
        self.digest = digest(data if data is not None else self._read_bytes())
        self.generation = 1
        self.on_swap: list[Callable[[], None]] = []
        # `cachegw serve`'s command-line [server] values, applied to every file read.
        self.server_overrides: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    def _read_bytes(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read the file: {exc.strerror or exc}") from None

    async def reload(self) -> ReloadResult:
        """Read the file again and apply it, or refuse it (result ``rejected``, with the
        reason in ``error``) leaving everything as it was."""
        async with self._lock:
            began = time.perf_counter()
            try:
                return await self._reload(began)
            except (ConfigError, ReloadError) as exc:
                self.runtime.metrics.reload("rejected")
                logger.error(
                    "cachegw: reload of %s rejected, still serving generation %d: %s",
                    self.path,
                    self.generation,
                    exc,
                )
                return ReloadResult(
                    "rejected",
                    self.generation,
                    self.digest,
                    time.perf_counter() - began,
                    error=str(exc),
                )

    async def _reload(self, began: float) -> ReloadResult:
        data = self._read_bytes()
        version = digest(data)
        if version == self.digest:
            self.runtime.metrics.reload("unchanged")
            return ReloadResult(
                "unchanged", self.generation, self.digest, time.perf_counter() - began
            )
        new = Gateway.from_toml(self.path)
        if self.server_overrides:
            new.server = dataclasses.replace(new.server, **self.server_overrides)
        old = self.runtime.gateway
        reason = restart_needed(old, new)
        if reason is not None:
            raise ReloadError(f"{self.path}: {reason}")
        scopes = stale_scopes(old, new)
        # Swap first, then purge: every fetch made under the old configuration started
        # before the purge, so none of its answers can be stored as fresh afterwards.
        self._swap(new)
        engine = self.runtime.engine
        if scopes and engine is not None:
            try:
                await engine.purge(scopes, soft=True)
            except Exception as exc:  # the shared purge record is unreachable
                logger.error(
                    "cachegw: reload of %s: the entries of changed routes could not be "
                    "soft-purged (%s); they expire by their TTL",
                    self.path,
                    exc,
                )
        self.digest = version
        self.generation += 1
        self.runtime.metrics.config(self.generation)
        self.runtime.metrics.reload("reloaded")
        took = time.perf_counter() - began
        logger.info(
            "cachegw: reloaded %s: generation %d (%s), %d scope(s) soft-purged in %.1f ms",
            self.path,
            self.generation,
            version,
            len(scopes),
            took * 1000,
        )
        return ReloadResult("reloaded", self.generation, version, took, scopes)

    def _swap(self, new: Gateway) -> None:
        """Install ``new`` with no await in between: a request sees all of it or none."""
        runtime = self.runtime
        old_services = {service.name: service for service in runtime.gateway.services}
        upstreams: dict[str, Upstream] = {}
        for service in new.services:
            before = old_services.get(service.name)
            current = runtime.upstreams.get(service.name)
            if current is not None and before is not None and _same_client(before, service):
                upstreams[service.name] = current
            else:
                upstreams[service.name] = upstream_for(service)
        retired = [
            upstream
            for name, upstream in runtime.upstreams.items()
            if upstreams.get(name) is not upstream and name in old_services
        ]
        runtime.gateway = new
        runtime.upstreams = upstreams
        engine = runtime.engine
        if engine is not None:
            engine.lock_ttl = max((s.exchange_bound for s in new.services), default=10.0) + 1.0
        for callback in self.on_swap:
            callback()
        for upstream in retired:
            # Closed once the requests and streams it still serves are over (a stream
            # lasts as long as its client takes bytes; send_timeout bounds a stalled one).
            task = asyncio.get_running_loop().create_task(upstream.retire())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def aclose(self) -> None:
        """Close upstream clients still waiting to retire (the gateway is stopping)."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)


def _entries_differ(old: Service, new: Service) -> bool:
    """Whether the same request may be answered differently by the service as a whole:
    another upstream, prefix, accepted hosts, forwarded headers or redirect rewriting."""
    return (
        old.upstream != new.upstream
        or old.prefix != new.prefix
        or old.hosts != new.hosts
        or old.forward_headers != new.forward_headers
        or old.rewrite_redirects != new.rewrite_redirects
        or old.credentials != new.credentials
    )


def _same_client(old: Service, new: Service) -> bool:
    return (
        old.upstream == new.upstream
        and old.client_settings == new.client_settings
        and old.client is new.client
    )


class ReloadingSupervisor(Multiprocess):
    """uvicorn's worker supervisor, except that ``SIGHUP`` reloads the gateway file in
    every worker (passed on to each) instead of replacing the workers, which would
    empty their in-memory caches."""

    def handle_hup(self) -> None:
        logger.info("cachegw: SIGHUP: reloading the gateway file in every worker")
        for process in self.processes:
            if process.pid is not None and process.exitcode is None:
                # One that just exited is fine: its replacement reads the file anew.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)
