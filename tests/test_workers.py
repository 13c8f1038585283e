"""Several workers on one machine without Redis (issue 23): `cachegw serve --workers 2`
on the memory backend keeps a cache per worker, and a write's invalidation and a purge
(admin API, `cachegw purge`) reach every worker before they are answered (the workers
relay purges over Unix datagram sockets, see cachegw/_relay.py).

Which worker answers a connection is the kernel's choice: the tests open a new
connection per request and wait until the upstream shows that both workers fetched.
"""

from __future__ import annotations

import os
import subprocess
import sys
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


def get(base: str) -> httpx.Response:
    """On a connection of its own: any worker may take it."""
    with httpx.Client(timeout=10) as client:
        return client.get(base + PATH, headers={"connection": "close"})


def until_every_worker_fetched(base: str, upstream: VersionedItems, gets: int) -> None:
    """GETs on new connections until the upstream has seen ``gets`` GETs in all (each
    worker fetches once into its own cache)."""
    for _ in range(400):
        assert get(base).status_code == 200
        if upstream.gets >= gets:
            break
    assert upstream.gets == gets, "the kernel never gave the second worker a connection"


@pytest.fixture
def two_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TEST_WORKERS_TOKEN", TOKEN)
    upstream = VersionedItems()
    with run_uvicorn(upstream) as origin:
        config = tmp_path / "gateway.toml"
        config.write_text(TOML.format(upstream=origin))
        with gateway_processes(config, args=["--workers", "2", "--no-access-log"]) as [gw]:
            yield gw, upstream, config


def test_a_write_through_one_worker_is_seen_by_every_worker_at_once(two_workers) -> None:  # type: ignore[no-untyped-def]
    gw, upstream, _ = two_workers
    until_every_worker_fetched(gw.base, upstream, 2)  # both hold version 0
    with httpx.Client(timeout=10) as client:
        put = client.put(gw.base + PATH)
    assert put.headers["x-version"] == "1"
    seen = [get(gw.base) for _ in range(60)]
    assert {r.headers["x-version"] for r in seen} == {"1"}, [
        (r.headers["x-version"], r.headers["x-cache-status"]) for r in seen
    ]


@pytest.mark.parametrize("how", ["api", "cli"])
def test_a_purge_through_one_worker_reaches_every_worker(two_workers, how: str) -> None:  # type: ignore[no-untyped-def]
    gw, upstream, config = two_workers
    until_every_worker_fetched(gw.base, upstream, 2)
    if how == "api":
        answer = httpx.post(
            f"{gw.base}/_cachegw/purge",
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
                gw.base,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "TEST_WORKERS_TOKEN": TOKEN},
            timeout=30,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    # Every worker fetches again: without the relay one of them would keep its entry.
    until_every_worker_fetched(gw.base, upstream, 4)
