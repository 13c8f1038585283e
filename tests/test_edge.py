"""Behind a real edge (issue 25): redirects rewritten to the client's view, trusted front
proxies told apart by their socket address.

The upstreams are real servers (FastAPI, and the echo stub); the gateway runs under uvicorn
with cachegw's own protocol, so repeated requests are answered by the fast path too.
Front proxies are played by raw sockets bound to 127.0.0.1 (trusted) and 127.0.0.2 (not).
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import requests
from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse

from cachegw import Gateway, Service, create_app
from cachegw._errors import ConfigError, redact
from cachegw._proxies import TrustedProxies, front
from cachegw._server import uvicorn_options
from cachegw._upstream import public_location
from tests.gateway_process import GatewayProcess
from tests.redis_process import RedisProcess
from tests.servers import StubUpstream, run_uvicorn

ONE_ROUTE = (
    '[[services]]\nname = "a"\nupstream = "http://127.0.0.1:9"\n[[services.routes]]\npath = "/x"\n'
)
TRUSTED = "127.0.0.1"
UNTRUSTED = "127.0.0.2"


def exchange(base: str, head: str, *, source: str = TRUSTED) -> tuple[int, dict[str, str], bytes]:
    """Send the request head as written (``\\n`` becomes CRLF) from ``source``; read the
    whole answer (by its Content-Length)."""
    port = int(base.rsplit(":", 1)[1])
    data = head.strip("\n").replace("\n", "\r\n").encode("latin-1") + b"\r\n\r\n"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before the head: {answer!r}"
            answer += chunk
        top, _, body = answer.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed before the body's end"
            body += chunk
    return int(lines[0].split(" ", 2)[1]), headers, body


def get(base: str, path: str, *extra: str, host: str = "gw.example", source: str = TRUSTED) -> Any:
    return exchange(
        base, "\n".join([f"GET {path} HTTP/1.1", f"Host: {host}", *extra]), source=source
    )


@contextmanager
def serving(gateway: Gateway) -> Iterator[str]:
    with run_uvicorn(create_app(gateway), **uvicorn_options(lifespan="on")) as base:
        yield base


# --- redirects -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "base", "prefix", "expected"),
    [
        ("http://10.0.0.5:9001/items/", "http://10.0.0.5:9001", "/catalog", "/catalog/items/"),
        ("http://10.0.0.5:9001/items?a=1#f", "http://10.0.0.5:9001", "", "/items?a=1#f"),
        ("https://10.0.0.5:9001/x", "http://10.0.0.5:9001", "/c", "/c/x"),  # either scheme
        ("HTTP://API.internal/x", "http://api.internal:80", "/c", "/c/x"),  # default port
        ("http://10.0.0.5:9001", "http://10.0.0.5:9001", "/c", "/c/"),
        ("http://10.0.0.5:9001/api/v1/x", "http://10.0.0.5:9001/api", "/c", "/c/v1/x"),
        ("http://10.0.0.5:9001/api", "http://10.0.0.5:9001/api/", "/c", "/c/"),
        ("http://[::1]:9001/x", "http://[::1]:9001", "/c", "/c/x"),
        # Not the upstream's origin, or not below its base path: left alone.
        ("http://10.0.0.5:9002/x", "http://10.0.0.5:9001", "/c", None),
        ("https://10.0.0.5/x", "http://10.0.0.5", "/c", None),  # 443 is not 80
        ("http://example.com/x", "http://10.0.0.5:9001", "/c", None),
        ("http://10.0.0.5:9001/apix", "http://10.0.0.5:9001/api", "/c", None),
        ("/items/", "http://10.0.0.5:9001", "/c", None),  # already relative
        ("http://user@10.0.0.5:9001/x", "http://10.0.0.5:9001", "/c", None),
        ("ftp://10.0.0.5:9001/x", "http://10.0.0.5:9001", "/c", None),
        # Would read as another host (a network-path reference): never produced.
        ("http://10.0.0.5:9001//evil.example/x", "http://10.0.0.5:9001", "", None),
        ("http://10.0.0.5:9001/\\evil.example/x", "http://10.0.0.5:9001", "", None),
    ],
)
def test_public_location(location: str, base: str, prefix: str, expected: str | None) -> None:
    found = public_location(location.encode(), base.rstrip("/"), prefix)
    assert found == (expected.encode() if expected is not None else None)


def _fastapi_upstream() -> FastAPI:
    app = FastAPI()

    @app.get("/items/")
    async def items() -> dict[str, str]:
        return {"items": "all"}

    @app.get("/items/{item_id}", name="item")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @app.get("/old/{item_id}")
    async def old(item_id: int, request: Request) -> Response:
        # An absolute URL built from the request, as url_for does: the upstream's own
        # address, since the gateway sends the upstream its own Host.
        target = str(request.url_for("item", item_id=item_id))
        return RedirectResponse(target, status_code=301, headers={"cache-control": "max-age=60"})

    @app.post("/items/")
    async def create(request: Request) -> Response:
        where = str(request.url_for("item", item_id=7))
        return Response(status_code=201, headers={"location": where, "content-location": where})

    return app


def test_redirects_name_the_gateway_path_not_the_upstream(tmp_path: Any) -> None:
    with run_uvicorn(_fastapi_upstream()) as origin:
        catalog = Service("catalog", origin, prefix="/catalog", ttl=60)
        catalog.route("/{rest:path}")
        raw = Service("raw", origin, prefix="/raw", ttl=60, rewrite_redirects=False)
        raw.route("/{rest:path}")
        with serving(Gateway(services=[catalog, raw])) as base:
            # Starlette's trailing-slash redirect, built from the Host it got.
            status, headers, _ = get(base, "/catalog/items")
            assert status == 307
            assert headers["location"] == "/catalog/items/"
            status, headers, body = get(base, "/catalog/items/")
            assert status == 200 and json.loads(body) == {"items": "all"}

            # A stored redirect names no client's host: the entry is right for all of them.
            for host in ("a.example", "b.example:8443", "a.example"):
                status, headers, _ = get(base, "/catalog/old/3", host=host)
                assert status == 301
                assert headers["location"] == "/catalog/items/3"
            assert headers["x-cache-status"] == "HIT"

            status, headers, _ = exchange(
                base, "POST /catalog/items/ HTTP/1.1\nHost: gw.example\nContent-Length: 0"
            )
            assert status == 201
            assert headers["location"] == headers["content-location"] == "/catalog/items/7"

            # Turned off: the upstream's own URL passes as it is.
            status, headers, _ = get(base, "/raw/items")
            assert status == 307
            assert headers["location"] == f"{origin}/items/"


def test_rewrite_redirects_is_checked() -> None:
    with pytest.raises(ConfigError, match="rewrite_redirects of service 'x' must be true or false"):
        Service("x", "http://127.0.0.1:9", rewrite_redirects="yes")  # type: ignore[arg-type]


# --- trusted proxies -----------------------------------------------------------------


def test_front_reads_forwarding_headers_only_from_trusted_peers() -> None:
    trusted = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "::1"])
    headers = [
        (b"host", b"internal:8080"),
        (b"x-forwarded-for", b"203.0.113.7"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"api.example.com"),
    ]
    assert front("10.1.2.3", "http", headers, trusted).__repr__() == (
        "Front(scheme='https', host='api.example.com', forwarded_for='203.0.113.7, 10.1.2.3')"
    )
    assert front("::ffff:127.0.0.1", "http", headers, trusted).scheme == "https"
    for peer in ("11.0.0.1", "127.0.0.2", "", "not-an-address"):
        seen = front(peer, "http", headers, trusted)
        assert (seen.scheme, seen.host, seen.forwarded_for) == ("http", "internal:8080", peer)
    # No trusted proxies at all (the default): the same as an untrusted peer.
    assert front("127.0.0.1", "http", headers, TrustedProxies()).scheme == "http"
    # The last value counts (a proxy appends its own); invalid values are ignored.
    odd = [
        (b"host", b"h"),
        (b"x-forwarded-proto", b"https, http"),
        (b"x-forwarded-host", b"bad host/x"),
    ]
    seen = front("127.0.0.1", "https", odd, trusted)
    assert (seen.scheme, seen.host) == ("http", "h")
    seen = front("127.0.0.1", "https", [(b"x-forwarded-proto", b"gopher")], trusted)
    assert seen.scheme == "https"
    # Host is taken as it came, never split like a list.
    assert front("11.0.0.1", "http", [(b"host", b"evil.example, good.example")], trusted).host == (
        "evil.example, good.example"
    )


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "localhost", "", 5])
def test_trusted_proxies_are_checked(bad: object) -> None:
    with pytest.raises(ConfigError, match="trusted_proxies must be a list of IP addresses"):
        Gateway(trusted_proxies=[bad])  # type: ignore[list-item]


def test_trusted_proxies_in_the_file(tmp_path: Any) -> None:
    path = tmp_path / "gw.toml"
    route = ONE_ROUTE
    path.write_text(f'[server]\ntrusted_proxies = ["127.0.0.1", "10.0.0.0/8"]\n{route}')
    gateway = Gateway.from_toml(path)
    assert gateway.trusted.trusts("10.9.9.9") and not gateway.trusted.trusts("11.0.0.1")
    assert gateway.server.header_timeout == 10.0
    path.write_text(f'[server]\ntrusted_proxies = ["10.0.0.300"]\n{route}')
    with pytest.raises(ConfigError) as caught:
        Gateway.from_toml(path)
    assert str(caught.value).startswith(f"{path}: server.trusted_proxies must be a list of IP")
    assert "got ['10.0.0.300']" in str(caught.value)


def _seen(body: bytes) -> dict[str, str]:
    """The echo upstream's view of the request: its headers, lower-case names."""
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


def test_a_trusted_front_proxy_is_believed_and_others_are_not() -> None:
    stub = StubUpstream()
    with run_uvicorn(stub) as origin:
        open_svc = Service("open", origin, prefix="/open", ttl=60)
        open_svc.route("/{rest:path}")
        named = Service("named", origin, prefix="/named", ttl=60, hosts=["api.example.com"])
        named.route("/{rest:path}")
        gateway = Gateway(services=[open_svc, named], trusted_proxies=["127.0.0.1/32"])
        forwarded = (
            "X-Forwarded-For: 203.0.113.7",
            "X-Forwarded-Proto: https",
            "X-Forwarded-Host: api.example.com",
        )
        with serving(gateway) as base:
            # From the trusted proxy: its client's address, scheme and host.
            status, headers, body = get(base, "/open/a", *forwarded, host="internal:8080")
            assert status == 200
            seen = _seen(body)
            assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
            assert seen["x-forwarded-proto"] == "https"
            assert "x-forwarded-host" not in seen  # no hosts: no host is forwarded or keyed

            # From anyone else: dropped, the socket's own values instead; and since the
            # scheme is keyed, the https entry above is not served to this http request.
            status, headers, body = get(base, "/open/a", *forwarded, source=UNTRUSTED)
            seen = _seen(body)
            assert headers["x-cache-status"] == "MISS"
            assert seen["x-forwarded-for"] == "127.0.0.2"
            assert seen["x-forwarded-proto"] == "http"
            assert stub.hits["/a"] == 2
            # Each scheme has its own entry, on the fast path too.
            for _ in range(2):
                _, headers, body = get(base, "/open/a", *forwarded, host="internal:8080")
                assert headers["x-cache-status"] == "HIT"
                assert _seen(body)["x-forwarded-proto"] == "https"
                _, headers, body = get(base, "/open/a", source=UNTRUSTED)
                assert headers["x-cache-status"] == "HIT"
                assert _seen(body)["x-forwarded-proto"] == "http"
            assert stub.hits["/a"] == 2

            # A service with hosts: the forwarded host is checked, keyed and forwarded.
            status, headers, body = get(base, "/named/b", *forwarded, host="internal:8080")
            assert status == 200
            assert _seen(body)["x-forwarded-host"] == "api.example.com"
            # The same forwarded host from an untrusted peer is not believed: its Host is
            # none of the service's.
            status, _, _ = get(base, "/named/b", *forwarded, host="internal:8080", source=UNTRUSTED)
            assert status == 400
            # A trusted proxy forwarding a host the service does not serve: refused too.
            status, _, _ = get(
                base,
                "/named/b",
                "X-Forwarded-Host: evil.example",
                host="api.example.com",
            )
            assert status == 400
            assert stub.hits["/b"] == 1


# --- secrets -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        (
            "rediss://app:s3%40cr@r.example:6380/0?ssl_ca_certs=/ca.pem",
            "rediss://app:***@r.example:6380/0?ssl_ca_certs=/ca.pem",
        ),
        ("redis://:p@ss@h/0", "redis://:***@h/0"),  # an unencoded "@": to the last one
        (
            "from 'redis://:a@h/0' to 'redis://:b@h/0'",
            "from 'redis://:***@h/0' to 'redis://:***@h/0'",
        ),
        ("unix:///run/r.sock?db=0&password=pw", "unix:///run/r.sock?db=0&password=***"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://user@h/0", "redis://user@h/0"),
        ("ttl must be ≥ 0, got -5", "ttl must be ≥ 0, got -5"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_backend_url_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("CACHEGW_TEST_PW", "hunter2-env")
    monkeypatch.setenv("CACHEGW_TEST_URL", "redis://:hunter2-url@127.0.0.1:1/0")
    gateway = Gateway(backend="rediss://app:${CACHEGW_TEST_PW}@r.example:6380/0")
    assert gateway.backend == "rediss://app:hunter2-env@r.example:6380/0"
    assert "hunter2" not in repr(gateway) and "app:***@r.example" in repr(gateway)
    assert Gateway(backend="${CACHEGW_TEST_URL}").backend.endswith("hunter2-url@127.0.0.1:1/0")

    route = ONE_ROUTE
    path = tmp_path / "gw.toml"
    path.write_text(f'[cache]\nbackend = "redis://:${{CACHEGW_UNSET_PW}}@h/0"\n{route}')
    with pytest.raises(ConfigError) as caught:
        Gateway.from_toml(path)
    assert str(caught.value) == (
        f"{path}: cache.backend reads the environment variable CACHEGW_UNSET_PW, which is not set"
    )
    path.write_text(f'[cache]\nbackend = "redis://:${{BAD NAME}}@h/0"\n{route}')
    with pytest.raises(ConfigError, match=r"cache.backend has '\$\{BAD NAME\}', which is no"):
        Gateway.from_toml(path)
    # A bad URL read from the environment is reported without its password.
    monkeypatch.setenv("CACHEGW_TEST_URL", "redis://:hunter2-bad@127.0.0.1:notaport/0")
    path.write_text(f'[cache]\nbackend = "${{CACHEGW_TEST_URL}}"\n{route}')
    with pytest.raises(ConfigError) as caught:
        Gateway.from_toml(path)
    assert "cache.backend is not a valid Redis URL" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        Service("s", "http://user:hunter2-up@127.0.0.1:9")
    assert "hunter2" not in str(caught.value)


@pytest.mark.redis
def test_a_rotated_redis_password_never_appears_in_any_output(tmp_path: Any) -> None:
    """A real redis-server with an ACL user, a real `cachegw serve` reading the password
    from its environment, then a rotation the running gateway must refuse (the backend is
    fixed at start): the old and the new password appear in no log line, no admin API
    answer and no command's output."""
    old, new = "Old-pw-5f3a9c", "New-pw-81bd27"
    stub = StubUpstream()
    with RedisProcess() as redis_server, run_uvicorn(stub) as origin:
        with redis_server.client() as client:
            # The user docs/backends.md recommends: cachegw's keys, channels and commands.
            # resetchannels: Redis 6.2 starts a user with every channel and refuses a
            # channel pattern after that (Redis 7 starts with none).
            acl = "~cachegw* ~{cachegw* resetchannels &cachegw* &{cachegw*"
            acl += " +@read +@write +@keyspace +@scripting +@pubsub"
            client.execute_command(
                "ACL",
                "SETUSER",
                "app",
                "on",
                f">{old}",
                *acl.split(),
                "+@connection",
                "-@dangerous",
                "+info",  # fencing a restarted Redis (issue 23)
            )
        port = redis_server.port
        routes = (
            f'[[services]]\nname = "a"\nupstream = "{origin}"\nttl = 60\n'
            '[[services.routes]]\npath = "/{rest:path}"\n'
        )
        admin = '[admin]\ntoken_env = "CACHEGW_ADMIN_TOKEN"\n'
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'[cache]\nbackend = "redis://app:${{CACHEGW_REDIS_PASSWORD}}@127.0.0.1:{port}/0"\n'
            f"{admin}{routes}"
        )
        env = {"CACHEGW_REDIS_PASSWORD": old, "CACHEGW_ADMIN_TOKEN": "t0ken"}
        gateway = GatewayProcess(config, extra_env=env)
        outputs: list[str] = []
        gateway.start()
        try:
            for _ in range(2):
                answer = httpx.get(f"{gateway.base}/x", timeout=10)
            assert answer.headers["x-cache-status"] == "HIT"
            with redis_server.client() as client:
                assert client.dbsize() > 0  # the gateway stored it in Redis, as app
            purged = httpx.post(
                f"{gateway.base}/_cachegw/purge",
                json={"paths": ["/x"]},
                headers={"authorization": "Bearer t0ken"},
                timeout=30,
            )
            assert purged.status_code == 200
            answer = httpx.get(f"{gateway.base}/x", timeout=10)
            assert answer.headers["x-cache-status"] == "MISS"
            with redis_server.client() as client:
                assert client.acl_log() == []  # nothing the gateway sent was refused

            # The rotation: the file now names the new password (written in clear).
            config.write_text(
                f'[cache]\nbackend = "redis://app:{new}@127.0.0.1:{port}/0"\n{admin}{routes}'
            )
            refused = httpx.post(
                f"{gateway.base}/_cachegw/reload",
                headers={"authorization": "Bearer t0ken"},
                timeout=30,
            )
            assert refused.status_code == 422
            assert "cache.backend changed from 'redis://app:***@" in refused.text
            outputs.append(refused.text)
            for command in (["reload", str(config), "--url", gateway.base], ["check", str(config)]):
                done = subprocess.run(
                    [sys.executable, "-m", "cachegw", *command],
                    capture_output=True,
                    text=True,
                    env={**os.environ, **env},
                    timeout=60,
                )
                outputs.append(done.stdout + done.stderr)
            assert "the gateway refused the reload" in outputs[1]
            # A file with a bad backend: the error quotes the URL, without its password.
            config.write_text(
                f'[cache]\nbackend = "redis://app:{new}@127.0.0.1:notaport/0"\n{admin}{routes}'
            )
            done = subprocess.run(
                [sys.executable, "-m", "cachegw", "check", str(config)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 2 and "cache.backend is not a valid Redis URL" in done.stderr
            outputs.append(done.stdout + done.stderr)
        finally:
            outputs.append(gateway.stop())
        assert "reload of" in outputs[-1] and "rejected" in outputs[-1]  # the log line
        for output in outputs:
            assert old not in output and new not in output, output


# --- content codings -----------------------------------------------------------------

# A download worth resuming: compressible JSON, large enough to be stored gzip.
DOWNLOAD = json.dumps([{"id": i, "name": f"item {i}", "tags": ["a", "b"]} for i in range(3000)])
BODY = DOWNLOAD.encode()


def _member(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    return packer.compress(data) + packer.flush()


class Origin:
    """An upstream that answers per path as real ones do, honours If-None-Match with its
    own ETag, and records the conditional headers it gets."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        path = scope["path"]
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.seen.append((path, headers))
        gzip_ok = "gzip" in headers.get("accept-encoding", "")
        status, body = 200, BODY
        out = [(b"content-type", b"application/json")]
        if path == "/plain":  # identity; the gateway compresses it (its own "-gzip" ETag)
            out += [(b"etag", b'"v1"'), (b"cache-control", b"max-age=0")]
            if headers.get("if-none-match") == '"v1"':
                status, body = 304, b""
        elif path == "/zipped" and gzip_ok:  # the upstream compresses (nginx's gzip on)
            out += [(b"content-encoding", b"gzip"), (b"vary", b"Accept-Encoding")]
            body = _member(BODY)
        elif path == "/members" and gzip_ok:  # valid gzip, two members, no Vary
            out += [(b"content-encoding", b"gzip")]
            body = _member(BODY[:5000]) + _member(BODY[5000:])
        elif path == "/bomb" and gzip_ok:  # inflates past the route's max_body, no Vary
            out += [(b"content-encoding", b"gzip")]
            body = _member(b" " * 300_000)
        elif path == "/unquoted":
            out += [(b"etag", b"abc123")]  # fresh for the route's ttl
            if headers.get("if-none-match") == "abc123":
                status, body = 304, b""
        out.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": body})


@contextmanager
def coded_gateway() -> Iterator[tuple[str, Origin]]:
    origin = Origin()
    with run_uvicorn(origin) as upstream:
        svc = Service("dl", upstream, prefix="/dl", ttl=60, max_body="200KiB")
        svc.route("/{rest:path}")
        with serving(Gateway(services=[svc])) as base:
            yield base, origin


@pytest.mark.parametrize("path", ["/dl/plain", "/dl/zipped"])
def test_real_clients_resume_a_ranged_download_of_a_gzip_entry(path: str) -> None:
    with coded_gateway() as (base, _):
        with httpx.Client(base_url=base, timeout=10) as client:
            whole = client.get(path)  # httpx asks for gzip and decodes it
            assert whole.headers["content-encoding"] == "gzip"
            assert whole.content == BODY
            # Interrupted after 10,000 decoded bytes; each client resumes from there.
            resumed = client.get(path, headers={"range": "bytes=10000-"})
            assert resumed.status_code == 206
            assert "content-encoding" not in resumed.headers
            assert resumed.headers["content-range"] == f"bytes 10000-{len(BODY) - 1}/{len(BODY)}"
            assert BODY[:10000] + resumed.content == BODY
            # If-Range with the identity form's validator (what a resumed 206 carried).
            again = client.get(
                path, headers={"range": "bytes=20000-", "if-range": resumed.headers["etag"]}
            )
            assert again.status_code == 206 and again.content == BODY[20000:]
        with requests.Session() as session:  # requests asks for gzip, deflate (and more)
            part = session.get(f"{base}{path}", headers={"Range": "bytes=-500"}, timeout=10)
            assert part.status_code == 206
            assert part.content == BODY[-500:]
            assert session.get(f"{base}{path}", timeout=10).content == BODY


@pytest.mark.parametrize(
    ("path", "inflated"), [("/dl/members", BODY), ("/dl/bomb", b" " * 300_000)]
)
def test_a_coding_the_gateway_cannot_verify_is_not_served_to_others(
    path: str, inflated: bytes
) -> None:
    with coded_gateway() as (base, origin):
        for _ in range(2):  # a miss, then a hit of the entry stored for gzip clients
            _, zipped, body = get(base, path, "Accept-Encoding: gzip")
            assert zipped["content-encoding"] == "gzip"
            assert gzip.decompress(body) == inflated
        assert zipped["x-cache-status"] == "HIT"
        assert "accept-encoding" in zipped["vary"].lower()
        # A client that did not accept gzip never gets that entry.
        for _ in range(2):
            status, headers, body = get(base, path)
            assert status == 200
            assert "content-encoding" not in headers
            assert body == BODY  # the upstream's answer without gzip
        assert len([p for p, _ in origin.seen if p == path[3:]]) >= 2
        # A range of such an entry is the identity range, or the full answer: never a
        # part of a gzip stream.
        status, headers, body = get(base, path, "Accept-Encoding: gzip", "Range: bytes=0-9")
        assert (status, body) == (206, BODY[:10]) or (
            status == 200 and "content-range" not in headers
        )


def test_revalidation_sends_the_upstreams_own_validator() -> None:
    with coded_gateway() as (base, origin):
        statuses = []
        for accept in ("gzip", "gzip", "identity", "identity"):
            status, headers, body = get(base, "/dl/plain", f"Accept-Encoding: {accept}")
            assert status == 200
            statuses.append(headers["x-cache-status"])
            if accept == "gzip":
                assert headers["etag"] == '"v1-gzip"'  # the form the gateway compressed
                body = gzip.decompress(body)
            assert body == BODY
        # The stale entry is revalidated with the upstream's own "v1" (never the
        # gateway's "v1-gzip"), and the upstream's 304 refreshes it.
        assert statuses[1] == statuses[3] == "EXPIRED"
        conditionals = [h.get("if-none-match") for p, h in origin.seen if p == "/plain"]
        assert len(conditionals) == 4
        assert [c for c in conditionals if c is not None] == ['"v1"', '"v1"']


def test_an_unquoted_etag_is_treated_as_absent() -> None:
    with coded_gateway() as (base, origin):
        _, zipped, _ = get(base, "/dl/unquoted", "Accept-Encoding: gzip")
        _, plain, body = get(base, "/dl/unquoted")
        assert body == BODY
        assert "abc123" not in zipped["etag"] and "abc123" not in plain["etag"]
        assert zipped["etag"] != plain["etag"]  # each form its own, as with any ETag
        # The gzip form's ETag does not validate the identity form.
        status, _, body = get(base, "/dl/unquoted", f"If-None-Match: {zipped['etag']}")
        assert status == 200 and body == BODY
        status, _, _ = get(
            base, "/dl/unquoted", "Accept-Encoding: gzip", f"If-None-Match: {zipped['etag']}"
        )
        assert status == 304
        assert all(h.get("if-none-match") != "abc123" for _, h in origin.seen)


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (b'"abc"', True),
        (b'W/"abc"', True),
        (b'""', True),
        (b"abc", False),
        (b'"a"b"', False),
        (b'w/"abc"', False),
        (b'"abc', False),
    ],
)
def test_valid_etag(value: bytes, valid: bool) -> None:
    from cachegw._encoding import valid_etag

    assert valid_etag(value) is valid
