"""Soak run: well-behaved traffic alongside hostile connections and Redis restarts.

A real `cachegw serve` on a Redis backend, in front of the hostile origin of the tests
(tests/hostile.py), for ``--minutes`` (5 by default). At the same time:

* well-behaved clients (keep-alive): cached GETs (hits, and misses as entries expire), an
  uncached GET, a 48 KiB GET and a complete chunked upload, each answer checked;
* slow-loris connections sending one header byte a second, and silent connections;
* stalled readers asking for a 64 MiB stream and reading nothing;
* aborted uploads: a chunked body cut off, one with broken framing, one that stalls;
* Redis stopped for 2 s and started again, once a minute.

Every minute it prints the well-behaved requests served, their failures, their p99
latency, the hostile connections the gateway cut, and the gateway's RSS. It fails (exit
status 1) if any well-behaved request failed, if the RSS at the end exceeds the RSS after
the first minute by more than 20 %, if the upstream ever received an aborted upload as
complete, or if the gateway logged a traceback.

    .venv/bin/python tests/bench/soak.py [--minutes 5] [--clients 6]

``--adversarial SECONDS`` runs the adversarial phase instead (issue 24), on the memory
backend and then on Redis: a quiet run of well-behaved clients alone for a third of the
time, then the same clients alongside attackers for the rest, against a cached service
(``max_bytes``/``l1_max_bytes`` of 16 MiB): unique ~8 KB targets, identity answers of
512 KiB compressible bodies stored compressed, 1 MiB binaries (each a miss, then a hit),
stalled readers of a 64 MiB stream, clients that send a slow GET and hang up, and floods
of 50 concurrent HEADs on cold keys. It prints one table row per backend and fails unless,
on each, the gateway's RSS stays within `cachegw check`'s budget + 64 MiB, the
well-behaved p99 within its quiet p99 + 50 ms, and no well-behaved request fails.

    .venv/bin/python tests/bench/soak.py --adversarial 90

Loopback only; every process and connection it opens is closed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.hostile import HostileOrigin  # noqa: E402
from tests.redis_process import RedisProcess  # noqa: E402
from tests.servers import free_port  # noqa: E402

TOML = """
[cache]
backend = "{redis}"
prefix = "soak"

[server]
header_timeout = 2
body_timeout = 2
keepalive_timeout = 5
send_timeout = 2

[[services]]
name = "s"
upstream = "{upstream}"
prefix = "/s"
ttl = 0
timeout = 5

  [[services.routes]]
  path = "/{{rest:path}}"
"""

UPLOAD = 4096

ADVERSARIAL_TOML = """
[cache]
backend = "{backend}"
prefix = "adv"
max_bytes = "16MiB"
l1_max_bytes = "16MiB"

[server]
send_timeout = 2

[[services]]
name = "c"
upstream = "{upstream}"
prefix = "/c"
ttl = 60
timeout = 5
max_body = "2MiB"
max_connections = 20
pool_timeout = 2

  [[services.routes]]
  path = "/{{rest:path}}"
"""


@dataclass
class Minute:
    served: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    cut: Counter[str] = field(default_factory=Counter)


class Soak:
    def __init__(self, port: int, minutes: float) -> None:
        self.port = port
        self.end = time.monotonic() + minutes * 60
        self.start = time.monotonic()
        self.minutes: list[Minute] = [Minute()]

    @property
    def now(self) -> Minute:
        index = int((time.monotonic() - self.start) // 60)
        while len(self.minutes) <= index:
            self.minutes.append(Minute())
        return self.minutes[index]

    def running(self) -> bool:
        return time.monotonic() < self.end

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    # --- well-behaved -------------------------------------------------------------------

    async def client(self, seed: int) -> None:
        rng = random.Random(seed)
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while self.running():
            roll = rng.random()
            if roll < 0.7:
                request, expect = _get(f"/s/small/{rng.randrange(200)}"), 1024
            elif roll < 0.85:
                request, expect = _get(f"/s/nocache/{rng.randrange(10**6)}"), 1024
            elif roll < 0.93:
                request, expect = _get("/s/medium"), 48 * 1024
            else:
                request, expect = _upload(), 2
            began = time.perf_counter()
            try:
                if conn is None:
                    conn = await self.connect()
                reader, writer = conn
                writer.write(request)
                status, body, close = await asyncio.wait_for(_response(reader), 15)
                if status != 200 or len(body) != expect:
                    raise _Failure(f"status {status}, {len(body)} bytes")
                if close:
                    writer.close()
                    conn = None
            except (OSError, asyncio.IncompleteReadError, TimeoutError, _Failure) as exc:
                self.now.errors[f"{type(exc).__name__}: {exc}"[:80]] += 1
                if conn is not None:
                    conn[1].close()
                conn = None
                continue
            self._served(began)
            await asyncio.sleep(0.002)
        if conn is not None:
            conn[1].close()

    def _served(self, began: float) -> None:
        minute = self.now
        minute.served += 1
        minute.latencies.append(time.perf_counter() - began)

    # --- hostile ------------------------------------------------------------------------

    async def loris(self) -> None:
        head = b"GET /s/small/1 HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        while self.running():
            try:
                reader, writer = await self.connect()
                for i in range(len(head)):
                    writer.write(head[i : i + 1])
                    await writer.drain()
                    if await _closed_within(reader, 1.0):
                        self.now.cut["slow-loris"] += 1
                        break
                writer.close()
            except OSError:
                await asyncio.sleep(0.1)

    async def silent(self) -> None:
        while self.running():
            try:
                reader, writer = await self.connect()
                if await _closed_within(reader, 30):
                    self.now.cut["silent"] += 1
                writer.close()
            except OSError:
                await asyncio.sleep(0.1)

    async def stalled_reader(self) -> None:
        while self.running():
            try:
                sock = socket.create_connection(("127.0.0.1", self.port))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                _reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
                writer.transport.pause_reading()  # and never resume: a client that stalls
                writer.write(_get("/s/big"))
                for _ in range(300):
                    await asyncio.sleep(0.1)
                    if _peer_closed(sock):
                        self.now.cut["stalled reader"] += 1
                        break
                writer.close()
            except OSError:
                await asyncio.sleep(0.1)

    async def aborted_uploads(self) -> None:
        kinds = ["disconnect", "framing", "stall"]
        n = 0
        while self.running():
            kind = kinds[n % 3]
            n += 1
            try:
                reader, writer = await self.connect()
                writer.write(
                    b"PUT /s/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"400\r\n" + b"u" * 100
                )
                await writer.drain()
                if kind == "framing":
                    writer.write(b"u" * 924 + b"\r\nzz\r\n")
                if kind in ("framing", "stall"):
                    if await _closed_within(reader, 10):
                        self.now.cut[f"upload {kind}"] += 1
                else:
                    await asyncio.sleep(0.2)
                    self.now.cut["upload disconnect"] += 1
                writer.close()
            except OSError:
                pass
            await asyncio.sleep(0.3)


class Adversary(Soak):
    """The adversarial phase: well-behaved clients on the cached service ``/c`` (hits,
    misses, 48 KiB answers) and the attackers of issue 24, each at a bounded rate."""

    def __init__(self, port: int, seconds: float, attack: bool) -> None:
        super().__init__(port, seconds / 60)
        self.attack = attack
        self.counts: Counter[str] = Counter()

    async def client(self, seed: int) -> None:
        rng = random.Random(seed)
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while self.running():
            roll = rng.random()
            if roll < 0.75:
                request, expect = _get(f"/c/small/{rng.randrange(200)}"), 1024
            elif roll < 0.9:
                request, expect = _get(f"/c/nocache/{rng.randrange(10**6)}"), 1024
            else:
                request, expect = _get("/c/medium"), 48 * 1024
            began = time.perf_counter()
            try:
                if conn is None:
                    conn = await self.connect()
                reader, writer = conn
                writer.write(request)
                status, body, close = await asyncio.wait_for(_response(reader), 15)
                if status != 200 or len(body) != expect:
                    raise _Failure(f"status {status}, {len(body)} bytes")
                if close:
                    writer.close()
                    conn = None
            except (OSError, asyncio.IncompleteReadError, TimeoutError, _Failure) as exc:
                self.now.errors[f"{type(exc).__name__}: {exc}"[:80]] += 1
                if conn is not None:
                    conn[1].close()
                conn = None
                continue
            self._served(began)
            await asyncio.sleep(0.002)
        if conn is not None:
            conn[1].close()

    async def _twice(self, path: str) -> None:
        """A miss then a hit on one connection, the answers read whole."""
        reader, writer = await self.connect()
        try:
            for _ in range(2):
                writer.write(_get(path))
                await asyncio.wait_for(_response(reader), 15)
        finally:
            writer.close()

    async def paced(self, kind: str, per_second: float, make: Any) -> None:
        n = 0
        while self.running():
            began = time.monotonic()
            try:
                await make(n)
                self.counts[kind] += 1
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                self.counts[f"{kind} failed"] += 1
            n += 1
            await asyncio.sleep(max(0.0, 1 / per_second - (time.monotonic() - began)))

    async def long_target(self, n: int) -> None:
        await self._twice(f"/c/small/long-{n}-{time.monotonic_ns()}?q=" + "x" * 8000)

    async def identity_text(self, n: int) -> None:
        await self._twice(f"/c/text/{n}-{time.monotonic_ns()}")

    async def binary(self, n: int) -> None:
        await self._twice(f"/c/bin/{n}-{time.monotonic_ns()}")

    async def abandoned(self, n: int) -> None:
        _, writer = await self.connect()
        writer.write(_get(f"/c/slow/{n}-{time.monotonic_ns()}"))
        await writer.drain()
        writer.close()

    async def head_flood(self, n: int) -> None:
        path = f"/c/slow/head-{n}-{time.monotonic_ns()}"

        async def head() -> None:
            reader, writer = await self.connect()
            try:
                writer.write(f"HEAD {path} HTTP/1.1\r\nHost: soak\r\n\r\n".encode())
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
            finally:
                writer.close()

        await asyncio.gather(*(head() for _ in range(50)))

    async def stalled(self, n: int) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        _reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        writer.transport.pause_reading()
        writer.write(_get("/c/big"))
        for _ in range(100):
            await asyncio.sleep(0.1)
            if _peer_closed(sock):
                break
        writer.close()


async def adversarial(port: int, pid: int, seconds: float, clients: int) -> dict[str, float]:
    """One backend: the quiet run, then the attack; the numbers of one table row."""
    quiet = Adversary(port, seconds / 3, attack=False)
    await asyncio.gather(*(quiet.client(i) for i in range(clients)))
    attack = Adversary(port, seconds * 2 / 3, attack=True)
    rss: list[float] = []

    async def sample() -> None:
        while attack.running():
            rss.append(rss_mib(pid))
            await asyncio.sleep(0.5)

    tasks = [asyncio.create_task(attack.client(100 + i)) for i in range(clients)]
    tasks += [
        asyncio.create_task(attack.paced(kind, rate, make))
        for kind, rate, make in (
            ("long targets", 20, attack.long_target),
            ("identity 512 KiB", 10, attack.identity_text),
            ("1 MiB binaries", 10, attack.binary),
            ("abandoned slow GETs", 40, attack.abandoned),
            ("HEAD floods of 50", 1, attack.head_flood),
        )
    ]
    tasks += [asyncio.create_task(attack.paced("stalled readers", 2, attack.stalled))]
    tasks.append(asyncio.create_task(sample()))
    await asyncio.sleep(seconds * 2 / 3)
    await asyncio.gather(*tasks[:clients])
    for task in tasks[clients:]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    def p99(run: Soak) -> float:
        lat = sorted(lat for m in run.minutes for lat in m.latencies)
        return lat[int(len(lat) * 0.99) - 1] * 1000 if lat else float("nan")

    print("      attacks sent: " + ", ".join(f"{k} {v}" for k, v in attack.counts.items()))
    return {
        "quiet p99": p99(quiet),
        "attack p99": p99(attack),
        "served": sum(m.served for m in attack.minutes),
        "failed": sum(sum(m.errors.values()) for m in (*quiet.minutes, *attack.minutes)),
        "rss max": max(rss, default=0.0),
        "rss start": rss_mib(pid) if not rss else rss[0],
    }


def run_adversarial(seconds: float, clients: int) -> int:
    from cachegw import Gateway
    from cachegw._app import memory_budget

    origin = HostileOrigin().start()
    redis = RedisProcess().start()
    rows = []
    try:
        for backend in ("memory", redis.url):
            workdir = Path(tempfile.mkdtemp(prefix="cachegw-adversarial-"))
            config = workdir / "gateway.toml"
            config.write_text(ADVERSARIAL_TOML.format(backend=backend, upstream=origin.base))
            budget = sum(size for _, size in memory_budget(Gateway.from_toml(config))) / 2**20
            port = free_port()
            log = workdir / "gateway.log"
            with log.open("wb") as out:
                gateway = subprocess.Popen(
                    [sys.executable, "-m", "cachegw", "serve", str(config), "--port", str(port),
                     "--no-access-log"],
                    stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                )  # fmt: skip
            try:
                deadline = time.monotonic() + 20
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                        break
                    except OSError:
                        if gateway.poll() is not None or time.monotonic() > deadline:
                            print(log.read_text(), file=sys.stderr)
                            return 2
                        time.sleep(0.1)
                base_rss = rss_mib(gateway.pid)
                name = "memory" if backend == "memory" else "redis"
                print(f"{name}: {seconds:g} s, budget {budget:.0f} MiB", flush=True)
                row = asyncio.run(adversarial(port, gateway.pid, seconds, clients))
            finally:
                gateway.terminate()
                try:
                    gateway.wait(15)
                except subprocess.TimeoutExpired:
                    gateway.kill()
                    gateway.wait()
            traceback = "Traceback" in log.read_text(errors="replace")
            rows.append((name, budget, base_rss, row, traceback))
    finally:
        redis.close()
        origin.close()
    print(
        "| backend | budget + 64 MiB | RSS at start | RSS max | quiet p99 | attacked p99 "
        "| served | failed | verdict |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    failed = False
    for name, budget, base_rss, row, traceback in rows:
        ok = (
            row["rss max"] <= budget + 64
            and row["attack p99"] <= row["quiet p99"] + 50
            and row["failed"] == 0
            and not traceback
        )
        failed |= not ok
        print(
            f"| {name} | {budget + 64:.0f} MiB | {base_rss:.0f} MiB | {row['rss max']:.0f} MiB "
            f"| {row['quiet p99']:.1f} ms | {row['attack p99']:.1f} ms | {row['served']:.0f} "
            f"| {row['failed']:.0f} | {'PASS' if ok else 'FAIL'} |"
        )
    return 1 if failed else 0


class _Failure(Exception):
    pass


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: soak\r\n\r\n".encode()


def _upload() -> bytes:
    body = b"".join(b"400\r\n" + b"w" * 1024 + b"\r\n" for _ in range(UPLOAD // 1024))
    return (
        b"PUT /s/upload HTTP/1.1\r\nHost: soak\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body
        + b"0\r\n\r\n"
    )


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, body, headers.get("connection", "").lower() == "close"


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(65536), seconds)
    except TimeoutError:
        return False
    except OSError:
        return True
    while data:  # read to the end (a 408 then the close)
        try:
            data = await asyncio.wait_for(reader.read(65536), 1)
        except (TimeoutError, OSError):
            return True
    return True


def _peer_closed(sock: socket.socket) -> bool:
    # The peer's reset shows as an error on the socket without reading its data.
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0 or _rdhup(sock)


def _rdhup(sock: socket.socket) -> bool:
    import select

    poller = select.poll()
    poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return any(
        event & (select.POLLHUP | select.POLLERR | select.POLLRDHUP) for _, event in poller.poll(0)
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run(args: argparse.Namespace, port: int, pid: int, redis: RedisProcess) -> Soak:
    soak = Soak(port, args.minutes)
    rss: list[float] = []

    async def restarts() -> None:
        while soak.running():
            await asyncio.sleep(30)
            if not soak.running():
                return
            await asyncio.to_thread(redis.stop)
            soak.now.cut["redis restart"] += 1
            await asyncio.sleep(2)
            await asyncio.to_thread(redis.start)
            await asyncio.sleep(28)

    async def report() -> None:
        print(
            f"{'min':>3} {'served':>7} {'failed':>6} {'p99 ms':>8} {'RSS MiB':>8}  hostile cut",
            flush=True,
        )
        minute = 0
        while soak.running():
            await asyncio.sleep(min(60.0, max(0.0, soak.end - time.monotonic())) or 0.01)
            now = soak.minutes[minute] if minute < len(soak.minutes) else Minute()
            rss.append(rss_mib(pid))
            lat = sorted(now.latencies)
            p99 = lat[int(len(lat) * 0.99) - 1] * 1000 if lat else float("nan")
            cut = ", ".join(f"{k} {v}" for k, v in sorted(now.cut.items()))
            print(
                f"{minute + 1:>3} {now.served:>7} {sum(now.errors.values()):>6} {p99:>8.1f} "
                f"{rss[-1]:>8.1f}  {cut}",
                flush=True,
            )
            for error, count in now.errors.most_common(5):
                print(f"      failed: {count} x {error}", flush=True)
            minute += 1

    tasks = [asyncio.create_task(soak.client(i)) for i in range(args.clients)]
    tasks += [asyncio.create_task(soak.loris()) for _ in range(args.loris)]
    tasks += [asyncio.create_task(soak.silent()) for _ in range(args.silent)]
    tasks += [asyncio.create_task(soak.stalled_reader()) for _ in range(args.stalled)]
    tasks += [asyncio.create_task(soak.aborted_uploads()) for _ in range(2)]
    tasks.append(asyncio.create_task(restarts()))
    await report()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    soak.rss = rss  # type: ignore[attr-defined]
    return soak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=6, help="well-behaved clients")
    parser.add_argument("--loris", type=int, default=50, help="slow-loris connections")
    parser.add_argument("--silent", type=int, default=50, help="silent connections")
    parser.add_argument("--stalled", type=int, default=5, help="stalled readers")
    parser.add_argument(
        "--adversarial", type=float, metavar="SECONDS", help="run the adversarial phase instead"
    )
    args = parser.parse_args()
    if args.adversarial:
        return run_adversarial(args.adversarial, args.clients)

    origin = HostileOrigin().start()
    redis = RedisProcess().start()
    workdir = Path(tempfile.mkdtemp(prefix="cachegw-soak-"))
    config = workdir / "gateway.toml"
    config.write_text(TOML.format(redis=redis.url, upstream=origin.base))
    log = workdir / "gateway.log"
    port = free_port()
    with log.open("wb") as out:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "cachegw", "serve", str(config), "--port", str(port),
             "--no-access-log"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if gateway.poll() is not None or time.monotonic() > deadline:
                    print(log.read_text(), file=sys.stderr)
                    return 2
                time.sleep(0.1)
        print(
            f"soak: {args.minutes:g} min, {args.clients} well-behaved clients, {args.loris} "
            f"slow-loris, {args.silent} silent, {args.stalled} stalled readers, aborted "
            f"uploads, Redis restarted every minute; {os.cpu_count()} CPUs",
            flush=True,
        )
        soak = asyncio.run(run(args, port, gateway.pid, redis))
    finally:
        gateway.terminate()
        try:
            gateway.wait(15)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait()
        redis.close()
        origin.close()
    output = log.read_text(errors="replace")
    rss: list[float] = soak.rss  # type: ignore[attr-defined]
    served = sum(m.served for m in soak.minutes)
    failed = sum(sum(m.errors.values()) for m in soak.minutes)
    every = sorted(lat for m in soak.minutes for lat in m.latencies)
    complete = [size for outcome, size in origin.uploads if outcome == "complete"]
    aborted = sum(1 for outcome, _ in origin.uploads if outcome == "aborted")
    print(
        f"served {served} well-behaved requests, {failed} failed; p99 overall "
        f"{every[int(len(every) * 0.99) - 1] * 1000:.1f} ms"
        if every
        else "served nothing"
    )
    print(
        f"upstream: {origin.streams['cut']} large streams cut when their reader stalled, "
        f"{origin.streams['finished']} finished"
    )
    print(
        f"upstream saw {len(complete)} complete uploads (all {UPLOAD} bytes: "
        f"{all(size == UPLOAD for size in complete)}), {aborted} aborted ones"
    )
    problems = []
    if failed or not served:
        problems.append(f"{failed} well-behaved requests failed")
    if len(rss) >= 2 and rss[-1] > 1.2 * rss[0]:
        problems.append(f"RSS grew from {rss[0]:.1f} MiB (minute 1) to {rss[-1]:.1f} MiB")
    if any(size != UPLOAD for size in complete):
        problems.append("an aborted upload reached the upstream as complete")
    if "Traceback" in output:
        problems.append("the gateway logged a traceback:\n" + output[-3000:])
    if len(rss) >= 2:
        print(
            f"RSS after minute 1 {rss[0]:.1f} MiB, at the end {rss[-1]:.1f} MiB "
            f"({rss[-1] / rss[0]:.2f}x)"
        )
    for problem in problems:
        print(f"FAIL: {problem}")
    if not problems:
        print("PASS")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
