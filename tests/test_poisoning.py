"""Keyed or dropped (issue 10): no request input reaches the upstream unkeyed.

The upstream here is an adversary of the tests' own: it honours every override header the way
common frameworks do (Django's USE_X_FORWARDED_HOST/PORT, Rails and Rack, Express's
``trust proxy``, Symfony's and IIS's X-Original-URL / X-Rewrite-URL, method overrides) and
has a canary path that must never be reached. The gateway runs under uvicorn with cachegw's
own protocol, so second requests are answered by the protocol-level fast path.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest

from cachegw import Gateway, Service, create_app
from cachegw._server import uvicorn_options
from tests.redis_process import HEALTHY
from tests.servers import Receive, Scope, Send, StubUpstream, run_uvicorn

_PATH_OVERRIDES = ("x-original-url", "x-original-uri", "x-rewrite-url", "x-override-url")
_METHOD_OVERRIDES = (
    "x-http-method-override",
    "x-method-override",
    "x-http-method",
    "x-original-method",
)
_HOST_OVERRIDES = ("x-forwarded-host", "x-original-host", "x-host")
_SCHEME_OVERRIDES = ("x-forwarded-proto", "x-forwarded-scheme", "x-scheme", "x-url-scheme")


class Framework:
    """An upstream that believes every header a client may send, and reads header names as
    WSGI and CGI do (``X_Forwarded_Host`` and ``X-Forwarded-Host`` are both
    ``HTTP_X_FORWARDED_HOST``: Django, Flask and PHP behind a server that passes
    underscores through)."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        headers = {
            k.decode("latin-1").replace("_", "-"): v.decode("latin-1") for k, v in scope["headers"]
        }
        method = scope["method"]
        path = scope["raw_path"].decode("latin-1")
        names = [k.decode("latin-1") for k, _ in scope["headers"]]
        self.seen.append({"method": method, "path": path, "headers": headers, "names": names})
        for name in _PATH_OVERRIDES:
            path = headers.get(name, path)
        for name in _METHOD_OVERRIDES:
            method = headers.get(name, method).upper()
        host = headers.get("host", "")
        for name in _HOST_OVERRIDES:
            host = headers.get(name, host)
        scheme = "http"
        for name in _SCHEME_OVERRIDES:
            scheme = headers.get(name, scheme)
        if headers.get("front-end-https", "").lower() == "on" or headers.get(
            "x-forwarded-ssl", ""
        ).lower() in ("on", "1"):
            scheme = "https"
        port = headers.get("x-forwarded-port")
        if port:
            host = f"{host.partition(':')[0]}:{port}"
        prefix = headers.get("x-forwarded-prefix", "") + headers.get("x-forwarded-path", "")
        server = headers.get("x-forwarded-server", "")
        self.hits[path] += 1
        status, extra = 200, []
        if path.startswith("/canary"):
            body = b"CANARY"
        elif method not in ("GET", "HEAD"):
            status, body = 405, f"method {method} not allowed".encode()
        elif scheme != "http":
            # Rails' force_ssl and friends: a redirect built from the scheme they were told.
            status, body = 301, b""
            extra = [(b"location", f"{scheme}://{host}{prefix}{path}".encode())]
        else:
            link = f"{scheme}://{host}{prefix}{path}"
            body = json.dumps({"self": link, "server": server, "method": method}).encode()
        response_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *extra,
        ]
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})


@contextmanager
def gateway(upstream: Framework, backend: str = "memory", **service: Any) -> Iterator[str]:
    with run_uvicorn(upstream) as origin:
        svc = Service("svc", origin, prefix="/svc", **service)
        svc.route("/admin/{rest:path}", ttl=60, methods=["GET", "HEAD"])
        svc.route("/{rest:path}", ttl=60)
        gw = Gateway(services=[svc], backend=backend, op_timeout=HEALTHY)
        with run_uvicorn(create_app(gw), **uvicorn_options(lifespan="on")) as base:
            yield base


def send(base: str, head: str) -> tuple[int, dict[str, str], bytes]:
    """Send the request head exactly as written (``\\n`` becomes CRLF); parse the answer."""
    port = int(base.rsplit(":", 1)[1])
    data = head.strip("\n").replace("\n", "\r\n").encode("latin-1") + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        top, _, body = answer.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split(" ", 2)[1]), headers, body


def get(base: str, path: str, host: str = "gw.example", *extra: str) -> Any:
    return send(base, "\n".join([f"GET {path} HTTP/1.1", f"Host: {host}", *extra]))


ATTACKS = [
    ("X-Forwarded-Host", "evil.example"),
    ("X-Original-Host", "evil.example"),
    ("X-Host", "evil.example"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Scheme", "https"),
    ("X-Scheme", "https"),
    ("X-Url-Scheme", "https"),
    ("X-Forwarded-Ssl", "on"),
    ("Front-End-Https", "on"),
    ("X-Forwarded-Port", "6666"),
    ("X-Forwarded-Prefix", "/evil"),
    ("X-Forwarded-Path", "/evil"),
    ("X-Forwarded-Server", "evil.example"),
    ("X-Original-URL", "/canary"),
    ("X-Original-URI", "/canary"),
    ("X-Rewrite-URL", "/canary"),
    ("X-Override-URL", "/canary"),
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-Method-Override", "DELETE"),
    ("X-HTTP-Method", "DELETE"),
    ("X-Original-Method", "DELETE"),
]
# The same headers spelled with underscores (nginx ignores such names by default for this
# reason: underscores_in_headers off).
UNDERSCORED = [(name.replace("-", "_"), value) for name, value in ATTACKS]


@pytest.fixture(scope="module", params=["memory", "redis"])
def framework(request: pytest.FixtureRequest) -> Iterator[tuple[Framework, str]]:
    """The adversarial upstream behind a gateway on each backend (Redis: the session's
    server; every test uses paths of its own)."""
    backend = "memory" if request.param == "memory" else request.getfixturevalue("redis_proc").url
    upstream = Framework()
    with gateway(upstream, backend) as base:
        yield upstream, base


@pytest.mark.parametrize(
    ("header", "value"), ATTACKS + UNDERSCORED, ids=[a[0] for a in ATTACKS + UNDERSCORED]
)
def test_override_header_never_poisons_and_never_reaches_the_upstream(
    framework: tuple[Framework, str], header: str, value: str
) -> None:
    upstream, base = framework
    path = f"/svc/page/{header.lower()}"
    status, _, poisoned = get(base, path, "gw.example", f"{header}: {value}")
    seen = upstream.seen[-1]
    assert header.lower() not in [name.lower() for name in seen["names"]] or header.lower() in (
        "x-forwarded-for",
        "x-forwarded-proto",
    )  # removed, or the gateway's own
    assert seen["headers"].get(header.lower().replace("_", "-")) != value
    assert status == 200 and b"evil" not in poisoned and b"https:" not in poisoned
    for _ in range(2):  # the second one is answered by the fast path
        status, headers, clean = get(base, path)
        assert status == 200
        assert json.loads(clean) == {
            "self": f"http://{seen['headers']['host']}/page/{header.lower()}",
            "server": "",
            "method": "GET",
        }
        assert "evil" not in json.dumps(headers) and b"6666" not in clean
    assert headers["x-cache-status"] == "HIT"
    assert upstream.hits["/canary"] == 0


def test_an_unsafe_request_with_a_method_override_is_stripped(
    framework: tuple[Framework, str],
) -> None:
    upstream, base = framework
    status, _, _ = send(
        base,
        "POST /svc/admin/users/1 HTTP/1.1\nHost: gw.example\nContent-Length: 0\n"
        "X-HTTP-Method-Override: GET",
    )
    assert status == 405  # the route allows GET and HEAD; the override changes nothing
    upstream.seen.clear()
    send(base, "POST /svc/form HTTP/1.1\nHost: gw.example\nContent-Length: 0\nX-HTTP-Method: PUT")
    assert [s["method"] for s in upstream.seen] == ["POST"]
    assert "x-http-method" not in upstream.seen[0]["headers"]


def test_client_host_never_reaches_the_upstream_by_default(
    framework: tuple[Framework, str],
) -> None:
    upstream, base = framework
    _, _, evil = get(base, "/svc/host/default", "evil.example")
    assert b"evil.example" not in evil
    assert "x-forwarded-host" not in upstream.seen[-1]["headers"]
    assert upstream.seen[-1]["headers"]["host"].startswith("127.0.0.1:")
    _, headers, clean = get(base, "/svc/host/default", "gw.example")
    assert headers["x-cache-status"] == "HIT" and b"evil" not in clean


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    """The gateway's backend setting (it opens and closes the backend itself)."""
    if request.param == "memory":
        return "memory"
    url: str = request.getfixturevalue("redis_url")
    return url


def test_hosts_list_refuses_others_and_keys_each_listed_host(backend: str) -> None:
    upstream = Framework()
    with gateway(upstream, backend, hosts=["api.example", "www.example:8443"]) as base:
        for host in ("evil.example", "api.example.evil", "www.example", "www.example:1"):
            status, headers, body = get(base, "/svc/v", host)
            assert status == 400, host
            assert headers["cache-control"] == "no-store" and b"evil" not in body
        assert upstream.seen == []
        answers = {}
        for host in ("api.example", "www.example:8443", "API.Example:80", "api.example"):
            status, headers, body = get(base, "/svc/v", host)
            assert status == 200
            answers[host] = (headers["x-cache-status"], json.loads(body)["self"])
    assert answers == {
        "api.example": ("HIT", "http://api.example/v"),
        "www.example:8443": ("MISS", "http://www.example:8443/v"),
        # Spellings of a listed name share its entry: the upstream only ever sees the name.
        "API.Example:80": ("HIT", "http://api.example/v"),
    }
    assert len(upstream.seen) == 2
    assert [s["headers"]["x-forwarded-host"] for s in upstream.seen] == [
        "api.example",
        "www.example:8443",
    ]


def test_forward_headers_are_let_through_and_keyed(backend: str) -> None:
    upstream = Framework()
    with gateway(upstream, backend, forward_headers=["X-Forwarded-Prefix"]) as base:
        _, first, one = get(base, "/svc/p", "gw.example", "X-Forwarded-Prefix: /one")
        _, clean, plain = get(base, "/svc/p")
        _, again, one_again = get(base, "/svc/p", "gw.example", "X-Forwarded-Prefix: /one")
        _, other, two = get(base, "/svc/p", "gw.example", "X-Forwarded-Prefix: /two")
        _, _, scheme = get(base, "/svc/p", "gw.example", "X-Forwarded-Scheme: https")
    assert json.loads(one)["self"].endswith("/one/p")
    assert b"/one" not in plain and clean["x-cache-status"] == "MISS"
    assert again["x-cache-status"] == "HIT" and one_again == one
    assert json.loads(two)["self"].endswith("/two/p") and other["x-cache-status"] == "MISS"
    assert "x-forwarded-prefix" in first["vary"].lower()
    assert b"https:" not in scheme  # not allowed, so still removed


# -- request directives cannot turn the cache off ------------------------------------------

DIRECTIVES = [
    "Cache-Control: no-cache",
    "Pragma: no-cache",
    "Cache-Control: max-age=0",
    "cache-control: x-other, NO-CACHE",
]


@contextmanager
def slow_gateway(backend: str, **route: Any) -> Iterator[tuple[StubUpstream, str]]:
    stub = StubUpstream()
    for name in ("a", "b", "c", "d", "e"):
        stub.route(f"/slow/{name}", body=f'{{"page": "{name}"}}'.encode(), delay=0.3)
    with run_uvicorn(stub) as origin:
        svc = Service("svc", origin, prefix="/svc")
        svc.route("/{rest:path}", ttl=60, **route)
        gw = Gateway(services=[svc], backend=backend, op_timeout=HEALTHY)
        with run_uvicorn(create_app(gw), **uvicorn_options(lifespan="on")) as base:
            yield stub, base


def parallel(base: str, path: str, header: str, n: int = 50) -> list[Any]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: get(base, path, "gw.example", header), range(n)))


@pytest.mark.parametrize("header", DIRECTIVES)
def test_parallel_no_cache_requests_share_one_upstream_request(backend: str, header: str) -> None:
    with slow_gateway(backend) as (stub, base):
        name = "abcd"[DIRECTIVES.index(header)]
        path = f"/slow/{name}"
        cold = parallel(base, f"/svc{path}", header)
        assert stub.hits[path] <= 2
        # With a fresh entry: one request checks it with the origin for everyone.
        before = stub.hits[path]
        warm = parallel(base, f"/svc{path}", header)
        assert stub.hits[path] - before <= 2
    for status, _, body in cold + warm:
        assert status == 200 and json.loads(body) == {"page": name}


def test_ignore_request_cache_control(backend: str) -> None:
    with slow_gateway(backend, ignore_request_cache_control=True) as (stub, base):
        get(base, "/svc/slow/e")
        answers = [get(base, "/svc/slow/e", "gw.example", header) for header in DIRECTIVES]
    assert [headers["x-cache-status"] for _, headers, _ in answers] == ["HIT"] * 4
    assert stub.hits["/slow/e"] == 1


# -- credentials other than Authorization and Cookie (issue 22) ------------------------------


class Pages:
    """An upstream that answers each caller's own page, from whichever credential header it
    is given, cacheable and without Vary (as many APIs do)."""

    def __init__(self) -> None:
        self.hits = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.hits += 1
        headers = dict(scope["headers"])
        caller = headers.get(b"x-api-key") or headers.get(b"x-tenant-token") or b"anonymous"
        body = b"page of " + caller
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize(
    ("service", "header"),
    [
        ({}, "X-API-Key"),
        ({}, "x-access-token"),
        ({"credential_headers": ["X-Tenant-Token"]}, "X-Tenant-Token"),
    ],
    ids=["default-x-api-key", "default-x-access-token", "configured"],
)
def test_credential_headers_never_share_a_callers_page(
    backend: str, service: dict[str, Any], header: str
) -> None:
    pages = Pages()
    with run_uvicorn(pages) as origin:
        svc = Service("svc", origin, prefix="/svc", **service)
        svc.route("/{rest:path}", ttl=60)
        gw = Gateway(services=[svc], backend=backend, op_timeout=HEALTHY)
        with run_uvicorn(create_app(gw), **uvicorn_options(lifespan="on")) as base:
            status, alice, body = get(base, "/svc/me", "gw.example", f"{header}: alice")
            assert status == 200 and alice["x-cache-status"] == "BYPASS"
            for _ in range(3):  # the second and third are fast-path hits of the anonymous entry
                status, anon, body = get(base, "/svc/me")
                assert status == 200 and body == b"page of anonymous", body
            _, bob, body = get(base, "/svc/me", "gw.example", f"{header}: bob")
            assert bob["x-cache-status"] == "BYPASS"
            assert b"alice" not in body
    assert anon["x-cache-status"] == "HIT"
