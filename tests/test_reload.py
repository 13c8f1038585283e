"""Reloading the gateway file of a running gateway: SIGHUP, POST /_cachegw/reload and
`cachegw reload`, through real processes on both backends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachegw import Gateway, Service
from cachegw._limits import ServerLimits
from cachegw._reload import restart_needed, route_scope, stale_scopes
from tests.gateway_process import GatewayProcess
from tests.redis_process import EVENTUALLY
from tests.reload_load import Load
from tests.servers import StubUpstream, run_uvicorn

TOKEN = "reload-test-token"

FILE = """
[cache]
backend = "{backend}"
op_timeout = "5s"  # a loaded machine must not turn HITs into misses
prefix = "{prefix}"

[admin]
token_env = "CACHEGW_TEST_RELOAD_TOKEN"

[[services]]
name = "catalog"
upstream = "{upstream}"
prefix = "/catalog"

  [[services.routes]]
  path = "/items/{{n}}"
  ttl = 60

  [[services.routes]]
  path = "/changing/{{n}}"
  ttl = {changing_ttl}
{extra}"""

EXTRA_ROUTE = """
  [[services.routes]]
  path = "/extra/{{n}}"
  ttl = 5
"""


def write(path: Path, upstream: str, backend: str, variant: str, prefix: str = "rl") -> Path:
    """Variant ``a`` and ``b`` are valid and differ in the second route's ttl and in a
    third route; ``bad`` fails validation."""
    extra = {"a": "", "b": EXTRA_ROUTE, "bad": EXTRA_ROUTE.replace("ttl = 5", "ttl = -5")}[variant]
    path.write_text(
        FILE.format(
            backend=backend,
            prefix=prefix,
            upstream=upstream,
            changing_ttl={"a": 30, "b": 20, "bad": 20}[variant],
            extra=extra.replace("{{", "{").replace("}}", "}"),
        )
    )
    return path


def post_reload(base: str) -> httpx.Response:
    return httpx.post(
        f"{base}/_cachegw/reload", headers={"authorization": f"Bearer {TOKEN}"}, timeout=30
    )


def generations(base: str) -> list[float]:
    """Every worker's ``cachegw_config_generation`` from the metrics endpoint."""
    text = httpx.get(f"{base}/_cachegw/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "cachegw_config_generation":
            return sorted(sample.value for sample in family.samples)
    raise AssertionError("no cachegw_config_generation in the metrics")


# --- the rule for entries (pure) -------------------------------------------------------


def catalog(
    upstream: str = "http://127.0.0.1:1",
    prefix: str = "/c",
    hosts: list[str] | None = None,
    **ttls: int,
) -> Service:
    service = Service("catalog", upstream, prefix=prefix, hosts=hosts)
    for path, ttl in (ttls or {"a": 10, "b": 10, "rest": 0}).items():
        service.route("/{x:path}" if path == "rest" else f"/{path}", ttl=ttl)
    return service


def test_unchanged_routes_keep_their_entries() -> None:
    assert stale_scopes(Gateway(services=[catalog()]), Gateway(services=[catalog()])) == []


def test_changed_and_following_routes_are_soft_purged() -> None:
    old = Gateway(services=[catalog(a=10, b=10, rest=0)])
    # b's policy changed: b, and the catch-all after it (it may now answer other paths).
    new = Gateway(services=[catalog(a=10, b=20, rest=0)])
    assert stale_scopes(old, new) == [
        route_scope("catalog", "/b"),
        route_scope("catalog", "/{x:path}"),
    ]
    # A route inserted before the catch-all takes paths the catch-all's entries answered.
    inserted = Gateway(services=[catalog(a=10, b=10, c=10, rest=0)])
    assert stale_scopes(old, inserted) == [route_scope("catalog", "/{x:path}")]
    # Appended last: nothing before it changed.
    appended = Gateway(services=[catalog(a=10, b=10)])
    assert stale_scopes(Gateway(services=[catalog(a=10)]), appended) == []


def test_removed_services_routes_and_moved_upstreams() -> None:
    old = Gateway(services=[catalog()])
    assert stale_scopes(old, Gateway(services=[])) == [
        route_scope("catalog", p) for p in ("/a", "/b", "/{x:path}")
    ]
    moved = Gateway(services=[catalog(upstream="http://127.0.0.1:2")])
    assert stale_scopes(old, moved) == ["svc:catalog"]
    assert stale_scopes(old, Gateway(services=[catalog(prefix="/d")])) == ["svc:catalog"]
    hosted = Gateway(services=[catalog(hosts=["api.example.com"])])
    assert stale_scopes(old, hosted) == ["svc:catalog"]


def test_cache_table_needs_a_restart() -> None:
    old = Gateway(services=[catalog()])
    assert restart_needed(old, Gateway(services=[catalog()])) is None
    reason = restart_needed(old, Gateway(services=[catalog()], backend="redis://127.0.0.1:1/0"))
    assert reason is not None
    assert "cache.backend changed from 'memory' to 'redis://127.0.0.1:1/0'" in reason
    assert "restart the gateway" in reason
    for changed in ({"compress": False}, {"compress_min": "2KiB"}):
        reason = restart_needed(old, Gateway(services=[catalog()], **changed))  # type: ignore[arg-type]
        assert reason is not None and f"cache.{next(iter(changed))} changed" in reason
    limits = Gateway(services=[catalog()], server=ServerLimits(header_timeout=1))
    reason = restart_needed(old, limits)
    assert reason is not None and "the [server] table changed" in reason
    assert "restart the gateway" in reason


# --- real processes under load -----------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory"
    url: str = request.getfixturevalue("redis_url")
    return url


def counted(load: Load, group: str | None, n: int, *, timeout: float) -> None:
    """Wait (bounded) until the current phase of ``load`` has ``n`` answers of ``group``
    (None: of any)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(RuntimeError):  # the load's thread is counting meanwhile
            if load.phases[-1].count(group) >= n:
                return
        time.sleep(0.05)


def test_reloads_under_load_drop_nothing_and_keep_hits(tmp_path: Path, backend: str) -> None:
    stub = StubUpstream()
    a, b, bad = (tmp_path / f"{v}.toml" for v in ("a", "b", "bad"))
    items = [f"/catalog/items/{n}" for n in range(10)]
    changing = [f"/catalog/changing/{n}" for n in range(5)]
    with run_uvicorn(stub) as upstream:
        for variant, path in (("a", a), ("b", b), ("bad", bad)):
            write(path, upstream, backend, variant)
        live = tmp_path / "gateway.toml"
        live.write_bytes(a.read_bytes())
        # No access log: nobody reads the pipe while the load runs, and a full pipe blocks.
        gw = GatewayProcess(
            live, extra_env={"CACHEGW_TEST_RELOAD_TOKEN": TOKEN}, args=["--no-access-log"]
        )
        gw.start(timeout=60)  # a loaded machine starts workers slowly
        try:
            for path in items:  # warm: the unchanged route is all hits from here on
                httpx.get(gw.base + path)
            results = []
            with Load(gw.port, items + changing, connections=50) as load:
                time.sleep(0.5)
                for index, source in enumerate((b, bad, a, bad, b, a)):
                    live.write_bytes(source.read_bytes())
                    load.mark(f"reload {index + 1}")
                    results.append(post_reload(gw.base))
                    # Each phase lasts 0.3 s (a soft purge's effect shows within it) and
                    # until it has enough answers to judge: a loaded machine serves fewer
                    # per second, and the assertions below are per phase.
                    time.sleep(0.3)
                    counted(load, "items", 60, timeout=20)
            health = httpx.get(f"{gw.base}/_cachegw/health").json()
            gens = generations(gw.base)
        finally:
            log = gw.stop()

    statuses = [r.status_code for r in results]
    assert statuses == [200, 422, 200, 422, 200, 200], [r.text for r in results]
    assert [r.json()["generation"] for r in results] == [2, 2, 3, 3, 4, 5]
    assert "services[0].routes[2].ttl" in results[1].json()["detail"]
    assert "stays in use" in results[1].json()["detail"]
    assert results[0].json()["soft_purged"] == [route_scope("catalog", "/changing/{n}")]
    assert results[2].json()["soft_purged"] == [
        route_scope("catalog", "/changing/{n}"),
        route_scope("catalog", "/extra/{n}"),
    ]
    assert health["config"]["generation"] == 5 and gens == [5.0]
    assert "reload of" in log and "rejected" in log

    failures = [f for phase in load.phases for f in phase.failures]
    assert failures == [], failures[:10]
    for phase in load.phases[1:]:
        assert phase.count("items") > 50, phase
        assert phase.hit_ratio("items") > 0.95, (phase.label, phase.answers)
    # The changed route was soft-purged: fetched again after a reload that changed it.
    assert stub.hits["/changing/0"] >= 4


def test_sighup_reloads_every_worker_and_post_fans_out(tmp_path: Path) -> None:
    stub = StubUpstream()
    with run_uvicorn(stub) as upstream:
        live = write(tmp_path / "gateway.toml", upstream, "memory", "a")
        gw = GatewayProcess(
            live, extra_env={"CACHEGW_TEST_RELOAD_TOKEN": TOKEN}, args=["--workers", "2"]
        )
        gw.start(timeout=60)  # a loaded machine starts workers slowly
        try:
            assert _eventually(lambda: generations(gw.base) == [1.0, 1.0])
            write(live, upstream, "memory", "b")
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGHUP)
            assert _eventually(lambda: generations(gw.base) == [2.0, 2.0])
            write(live, upstream, "memory", "a")
            answer = post_reload(gw.base)
            assert answer.status_code == 200, answer.text
            assert answer.json()["workers"] == "all"
            assert _eventually(lambda: generations(gw.base) == [3.0, 3.0])
            alive = gw.proc.poll() is None
        finally:
            log = gw.stop()
    assert alive, log
    assert "restarting processes" not in log  # uvicorn's own SIGHUP would replace workers
    assert log.count("cachegw: reloaded ") >= 4  # two workers, twice; on stderr, as INFO


def test_in_flight_requests_finish_under_their_configuration(tmp_path: Path) -> None:
    first, second = StubUpstream(), StubUpstream()
    first.route("/changing/slow", body=b"first", delay=1.0)
    second.route("/changing/slow", body=b"second")
    with run_uvicorn(first) as one, run_uvicorn(second) as two:
        live = write(tmp_path / "gateway.toml", one, "memory", "a")
        gw = GatewayProcess(live, extra_env={"CACHEGW_TEST_RELOAD_TOKEN": TOKEN})
        gw.start(timeout=60)  # a loaded machine starts workers slowly
        try:
            slow: list[httpx.Response] = []
            thread = threading.Thread(
                target=lambda: slow.append(httpx.get(f"{gw.base}/catalog/changing/slow"))
            )
            thread.start()
            time.sleep(0.3)  # the request is waiting for the first upstream
            write(live, two, "memory", "a")
            reloaded = post_reload(gw.base)
            thread.join(10)
            after = httpx.get(f"{gw.base}/catalog/changing/slow")
        finally:
            gw.stop()
    assert reloaded.json()["soft_purged"] == ["svc:catalog"]
    assert slow[0].status_code == 200 and slow[0].content == b"first"
    # The answer fetched from the old upstream is not served as fresh once the service moved.
    assert after.content == b"second"


def test_cli_reload_reports_and_refuses(tmp_path: Path) -> None:
    stub = StubUpstream()
    env = {**os.environ, "CACHEGW_TEST_RELOAD_TOKEN": TOKEN}
    with run_uvicorn(stub) as upstream:
        live = write(tmp_path / "gateway.toml", upstream, "memory", "a")
        # A [server] value from the command line holds for the reloaded file too.
        gw = GatewayProcess(live, extra_env=env, args=["--header-timeout", "5"])
        gw.start(timeout=60)  # a loaded machine starts workers slowly
        try:
            write(live, upstream, "memory", "b")
            ok = _cli("reload", str(live), "--url", gw.base, env=env)
            changed_backend = live.read_text().replace('"memory"', '"redis://127.0.0.1:1/0"')
            live.write_text(changed_backend)
            refused = _cli("reload", str(live), "--url", gw.base, env=env)
            health = httpx.get(f"{gw.base}/_cachegw/health").json()
        finally:
            gw.stop()
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("reloaded: generation 2 (")
    assert "soft-purged route:catalog:/changing/{n}" in ok.stdout
    assert refused.returncode == 1
    assert "cache.backend changed from 'memory' to 'redis://127.0.0.1:1/0'" in refused.stderr
    assert "restart the gateway" in refused.stderr
    assert health["config"]["generation"] == 2


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cachegw", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def _eventually(check: object, seconds: float = EVENTUALLY) -> bool:
    assert callable(check)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return bool(check())
