"""A stalled Redis under ``cachegw serve`` (issue 12): what cold and warm requests cost.

``cachegw serve`` (defaults, Redis backend) in front of the bench upstream, on a
redis-server of its own. Redis is paused with ``CLIENT PAUSE <ms> ALL`` (it accepts
connections and does not answer: a stall, not an outage). During the pause, client threads
ask for paths never seen before (cold: each is forwarded upstream) and one thread asks for
a path cached just before the pause (warm: in the process's L1 copy for its first second).

Reported: the upstream's own latency (asked directly, same client, just before), cold
latency p50/p99/max during the pause, warm latency during the L1 copy's life, and every
status. Target: cold p99 <= upstream p99 + 150 ms, no 5xx.

Used by ``all.py`` (``--only stall``) and runnable alone::

    .venv/bin/python tests/bench/stall.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import http.client
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from _harness import CLIENT_CPU, SetupError, wait_listening
from _suite import Server, serve_server, start, start_redis, stop, uvicorn_server

TARGET_MS = 150.0


@dataclass
class StallResult:
    upstream_p99_ms: float
    cold_ms: list[float] = field(default_factory=list)
    warm_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    warm_cache: dict[str, int] = field(default_factory=dict)

    @property
    def cold_p99_ms(self) -> float:
        return _pct(self.cold_ms, 0.99)

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500 or status == 0)

    @property
    def ok(self) -> bool:
        return (
            bool(self.cold_ms)
            and self.cold_p99_ms <= self.upstream_p99_ms + TARGET_MS
            and self.errors == 0
        )

    def lines(self) -> list[str]:
        warm = ", ".join(f"{k} {v}" for k, v in sorted(self.warm_cache.items()))
        return [
            f"upstream alone: p99 {self.upstream_p99_ms:.1f} ms",
            f"cold during the pause: {len(self.cold_ms)} requests, p50 "
            f"{_pct(self.cold_ms, 0.5):.1f} ms, p99 {self.cold_p99_ms:.1f} ms, max "
            f"{max(self.cold_ms, default=0):.1f} ms; "
            f"{sum(ms > self.upstream_p99_ms + TARGET_MS for ms in self.cold_ms)} over "
            f"upstream p99 + {TARGET_MS:g} ms (the first requests, until the breaker opens)",
            f"warm (L1) during the pause: {len(self.warm_ms)} requests, p99 "
            f"{_pct(self.warm_ms, 0.99):.1f} ms ({warm})",
            f"statuses: {dict(sorted(self.statuses.items()))}",
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "upstream_p99_ms": self.upstream_p99_ms,
            "cold_requests": len(self.cold_ms),
            "cold_p50_ms": _pct(self.cold_ms, 0.5),
            "cold_p99_ms": self.cold_p99_ms,
            "cold_max_ms": max(self.cold_ms, default=0.0),
            "warm_requests": len(self.warm_ms),
            "warm_p99_ms": _pct(self.warm_ms, 0.99),
            "statuses": self.statuses,
            "target_ms": TARGET_MS,
            "pass": self.ok,
        }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _timed(conn: http.client.HTTPConnection, path: str) -> tuple[int, float, dict[str, str]]:
    began = time.perf_counter()
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        status, headers = response.status, {k.lower(): v for k, v in response.getheaders()}
    except (OSError, http.client.HTTPException):
        status, headers = 0, {}
        conn.close()
    return status, (time.perf_counter() - began) * 1000, headers


def run_stall(seconds: float = 5.0, clients: int = 8) -> StallResult:
    """Start the servers, pause Redis, measure; every process is stopped on the way out."""
    redis = start_redis()
    upstream = uvicorn_server("upstream", "gateway_apps:upstream", CLIENT_CPU)
    servers: list[Server] = [upstream]
    try:
        start(upstream)
        wait_listening(upstream.proc, upstream.port, upstream.name)  # type: ignore[arg-type]
        gateway = serve_server(
            "cachegw serve (Redis, stalled)", f"http://127.0.0.1:{upstream.port}", redis.url
        )
        servers.append(gateway)
        start(gateway)
        wait_listening(gateway.proc, gateway.port, gateway.name)  # type: ignore[arg-type]
        direct = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=10)
        alone = [_timed(direct, f"/uncached/alone/{i}")[1] for i in range(300)]
        direct.close()
        result = StallResult(upstream_p99_ms=_pct(alone, 0.99))
        warm_conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        for _ in range(2):
            _timed(warm_conn, "/svc/cached/warm")
        # Let the landing message of the store go by (it drops the process's L1 copy, as
        # for any change), then read the entry again: the copy is fresh when Redis stops.
        time.sleep(0.3)
        for _ in range(2):
            _, _, headers = _timed(warm_conn, "/svc/cached/warm")
        if headers.get("x-cache-status") != "HIT":
            raise SetupError(f"the warm path is not a HIT before the pause: {headers}")
        lock = threading.Lock()
        counter = iter(range(10**9))
        stop_at = [0.0]

        def cold() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
            while time.monotonic() < stop_at[0]:
                with lock:
                    n = next(counter)
                status, ms, _ = _timed(conn, f"/svc/cached/cold/{n}")
                with lock:
                    result.cold_ms.append(ms)
                    result.statuses[status] = result.statuses.get(status, 0) + 1
            conn.close()

        def warm() -> None:
            # The L1 copy lives 1 s from the last read of Redis: measure within it.
            until = time.monotonic() + 0.8
            while time.monotonic() < until:
                status, ms, headers = _timed(warm_conn, "/svc/cached/warm")
                with lock:
                    result.warm_ms.append(ms)
                    result.statuses[status] = result.statuses.get(status, 0) + 1
                    cache = headers.get("x-cache-status", "?")
                    result.warm_cache[cache] = result.warm_cache.get(cache, 0) + 1

        pause_ms = int((seconds + 2) * 1000)
        with redis.client() as client:
            client.execute_command("CLIENT", "PAUSE", str(pause_ms), "ALL")
        stop_at[0] = time.monotonic() + seconds
        threads = [threading.Thread(target=cold) for _ in range(clients)]
        threads.append(threading.Thread(target=warm))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 30)
        warm_conn.close()
        return result
    finally:
        for server in servers:
            stop(server)
        redis.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    result = run_stall(args.seconds)
    for line in result.lines():
        print(line)
    verdict = "PASS" if result.ok else "FAIL"
    print(
        f"cold p99 {result.cold_p99_ms:.1f} ms <= upstream p99 {result.upstream_p99_ms:.1f} "
        f"+ {TARGET_MS:g} ms, 0 x 5xx: {verdict}"
    )
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
