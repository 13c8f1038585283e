"""Every byte the gateway holds is bounded (issue 24), against a real `cachegw serve` on the
memory and the Redis backend: floods of distinct keys with large bodies, identity answers
of entries stored compressed and unique long targets, answered as misses and then as
fast-path hits, keep the process's memory within what `cachegw check` says it may hold.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis_process import RedisProcess

from cachegw import Gateway
from cachegw._app import memory_budget
from tests.gateway_process import GatewayProcess
from tests.hostile import HostileOrigin, read_response

TOML = """
[cache]
backend = "{backend}"
op_timeout = "5s"  # a loaded machine must not turn HITs into misses
max_entries = 100
max_bytes = "8MiB"
l1_max_bytes = "8MiB"

[[services]]
name = "b"
upstream = "{upstream}"
prefix = "/b"
ttl = 60
max_body = "2MiB"
max_connections = 4

  [[services.routes]]
  path = "/{{rest:path}}"
"""


@pytest.fixture(scope="module")
def origin() -> Iterator[HostileOrigin]:
    origin = HostileOrigin().start()
    yield origin
    origin.close()


@pytest.fixture(scope="module", params=["memory", "redis"])
def gateway(
    request: pytest.FixtureRequest,
    origin: HostileOrigin,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProcess, Path]]:
    backend = "memory"
    if request.param == "redis":
        redis: RedisProcess = request.getfixturevalue("redis_proc")
        backend = redis.url
    config = tmp_path_factory.mktemp("budget") / "gateway.toml"
    config.write_text(TOML.format(backend=backend, upstream=origin.base))
    gw = GatewayProcess(config, args=["--no-access-log"])
    gw.start()
    yield gw, config
    output = gw.stop()
    assert "Traceback" not in output, output


def rss(gw: GatewayProcess) -> int:
    assert gw.proc is not None
    for line in Path(f"/proc/{gw.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def get_twice(port: int, target: str) -> None:
    """A miss, then a hit on the same connection (the fast path answers plain hits)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for expected in (b"x-cache-status: MISS", b"x-cache-status: HIT"):
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            answer = read_response(sock)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
            assert expected in answer, answer[:600]


def l1_and_memory(port: int) -> tuple[dict[str, float], dict[str, int] | None]:
    base = f"http://127.0.0.1:{port}/_cachegw"
    metrics = httpx.get(f"{base}/metrics", timeout=5).text
    l1 = {
        name: float(line.split()[-1])
        for line in metrics.splitlines()
        for name in ("cachegw_l1_entries", "cachegw_l1_bytes", "cachegw_l1_max_bytes")
        if line.startswith(name + " ") or line.startswith(name + "{")
    }
    health = httpx.get(f"{base}/health", timeout=5).json()
    return l1, health.get("memory")


def test_floods_of_large_and_long_keys_stay_within_the_budget(
    gateway: tuple[GatewayProcess, Path],
) -> None:
    gw, config = gateway
    budget = sum(size for _, size in memory_budget(Gateway.from_toml(config)))
    tag = time.monotonic_ns()
    for i in range(5):  # warm up: the code paths, the pools
        get_twice(gw.port, f"/b/small/warm-{tag}-{i}")
    before = rss(gw)
    # Identity answers of 512 KiB JSON stored compressed (tens of KiB each), 1 MiB binaries
    # and unique ~8 KB targets: each a miss, then a fast-path hit.
    for i in range(150):
        get_twice(gw.port, f"/b/text/{tag}-{i}")
    for i in range(150):
        get_twice(gw.port, f"/b/bin/{tag}-{i}")
    for i in range(400):
        get_twice(gw.port, f"/b/small/{tag}-{i}?q=" + "x" * 8000)
    grown = rss(gw) - before
    assert grown <= budget + 64 * 2**20, (grown, budget)
    l1, memory = l1_and_memory(gw.port)
    assert l1["cachegw_l1_bytes"] <= l1["cachegw_l1_max_bytes"] == 8 * 2**20
    if memory is not None:
        # The decoded copies never outlive what the memory backend holds.
        assert memory["entries"] <= 100 and memory["bytes"] <= 8 * 2**20
        assert l1["cachegw_l1_entries"] <= memory["entries"]
