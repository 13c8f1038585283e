"""The Grafana dashboard in docs/: every PromQL query names metrics and labels the
gateway exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cachegw._metrics import Metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"
# Labels Prometheus adds when it scrapes, and the histogram bucket bound.
_SCRAPE_LABELS = {"instance", "job", "le"}


def exported() -> dict[str, set[str]]:
    """Sample name → its label names, from a `Metrics` with every kind of value set."""
    metrics = Metrics(
        memory_stats=lambda: {
            "entries": 1,
            "bytes": 1,
            "max_entries": 1,
            "max_bytes": 1,
            "evictions": 1,
        }
    )
    metrics.watch_l1(lambda: {"entries": 1, "bytes": 1, "max_entries": 1, "max_bytes": 1})
    metrics.request("s", "/r", "HIT", 0.001)
    metrics.upstream("s", 0.1, "timeout")
    metrics.backend_error("get")
    metrics.circuit(False)
    metrics.stale("s", "stale-if-error")
    metrics.coalesced("s")
    metrics.purge("tags")
    metrics.config(1)
    metrics.reload("reloaded")
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render()[0].decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def queries() -> list[tuple[str, str]]:
    data = json.loads(DASHBOARD.read_text())
    found = []
    for panel in data["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            found.append((panel["title"], target["expr"]))
    return found


def test_every_query_uses_exported_metrics_and_labels() -> None:
    names = exported()
    used: set[str] = set()
    for title, expr in queries():
        assert expr.count("(") == expr.count(")"), f"unbalanced parentheses in {title!r}"
        metrics = set(re.findall(r"\bcachegw_[a-z0-9_]+\b", expr))
        assert metrics, f"{title!r} uses no cachegw metric: {expr}"
        unknown = sorted(metrics - set(names))
        assert not unknown, f"{title!r} uses metrics the gateway does not export: {unknown}"
        labels = set().union(*(names[m] for m in metrics)) | _SCRAPE_LABELS
        grouped = {
            label.strip()
            for group in re.findall(r"\bby \(([^)]*)\)", expr)
            for label in group.split(",")
        }
        matched = set(re.findall(r"([a-z_]+)\s*[!=]~?\"", expr))
        assert grouped | matched <= labels, (title, sorted((grouped | matched) - labels))
        used |= metrics
    # The dashboard covers what `cachegw top` shows.
    for name in (
        "cachegw_requests_total",
        "cachegw_request_duration_seconds_bucket",
        "cachegw_upstream_errors_total",
        "cachegw_coalesced_waiters_total",
        "cachegw_backend_circuit_open",
        "cachegw_memory_bytes",
        "cachegw_l1_entries",
        "cachegw_config_generation",
    ):
        assert name in used, f"no panel shows {name}"


def test_the_operations_page_links_the_dashboard() -> None:
    page = (DASHBOARD.parent / "operations.md").read_text()
    assert "(grafana-dashboard.json)" in page
