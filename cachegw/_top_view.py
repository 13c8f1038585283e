"""The figures of ``cachegw top``, from two scrapes of the metrics endpoint (pure).

Rates, cache-status shares and latency quantiles per service and per route over the
interval between two scrapes; `cachegw._top` draws them and runs the terminal loop.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Row", "Scrape", "View", "compute", "histogram_quantile", "sort_rows"]

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Scrape:
    """One reading of the metrics endpoint: ``at`` (seconds, any clock) and every sample."""

    at: float
    samples: Mapping[tuple[str, Labels], float]

    @classmethod
    def parse(cls, text: str, at: float) -> Scrape:
        samples: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                samples[(sample.name, labels)] = sample.value
        return cls(at, samples)

    def by(self, name: str, *keep: str) -> dict[tuple[str, ...], float]:
        """Samples of ``name`` summed over every label but ``keep`` (as PromQL's
        ``sum by``): merges a ``pid`` label, for instance."""
        sums: dict[tuple[str, ...], float] = defaultdict(float)
        for (sample, labels), value in self.samples.items():
            if sample == name:
                found = dict(labels)
                sums[tuple(found.get(k, "") for k in keep)] += value
        return dict(sums)

    def values(self, name: str) -> list[float]:
        return [v for (sample, _), v in self.samples.items() if sample == name]


@dataclass
class Row:
    """Figures over one interval for a service (``route`` empty) or one of its routes."""

    service: str
    route: str
    requests: float = 0.0
    statuses: dict[str, float] = field(default_factory=dict)
    buckets: dict[float, float] = field(default_factory=dict)  # le → count (cumulative)
    seconds: float = 1.0
    errors: float | None = None
    timeouts: float | None = None
    coalesced: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def share(self, *statuses: str) -> float | None:
        if not self.requests:
            return None
        return sum(self.statuses.get(s, 0.0) for s in statuses) / self.requests

    def quantile(self, q: float) -> float | None:
        return histogram_quantile(q, self.buckets)


@dataclass
class View:
    """What one frame shows."""

    url: str
    seconds: float
    services: list[tuple[Row, list[Row]]]
    generations: list[float]
    circuit_open: bool
    memory: dict[str, float]
    l1: dict[str, float]
    sort: str = "rps"
    error: str | None = None
    note: str | None = None  # what the figures cover, when not the last interval


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of cumulative ``buckets`` (upper bound → count), interpolated
    linearly within a bucket as Prometheus's ``histogram_quantile`` does; None without
    observations. A rank in the ``+Inf`` bucket gives the highest finite bound."""
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _delta(now: float, before: float | None) -> float:
    # A counter that went down was reset (a worker or the gateway restarted).
    if before is None or now < before:
        return now
    return now - before


def _deltas(now: Scrape, before: Scrape, name: str, *keep: str) -> dict[tuple[str, ...], float]:
    old = before.by(name, *keep)
    return {key: _delta(value, old.get(key)) for key, value in now.by(name, *keep).items()}


def compute(before: Scrape, now: Scrape, url: str = "", sort: str = "rps") -> View:
    """The view of what happened between two scrapes (pure)."""
    seconds = max(now.at - before.at, 1e-9)
    routes = _route_rows(before, now, seconds)
    services = _service_rows(before, now, seconds, routes)
    grouped = [
        (total, sort_rows([r for (s, _), r in routes.items() if s == name], sort))
        for name, total in services.items()
    ]
    ordered = [
        (total, route_rows)
        for total in sort_rows([t for t, _ in grouped], sort)
        for t, route_rows in grouped
        if t is total
    ]
    return View(
        url=url,
        seconds=seconds,
        services=ordered,
        generations=sorted(now.values("cachegw_config_generation")),
        circuit_open=any(v > 0 for v in now.values("cachegw_backend_circuit_open")),
        memory=_gauges(now, "cachegw_memory"),
        l1=_gauges(now, "cachegw_l1"),
        sort=sort,
    )


def _route_rows(before: Scrape, now: Scrape, seconds: float) -> dict[tuple[str, str], Row]:
    """A row per (service, route) that answered requests between the two scrapes."""
    requests = _deltas(now, before, "cachegw_requests_total", "service", "route", "cache_status")
    buckets = _deltas(
        now, before, "cachegw_request_duration_seconds_bucket", "service", "route", "le"
    )
    routes: dict[tuple[str, str], Row] = {}

    def row(service: str, route: str) -> Row:
        found = routes.get((service, route))
        if found is None:
            found = routes[(service, route)] = Row(service, route, seconds=seconds)
        return found

    for (service, route, status), count in requests.items():
        if not service:
            continue  # refusals before routing (bad target, no route)
        target = row(service, route)
        target.requests += count
        target.statuses[status] = target.statuses.get(status, 0.0) + count
    for (service, route, le), count in buckets.items():
        if service:
            target = row(service, route)
            bound = float(le)
            target.buckets[bound] = target.buckets.get(bound, 0.0) + count
    return routes


def _service_rows(
    before: Scrape, now: Scrape, seconds: float, routes: Mapping[tuple[str, str], Row]
) -> dict[str, Row]:
    """A row per service: its routes' sums, its upstream errors and coalesced waiters."""
    errors = _deltas(now, before, "cachegw_upstream_errors_total", "service", "kind")
    coalesced = _deltas(now, before, "cachegw_coalesced_waiters_total", "service")
    services: dict[str, Row] = {}
    for (service, _), route_row in routes.items():
        total = services.setdefault(service, Row(service, "", seconds=seconds))
        total.requests += route_row.requests
        for status, count in route_row.statuses.items():
            total.statuses[status] = total.statuses.get(status, 0.0) + count
        for bound, count in route_row.buckets.items():
            total.buckets[bound] = total.buckets.get(bound, 0.0) + count
    for (service, kind), count in errors.items():
        total = services.setdefault(service, Row(service, "", seconds=seconds))
        total.errors = (total.errors or 0.0) + count
        if kind == "timeout":
            total.timeouts = (total.timeouts or 0.0) + count
    for (service,), count in coalesced.items():
        total = services.setdefault(service, Row(service, "", seconds=seconds))
        total.coalesced = (total.coalesced or 0.0) + count
    for total in services.values():
        total.errors = total.errors or 0.0
        total.timeouts = total.timeouts or 0.0
        total.coalesced = total.coalesced or 0.0
    return services


def _gauges(now: Scrape, prefix: str) -> dict[str, float]:
    """The summed ``<prefix>_entries``, ``_bytes``, ``_max_entries``, ``_max_bytes``."""
    found = {}
    for stat in ("entries", "bytes", "max_entries", "max_bytes"):
        values = now.values(f"{prefix}_{stat}")
        if values:
            found[stat] = sum(values)
    return found


def sort_rows(rows: list[Row], sort: str) -> list[Row]:
    """``rows`` in the order a sort key of the live view (`SORTS`) names."""
    if sort == "name":
        return sorted(rows, key=lambda r: (r.service, r.route))
    if sort == "hit":
        return sorted(rows, key=lambda r: (-(r.share("HIT") or 0.0), r.service, r.route))
    if sort == "p99":
        return sorted(rows, key=lambda r: (-(r.quantile(0.99) or 0.0), r.service, r.route))
    if sort == "errors":
        return sorted(rows, key=lambda r: (-(r.errors or 0.0), -r.rps, r.service, r.route))
    return sorted(rows, key=lambda r: (-r.rps, r.service, r.route))
