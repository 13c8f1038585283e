"""Upstream transport throughput: httpx default (httpcore) vs aiohttp-based transports vs
cachegw's `Upstream` (its own aiohttp pool, what the gateway forwards with).

50 concurrent GETs of a 1 KiB body from a local uvicorn upstream, a few seconds per
transport, same process, same run. Prints req/s side by side.

    .venv/bin/python tests/bench/upstream_transport.py [seconds]
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import httpx

from cachegw._upstream import Upstream

CONCURRENCY = 50
APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"1024")]})
    await send({"type": "http.response.body", "body": b"x" * 1024})
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _run(get: Callable[[], Awaitable[None]], seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await get()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done / (time.perf_counter() - start)


def main(seconds: float) -> None:
    port = _free_port()
    here = os.path.dirname(os.path.abspath(__file__))
    app_file = os.path.join(here, "_bench_upstream_app.py")
    with open(app_file, "w") as f:
        f.write(APP)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "_bench_upstream_app:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--http",
            "httptools",
            "--loop",
            "uvloop",
        ],
        env={**os.environ, "PYTHONPATH": here},
    )
    try:
        asyncio.run(_measure(f"http://127.0.0.1:{port}/", port, seconds))
    finally:
        proc.terminate()
        proc.wait()
        os.unlink(app_file)


async def _measure(url: str, port: int, seconds: float) -> None:
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                break
        except OSError:
            await asyncio.sleep(0.05)
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    results: dict[str, float] = {}
    transports: list[tuple[str, httpx.AsyncBaseTransport]] = [
        ("httpx default (httpcore)", httpx.AsyncHTTPTransport(limits=limits))
    ]
    try:  # httpx-aiohttp is not a dependency: its row only when it is installed
        from httpx_aiohttp import AiohttpTransport

        transports.append(("httpx + AiohttpTransport", AiohttpTransport(limits=limits)))
    except ImportError:
        pass
    for name, transport in transports:
        async with httpx.AsyncClient(transport=transport, trust_env=False) as client:

            async def get(client: httpx.AsyncClient = client) -> None:
                r = await client.get(url)
                assert r.status_code == 200 and len(r.content) == 1024

            await _run(get, 0.5)  # warm the pool
            results[name] = await _run(get, seconds)
    upstream = Upstream(url, timeout=10)

    async def fetch() -> None:
        fetched = await upstream.fetch("GET", "/", b"", [], None, max_body=1 << 20)
        assert fetched.status == 200 and fetched.body is not None and len(fetched.body) == 1024

    try:
        await _run(fetch, 0.5)
        results["cachegw Upstream.fetch"] = await _run(fetch, seconds)
    finally:
        await upstream.aclose()
    base = results["httpx default (httpcore)"]
    for name, rps in results.items():
        print(f"{name:28s} {rps:8.0f} req/s  x{rps / base:.2f}")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 4.0)
