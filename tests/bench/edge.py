"""The whole chain behind a real edge: client → nginx (TLS) → `cachegw serve` → FastAPI.

nginx terminates TLS with a self-signed certificate this script makes with ``openssl`` and
forwards to a real `cachegw serve` process that lists nginx in ``trusted_proxies``; the
upstream is a FastAPI app under uvicorn that trusts the gateway's forwarding headers
(``--proxy-headers``), as deployed. The script checks, with real clients (httpx, requests,
curl) over https:

* redirects: Starlette's trailing-slash redirect and a ``url_for`` redirect name the path
  the client uses (``/catalog/...``), not the upstream's internal address;
* forwarded headers: the app sees the client's address chain, ``https`` and the public
  host, and an https entry is not served to a plain-http client of the gateway;
* a ranged gzip download: the whole body gzip, then a resumed range, decoded by httpx,
  requests and ``curl --compressed -r``.

Prints one line per check and exits 1 if any fails. Needs nginx (``apt-get install -y
nginx``) and openssl on ``PATH``.

    .venv/bin/python tests/bench/edge.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import requests
from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.gateway_process import GatewayProcess  # noqa: E402
from tests.servers import free_port, run_uvicorn  # noqa: E402

# Below the route's max_body (1 MiB), so it is stored: ~440 KB of JSON, ~50 KB gzip.
EXPORT = json.dumps([{"id": i, "name": f"item {i}", "tags": ["x", "y"]} for i in range(8_000)])


def upstream_app() -> FastAPI:
    app = FastAPI()

    @app.get("/items/")
    async def items() -> dict[str, int]:
        return {"count": 3}

    @app.get("/items/{item_id}", name="item")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @app.get("/legacy/{item_id}")
    async def legacy(item_id: int, request: Request) -> Response:
        return RedirectResponse(str(request.url_for("item", item_id=item_id)), status_code=301)

    @app.get("/whoami")
    async def whoami(request: Request) -> dict[str, Any]:
        return {
            "x-forwarded-for": request.headers.get("x-forwarded-for"),
            "x-forwarded-proto": request.headers.get("x-forwarded-proto"),
            "x-forwarded-host": request.headers.get("x-forwarded-host"),
            "url": str(request.url),
        }

    @app.get("/export")
    async def export() -> Response:
        return Response(EXPORT, media_type="application/json")

    return app


def certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


NGINX = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://127.0.0.1:{gateway};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
        }}
    }}
}}
"""


@contextmanager
def nginx(directory: Path, port: int, gateway: int, cert: Path, key: Path) -> Iterator[str]:
    conf = directory / "nginx.conf"
    conf.write_text(NGINX.format(dir=directory, port=port, gateway=gateway, cert=cert, key=key))
    proc = subprocess.Popen(
        ["nginx", "-p", str(directory), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"https://localhost:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(f"{base}/_cachegw/health", verify=str(cert), timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"nginx did not start: {proc.stderr.read() if proc.stderr else ''!r}"
                    ) from None
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


class Checks:
    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, name: str, check: Callable[[], str]) -> None:
        began = time.perf_counter()
        try:
            detail = check()
            verdict = "ok  "
        except Exception as exc:  # reported, then the next check runs
            detail = f"{type(exc).__name__}: {exc}"
            verdict = "FAIL"
            self.failed += 1
        took = (time.perf_counter() - began) * 1000
        print(f"{verdict} {name:<58} {took:7.1f} ms  {detail}")


def main() -> int:
    for tool in ("nginx", "openssl", "curl"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install -y {tool})")
            return 1
    checks = Checks()
    with tempfile.TemporaryDirectory(prefix="cachegw-edge-") as tmp:
        directory = Path(tmp)
        cert, key = certificate(directory)
        # The upstream trusts the gateway's X-Forwarded-Proto, as a FastAPI app behind a
        # proxy is run: its url_for then says https://<its own address>/...
        with run_uvicorn(
            upstream_app(), proxy_headers=True, forwarded_allow_ips="127.0.0.1"
        ) as origin:
            config = directory / "gateway.toml"
            config.write_text(
                '[server]\ntrusted_proxies = ["127.0.0.1"]\n\n'
                f'[[services]]\nname = "catalog"\nupstream = "{origin}"\nprefix = "/catalog"\n'
                'hosts = ["localhost"]\nttl = 60\n\n'
                '  [[services.routes]]\n  path = "/{rest:path}"\n'
            )
            gateway = GatewayProcess(config, args=["--no-access-log"])
            gateway.start(timeout=60)
            try:
                with nginx(directory, free_port(), gateway.port, cert, key) as edge:
                    run_checks(checks, edge, gateway.base, cert, origin)
            finally:
                output = gateway.stop()
            if "Traceback" in output:
                print(output)
                checks.failed += 1
    print(f"\n{'all checks passed' if not checks.failed else f'{checks.failed} check(s) FAILED'}")
    return 1 if checks.failed else 0


def run_checks(checks: Checks, edge: str, direct: str, cert: Path, origin: str) -> None:
    # The client's own address: 127.0.0.3, so each hop's address is told apart.
    client = httpx.Client(
        base_url=edge,
        verify=str(cert),
        timeout=10,
        transport=httpx.HTTPTransport(verify=str(cert), local_address="127.0.0.3"),
    )
    internal = origin.removeprefix("http://")

    def trailing_slash() -> str:
        answer = client.get("/catalog/items")
        location = answer.headers["location"]
        assert answer.status_code == 307 and location == "/catalog/items/", (answer, location)
        followed = client.get("/catalog/items", follow_redirects=True)
        assert followed.status_code == 200 and followed.json() == {"count": 3}
        assert str(followed.url) == f"{edge}/catalog/items/"
        return f"Location: {location} -> {followed.url}"

    def url_for() -> str:
        for _ in range(2):  # a miss, then the stored redirect
            answer = client.get("/catalog/legacy/7")
            location = answer.headers["location"]
            assert answer.status_code == 301 and location == "/catalog/items/7", location
            assert internal not in location
        assert answer.headers["x-cache-status"] == "HIT"
        # What the app itself answers the gateway (same forwarding headers, its own Host).
        said = httpx.get(
            f"{origin}/legacy/7",
            headers={"x-forwarded-proto": "https", "x-forwarded-for": "127.0.0.1"},
        ).headers["location"]
        return f"upstream said {said}, client got {location} (HIT on the 2nd)"

    def forwarded() -> str:
        seen = client.get("/catalog/whoami", headers={"x-forwarded-for": "203.0.113.9"}).json()
        # nginx appends the client's address to what it sent; the gateway appends nginx's.
        assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.3, 127.0.0.1", seen
        assert seen["x-forwarded-proto"] == "https", seen
        assert seen["x-forwarded-host"] == "localhost", seen
        return (
            f"XFF {seen['x-forwarded-for']!r}, proto {seen['x-forwarded-proto']}, "
            f"host {seen['x-forwarded-host']}"
        )

    def not_trusted() -> str:
        # Straight to the gateway (http, 127.0.0.2, not a trusted proxy), with forged
        # headers: dropped, and the https entry above is not this request's.
        with httpx.Client(
            transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=10
        ) as plain:
            answer = plain.get(
                f"{direct}/catalog/whoami",
                headers={
                    "host": "localhost",
                    "x-forwarded-proto": "https",
                    "x-forwarded-for": "203.0.113.9",
                },
            )
        seen = answer.json()
        assert seen["x-forwarded-for"] == "127.0.0.2" and seen["x-forwarded-proto"] == "http"
        assert answer.headers["x-cache-status"] == "MISS"
        return f"XFF {seen['x-forwarded-for']!r}, proto {seen['x-forwarded-proto']}, MISS"

    body = EXPORT.encode()

    def ranged_httpx() -> str:
        whole = client.get("/catalog/export")
        assert whole.headers["content-encoding"] == "gzip" and whole.content == body
        wire = int(whole.headers["content-length"])
        part = client.get("/catalog/export", headers={"range": "bytes=100000-"})
        assert part.status_code == 206 and "content-encoding" not in part.headers
        assert body[:100000] + part.content == body
        return f"{len(body)} B ({wire} B gzip), resumed at 100000: identical"

    def ranged_requests() -> str:
        with requests.Session() as session:
            part = session.get(
                f"{edge}/catalog/export", headers={"Range": "bytes=-1000"}, verify=str(cert)
            )
        assert part.status_code == 206 and part.content == body[-1000:], part.status_code
        return f"206, {part.headers['content-range']}"

    def ranged_curl() -> str:
        out = subprocess.run(
            ["curl", "-s", "--cacert", str(cert), "--compressed", "-r", "5000-",
             f"{edge}/catalog/export"],
            capture_output=True,
            check=True,
        ).stdout  # fmt: skip
        assert out == body[5000:], len(out)
        return f"curl --compressed -r 5000-: {len(out)} B, identical"

    def gzip_hit() -> str:
        answer = client.get("/catalog/export", headers={"accept-encoding": "gzip"})
        assert answer.headers["x-cache-status"] == "HIT"
        assert answer.content == body  # httpx decoded it
        return f"HIT, {answer.headers['content-length']} B gzip for {len(body)} B"

    for name, check in (
        ("redirect: trailing slash (Starlette)", trailing_slash),
        ("redirect: url_for behind --proxy-headers, stored", url_for),
        ("forwarded headers from nginx (trusted)", forwarded),
        ("forwarded headers from an untrusted peer", not_trusted),
        ("ranged gzip download resumed: httpx", ranged_httpx),
        ("ranged gzip download resumed: requests", ranged_requests),
        ("ranged gzip download resumed: curl", ranged_curl),
        ("the gzip entry is a hit through nginx", gzip_hit),
    ):
        checks(name, check)
    client.close()


if __name__ == "__main__":
    sys.exit(main())
