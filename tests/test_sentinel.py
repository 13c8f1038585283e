"""Redis Sentinel (issue 23): configured by URL, in the gateway file and from Python,
against a real master, replica and three sentinels (tests/sentinel_process.py), through
a graceful failover and a master kill, with no write undone."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest
from redis.asyncio.sentinel import SentinelConnectionPool

from cachegw import ConfigError, Gateway, RedisBackend
from tests.gateway_process import gateway_processes
from tests.items_upstream import VersionedItems
from tests.redis_process import EVENTUALLY
from tests.sentinel_process import SentinelSetup
from tests.servers import run_uvicorn
from tests.test_failover import PATH, QUIET, WINDOW, read, version, wait_for, write_config

TOML = """
[cache]
backend = "{backend}"

[[services]]
name = "api"
upstream = "http://127.0.0.1:9"

  [[services.routes]]
  path = "/{{rest:path}}"
"""


def test_sentinel_url_names_the_master_the_sentinels_and_their_passwords() -> None:
    backend = RedisBackend.from_url(
        "redis+sentinel://:s3cret@127.0.0.1:26379,[::1]:26380/mymaster/2?sentinel_password=other"
    )
    pool = backend.client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert (pool.connection_kwargs["password"], pool.connection_kwargs["db"]) == ("s3cret", 2)
    assert pool.max_connections == 1024
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380]
    assert [s.connection_pool.connection_kwargs["host"] for s in sentinels] == ["127.0.0.1", "::1"]
    assert {s.connection_pool.connection_kwargs["password"] for s in sentinels} == {"other"}
    # Bounded like every client from_url builds: op_timeout, no retries.
    assert {s.connection_pool.connection_kwargs["socket_timeout"] for s in sentinels} == {0.25}
    assert pool.connection_kwargs["socket_timeout"] == 0.25
    tls = RedisBackend.from_url("rediss+sentinel://127.0.0.1:26379/m").client.connection_pool
    assert "SSL" in tls.connection_class.__name__


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://127.0.0.1:26379", "must name the master"),
        ("redis+sentinel://127.0.0.1:26379/", "must name the master"),
        ("redis+sentinel://127.0.0.1/m", "host:port"),
        ("redis+sentinel://127.0.0.1:1,:2/m", "host:port"),
        ("redis+sentinel://127.0.0.1:1/m/x", "must be a number"),
        ("redis+sentinel://127.0.0.1:1/m?ssl=yes", "unknown option"),
        ("redis+cluster://127.0.0.1:1,127.0.0.1:x", "host:port"),
    ],
)
def test_malformed_sentinel_and_node_list_urls_are_clear_errors(
    url: str, says: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=says):
        RedisBackend.from_url(url)
    path = tmp_path / "gateway.toml"
    path.write_text(TOML.format(backend=url))
    with pytest.raises(ConfigError, match=says) as caught:
        Gateway.from_toml(path)
    assert "gateway.toml" in str(caught.value) and "cache.backend" in str(caught.value)


def test_no_password_in_the_error() -> None:
    with pytest.raises(ConfigError) as caught:
        RedisBackend.from_url("redis+sentinel://:hunter2@127.0.0.1:1/m/x")
    assert "hunter2" not in str(caught.value)


@pytest.mark.redis
def test_python_backend_follows_the_master_across_a_failover() -> None:
    with SentinelSetup() as setup:

        async def scenario() -> None:
            backend = RedisBackend.from_url(setup.url)
            await backend.set("k", b"before", 60)
            assert await backend.get("k") == b"before"
            old = setup.master_port()
            await asyncio.to_thread(setup.failover)
            # The first command on a connection to the demoted master may fail (fail
            # open); the pool then asks the sentinels and reaches the new master.
            deadline = time.monotonic() + 10
            while True:
                try:
                    await backend.set("k", b"after", 60)
                    break
                except Exception:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            assert await backend.get("k") == b"after"
            assert setup.master_port() != old
            await backend.aclose()

        asyncio.run(scenario())


@pytest.mark.redis
@pytest.mark.parametrize("how", ["graceful", "kill"])
def test_gateways_on_sentinel_through_a_failover_undo_no_write(tmp_path: Path, how: str) -> None:
    """Two `cachegw serve` processes configured with a redis+sentinel:// URL in the file:
    entries shared through the master; a failover (SENTINEL FAILOVER, or the master
    killed); every answer a 200; entries stored before the failover are not served after
    it (the new master is fenced); a write made right after the failover is seen by both;
    hits again, stored on the new master."""
    upstream = VersionedItems()
    with SentinelSetup() as setup, run_uvicorn(upstream) as origin:
        config = write_config(tmp_path / "g.toml", setup.url, origin)
        with gateway_processes(config, count=2, args=QUIET) as [a, b]:
            assert read(a.base) == (0, "MISS")
            assert wait_for(lambda: read(b.base) == (0, "HIT"), EVENTUALLY)
            old = setup.master_port()
            if how == "graceful":
                setup.failover()
            else:
                killed = next(s for s in setup.servers() if s.port == old)
                assert killed._proc is not None
                killed._proc.send_signal(signal.SIGKILL)
                setup.wait_for_new_master(old, timeout=30)
            new = setup.master_port()
            # The first reads after the failover: 200s, none from before it.
            assert read(b.base)[1] != "HIT"
            assert version(httpx.put(a.base + PATH, timeout=10)) == 1
            time.sleep(WINDOW)
            seen = [read(base) for _ in range(5) for base in (a.base, b.base)]
            assert {v for v, _ in seen} == {1}, seen
            assert wait_for(lambda: read(b.base) == (1, "HIT"), EVENTUALLY)
            assert wait_for(lambda: read(a.base) == (1, "HIT"), EVENTUALLY)
        with next(s for s in setup.servers() if s.port == new).client() as client:
            assert client.exists("cachegw:GET:api:/items/1") or client.dbsize() > 3
