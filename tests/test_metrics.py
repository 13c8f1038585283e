"""Metrics: per-instance registries, exposition values, multi-process aggregation; the access log.

The multi-process tests run prometheus-client in subprocesses only: it picks its mode
once per process, from ``PROMETHEUS_MULTIPROC_DIR``, when first imported, so setting the
variable here would not take effect (and must not leak into other tests).
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from cachegw import MemoryBackend
from cachegw._accesslog import (
    ACCESS_LOGGER,
    BufferedAccessHandler,
    access_line,
    access_record,
    access_sink,
    enable_access_log,
    hit_tail,
    log_access,
    log_config,
)
from cachegw._errors import ConfigError
from cachegw._metrics import MULTIPROC_ENV, Metrics, multiprocess_dir

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(body: bytes) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


@pytest.fixture(autouse=True)
def _single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)


# -- single process --------------------------------------------------------------------


def test_known_sequence_gives_expected_values() -> None:
    metrics = Metrics(version="1.2.3")
    for status in ("MISS", "HIT", "HIT", "STALE"):
        metrics.request("catalog", "/items/{item_id}", status)
    metrics.request("users", "/{rest:path}", "BYPASS")
    metrics.request("", "", "ERROR")
    metrics.upstream("catalog", 0.004)
    metrics.upstream("catalog", 0.2)
    metrics.upstream("catalog", 10.5, "timeout")
    metrics.upstream("users", 0.0, "connect")
    metrics.backend_error("get")
    metrics.backend_error("get")
    metrics.backend_error("set")
    metrics.circuit(True)
    metrics.stale("catalog", "stale-while-revalidate")
    metrics.stale("catalog", "stale-if-error")
    metrics.coalesced("catalog")
    metrics.coalesced("catalog")
    metrics.purge("tags")
    metrics.purge("all")

    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    found = samples(body)
    item = {"service": "catalog", "route": "/items/{item_id}"}
    assert value(found, "cachegw_requests_total", cache_status="HIT", **item) == 2
    assert value(found, "cachegw_requests_total", cache_status="MISS", **item) == 1
    assert value(found, "cachegw_requests_total", cache_status="STALE", **item) == 1
    assert value(found, "cachegw_requests_total", cache_status="EXPIRED", **item) is None
    assert (
        value(
            found,
            "cachegw_requests_total",
            service="users",
            route="/{rest:path}",
            cache_status="BYPASS",
        )
        == 1
    )
    assert value(found, "cachegw_requests_total", service="", route="", cache_status="ERROR") == 1

    hist = "cachegw_upstream_request_duration_seconds"
    assert value(found, f"{hist}_count", service="catalog") == 3
    assert value(found, f"{hist}_sum", service="catalog") == pytest.approx(10.704)
    assert value(found, f"{hist}_bucket", service="catalog", le="0.005") == 1
    assert value(found, f"{hist}_bucket", service="catalog", le="0.25") == 2
    assert value(found, f"{hist}_bucket", service="catalog", le="10.0") == 2
    assert value(found, f"{hist}_bucket", service="catalog", le="30.0") == 3
    assert value(found, f"{hist}_bucket", service="catalog", le="+Inf") == 3
    assert value(found, f"{hist}_bucket", service="users", le="0.001") == 1

    errors = "cachegw_upstream_errors_total"
    assert value(found, errors, service="catalog", kind="timeout") == 1
    assert value(found, errors, service="users", kind="connect") == 1
    assert value(found, "cachegw_backend_errors_total", operation="get") == 2
    assert value(found, "cachegw_backend_errors_total", operation="set") == 1
    assert value(found, "cachegw_backend_circuit_open") == 1
    stale = "cachegw_stale_served_total"
    assert value(found, stale, service="catalog", reason="stale-while-revalidate") == 1
    assert value(found, stale, service="catalog", reason="stale-if-error") == 1
    assert value(found, "cachegw_coalesced_waiters_total", service="catalog") == 2
    assert value(found, "cachegw_purges_total", kind="tags") == 1
    assert value(found, "cachegw_purges_total", kind="all") == 1
    assert value(found, "cachegw_info", version="1.2.3") == 1

    metrics.circuit(False)
    assert value(samples(metrics.render()[0]), "cachegw_backend_circuit_open") == 0


def test_every_documented_metric_is_exposed() -> None:
    backend = MemoryBackend()
    metrics = Metrics(memory_stats=backend.stats)
    metrics.request("s", "/", "HIT", 0.001)
    metrics.watch_l1(lambda: {"entries": 1, "bytes": 2, "max_entries": 3, "max_bytes": 4})
    metrics.upstream("s", 0.1, "status_5xx")
    metrics.backend_error("get")
    metrics.stale("s", "max-stale")
    metrics.coalesced("s")
    metrics.purge("service")
    metrics.config(1)
    metrics.reload("reloaded")
    families = text_string_to_metric_families(metrics.render()[0].decode())
    names = {f.name for f in families if not f.name.endswith("_created")}
    assert names == {
        "cachegw_requests",
        "cachegw_request_duration_seconds",
        "cachegw_upstream_request_duration_seconds",
        "cachegw_upstream_errors",
        "cachegw_backend_errors",
        "cachegw_backend_circuit_open",
        "cachegw_stale_served",
        "cachegw_coalesced_waiters",
        "cachegw_purges",
        "cachegw_info",
        "cachegw_start_time_seconds",
        "cachegw_config_generation",
        "cachegw_config_reloads",
        "cachegw_memory_entries",
        "cachegw_memory_bytes",
        "cachegw_memory_max_entries",
        "cachegw_memory_max_bytes",
        "cachegw_memory_evictions",
        "cachegw_l1_entries",
        "cachegw_l1_bytes",
        "cachegw_l1_max_entries",
        "cachegw_l1_max_bytes",
    }
    docs = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    for name in names - {"cachegw_info"}:
        assert f"`{name}" in docs, f"{name} is not documented in docs/operations.md"


def test_instances_do_not_share_values() -> None:
    first, second = Metrics(), Metrics()
    first.request("catalog", "/a", "HIT")
    first.request("catalog", "/a", "HIT")
    second.request("catalog", "/a", "HIT")
    second.circuit(True)
    one, two = samples(first.render()[0]), samples(second.render()[0])
    labels = {"service": "catalog", "route": "/a", "cache_status": "HIT"}
    assert value(one, "cachegw_requests_total", **labels) == 2
    assert value(two, "cachegw_requests_total", **labels) == 1
    assert value(one, "cachegw_backend_circuit_open") == 0
    assert value(two, "cachegw_backend_circuit_open") == 1


def test_memory_gauges_follow_a_real_backend_at_scrape_time() -> None:
    backend = MemoryBackend(max_entries=2, max_bytes="1MiB")
    metrics = Metrics()
    assert value(samples(metrics.render()[0]), "cachegw_memory_entries") is None
    metrics.watch_memory(backend.stats)
    assert value(samples(metrics.render()[0]), "cachegw_memory_entries") == 0

    backend.set_nowait("a", b"x" * 100, 60)
    found = samples(metrics.render()[0])
    assert value(found, "cachegw_memory_entries") == 1
    assert value(found, "cachegw_memory_bytes") == backend.stats()["bytes"] > 100
    assert value(found, "cachegw_memory_max_entries") == 2
    assert value(found, "cachegw_memory_max_bytes") == 1024 * 1024

    backend.set_nowait("b", b"y", 60)
    backend.set_nowait("c", b"z", 60)  # evicts "a"
    found = samples(metrics.render()[0])
    assert value(found, "cachegw_memory_entries") == 2
    assert value(found, "cachegw_memory_bytes") == backend.stats()["bytes"]
    assert value(found, "cachegw_memory_evictions_total") == 1


def test_a_failing_memory_source_does_not_break_the_scrape() -> None:
    def broken() -> dict[str, int]:
        raise RuntimeError("backend gone")

    metrics = Metrics(memory_stats=broken)
    metrics.request("s", "/", "HIT")
    found = samples(metrics.render()[0])
    assert value(found, "cachegw_memory_entries") is None
    assert value(found, "cachegw_requests_total", service="s", route="/", cache_status="HIT") == 1


def test_openmetrics_when_asked() -> None:
    metrics = Metrics()
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_the_prometheus_client_internals_the_adapter_reads() -> None:
    # The contract of cachegw._prom (pyproject.toml allows prometheus-client below 1.0):
    # a release that renames or reshapes these fails here, not in production.
    from prometheus_client import CollectorRegistry, Histogram, generate_latest, values

    from cachegw._prom import Timings

    # How the adapter asks for multi-process mode (False here: see the module docstring).
    assert "_multiprocess" in dir(values.ValueClass)
    assert values.ValueClass._multiprocess is False
    registry = CollectorRegistry()
    child = Histogram("t", "t", ["a"], registry=registry, buckets=(1, 2)).labels(a="x")
    assert len(child._buckets) == 3  # one per bucket, +Inf last, non-cumulative
    assert all(callable(b.inc) and callable(b.get) for b in [*child._buckets, child._sum])
    timings = Timings(child)
    timings.counts[0], timings.counts[2], timings.total = 2, 1, 3.5
    timings.flush()
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert samples[("t_bucket", "1.0")] == 2
    assert samples[("t_bucket", "2.0")] == 2
    assert samples[("t_bucket", "+Inf")] == 3
    assert samples[("t_sum", None)] == 3.5


def test_multiproc_variable_set_too_late_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # prometheus_client is already imported here, in single-process mode.
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match="before the process starts"):
        Metrics()


def test_multiprocess_dir_sets_and_removes_a_fresh_directory() -> None:
    with multiprocess_dir() as path:
        assert os.environ[MULTIPROC_ENV] == path
        assert os.path.isdir(path)
        assert os.listdir(path) == []
    assert MULTIPROC_ENV not in os.environ
    assert not os.path.exists(path)


def test_multiprocess_dir_keeps_a_directory_the_user_chose(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with multiprocess_dir() as path:
        assert path == str(tmp_path)
    assert os.environ[MULTIPROC_ENV] == str(tmp_path)
    assert tmp_path.is_dir()


# -- several processes -----------------------------------------------------------------

# A worker: counts, reports its memory backend, says "ready", then waits for a line on
# stdin before closing (as the app's lifespan does on shutdown) and exiting.
_WORKER = textwrap.dedent(
    """
    import sys
    from cachegw import MemoryBackend
    from cachegw._metrics import Metrics

    hits, entries, circuit = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "open"
    backend = MemoryBackend()
    for i in range(entries):
        backend.set_nowait(f"k{i}", b"v", 60)
    metrics = Metrics(version="9.9", memory_stats=backend.stats)
    assert metrics.multiprocess_dir
    for _ in range(hits):
        metrics.request("catalog", "/items/{item_id}", "HIT")
    metrics.request("catalog", "/items/{item_id}", "MISS")
    metrics.upstream("catalog", 0.003, None)
    metrics.upstream("catalog", 1.5, "status_5xx")
    metrics.circuit(circuit)
    metrics.render()
    print("ready", flush=True)
    sys.stdin.readline()
    metrics.close()
    """
)

_RENDER = textwrap.dedent(
    """
    import sys
    from cachegw._metrics import Metrics

    sys.stdout.buffer.write(Metrics().render()[0])
    """
)


class Worker:
    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, *args],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == "ready\n", f"worker failed (exit {self.proc.poll()})"

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def multiproc_env(tmp_path: Path) -> dict[str, str]:
    directory = tmp_path / "metrics"
    directory.mkdir()
    return {**os.environ, MULTIPROC_ENV: str(directory)}


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.kill()


def render_in_subprocess(env: dict[str, str]) -> Samples:
    done = subprocess.run(
        [sys.executable, "-c", _RENDER], env=env, capture_output=True, check=True, timeout=30
    )
    return samples(done.stdout)


def test_multiprocess_rendering_sums_all_workers(
    multiproc_env: dict[str, str], workers: list[Worker]
) -> None:
    workers.append(Worker(multiproc_env, "3", "2", "open"))
    workers.append(Worker(multiproc_env, "4", "5", "closed"))

    found = render_in_subprocess(multiproc_env)
    item = {"service": "catalog", "route": "/items/{item_id}"}
    assert value(found, "cachegw_requests_total", cache_status="HIT", **item) == 7
    assert value(found, "cachegw_requests_total", cache_status="MISS", **item) == 2
    hist = "cachegw_upstream_request_duration_seconds"
    assert value(found, f"{hist}_count", service="catalog") == 4
    assert value(found, f"{hist}_sum", service="catalog") == pytest.approx(3.006)
    assert value(found, f"{hist}_bucket", service="catalog", le="0.005") == 2
    assert value(found, f"{hist}_bucket", service="catalog", le="+Inf") == 4
    errors = "cachegw_upstream_errors_total"
    assert value(found, errors, service="catalog", kind="status_5xx") == 2
    assert value(found, "cachegw_backend_circuit_open") == 1  # any live worker open
    assert value(found, "cachegw_memory_entries") == 7  # 2 + 5: each worker's own store
    assert value(found, "cachegw_info", version="9.9") == 1

    # A worker that shut down leaves the live gauges; its counts stay in the totals.
    workers[0].stop()
    found = render_in_subprocess(multiproc_env)
    assert value(found, "cachegw_backend_circuit_open") == 0
    assert value(found, "cachegw_memory_entries") == 5
    assert value(found, "cachegw_requests_total", cache_status="HIT", **item) == 7
    workers[1].stop()


# -- access log ------------------------------------------------------------------------


def scope(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/catalog/items/42",
        "raw_path": b"/catalog/items/42",
        "query_string": b"lang=en&b=1",
        "client": ("203.0.113.7", 51234),
        "headers": [
            (b"host", b"gw.example"),
            (b"user-agent", b"curl/8.5"),
            (b"authorization", b"Bearer s3cr3t-token"),
            (b"cookie", b"session=c00kie-value"),
        ],
    }
    base.update(overrides)
    return base


KEY = "cachegw:" + "0123456789abcdef" * 4


def test_access_line_is_json_with_the_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    log_access(
        scope(),
        status=200,
        bytes_sent=1024,
        duration=0.0123456,
        service="catalog",
        route="/items/{item_id}",
        cache_status="MISS",
        upstream=0.01,
        key=KEY,
    )
    [record] = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert record.levelno == logging.INFO
    line = record.getMessage()
    assert "\n" not in line
    fields = json.loads(line)
    assert fields.pop("time").endswith("Z")
    assert fields == {
        "client": "203.0.113.7",
        "method": "GET",
        "path": "/catalog/items/42",
        "query": "lang=en&b=1",
        "status": 200,
        "bytes": 1024,
        "duration_ms": 12.346,
        "service": "catalog",
        "route": "/items/{item_id}",
        "cache_status": "MISS",
        "upstream_ms": 10.0,
        "key": "0123456789ab",
        "user_agent": "curl/8.5",
    }
    assert "s3cr3t" not in line
    assert "c00kie" not in line


def test_access_line_time_is_rfc3339_utc() -> None:
    record = access_record(scope(), status=200, bytes_sent=0, duration=0)
    assert datetime.fromisoformat(record["time"]).utcoffset() == timedelta(0)


def test_access_line_of_a_refusal_has_no_upstream_or_key() -> None:
    record = access_record(
        scope(client=None, headers=[]), status=404, bytes_sent=80, duration=0.0001
    )
    assert record["client"] is None
    assert record["user_agent"] == ""
    assert "upstream_ms" not in record
    assert "key" not in record


def test_hostile_values_are_truncated_and_escaped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    long_path = b"/x" + b"a" * 5000
    log_access(
        scope(
            raw_path=long_path + b'\n{"forged":1}',
            query_string=b"q=" + b"b" * 5000,
            headers=[(b"user-agent", b"u" * 5000 + b"\r\n")],
        ),
        status=200,
        bytes_sent=0,
        duration=0,
    )
    line = caplog.records[-1].getMessage()
    assert "\n" not in line and "\r" not in line
    fields = json.loads(line)
    assert len(fields["path"]) == 2048
    assert len(fields["query"]) == 2048
    assert len(fields["user_agent"]) == 512


def test_log_access_is_a_no_op_when_the_logger_is_off(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger=ACCESS_LOGGER)

    def not_called(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise AssertionError("the record was built although the logger is off")

    monkeypatch.setattr("cachegw._accesslog.access_record", not_called)
    log_access(scope(), status=200, bytes_sent=0, duration=0)
    assert not [r for r in caplog.records if r.name == ACCESS_LOGGER]


def test_enable_access_log_writes_bare_json_lines() -> None:
    logger = logging.getLogger(ACCESS_LOGGER)
    stream = io.StringIO()
    handler = enable_access_log(stream)
    try:
        log_access(scope(), status=304, bytes_sent=0, duration=0.001, cache_status="HIT")
        log_access(scope(method="HEAD"), status=200, bytes_sent=0, duration=0.001)
        handler.flush()
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["method"] for line in lines] == ["GET", "HEAD"]
    assert json.loads(lines[0])["cache_status"] == "HIT"


_text = st.text(st.characters(codec="latin-1"), max_size=60)


@settings(database=None)  # no .hypothesis directory in the checkout
@given(
    path=_text,
    query=_text,
    user_agent=_text,
    method=st.sampled_from(["GET", "HEAD", "POST"]),
    status=st.integers(100, 599),
    duration=st.floats(0, 100, allow_nan=False),
    upstream=st.none() | st.floats(0, 100, allow_nan=False),
    key=st.none() | st.text("0123456789abcdef:", max_size=70),
    route=_text,
)
def test_formatted_line_is_the_json_of_the_record(
    path: str,
    query: str,
    user_agent: str,
    method: str,
    status: int,
    duration: float,
    upstream: float | None,
    key: str | None,
    route: str,
) -> None:
    # The hot path formats the line itself; it must say exactly what the record says.
    fields: dict[str, Any] = {
        "status": status,
        "bytes_sent": 7,
        "duration": duration,
        "service": "svc",
        "route": route,
        "cache_status": "HIT",
        "upstream": upstream,
        "key": key,
    }
    request = scope(
        raw_path=path.encode("latin-1"),
        query_string=query.encode("latin-1"),
        headers=[(b"user-agent", user_agent.encode("latin-1"))],
        method=method,
    )
    line = access_line(request, **fields)
    assert "\n" not in line and "\r" not in line
    parsed = json.loads(line)
    record = access_record(request, **fields)
    assert list(parsed) == list(record)
    assert {**parsed, "time": None} == {**record, "time": None}


def test_a_fast_path_hit_line_is_the_ordinary_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    request = scope(headers=[(b"user-agent", b'ua"\n')])
    fields: dict[str, Any] = {
        "status": 200,
        "bytes_sent": 3,
        "service": "catalog",
        "route": "/items/{item_id}",
        "key": KEY,
    }
    expected = json.loads(access_line(request, duration=0.0, cache_status="HIT", **fields))
    tail = hit_tail(
        "GET", request["raw_path"], request["query_string"], b'ua"\n', request["client"], **fields
    )
    assert tail.endswith(b"}\n") and b"\n" not in tail[:-1]  # one line, whatever the request
    sink = access_sink()  # the logger's records (pytest's handler, not a buffered one)
    assert sink is not None
    for _ in range(2):  # the tail is kept and reused by the fast path
        sink.write_tail(tail, 1_700_000_000.5)
        line = json.loads(caplog.records[-1].getMessage())
        assert {**line, "time": None} == {**expected, "time": None}
        assert line["time"] == "2023-11-14T22:13:20.500Z"
    other = scope(raw_path=b"/catalog/items/43")
    sink.write_tail(hit_tail("GET", other["raw_path"], b"", b"", None, **fields), 0.0)
    assert json.loads(caplog.records[-1].getMessage())["path"] == "/catalog/items/43"


def test_buffered_lines_are_written_by_the_timer_and_on_flush() -> None:
    stream = io.StringIO()
    handler = BufferedAccessHandler(stream, flush_interval=0.05)
    try:
        handler.write("one")
        assert stream.getvalue() == ""  # buffered, not written by the request
        deadline = time.monotonic() + 10
        while stream.getvalue() != "one\n" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stream.getvalue() == "one\n"  # the timer wrote it
    finally:
        handler.close()
    quiet = BufferedAccessHandler(io.StringIO(), flush_interval=3600)
    quiet.write("two")
    quiet.write("three")
    quiet.close()  # logging.shutdown closes handlers at exit
    assert quiet.stream.getvalue() == "two\nthree\n"  # type: ignore[attr-defined]


def a_tail(query: bytes = b"") -> bytes:
    """A fast-path hit's line after its time, for GET /a from 10.0.0.1 with User-Agent ua."""
    return hit_tail(
        "GET",
        b"/a",
        query,
        b"ua",
        ("10.0.0.1", 1),
        status=200,
        bytes_sent=3,
        service="s",
        route="/a",
        key=KEY,
    )


def test_lines_by_tail_follow_the_logger_configuration() -> None:
    # The hot path keeps the buffered handler it found (`access_sink`) and checks it again
    # at most a millisecond later: removing the handler or turning the logger off stops
    # its lines from then on.
    logger = logging.getLogger(ACCESS_LOGGER)
    saved = (logger.level, logger.propagate, logger.disabled)
    stream = io.StringIO()
    handler = enable_access_log(stream)
    tail = a_tail(b"q=1")
    try:
        sink = access_sink()
        assert sink is handler
        sink.write_tail(tail, 1_700_000_000.25)
        handler.flush()
        line = json.loads(stream.getvalue())
        assert line["time"] == "2023-11-14T22:13:20.250Z"
        assert (line["path"], line["query"], line["user_agent"]) == ("/a", "q=1", "ua")
        logger.disabled = True  # off
        handler.write_tail(tail, 1_700_000_000.252)  # another millisecond: looked up again
        assert access_sink() is None
        logger.disabled = False
        assert access_sink() is handler
        logger.removeHandler(handler)
        handler.write_tail(tail, 1_700_000_000.254)
        assert access_sink() is not handler
        handler.flush()
        assert stream.getvalue().count("\n") == 1  # only the line written while attached
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(saved[0])
        logger.propagate, logger.disabled = saved[1], saved[2]
    assert access_sink() is not handler  # closed: forgotten


@pytest.mark.parametrize("kind", ["file", "pipe"])
def test_a_batch_is_one_write_to_a_file_and_whole_lines_to_a_pipe(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Like nginx's buffer: one write per batch to a file. On a pipe, writes of at most
    # PIPE_BUF (4096) bytes of whole lines: atomic, so another writer (stderr on the same
    # pipe, another worker) never cuts a line.
    writes: list[bytes] = []
    real_write = os.write

    def record(fd: int, data: Any) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", record)
    if kind == "file":
        stream = (tmp_path / "access.log").open("w")
        read_back = lambda: (tmp_path / "access.log").read_text()  # noqa: E731
    else:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        stream = os.fdopen(write_fd, "w")
        read_back = lambda: os.read(read_fd, 1 << 20).decode()  # noqa: E731
    lines = [f'{{"n":{i},"pad":"{"x" * (i % 300)}"}}' for i in range(200)]
    handler = BufferedAccessHandler(stream, flush_interval=3600, buffer_bytes=1 << 20)
    try:
        for line in lines:
            handler.write(line)
        handler.flush()
        assert read_back().splitlines() == lines
    finally:
        handler.close()
        stream.close()
    if kind == "file":
        assert len(writes) == 1
    else:
        assert len(writes) > 1
        assert all(len(data) <= 4096 and data.endswith(b"\n") for data in writes)


def test_hit_lines_are_counted_and_stamped_once_per_millisecond() -> None:
    # A fast-path hit's line costs a list step: its time is formatted, and the buffer's
    # size checked, by the first line of each millisecond.
    stream = io.StringIO()
    handler = BufferedAccessHandler(stream, flush_interval=3600, buffer_bytes=1000)
    tail = a_tail()
    base = 1_700_000_000.0
    try:
        for _ in range(20):  # one millisecond: ~4 KiB queued, not written yet
            handler.write_tail(tail, base + 0.0071)
        assert stream.getvalue() == ""
        handler.write_tail(tail, base + 0.0085)  # the next millisecond writes the buffer
        written = stream.getvalue().splitlines()
        assert len(written) == 20
        assert {json.loads(line)["time"] for line in written} == {"2023-11-14T22:13:20.007Z"}
        handler.write_tail(tail, base + 0.0089)
        handler.write_tail(tail, base + 0.0064)  # the clock went back: stamped as it says
    finally:
        handler.close()
    times = [json.loads(line)["time"][-7:] for line in stream.getvalue().splitlines()[20:]]
    assert times == ["20.008Z", "20.008Z", "20.006Z"]


def test_a_full_buffer_is_written_at_once() -> None:
    stream = io.StringIO()
    handler = BufferedAccessHandler(stream, flush_interval=3600, buffer_bytes=100)
    try:
        for i in range(9):
            handler.write(f"{i:09d}")  # 10 bytes with its newline
        assert stream.getvalue() == ""
        handler.write("000000009")  # 100 bytes: memory stays bounded
        assert stream.getvalue().splitlines() == [f"{i:09d}" for i in range(10)]
    finally:
        handler.close()


_UNDER_UVICORN_CONFIG = textwrap.dedent(
    """
    import logging.config, sys
    from cachegw._accesslog import log_access, log_config

    logging.config.dictConfig(log_config(sys.argv[1] == "on"))
    scope = {"method": "GET", "path": "/x", "headers": [(b"cookie", b"c00kie")]}
    log_access(scope, status=200, bytes_sent=3, duration=0.001, cache_status="HIT")
    """
)


@pytest.mark.parametrize("switch", ["on", "off"])
def test_log_config_turns_the_access_log_on_and_off(switch: str) -> None:
    # In a subprocess: dictConfig reconfigures the process's loggers.
    done = subprocess.run(
        [sys.executable, "-c", _UNDER_UVICORN_CONFIG, switch],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert done.stderr == ""
    if switch == "off":
        assert done.stdout == ""
        return
    [line] = done.stdout.splitlines()
    assert json.loads(line)["cache_status"] == "HIT"
    assert "c00kie" not in line
    assert log_config(True)["loggers"]["uvicorn.access"]  # uvicorn's own config is kept
