"""Prometheus metrics: one `Metrics` object per application, nothing global.

Each `Metrics` owns its own ``CollectorRegistry``, so several applications in one
process (tests, an app mounting two gateways) never share or collide on values.

Several worker processes (``cachegw serve --workers N``) use prometheus-client's
multi-process mode: when ``PROMETHEUS_MULTIPROC_DIR`` names a directory, every process
writes its values to memory-mapped files there and `Metrics.render` merges the files of
all workers, so any worker answers a scrape with the totals. prometheus-client decides
the mode once, when it is first imported, so the variable must be in the environment
before the worker starts: `multiprocess_dir` sets it for the supervisor, whose workers
are spawned (not forked) and inherit it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from cachegw._prom import MULTIPROC_ENV, Timings, multiprocess_path

__all__ = [
    "CACHE_STATUSES",
    "MULTIPROC_ENV",
    "REQUEST_BUCKETS",
    "UPSTREAM_BUCKETS",
    "MemoryStats",
    "Metrics",
    "multiprocess_dir",
]

#: ``cache_status`` label values: nginx's vocabulary, plus ``ERROR`` for requests the
#: gateway refused itself (bad target or headers, no route, method not allowed).
CACHE_STATUSES = ("HIT", "MISS", "STALE", "BYPASS", "EXPIRED", "ERROR")

#: Upstream latency buckets (seconds): 1 ms to 30 s, roughly 1-2.5-5 per decade.
UPSTREAM_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

#: Gateway response-time buckets (seconds): 100 µs (a cache hit) to 30 s (a slow miss).
REQUEST_BUCKETS = (0.0001, 0.00025, 0.0005, *UPSTREAM_BUCKETS)

#: A callable returning `MemoryBackend.stats()`-shaped numbers: ``entries``, ``bytes``,
#: ``max_entries``, ``max_bytes``, ``evictions``.
MemoryStats = Callable[[], Mapping[str, int]]

# In multi-process mode the memory gauges cannot be read at scrape time (the scraped
# worker sees only its own backend): each worker copies its numbers to the shared
# files, at most this often, when it counts a request or renders.
_MEMORY_SYNC_INTERVAL = 1.0

_MEMORY_GAUGES = (
    ("entries", "cachegw_memory_entries", "Entries held by the in-memory backend."),
    ("bytes", "cachegw_memory_bytes", "Bytes charged to the in-memory backend's entries."),
    ("max_entries", "cachegw_memory_max_entries", "The in-memory backend's entry bound."),
    ("max_bytes", "cachegw_memory_max_bytes", "The in-memory backend's byte bound."),
)
_EVICTIONS_HELP = "Entries the in-memory backend evicted to stay within its bounds."
_L1_GAUGES = (
    ("entries", "cachegw_l1_entries", "Decoded entries held in the process (L1)."),
    (
        "bytes",
        "cachegw_l1_bytes",
        "Bytes held in L1: entries whole and the answers built from them.",
    ),
    ("max_entries", "cachegw_l1_max_entries", "L1's entry bound (l1_entries)."),
    ("max_bytes", "cachegw_l1_max_bytes", "L1's byte bound."),
)


class Metrics:
    """The gateway's Prometheus metrics, in a registry of their own.

    Usage::

        metrics = Metrics(version=__version__)
        metrics.request("catalog", "/items/{item_id}", "HIT")
        metrics.upstream("catalog", 0.012, None)
        body, content_type = metrics.render(request.headers.get("accept", ""))

    Parameters:
        version: reported as ``cachegw_info{version=...} 1``.
        memory_stats: a callable returning the in-memory backend's numbers (usually
            ``MemoryBackend.stats``); it can also be set later with `watch_memory`.

    Raises:
        ConfigError: ``PROMETHEUS_MULTIPROC_DIR`` is set but prometheus-client was
            imported before it was, or it names no directory.
    """

    def __init__(self, *, version: str = "", memory_stats: MemoryStats | None = None) -> None:
        self.multiprocess_dir = multiprocess_path()
        self._memory_stats = memory_stats
        self._l1_stats: MemoryStats | None = None
        self._memory_synced = 0.0
        self._evictions_seen = 0

        # In multi-process mode values go to the shared files whatever the registry; the
        # metrics are then registered nowhere and `render` reads the files instead.
        registry = None if self.multiprocess_dir else CollectorRegistry()
        self._registry = registry
        self._declare_traffic(registry)
        self._declare_events(registry)
        self._declare_gateway(registry, version)

        # Created on first use in multi-process mode: a gateway on Redis has no memory
        # numbers, and a gauge reports 0 from the moment it exists.
        self._memory_gauges: dict[str, Gauge] = {}
        self._l1_gauges: dict[str, Gauge] = {}
        self._evictions: Counter | None = None
        if registry is not None:
            registry.register(_MemoryCollector(self))
            self._render_registry = registry
        else:
            self._render_registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
                self._render_registry, path=self.multiprocess_dir
            )

        # Label children cached by label values: `.labels()` validates and locks on every
        # call, and `request` runs on every cache hit.
        self._request_children: dict[tuple[str, str, str], Counter] = {}
        # Response times are counted in plain lists on the request path and added to the
        # histogram when it is read (see `Timings`).
        self._timings: dict[tuple[str, str], Timings] = {}
        self._timings_flushed = 0.0
        self._upstream_children: dict[str, Histogram] = {}

    def _declare_traffic(self, registry: CollectorRegistry | None) -> None:
        """The metrics of requests, upstream requests and the cache backend."""
        self._requests = Counter(
            "cachegw_requests",
            "Requests answered, by service, route template and cache status.",
            ("service", "route", "cache_status"),
            registry=registry,
        )
        self._request_seconds = Histogram(
            "cachegw_request_duration_seconds",
            "Time the gateway took to answer, by service and route template (hits included).",
            ("service", "route"),
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self._upstream_seconds = Histogram(
            "cachegw_upstream_request_duration_seconds",
            "Time an upstream took to answer (bodies streamed through: to their headers).",
            ("service",),
            buckets=UPSTREAM_BUCKETS,
            registry=registry,
        )
        self._upstream_errors = Counter(
            "cachegw_upstream_errors",
            "Upstream requests that failed: connect, timeout, protocol or status_5xx.",
            ("service", "kind"),
            registry=registry,
        )
        self._backend_errors = Counter(
            "cachegw_backend_errors",
            "Cache backend operations that failed or ran out of time (served uncached).",
            ("operation",),
            registry=registry,
        )
        self._circuit = Gauge(
            "cachegw_backend_circuit_open",
            "1 while the cache backend's circuit breaker is open (cache skipped).",
            registry=registry,
            multiprocess_mode="livemax",
        )

    def _declare_events(self, registry: CollectorRegistry | None) -> None:
        """The counters of what happened to requests: stale, coalesced, purges."""
        self._stale = Counter(
            "cachegw_stale_served",
            "Stale entries served, by reason: stale-while-revalidate, stale-if-error, max-stale.",
            ("service", "reason"),
            registry=registry,
        )
        self._coalesced = Counter(
            "cachegw_coalesced_waiters",
            "Requests that waited for another request's fetch of the same key.",
            ("service",),
            registry=registry,
        )
        self._purges = Counter(
            "cachegw_purges",
            "Purge requests, by kind: tags, paths, service, all.",
            ("kind",),
            registry=registry,
        )

    def _declare_gateway(self, registry: CollectorRegistry | None, version: str) -> None:
        """The gauges and counters of the gateway itself: version, start, reloads."""
        info = Gauge(
            "cachegw_info",
            "cachegw's version.",
            ("version",),
            registry=registry,
            multiprocess_mode="livemax",
        )
        info.labels(version).set(1)
        # When the gateway started (the earliest live worker): `cachegw top --once` turns
        # counters into figures since then when its own window saw no requests.
        started = Gauge(
            "cachegw_start_time_seconds",
            "Unix time the gateway (its earliest live worker) started.",
            registry=registry,
            multiprocess_mode="livemin",
        )
        started.set(time.time())
        # Per worker ("liveall": a pid label in multi-process mode), so a scrape shows
        # whether every worker took a reload: min() and max() agree once they all have.
        self._generation = Gauge(
            "cachegw_config_generation",
            "Generation of the gateway file in use: 1 at start, +1 per applied reload.",
            registry=registry,
            multiprocess_mode="liveall",
        )
        self._reloads = Counter(
            "cachegw_config_reloads",
            "Reloads of the gateway file, by outcome: reloaded, unchanged, rejected.",
            ("outcome",),
            registry=registry,
        )

    def __repr__(self) -> str:
        mode = f"multiprocess_dir={self.multiprocess_dir!r}" if self.multiprocess_dir else ""
        return f"Metrics({mode})"

    # -- counting ----------------------------------------------------------------------

    def request(
        self, service: str, route: str, cache_status: str, seconds: float | None = None
    ) -> None:
        """Count one answered request (``cache_status``: one of `CACHE_STATUSES`) and,
        when given, the ``seconds`` the gateway took to answer it."""
        labels = (service, route, cache_status)
        child = self._request_children.get(labels)
        if child is None:
            child = self._request_children[labels] = self._requests.labels(*labels)
        child.inc()
        if seconds is not None:
            timings = self._timings.get((service, route))
            if timings is None:
                timings = Timings(self._request_seconds.labels(service, route))
                self._timings[(service, route)] = timings
            timings.counts[bisect_left(REQUEST_BUCKETS, seconds)] += 1
            timings.total += seconds
        if self.multiprocess_dir is not None:
            now = time.monotonic()
            if now - self._timings_flushed >= _MEMORY_SYNC_INTERVAL:
                self._timings_flushed = now
                self._flush_timings()
                if self._memory_stats is not None or self._l1_stats is not None:
                    self._sync_memory()

    def upstream(self, service: str, seconds: float, error_kind: str | None = None) -> None:
        """Record one upstream request's duration, and its failure if ``error_kind``
        (``connect``, ``timeout``, ``protocol`` or ``status_5xx``) is given."""
        child = self._upstream_children.get(service)
        if child is None:
            child = self._upstream_children[service] = self._upstream_seconds.labels(service)
        child.observe(seconds)
        if error_kind is not None:
            self._upstream_errors.labels(service, error_kind).inc()

    def backend_error(self, operation: str) -> None:
        """Count one failed backend operation (``get``, ``set``, ``delete``, ``lock``, ...)."""
        self._backend_errors.labels(operation).inc()

    def circuit(self, open: bool) -> None:
        """Set the backend circuit breaker's state."""
        self._circuit.set(1 if open else 0)

    def stale(
        self,
        service: str,
        reason: Literal["stale-while-revalidate", "stale-if-error", "max-stale"],
    ) -> None:
        """Count one stale entry served, and why."""
        self._stale.labels(service, reason).inc()

    def coalesced(self, service: str) -> None:
        """Count one request answered by another request's fetch."""
        self._coalesced.labels(service).inc()

    def purge(self, kind: Literal["tags", "paths", "service", "all"]) -> None:
        """Count one purge request."""
        self._purges.labels(kind).inc()

    def config(self, generation: int) -> None:
        """Set the generation of the configuration in use."""
        self._generation.set(generation)

    def reload(self, outcome: Literal["reloaded", "unchanged", "rejected"]) -> None:
        """Count one reload attempt."""
        self._reloads.labels(outcome).inc()

    def watch_memory(self, memory_stats: MemoryStats | None) -> None:
        """Report the in-memory backend's size from ``memory_stats`` (None: stop)."""
        self._memory_stats = memory_stats
        self._memory_synced = 0.0

    def watch_l1(self, l1_stats: MemoryStats | None) -> None:
        """Report the in-process L1's size from ``l1_stats`` (`L1.stats`; None: stop)."""
        self._l1_stats = l1_stats
        self._memory_synced = 0.0

    # -- exposition --------------------------------------------------------------------

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics in the exposition format the ``Accept`` header asks for (the
        Prometheus text format by default, OpenMetrics when asked), and its content type.

        In multi-process mode: the sum over every worker that wrote to the directory.
        """
        self._flush_timings()
        if self.multiprocess_dir is not None and (
            self._memory_stats is not None or self._l1_stats is not None
        ):
            self._sync_memory(force=True)
        encoder, content_type = choose_encoder(accept)
        return encoder(self._render_registry), content_type

    def _flush_timings(self) -> None:
        for timings in list(self._timings.values()):
            timings.flush()

    def close(self) -> None:
        """Call when the worker stops: in multi-process mode, its ``live*`` gauges
        (circuit state, memory size) leave the merged view."""
        if self.multiprocess_dir is not None:
            multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                os.getpid(), self.multiprocess_dir
            )

    # -- memory backend ----------------------------------------------------------------

    def _sync_memory(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._memory_synced < _MEMORY_SYNC_INTERVAL:
            return
        self._memory_synced = now
        l1 = self._read(self._l1_stats)
        if l1 is not None:
            if not self._l1_gauges:
                for stat, name, doc in _L1_GAUGES:
                    self._l1_gauges[stat] = Gauge(
                        name, doc, registry=None, multiprocess_mode="livesum"
                    )
            for stat, gauge in self._l1_gauges.items():
                gauge.set(l1.get(stat, 0))
        stats = self._read_memory()
        if stats is None:
            return
        if self._evictions is None:
            for stat, name, doc in _MEMORY_GAUGES:
                self._memory_gauges[stat] = Gauge(
                    name, doc, registry=None, multiprocess_mode="livesum"
                )
            self._evictions = Counter("cachegw_memory_evictions", _EVICTIONS_HELP, registry=None)
        for stat, gauge in self._memory_gauges.items():
            gauge.set(stats.get(stat, 0))
        evictions = stats.get("evictions", 0)
        if evictions > self._evictions_seen:
            self._evictions.inc(evictions - self._evictions_seen)
        self._evictions_seen = evictions

    def _read_memory(self) -> Mapping[str, int] | None:
        return self._read(self._memory_stats)

    @staticmethod
    def _read(source: MemoryStats | None) -> Mapping[str, int] | None:
        if source is None:
            return None
        try:
            return source()
        except Exception:  # a scrape must not fail because a stats source did
            return None


class _MemoryCollector:
    """Reads the in-memory backend's numbers at scrape time (single-process mode)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        l1 = self._metrics._read(self._metrics._l1_stats)
        if l1 is not None:
            for stat, name, doc in _L1_GAUGES:
                yield GaugeMetricFamily(name, doc, value=l1.get(stat, 0))
        stats = self._metrics._read_memory()
        if stats is None:
            return
        for stat, name, doc in _MEMORY_GAUGES:
            yield GaugeMetricFamily(name, doc, value=stats.get(stat, 0))
        yield CounterMetricFamily(
            "cachegw_memory_evictions", _EVICTIONS_HELP, value=stats.get("evictions", 0)
        )

    def describe(self) -> Iterable[Metric]:
        # Registering must not call the stats source (the backend may not exist yet).
        return ()


@contextmanager
def multiprocess_dir() -> Iterator[str]:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at a fresh temporary directory for the duration.

    For a supervisor about to spawn workers: enter it before the workers start, so each
    imports prometheus-client in multi-process mode. A directory the user already set
    in the environment is kept as it is (and not removed); prometheus-client expects
    it to be emptied between runs.

    Usage::

        with multiprocess_dir():
            uvicorn.run("cachegw._app:app_from_env", factory=True, workers=4)
    """
    preset = os.environ.get(MULTIPROC_ENV)
    if preset:
        yield preset
        return
    path = tempfile.mkdtemp(prefix="cachegw-metrics-")
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(path, ignore_errors=True)
