"""Several workers on one machine without Redis (issue 23): `cachegw serve --workers N`
on the memory backend keeps a cache per worker, and the workers keep them coherent
(cachegw/_relay.py): a write's invalidation and a purge (admin API, `cachegw purge`) reach
every worker before they are answered, and what one worker fetches lands in every
worker's cache (one upstream request per key for the machine).

Which worker answers a connection is the kernel's choice. A test learns which one it
talks to from the health endpoint's ``pid`` on the same keep-alive connection, and opens
new connections until it has talked to every worker.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.gateway_process import gateway_processes
from tests.items_upstream import VersionedItems
from tests.servers import run_uvicorn

TOKEN = "workers-token"
TOML = """
[cache]
backend = "memory"

[admin]
token_env = "TEST_WORKERS_TOKEN"

[[services]]
name = "api"
upstream = "{upstream}"
prefix = "/api"
ttl = 60

  [[services.routes]]
  path = "/items/{{item_id}}"
  tags = ["item:{{item_id}}"]
"""
PATH = "/api/items/1"


def answered_by(base: str, path: str = PATH) -> tuple[int, httpx.Response]:
    """A GET on a connection of its own, and the pid of the worker that answered it."""
    with httpx.Client(timeout=30) as client:
        pid = client.get(base + "/_cachegw/health").json()["pid"]
        return pid, client.get(base + path)  # the same connection: the same worker


def from_every_worker(base: str, workers: int, path: str = PATH) -> dict[int, httpx.Response]:
    """A GET answered by each worker (new connections until every worker has answered)."""
    seen: dict[int, httpx.Response] = {}
    for _ in range(400):
        pid, response = answered_by(base, path)
        assert response.status_code == 200, response.text
        seen.setdefault(pid, response)
        if len(seen) == workers:
            return seen
    raise AssertionError(f"the kernel gave only workers {sorted(seen)} a connection")


def health_of_every_worker(base: str, workers: int) -> dict[int, dict[str, object]]:
    seen: dict[int, dict[str, object]] = {}
    for _ in range(400):
        with httpx.Client(timeout=30) as client:
            body = client.get(base + "/_cachegw/health", headers={"connection": "close"}).json()
        seen.setdefault(body["pid"], body)
        if len(seen) == workers:
            return seen
    raise AssertionError(f"the kernel gave only workers {sorted(seen)} a connection")


Gateway = Callable[..., tuple[str, VersionedItems, Path, str]]


@pytest.fixture
def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Starts `cachegw serve --workers N` before a versioned upstream; yields the
    gateway's base URL, the upstream, the file and the upstream's URL."""
    monkeypatch.setenv("TEST_WORKERS_TOKEN", TOKEN)
    with contextlib.ExitStack() as stack:

        def start(workers: int, latency: float = 0.0) -> tuple[str, VersionedItems, Path, str]:
            upstream = VersionedItems(latency)
            origin = stack.enter_context(run_uvicorn(upstream))
            config = tmp_path / "gateway.toml"
            config.write_text(TOML.format(upstream=origin))
            [gw] = stack.enter_context(
                gateway_processes(config, args=["--workers", str(workers), "--no-access-log"])
            )
            # Every worker is up (its sockets bound): the first to answer may be alone.
            health_of_every_worker(gw.base, workers)
            return gw.base, upstream, config, origin

        yield start


def test_what_one_worker_fetched_every_worker_serves(gateway: Gateway) -> None:
    base, upstream, _, _ = gateway(2)
    assert answered_by(base)[1].headers["x-cache-status"] == "MISS"
    seen = from_every_worker(base, 2)
    assert {r.headers["x-cache-status"] for r in seen.values()} == {"HIT"}
    assert upstream.gets == 1


def test_a_write_through_one_worker_is_seen_by_every_worker_at_once(gateway: Gateway) -> None:
    base, _, _, _ = gateway(2)
    from_every_worker(base, 2)  # every worker holds version 0
    with httpx.Client(timeout=10) as client:
        put = client.put(base + PATH)
    assert put.headers["x-version"] == "1"
    seen = from_every_worker(base, 2)
    assert {r.headers["x-version"] for r in seen.values()} == {"1"}, [
        (r.headers["x-version"], r.headers["x-cache-status"]) for r in seen.values()
    ]


@pytest.mark.parametrize("how", ["api", "cli"])
def test_a_purge_through_one_worker_reaches_every_worker(gateway: Gateway, how: str) -> None:
    base, _, config, origin = gateway(2)
    seen = from_every_worker(base, 2)
    assert {r.headers["x-version"] for r in seen.values()} == {"0"}
    # A new version the gateway does not know of: only a purge makes it fetch again.
    assert httpx.put(origin + "/items/1", timeout=10).headers["x-version"] == "1"
    if how == "api":
        answer = httpx.post(
            f"{base}/_cachegw/purge",
            json={"tags": ["item:1"]},
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
    else:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "cachegw",
                "purge",
                str(config),
                "--tag",
                "item:1",
                "--url",
                base,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "TEST_WORKERS_TOKEN": TOKEN},
            timeout=30,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    # Without the relay, the worker the purge did not go through keeps version 0.
    seen = from_every_worker(base, 2)
    assert {r.headers["x-version"] for r in seen.values()} == {"1"}


def served_by_worker(base: str, workers: int) -> dict[int, int]:
    """Responses each worker gave so far (its health counters)."""
    return {
        pid: sum(body["stats"][s] for s in ("HIT", "MISS", "STALE", "EXPIRED", "BYPASS"))  # type: ignore[index]
        for pid, body in health_of_every_worker(base, workers).items()
    }


def test_cold_requests_for_one_key_send_one_request_upstream_per_machine(
    gateway: Gateway,
) -> None:
    """100 concurrent requests for a key no worker holds: one upstream request, however
    the kernel spreads them over the workers and whatever their timing."""
    workers = 3
    base, upstream, _, _ = gateway(workers, latency=0.05)
    before = served_by_worker(base, workers)
    keys = 0
    spread = False
    while not spread and keys < 5:  # until the requests for one key reached two workers
        keys += 1
        path = f"/api/items/{100 + keys}"
        start = threading.Barrier(100)

        def one(path: str = path, start: threading.Barrier = start) -> httpx.Response:
            with httpx.Client(timeout=60) as client:
                start.wait()
                return client.get(base + path)

        with ThreadPoolExecutor(100) as pool:
            answers = list(pool.map(lambda _: one(), range(100)))
        assert [a.status_code for a in answers] == [200] * 100
        assert {a.headers["x-version"] for a in answers} == {"0"}
        assert upstream.gets == keys
        after = served_by_worker(base, workers)
        spread = sum(after[pid] > before[pid] for pid in after) >= 2
        before = after
    assert spread, "the kernel gave one worker every request, five times"
