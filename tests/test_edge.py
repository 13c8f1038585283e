"""Behind a real edge (issue 25): redirects rewritten to the client's view, trusted front
proxies told apart by their socket address.

The upstreams are real servers (FastAPI, and the echo stub); the gateway runs under uvicorn
with cachegw's own protocol, so repeated requests are answered by the fast path too.
Front proxies are played by raw sockets bound to 127.0.0.1 (trusted) and 127.0.0.2 (not).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse

from cachegw import Gateway, Service, create_app
from cachegw._errors import ConfigError
from cachegw._proxies import TrustedProxies, front
from cachegw._server import uvicorn_options
from cachegw._upstream import public_location
from tests.servers import StubUpstream, run_uvicorn

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


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "localhost", "", 5])
def test_trusted_proxies_are_checked(bad: object) -> None:
    with pytest.raises(ConfigError, match="trusted_proxies must be a list of IP addresses"):
        Gateway(trusted_proxies=[bad])  # type: ignore[list-item]


def test_trusted_proxies_in_the_file(tmp_path: Any) -> None:
    path = tmp_path / "gw.toml"
    route = (
        '[[services]]\nname = "a"\nupstream = "http://127.0.0.1:9"\n'
        '[[services.routes]]\npath = "/x"\n'
    )
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
