"""The gateway as a real process started from a TOML file, on both backends."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.gateway_process import gateway_processes
from tests.hostile import read_response
from tests.redis_process import RedisProcess
from tests.servers import StubUpstream, run_uvicorn

TOML = """
[cache]
backend = "{backend}"
op_timeout = "5s"  # a loaded machine must not turn HITs into misses
prefix = "{prefix}"

[[services]]
name = "catalog"
upstream = "{upstream}"
prefix = "/catalog"
ttl = 30

  [[services.routes]]
  path = "/items/{{item_id}}"
  ttl = 60
  tags = ["item:{{item_id}}"]

  [[services.routes]]
  path = "/{{rest:path}}"
  ttl = 0
"""


def write_config(tmp_path: Path, upstream: str, backend: str, prefix: str = "t") -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(TOML.format(upstream=upstream, backend=backend, prefix=prefix))
    return path


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory"
    url: str = request.getfixturevalue("redis_url")
    return url


def test_served_from_toml_miss_then_hit(tmp_path: Path, backend: str) -> None:
    stub = StubUpstream()
    stub.route("/items/42", body=b'{"id": 42}', headers=[(b"content-type", b"application/json")])
    with (
        run_uvicorn(stub) as upstream,
        gateway_processes(write_config(tmp_path, upstream, backend)) as [gw],
    ):
        first = httpx.get(f"{gw.base}/catalog/items/42")
        second = httpx.get(f"{gw.base}/catalog/items/42")
        other = httpx.get(f"{gw.base}/catalog/anything")
        other2 = httpx.get(f"{gw.base}/catalog/anything")
        missing = httpx.get(f"{gw.base}/nowhere")
    assert (first.headers["x-cache-status"], second.headers["x-cache-status"]) == ("MISS", "HIT")
    assert second.content == b'{"id": 42}'
    assert "date" not in second.headers or second.headers.get_list(
        "date"
    ) == first.headers.get_list("date")
    assert other.headers["x-cache-status"] == other2.headers["x-cache-status"] == "MISS"  # ttl = 0
    assert missing.status_code == 404
    assert stub.hits["/items/42"] == 1
    assert stub.hits["/anything"] == 2


def test_single_date_header(tmp_path: Path) -> None:
    stub = StubUpstream()
    stub.route("/d", headers=[(b"date", b"Fri, 27 Nov 2026 10:00:00 GMT")], body=b"d")
    with (
        run_uvicorn(stub) as upstream,
        gateway_processes(write_config(tmp_path, upstream, "memory")) as [gw],
    ):
        response = httpx.get(f"{gw.base}/catalog/d")
    assert response.headers.get_list("date") == ["Fri, 27 Nov 2026 10:00:00 GMT"]


def test_two_processes_share_redis_entries_and_invalidation(tmp_path: Path, redis_url: str) -> None:
    stub = StubUpstream()
    stub.route("/items/7", body=b"seven")
    config = write_config(tmp_path, "{upstream}", redis_url)
    with run_uvicorn(stub) as upstream:
        config.write_text(config.read_text().replace("{upstream}", upstream))
        with gateway_processes(config, count=2) as [a, b]:
            first = httpx.get(f"{a.base}/catalog/items/7")
            from_b = httpx.get(f"{b.base}/catalog/items/7")
            httpx.post(f"{b.base}/catalog/items/7", content=b"update")
            # Another process sees a write within 200 ms (its purge record's polling).
            time.sleep(0.25)
            after = httpx.get(f"{a.base}/catalog/items/7")
    assert first.headers["x-cache-status"] == "MISS"
    assert from_b.headers["x-cache-status"] == "HIT"
    assert after.headers["x-cache-status"] == "MISS"
    assert stub.hits["/items/7"] == 3  # two GET misses and the POST


@pytest.mark.redis
def test_redis_outage_degrades_to_uncached_proxying(tmp_path: Path) -> None:
    stub = StubUpstream()
    stub.route("/items/1", body=b"one")
    with RedisProcess() as redis, run_uvicorn(stub) as upstream:
        config = write_config(tmp_path, upstream, redis.url)
        with gateway_processes(config) as [gw]:
            url = f"{gw.base}/catalog/items/1"
            assert httpx.get(url).headers["x-cache-status"] == "MISS"
            assert httpx.get(url).headers["x-cache-status"] == "HIT"
            redis.stop()
            during = [httpx.get(url, timeout=5) for _ in range(5)]
            redis.start()
            # The circuit breaker probes the backend again within its cooldown (1 s).
            statuses = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and statuses[-1:] != ["HIT"]:
                statuses.append(httpx.get(url, timeout=5).headers["x-cache-status"])
                time.sleep(0.1)
    assert [r.status_code for r in during] == [200] * 5
    assert all(r.content == b"one" for r in during)
    assert statuses[-1] == "HIT", statuses


def test_coalescing_through_a_real_process(tmp_path: Path) -> None:
    stub = StubUpstream()
    stub.route("/items/9", body=b"nine", delay=0.3)
    with (
        run_uvicorn(stub) as upstream,
        gateway_processes(write_config(tmp_path, upstream, "memory")) as [gw],
    ):
        results: list[int] = []

        def get() -> None:
            results.append(httpx.get(f"{gw.base}/catalog/items/9", timeout=10).status_code)

        threads = [threading.Thread(target=get) for _ in range(30)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == [200] * 30
    assert stub.hits["/items/9"] == 1


def test_l1_copies_follow_changes_made_by_another_process(tmp_path: Path, redis_url: str) -> None:
    """Each process keeps decoded copies of hot Redis entries (the L1). An invalidation
    or refresh in one process reaches the other's copy through the landing channel, not
    only when the copy's l1_ttl ends (set to a minute here, so only the channel can)."""
    stub = StubUpstream()
    stub.route("/items/1", body=b"v1")
    config = write_config(tmp_path, "{upstream}", redis_url)
    with run_uvicorn(stub) as upstream:
        text = config.read_text().replace("{upstream}", upstream)
        config.write_text(text.replace("[cache]\n", "[cache]\nl1_ttl = 60\n", 1))
        with gateway_processes(config, count=2) as [a, b]:
            url_a, url_b = f"{a.base}/catalog/items/1", f"{b.base}/catalog/items/1"
            assert httpx.get(url_a).headers["x-cache-status"] == "MISS"
            assert httpx.get(url_b).headers["x-cache-status"] == "HIT"  # from Redis
            assert httpx.get(url_b).content == b"v1"  # from b's L1 now
            stub.route("/items/1", body=b"v2")
            httpx.post(url_a, content=b"change")  # invalidates; a tells the others
            # b answers from its copy until the message reaches it (a generous deadline:
            # how soon it does depends on the machine's load, not on the code).
            deadline = time.monotonic() + 10
            after = httpx.get(url_b)
            while after.content == b"v1" and time.monotonic() < deadline:
                after = httpx.get(url_b)
            again_a = httpx.get(url_a)
    assert (after.headers["x-cache-status"], after.content) == ("MISS", b"v2")
    assert (again_a.headers["x-cache-status"], again_a.content) == ("HIT", b"v2")


def test_access_log_loses_no_line_at_sigterm(tmp_path: Path) -> None:
    # Lines are buffered (written once a second or at exit): a SIGTERM right after the
    # last response must still get every line out, hits from the protocol-level fast
    # path and misses from the ordinary path alike. (Fewer than 64 KiB of lines: the
    # test reads the output only once the process has ended.)
    stub = StubUpstream()
    stub.route("/items/1", body=b"one")
    with run_uvicorn(stub) as upstream:
        config = write_config(tmp_path, upstream, "memory")
        with gateway_processes(config) as [gw], httpx.Client(base_url=gw.base) as client:
            statuses = [client.get("/catalog/items/1").headers["x-cache-status"]]
            # Hits of one entry by clients that differ (User-Agent, query): each line is
            # its own request's, though the fast path reuses the line's text.
            agents = [f"agent-{i % 3}" for i in range(120)]
            statuses += [
                client.get(
                    "/catalog/items/1", params={"v": i % 2}, headers={"user-agent": agent}
                ).headers["x-cache-status"]
                for i, agent in enumerate(agents)
            ]
            statuses += [
                client.get(f"/catalog/other/{i}").headers["x-cache-status"] for i in range(10)
            ]
            output = gw.stop()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith('{"time"')]
    assert [line["cache_status"] for line in lines] == statuses
    assert statuses.count("HIT") == 118  # the first request of each query is a miss
    hits = lines[1:121]
    assert [line["user_agent"] for line in hits] == agents
    assert [line["query"] for line in hits] == [f"v={i % 2}" for i in range(120)]
    times = [line["time"] for line in lines]
    assert times == sorted(times)
    assert [line["path"] for line in lines[-10:]] == [f"/catalog/other/{i}" for i in range(10)]


def test_hostile_user_agent_on_fast_path_hits_cannot_forge_log_lines(tmp_path: Path) -> None:
    # Raw socket: a User-Agent made to close the JSON object and start another, with bytes
    # that are not UTF-8. The fast path keeps the line's text per client: every hit must
    # still be one line whose user_agent is the header, escaped.
    import socket

    stub = StubUpstream()
    stub.route("/items/1", body=b"one")
    agent = b'x"},{"status":500,"cache_status":"HIT\\\xff\xe9'
    with run_uvicorn(stub) as upstream:
        config = write_config(tmp_path, upstream, "memory")
        with gateway_processes(config) as [gw]:
            host, port = gw.base.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                request = (
                    b"GET /catalog/items/1 HTTP/1.1\r\nHost: a\r\nUser-Agent: "
                    + agent
                    + b"\r\n\r\n"
                )
                statuses = []
                for _ in range(3):  # a miss, then fast-path hits on one connection
                    sock.sendall(request)
                    # The whole response, body included: the next one starts after it.
                    head, _, body = read_response(sock).partition(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 200")
                    assert body == b"one"
                    statuses.append(
                        head.split(b"x-cache-status: ", 1)[1].split(b"\r\n", 1)[0].decode()
                    )
            output = gw.stop()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith('{"time"')]
    assert statuses == ["MISS", "HIT", "HIT"]
    assert [line["cache_status"] for line in lines] == statuses
    assert {line["user_agent"] for line in lines} == {agent.decode("latin-1")}
    assert {line["status"] for line in lines} == {200}
