"""Compression (issue 17): entries held within one ``max_bytes``, and the gzip-accepting HIT path.

1. **Entries held.** The real `CacheEngine` over ``MemoryBackend(max_bytes=...)`` stores
   ``--keys`` distinct JSON API bodies of a few KiB (seeded: pages of 3-10 repository
   records shaped like GitHub's ``/users/{user}/repos``, 2-8 KiB each), once with
   compression off (cachegw before issue 17) and once with the gateway's default
   (``compress_min`` 1 KiB). It reports the entries each backend holds at the end and their
   ratio. Target: at least 4x.
2. **HIT path.** Two ``cachegw serve`` processes from TOML files (memory backend, the same
   route; ``compress = false`` and the default), each one uvicorn worker pinned to CPU 0, in
   front of one upstream (CPU 1) answering a ~5 KiB JSON with ``max-age=3600``. wrk (1
   thread, keep-alive, CPU 1) asks for it with ``Accept-Encoding: gzip`` (what browsers and
   most HTTP libraries send) and without (curl's default, for information); rounds are
   interleaved and medians reported. Target: the gzip client's req/s with compression on at
   least that with compression off (ratio ≥ 1.0). Every answer is checked first: ``HIT``,
   the right ``Content-Encoding``, the same JSON once decoded.

    .venv/bin/python tests/bench/compression.py [--keys 20000] [--max-bytes 16MiB]
        [--seconds 5] [--rounds 3] [--connections 50] [--no-wrk] [--json FILE]

On a shared machine absolute numbers are noisy; the ratios are measured side by side in
one run. Exit status: 0 when both targets are met, 1 when one is missed, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _harness import (  # noqa: E402
    SetupError,
    free_port,
    http_get,
    pin,
    spawn,
    terminate,
    uvicorn_command,
    wait_listening,
)

SERVER_CPU, CLIENT_CPU = 0, 1
TARGET_ENTRIES = 4.0
TARGET_HIT = 1.0
_WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
]


def api_body(rng: random.Random, records: tuple[int, int] = (3, 10)) -> bytes:
    """A JSON API answer of a few KiB: a page of repository records shaped like GitHub's
    ``GET /users/{user}/repos`` (nested owner, URLs, timestamps, counters, flags)."""
    login = f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}{rng.randint(1, 999)}"
    owner_id = rng.randint(10**5, 10**8)
    base = "https://api.example.com"
    repos = []
    for _ in range(rng.randint(*records)):
        name = f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"
        rid = rng.randint(10**6, 10**9)
        repos.append(
            {
                "id": rid,
                "name": name,
                "full_name": f"{login}/{name}",
                "private": False,
                "owner": {
                    "login": login,
                    "id": owner_id,
                    "avatar_url": f"https://avatars.example.com/u/{owner_id}?v=4",
                    "url": f"{base}/users/{login}",
                    "html_url": f"https://example.com/{login}",
                    "repos_url": f"{base}/users/{login}/repos",
                    "type": "User",
                    "site_admin": False,
                },
                "html_url": f"https://example.com/{login}/{name}",
                "description": " ".join(rng.sample(_WORDS, rng.randint(3, 8))).capitalize(),
                "fork": rng.random() < 0.2,
                "url": f"{base}/repos/{login}/{name}",
                "issues_url": f"{base}/repos/{login}/{name}/issues{{/number}}",
                "pulls_url": f"{base}/repos/{login}/{name}/pulls{{/number}}",
                "created_at": f"20{rng.randint(15, 26)}-{rng.randint(1, 12):02d}-"
                f"{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
                f"{rng.randint(0, 59):02d}Z",
                "updated_at": f"2026-{rng.randint(1, 11):02d}-{rng.randint(1, 28):02d}T"
                f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z",
                "size": rng.randint(10, 90000),
                "stargazers_count": rng.randint(0, 5000),
                "watchers_count": rng.randint(0, 5000),
                "language": rng.choice(["Python", "Go", "Rust", "TypeScript", None]),
                "has_issues": True,
                "has_wiki": rng.random() < 0.5,
                "archived": False,
                "license": {"key": "mit", "name": "MIT License", "spdx_id": "MIT"},
                "topics": rng.sample(_WORDS, rng.randint(0, 4)),
                "visibility": "public",
                "default_branch": "main",
            }
        )
    return json.dumps(repos, separators=(",", ":")).encode()


# -- 1. entries held ----------------------------------------------------------------------


async def fill(
    keys: int, max_bytes: int, compress_min: int | None, records: tuple[int, int]
) -> dict[str, int]:
    from cachegw import MemoryBackend
    from cachegw._engine import CacheEngine
    from cachegw._models import Fetched, RequestInfo
    from cachegw._policy import CachePolicy

    backend = MemoryBackend(max_entries=10 * keys, max_bytes=max_bytes)
    engine = CacheEngine(backend, compress_min=compress_min)
    policy = CachePolicy(ttl=3600)
    rng = random.Random(17)
    body_bytes = 0
    for n in range(keys):
        body = api_body(rng, records)
        body_bytes += len(body)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"max-age=3600"),
        ]

        async def fetch(
            validators: Any = (), body: bytes = body, headers: Any = headers
        ) -> Fetched:
            return Fetched(200, list(headers), body, response_time=time.time())

        # A key shaped like the gateway's (``cachegw:<sha256 hex>``, 72 bytes).
        key = "cachegw:" + hashlib.sha256(n.to_bytes(8, "little")).hexdigest()
        request = RequestInfo(method="GET", key=key, headers={})
        await engine.serve(request, policy, fetch)
    stats = backend.stats()
    stats["mean_body"] = body_bytes // keys
    return stats


# -- 2. the HIT path ----------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

HIT_BODY = api_body(random.Random(4), (5, 5))  # ~5 KiB


def upstream() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """uvicorn factory: the origin, one JSON answer with max-age=3600 for every path."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(HIT_BODY)).encode()),
        (b"cache-control", b"max-age=3600"),
    ]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].replace("lifespan.", "")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": HIT_BODY})

    return app


TOML = """
[cache]
backend = "memory"
prefix = "bench"
{extra}

[[services]]
name = "api"
upstream = "http://127.0.0.1:{port}"
prefix = ""

  [[services.routes]]
  path = "/{{rest:path}}"
  ttl = 3600
"""

_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")


def wrk(wrk_path: str, url: str, seconds: float, connections: int, gzip_client: bool) -> float:
    args = [wrk_path, "-t1", f"-c{connections}", "--timeout", "5s"]
    if gzip_client:
        args += ["-H", "Accept-Encoding: gzip"]
    subprocess.run([*args, "-d1s", url], check=True, capture_output=True)  # warm-up
    out = subprocess.run(
        [*args, f"-d{max(1, round(seconds))}s", url], check=True, capture_output=True, text=True
    ).stdout
    found = _RPS.search(out)
    if found is None or "Non-2xx" in out:
        raise SetupError(f"wrk failed on {url}:\n{out}")
    return float(found.group(1))


def check(port: int, gzip_client: bool, compress: bool) -> None:
    """Two answers, the second a HIT, with the encoding this client and gateway imply."""
    import http.client

    for attempt in range(2):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        headers = {"Accept-Encoding": "gzip"} if gzip_client else {"Accept-Encoding": "identity"}
        conn.request("GET", "/users", headers=headers)
        response = conn.getresponse()
        body = response.read()
        conn.close()
        encoding = response.getheader("content-encoding")
        if encoding == "gzip":
            body = gzip.decompress(body)
        if body != HIT_BODY or response.status != 200:
            raise SetupError(f"port {port}: wrong answer {response.status}")
        if (encoding == "gzip") != (gzip_client and compress):
            raise SetupError(f"port {port}: Content-Encoding {encoding!r} is not expected")
        if attempt == 1 and response.getheader("x-cache-status") != "HIT":
            raise SetupError(f"port {port}: second answer is not a HIT")


def hit_path(args: argparse.Namespace, wrk_path: str) -> dict[str, Any]:
    pin(0, CLIENT_CPU)
    up_port = free_port()
    procs = []
    try:
        origin = spawn(uvicorn_command("compression:upstream", up_port), CLIENT_CPU)
        procs.append(origin)
        wait_listening(origin, up_port, "upstream")
        gateways = {}
        tmp = Path(tempfile.mkdtemp(prefix="cachegw-bench-"))
        for name, extra in (("off", "compress = false"), ("on", "")):
            config = tmp / f"{name}.toml"
            config.write_text(TOML.format(extra=extra, port=up_port))
            port = free_port()
            command = [sys.executable, "-m", "cachegw", "serve", str(config), "--port", str(port)]
            proc = spawn(command, SERVER_CPU)
            procs.append(proc)
            wait_listening(proc, port, f"gateway ({name})")
            gateways[name] = port
        for name, port in gateways.items():
            for gzip_client in (True, False):
                check(port, gzip_client, compress=name == "on")
        rows: dict[str, list[float]] = {}
        for round_no in range(args.rounds):
            order = list(gateways.items())
            if round_no % 2:
                order.reverse()
            for name, port in order:
                for gzip_client in (True, False):
                    label = f"{name}/{'gzip' if gzip_client else 'identity'}"
                    url = f"http://127.0.0.1:{port}/users"
                    rps = wrk(wrk_path, url, args.seconds, args.connections, gzip_client)
                    rows.setdefault(label, []).append(rps)
                    print(f"  round {round_no + 1}: {label:14} {rps:10.0f} req/s", flush=True)
        medians = {label: statistics.median(v) for label, v in rows.items()}
        status, _, _ = http_get(gateways["on"], "/_cachegw/health")
        if status != 200:
            raise SetupError("gateway health check failed after the run")
        return {"body_bytes": len(HIT_BODY), "rps": medians, "runs": rows}
    finally:
        for proc in reversed(procs):
            terminate(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=20000)
    parser.add_argument("--max-bytes", default="16MiB")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--records", default="3-10", help="records per JSON body, LO-HI (~0.7 KiB each)"
    )
    parser.add_argument("--no-wrk", action="store_true", help="only the entries-held part")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from cachegw._backends._memory import parse_size

    max_bytes = parse_size(args.max_bytes, what="--max-bytes")
    result: dict[str, Any] = {}
    ok = True
    try:
        lo, _, hi = args.records.partition("-")
        records = (int(lo), int(hi or lo))
        off = asyncio.run(fill(args.keys, max_bytes, None, records))
        on = asyncio.run(fill(args.keys, max_bytes, 1024, records))
        ratio = on["entries"] / max(1, off["entries"])
        result["entries"] = {"off": off, "on": on, "ratio": ratio}
        print(
            f"JSON bodies: mean {off['mean_body']} bytes, {args.keys} keys, max_bytes {max_bytes}"
        )
        print(
            f"entries held: compression off {off['entries']}, on {on['entries']}: "
            f"{ratio:.2f}x (target >= {TARGET_ENTRIES}x) "
            f"{'PASS' if ratio >= TARGET_ENTRIES else 'FAIL'}"
        )
        ok &= ratio >= TARGET_ENTRIES
        wrk_path = shutil.which("wrk")
        if args.no_wrk:
            pass
        elif wrk_path is None:
            print("HIT path: skipped, wrk is not installed")
        else:
            print(f"HIT path ({len(HIT_BODY)}-byte JSON), {args.rounds} rounds x {args.seconds} s:")
            hits = hit_path(args, wrk_path)
            result["hit"] = hits
            rps = hits["rps"]
            gz = rps["on/gzip"] / rps["off/gzip"]
            plain = rps["on/identity"] / rps["off/identity"]
            for label, value in rps.items():
                print(f"  median {label:14} {value:10.0f} req/s")
            print(
                f"gzip client, on/off: {gz:.2f}x (target >= {TARGET_HIT}x) "
                f"{'PASS' if gz >= TARGET_HIT else 'FAIL'}; identity client, on/off: "
                f"{plain:.2f}x (information)"
            )
            result["hit"]["ratios"] = {"gzip": gz, "identity": plain}
            ok &= gz >= TARGET_HIT
    except SetupError as exc:
        print(f"setup error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
