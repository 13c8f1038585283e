"""`cachegw top`: the figures from a recorded sequence of scrapes, exactly, and the
command end to end against a real gateway process."""

# ruff: noqa: E501 - the expected frame is 132 columns wide, as the terminal shows it

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from cachegw._metrics import Metrics
from cachegw._top import as_text
from cachegw._top_view import Scrape, compute, histogram_quantile
from tests.gateway_process import GatewayProcess
from tests.servers import Receive, Scope, Send, StubUpstream, run_uvicorn
from tests.test_reload import generations


def recorded() -> tuple[Scrape, Scrape]:
    """Two scrapes 2 s apart, written by the gateway's own `Metrics`."""
    metrics = Metrics(
        memory_stats=lambda: {
            "entries": 120,
            "bytes": 3 << 20,
            "max_entries": 10_000,
            "max_bytes": 64 << 20,
            "evictions": 0,
        }
    )
    metrics.watch_l1(
        lambda: {"entries": 40, "bytes": 40 << 10, "max_entries": 4096, "max_bytes": 32 << 20}
    )
    metrics.config(3)
    for _ in range(100):  # before the window: must not count
        metrics.request("catalog", "/items/{id}", "HIT", 0.0002)
    metrics.upstream("catalog", 0.5, "timeout")
    before = Scrape.parse(metrics.render()[0].decode(), at=10.0)

    for _ in range(8):
        metrics.request("catalog", "/items/{id}", "HIT", 0.0002)
    metrics.request("catalog", "/items/{id}", "STALE", 0.0004)
    metrics.request("catalog", "/items/{id}", "MISS", 0.02)
    for _ in range(4):
        metrics.request("users", "/profile", "BYPASS", 0.1)
    metrics.request("", "", "ERROR", 0.0001)  # refused before routing: in no row
    metrics.upstream("catalog", 10.0, "timeout")
    metrics.upstream("catalog", 0.01, "timeout")
    metrics.upstream("users", 0.1, "status_5xx")
    for _ in range(3):
        metrics.coalesced("catalog")
    metrics.circuit(True)
    now = Scrape.parse(metrics.render()[0].decode(), at=12.0)
    return before, now


EXPECTED = """\
cachegw top  http://gw:8000  every 2.0 s  sorted by req/s
config generation 3  circuit OPEN (cache skipped)
memory 120/10000 entries, 3.0 MiB/64.0 MiB  L1 40/4096 entries, 40.0 KiB/32.0 MiB

SERVICE / ROUTE  REQ/S  HIT%  STALE%  MISS%  BYPASS%  P50 ms  P99 ms  UPS ERR/s  TIMEOUT/s  COALESCED/s
catalog            5.0  80.0    10.0   10.0      0.0    0.19    23.5        1.0        1.0          1.5
  /items/{id}      5.0  80.0    10.0   10.0      0.0    0.19    23.5
users              2.0   0.0     0.0    0.0    100.0    75.0    99.5        0.5        0.0          0.0
  /profile         2.0   0.0     0.0    0.0    100.0    75.0    99.5
"""


def test_a_recorded_sequence_renders_exact_figures() -> None:
    before, now = recorded()
    assert as_text(compute(before, now, "http://gw:8000")) == EXPECTED


def test_sorting() -> None:
    before, now = recorded()
    by_rps = [t.service for t, _ in compute(before, now, sort="rps").services]
    by_p99 = [t.service for t, _ in compute(before, now, sort="p99").services]
    by_hit = [t.service for t, _ in compute(before, now, sort="hit").services]
    by_name = [t.service for t, _ in compute(before, now, sort="name").services]
    assert by_rps == ["catalog", "users"]
    assert by_p99 == ["users", "catalog"]
    assert by_hit == ["catalog", "users"]
    assert by_name == ["catalog", "users"]
    assert "sorted by p99" in as_text(compute(before, now, sort="p99"))


def test_workers_are_merged_and_a_reload_in_progress_shows() -> None:
    def text(hits: int, generations: tuple[int, int]) -> str:
        lines = [
            "# TYPE cachegw_requests_total counter",
            f'cachegw_requests_total{{service="s",route="/r",cache_status="HIT"}} {hits}',
            "# TYPE cachegw_config_generation gauge",
        ]
        lines += [
            f'cachegw_config_generation{{pid="{pid}"}} {gen}'
            for pid, gen in zip((101, 102), generations, strict=True)
        ]
        return "\n".join(lines) + "\n"

    before = Scrape.parse(text(10, (2, 2)), 0.0)
    now = Scrape.parse(text(30, (2, 3)), 1.0)
    view = compute(before, now)
    assert view.services[0][0].rps == 20.0
    assert "config generation 2..3, 2 workers (workers differ: a reload is on its way)" in as_text(
        view
    )
    # A counter that went down was reset (a restarted gateway): its value is the delta.
    assert compute(now, Scrape.parse(text(5, (1, 1)), 2.0)).services[0][0].rps == 5.0


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.1: 0.0, 0.2: 10.0, float("inf"): 10.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None
    assert histogram_quantile(0.99, {0.1: 1.0, float("inf"): 4.0}) == 0.1  # +Inf: highest bound


def test_top_once_against_a_real_gateway(tmp_path: Path) -> None:
    stub = StubUpstream()
    stub.route("/items/1", body=b"one")
    with run_uvicorn(stub) as upstream:
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'[cache]\nbackend = "memory"\n\n[[services]]\nname = "catalog"\n'
            f'upstream = "{upstream}"\nprefix = "/catalog"\nttl = 60\n\n'
            f'  [[services.routes]]\n  path = "/items/{{n}}"\n'
        )
        gw = GatewayProcess(config, args=["--no-access-log", "--workers", "2"])
        gw.start(timeout=60)  # a loaded machine starts workers slowly
        try:
            # Both workers up (the first to be healthy does not wait for the second).
            deadline = time.monotonic() + 30
            while len(generations(gw.base)) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            for _ in range(6):  # the MISS of each worker, before the window
                httpx.get(f"{gw.base}/catalog/items/1")
            done = threading.Event()

            def traffic() -> None:
                with httpx.Client() as client:
                    while not done.is_set():
                        client.get(f"{gw.base}/catalog/items/1")
                        time.sleep(0.005)

            thread = threading.Thread(target=traffic)
            thread.start()
            try:
                shown = subprocess.run(
                    [sys.executable, "-m", "cachegw", "top", gw.base, "--once", "--interval", "2"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
            finally:
                done.set()
                thread.join(10)
        finally:
            gw.stop()
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[1] == "config generation 1, 2 workers  circuit closed"
    assert lines[2].startswith("memory ") and " L1 " in lines[2]
    route = next(line for line in lines if line.startswith("  /items/{n}"))
    cells = route.split()
    rate = float(cells[1])  # req/s over the 2 s window: however few a loaded machine made
    assert rate > 0
    # Hits, but for at most one MISS per worker (one that got none of the warm-up requests
    # misses once in the window); HIT + MISS is every request.
    requests = rate * 2
    assert float(cells[2]) >= 100 * (requests - 2) / requests - 0.15, (cells, requests)
    assert float(cells[2]) + float(cells[4]) == pytest.approx(100.0, abs=0.15)
    assert cells[3] == cells[5] == "0.0"  # no STALE, no BYPASS
    assert float(cells[6]) < float(cells[7]) or cells[6] == cells[7]  # p50 <= p99


def test_top_reports_an_unreachable_gateway() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "cachegw", "top", "http://127.0.0.1:9", "--once"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shown.returncode == 1
    assert shown.stderr.startswith("error: cannot reach the gateway at http://127.0.0.1:9/")


class HostileMetrics:
    """A metrics endpoint (a proxy in front of a gateway, or a gateway whose routes were
    named by an attacker) with terminal escape sequences and rich markup in label values;
    it records the Authorization headers it gets, and asks for a token when told to."""

    def __init__(self, *, ask_token: str | None = None) -> None:
        self.ask_token = ask_token
        self.authorizations: list[str | None] = []
        self.metrics = Metrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.authorizations.append(headers.get("authorization"))
        if (
            self.ask_token is not None
            and headers.get("authorization") != f"Bearer {self.ask_token}"
        ):
            out = [(b"www-authenticate", b'Bearer realm="edge"'), (b"content-length", b"0")]
            await send({"type": "http.response.start", "status": 401, "headers": out})
            await send({"type": "http.response.body", "body": b""})
            return
        for _ in range(3):
            self.metrics.request("svc\x1b]0;pwned\x07", "/r\x1b[2J[bold red]x\x9b5m", "HIT", 0.001)
        body = self.metrics.render()[0]
        out = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": out})
        await send({"type": "http.response.body", "body": body})


def _top(base: str, token: str | None = "s3cret-token") -> subprocess.CompletedProcess[str]:
    """``cachegw top BASE --once`` with the admin token's variable set to ``token``."""
    env = {k: v for k, v in os.environ.items() if k != "CACHEGW_ADMIN_TOKEN"}
    if token is not None:
        env["CACHEGW_ADMIN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "cachegw", "top", base, "--once", "--interval", "0.2"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_top_prints_no_control_characters_and_keeps_the_token_unless_asked() -> None:
    hostile = HostileMetrics()
    with run_uvicorn(hostile) as base:
        shown = _top(base)
    assert shown.returncode == 0, shown.stderr
    printed = shown.stdout + shown.stderr
    assert not any((ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F for c in printed)
    assert "svc\\x1b]0;pwned\\x07" in printed  # shown, made harmless
    assert "/r\\x1b[2J[bold red]x\\x9b5m" in printed  # markup shown as written
    assert hostile.authorizations == [None, None]  # the token was not asked for


def test_top_sends_the_token_where_a_401_asks_for_it() -> None:
    hostile = HostileMetrics(ask_token="s3cret-token")
    with run_uvicorn(hostile) as base:
        shown = _top(base)
        refused = _top(base, token=None)
    assert shown.returncode == 0, shown.stderr
    assert hostile.authorizations[:2] == [None, "Bearer s3cret-token"]
    assert refused.returncode == 1 and "answered 401" in refused.stderr
    # A URL with an escape sequence: a clear error, printed harmless, not a traceback.
    bad = _top("http://127.0.0.1:9/\x1b[31m")
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: cannot reach the gateway at http://127.0.0.1:9/\\x1b[31m")
    assert "\x1b" not in bad.stderr


def test_once_right_after_traffic_shows_the_figures_since_the_start() -> None:
    """`--once` run after the traffic ended: its window has no requests, so it shows the
    gateway's figures since it started (noted as such), not a frame of zeros."""
    from cachegw import Gateway, MemoryBackend, Service, create_app
    from cachegw._server import uvicorn_options
    from cachegw._top import once

    stub = StubUpstream()
    stub.route("/items/1", body=b"one")
    with run_uvicorn(stub) as upstream:
        service = Service("catalog", upstream, prefix="/catalog", ttl=60).route("/items/{n}")
        app = create_app(Gateway(services=[service], backend=MemoryBackend()))
        with run_uvicorn(app, **uvicorn_options(lifespan="on")) as base:
            statuses = [
                httpx.get(f"{base}/catalog/items/1").headers["x-cache-status"] for _ in range(4)
            ]
            shown = once(base, None, 0.2, "rps", 132)
    assert statuses == ["MISS", "HIT", "HIT", "HIT"]
    lines = shown.splitlines()
    assert any(
        line.startswith("no requests in the last 0.2 s: figures since the gateway started ")
        for line in lines
    ), shown
    cells = next(line for line in lines if line.startswith("  /items/{n}")).split()
    assert float(cells[1]) > 0  # req/s averaged since the start
    assert (cells[2], cells[4]) == ("75.0", "25.0")  # HIT%, MISS%


def test_since_start_needs_the_start_time_and_some_requests() -> None:
    from cachegw._top import since_start

    requests = {
        (
            "cachegw_requests_total",
            (("cache_status", "HIT"), ("route", "/a"), ("service", "s")),
        ): 9.0,
        (
            "cachegw_requests_total",
            (("cache_status", "MISS"), ("route", "/a"), ("service", "s")),
        ): 1.0,
    }
    assert since_start(Scrape(50.0, requests), "u", "rps", 1.0) is None  # no start time
    started = {("cachegw_start_time_seconds", ()): time.time() - 100}
    assert since_start(Scrape(50.0, started), "u", "rps", 1.0) is None  # no requests
    view = since_start(Scrape(50.0, {**started, **requests}), "u", "rps", 1.0)
    assert view is not None and view.note is not None
    assert view.note.startswith("no requests in the last 1 s: figures since the gateway started")
    [(_total, [route])] = view.services
    assert route.requests == 10 and route.share("HIT") == pytest.approx(0.9)
    assert route.rps == pytest.approx(0.1, rel=0.05)
