"""Reloads under load: 50 connections on a real `cachegw serve` process while its file is
reloaded 20 times, alternating two valid files and one invalid file, on the memory backend
and on a real Redis.

Prints, per backend, one row per reload: the requests answered since that reload, failed
or reset ones, the hit ratio of the route no reload changes, and how long the reload took
(the admin call's own ``seconds``, and the round trip of ``POST /_cachegw/reload``).

    .venv/bin/python tests/bench/reload.py [--reloads 20] [--interval 0.5] [--workers 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.gateway_process import GatewayProcess  # noqa: E402
from tests.redis_process import RedisProcess  # noqa: E402
from tests.reload_load import Load  # noqa: E402
from tests.servers import StubUpstream, run_uvicorn  # noqa: E402
from tests.test_reload import TOKEN, post_reload, write  # noqa: E402

CYCLE = ("b", "bad", "a")  # two valid files and an invalid one, in turn


def run(backend: str, args: argparse.Namespace, tmp: Path) -> bool:
    stub = StubUpstream()
    items = [f"/catalog/items/{n}" for n in range(20)]
    changing = [f"/catalog/changing/{n}" for n in range(10)]
    rows = []
    with run_uvicorn(stub) as upstream:
        sources = {v: write(tmp / f"{v}.toml", upstream, backend, v) for v in ("a", "b", "bad")}
        live = tmp / "gateway.toml"
        live.write_bytes(sources["a"].read_bytes())
        gw = GatewayProcess(
            live,
            extra_env={"CACHEGW_TEST_RELOAD_TOKEN": TOKEN},
            args=["--no-access-log", "--workers", str(args.workers)],
        )
        gw.start(timeout=60)
        try:
            for path in items * args.workers * 2:
                httpx.get(gw.base + path)
            with Load(gw.port, items + changing, connections=args.connections) as load:
                time.sleep(args.interval)
                for index in range(args.reloads):
                    variant = CYCLE[index % len(CYCLE)]
                    live.write_bytes(sources[variant].read_bytes())
                    load.mark(f"{index + 1} ({variant})")
                    began = time.perf_counter()
                    answer = post_reload(gw.base)
                    rows.append((answer, time.perf_counter() - began))
                    time.sleep(args.interval)
        finally:
            gw.stop()
    print(
        f"\n{backend if backend == 'memory' else 'redis'}, {args.workers} worker(s), "
        f"{args.connections} connections"
    )
    print(
        f"{'reload':>10} {'result':>9} {'gen':>4} {'requests':>9} {'failed':>7} "
        f"{'hit ratio (unchanged)':>22} {'reload ms':>10} {'round trip ms':>14}"
    )
    ok = True
    total = failed = 0
    worst = 1.0
    for phase, (answer, round_trip) in zip(load.phases[1:], rows, strict=True):
        body = answer.json()
        result = body.get("outcome", f"{answer.status_code}")
        seconds = body.get("seconds")
        ratio = phase.hit_ratio("items")
        worst = min(worst, ratio)
        total += phase.count()
        failed += len(phase.failures)
        print(
            f"{phase.label:>10} {result:>9} {body['generation']:>4} {phase.count():>9} "
            f"{len(phase.failures):>7} {ratio:>21.2%} "
            f"{f'{seconds * 1000:.1f}' if seconds is not None else '-':>10} "
            f"{round_trip * 1000:>14.1f}"
        )
        expected_rejected = phase.label.endswith("(bad)")
        ok &= (answer.status_code == 422) == expected_rejected
    failures = [f for phase in load.phases for f in phase.failures]
    print(
        f"total: {total} requests, {failed} failed or reset, lowest hit ratio of the "
        f"unchanged route {worst:.2%}"
    )
    for failure in failures[:5]:
        print("  failure:", failure)
    return ok and not failures and worst > 0.95


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between reloads")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    print("Machine note: shared, loaded 2-core host; request counts are noisy, failures are not.")
    good = True
    with tempfile.TemporaryDirectory() as tmp:
        good &= run("memory", args, Path(tmp))
    with RedisProcess() as redis, tempfile.TemporaryDirectory() as tmp:
        good &= run(redis.url, args, Path(tmp))
    print("\nOK" if good else "\nFAILED: see the rows above")
    return 0 if good else 1


if __name__ == "__main__":
    raise SystemExit(main())
