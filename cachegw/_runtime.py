"""`Runtime`: what the gateway's lifespan opens (backend, engine, upstream clients, metrics)
and what the proxy path, the admin endpoints and the reloader use."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from cachegw._accesslog import flush_access_log
from cachegw._backends import (
    CacheBackend,
    MemoryBackend,
    RedisBackend,
    backend_from_url,
    cache_backend,
)
from cachegw._engine import CacheEngine
from cachegw._flight import Coordinator, coordinator_for
from cachegw._gateway import Gateway
from cachegw._metrics import Metrics
from cachegw._purge import Purges, purges_for
from cachegw._relay import ENV_VAR as RELAY_DIR
from cachegw._relay import RelayCoordinator, RelayPurges
from cachegw._reload import Reloader
from cachegw._store import L1
from cachegw._upstream import Upstream, upstream_for
from cachegw._version import __version__

__all__ = ["Runtime"]


class Runtime:
    """What the lifespan opens and the proxy path uses."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.backend: CacheBackend | None = None
        self._owned: MemoryBackend | RedisBackend | None = None  # built here from a URL
        self.engine: CacheEngine | None = None
        self.upstreams: dict[str, Upstream] = {}
        self.metrics = Metrics(version=__version__)
        # Set when the gateway came from a file: what `cachegw reload` and SIGHUP use.
        self.reloader: Reloader | None = None
        # Whether SIGHUP reloads (`cachegw serve`; not an app embedded in a test or a
        # host process, whose signals are not ours to take).
        self.reload_on_sighup = False
        self._signalled: asyncio.Task[Any] | None = None

    async def open(self) -> None:
        gateway = self.gateway
        if isinstance(gateway.backend, str):
            self._owned = backend_from_url(
                gateway.backend,
                max_entries=gateway.max_entries,
                max_bytes=gateway.max_bytes,
                op_timeout=float(gateway.op_timeout),
            )
            if isinstance(self._owned, RedisBackend):
                await self._owned.warm()
            backend = cache_backend(self._owned)
        else:
            backend = cache_backend(gateway.backend)
        self.backend = backend
        if isinstance(backend, MemoryBackend):
            self.metrics.watch_memory(backend.stats)
        purges = self._purges(backend, gateway.prefix)
        coordinator: Coordinator
        if isinstance(purges, RelayPurges) and isinstance(backend, MemoryBackend):
            # Workers of one machine: one fetch per key for all of them (see `_relay`).
            coordinator = RelayCoordinator(purges.directory, backend)
        else:
            coordinator = coordinator_for(backend, gateway.prefix)
        self.engine = CacheEngine(
            backend,
            status_header=gateway.status_header,
            metrics=self.metrics,
            purges=purges,
            coordinator=coordinator,
            expose_tag_headers=gateway.expose_tag_headers,
            # A lock outlives the slowest upstream exchange it protects.
            lock_ttl=max((s.exchange_bound for s in gateway.services), default=10.0) + 1.0,
            l1=L1(
                max_entries=gateway.l1_entries,
                max_bytes=int(gateway.l1_max_bytes),
                ttl=float(gateway.l1_ttl),
            ),
            compress_min=int(gateway.compress_min) if gateway.compress else None,
        )
        self.engine.start()
        self.metrics.watch_l1(self.engine.store.l1.stats)
        for service in gateway.services:
            self.upstreams[service.name] = upstream_for(service)
        self.metrics.config(self.reloader.generation if self.reloader is not None else 1)
        if self.reload_on_sighup and self.reloader is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)

    @staticmethod
    def _purges(backend: CacheBackend, prefix: str) -> Purges:
        """Through Redis when shared; else relayed between the workers of
        `cachegw serve --workers N` (see `_relay`); else per process."""
        relay = os.environ.get(RELAY_DIR)
        if relay and backend.shared_client is None:
            return RelayPurges(relay)
        return purges_for(backend, prefix)

    def _on_sighup(self) -> None:
        assert self.reloader is not None
        task = asyncio.get_running_loop().create_task(self.reloader.reload())
        # Keep a reference until done (the loop holds only a weak one).
        self._signalled = task

    async def close(self) -> None:
        if self.reload_on_sighup and self.reloader is not None:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self.reloader is not None:
            await self.reloader.aclose()
        self.metrics.close()
        if self.engine is not None:
            await self.engine.aclose()
        for upstream in self.upstreams.values():
            await upstream.aclose()
        self.upstreams.clear()
        if isinstance(self._owned, RedisBackend):
            await self._owned.aclose()
        flush_access_log()
