"""Latency added by a Redis outage: answers of a request loop while Redis is healthy,
stopped, and stalled (``CLIENT PAUSE``), side by side in one run.

A real `cachegw serve` on a redis-server of its own, in front of an origin answering after
50 ms (the resilience tests' setup, tests/test_resilience.py); a few clients request two
cached paths back to back. Each phase lasts ``--seconds`` (3 by default). Prints, per
phase, the answers, their statuses and p50 / p99 / max latency. The tests assert only
what would break if the code were wrong (no 5xx, the circuit opens, no answer waits for
an operation deadline); the figures here are what to read, with the caveat that a loaded
machine adds its own scheduling delays.

    .venv/bin/python tests/bench/resilience.py [--seconds 3] [--clients 4]

Loopback only; every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import redis as redis_lib  # noqa: E402

from tests.chaos import Answer, Gateway, Origin, get  # noqa: E402
from tests.redis_process import RedisProcess  # noqa: E402
from tests.test_resilience import UPSTREAM_DELAY, Loop, write_config  # noqa: E402


def row(name: str, answers: list[Answer]) -> str:
    if not answers:
        return f"{name:<16} no answers"
    lat = sorted(a.latency * 1000 for a in answers)
    statuses = dict(Counter(a.status for a in answers))
    p99 = lat[max(0, int(len(lat) * 0.99) - 1)]
    return (
        f"{name:<16} {len(answers):>6} {lat[len(lat) // 2]:>8.1f} {p99:>8.1f} {lat[-1]:>8.1f}"
        f"  {statuses}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    paths = [f"/svc/d/bench/{i % 2}" for i in range(args.clients)]
    with tempfile.TemporaryDirectory() as tmp, RedisProcess() as redis, Origin() as origin:
        for i in range(2):
            origin.route(f"/d/bench/{i}", body=b"bench", delay=UPSTREAM_DELAY)
        gateway = Gateway(write_config(Path(tmp), redis.url, origin.base)).start()
        try:
            for path in set(paths):
                get(gateway.port, path)
            with Loop(gateway.port, paths) as loop:
                start = time.monotonic()
                time.sleep(args.seconds)
                healthy = loop.since(start)
                redis.stop()
                down = time.monotonic()
                time.sleep(args.seconds)
                stopped = loop.since(down)
                redis.start()
                time.sleep(1.0)
                paused_at = time.monotonic()
                millis = int(args.seconds * 1000)

                def pause() -> None:
                    with redis_lib.Redis(host="127.0.0.1", port=redis.port) as client:
                        client.execute_command("CLIENT", "PAUSE", str(millis), "ALL")

                threading.Thread(target=pause).start()
                time.sleep(args.seconds)
                paused = loop.since(paused_at)
        finally:
            gateway.stop()
    print(f"upstream delay {UPSTREAM_DELAY * 1000:.0f} ms, {args.clients} clients")
    print(f"{'phase':<16} {'answers':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  statuses")
    print(row("healthy", healthy))
    print(row("redis stopped", stopped))
    print(row("redis paused", paused))
    return 0


if __name__ == "__main__":
    sys.exit(main())
