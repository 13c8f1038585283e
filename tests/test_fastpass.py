"""The pass-through at the protocol level (issue 26, `cachegw._fastpass`): a request the
cache will not answer — a GET of a ``ttl = 0`` route, a POST with a small body — is
forwarded by cachegw's uvicorn protocol without an ASGI cycle. It must be the ordinary
path's answer byte for byte: the same request through a gateway whose fast pass-through
is switched off gets the same response, the upstream the same request, the access log
the same line. Real upstream and gateway on loopback, raw sockets for the client.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from cachegw import Gateway, MemoryBackend, Service, create_app
from cachegw import _app as app_module
from cachegw._app import _GatewayApp
from cachegw._server import uvicorn_options
from tests.servers import StubUpstream, run_uvicorn

ACCESS = "cachegw.access"


@contextmanager
def gateway(
    upstream: str, *, fast: bool, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, list[str]]]:
    """A gateway in front of ``upstream``: ``/svc/pass/...`` keeps nothing (ttl = 0),
    ``/svc/kept/...`` caches for 60 s. Yields its base URL and the targets the protocol
    forwarded itself."""
    taken: list[str] = []
    real_plan = app_module.plan

    def plan(proxy: Any, scope: dict[str, Any]) -> Any:
        run = real_plan(proxy, scope) if fast else None
        if run is not None:
            taken.append(f"{scope['method']} {scope['raw_path'].decode()}")
        return run

    monkeypatch.setattr(app_module, "plan", plan)
    svc = Service("svc", upstream, prefix="/svc", rewrite_redirects=True)
    svc.route("/pass/{rest:path}", ttl=0)
    svc.route("/kept/{rest:path}", ttl=60)
    app = create_app(Gateway(services=[svc], backend=MemoryBackend()))
    assert isinstance(app, _GatewayApp)
    with run_uvicorn(app, **uvicorn_options(lifespan="on")) as base:
        yield base, taken


def exchange(base: str, data: bytes) -> bytes:
    """Send one request as raw bytes; read its whole response (a ``100 Continue`` left
    out): until its declared body is in, or the connection closes."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while True:
            received = received.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
            head, sep, body = received.partition(b"\r\n\r\n")
            if sep:
                length = re.search(rb"(?im)^content-length: *(\d+)", head)
                no_body = data.startswith(b"HEAD ") or head.split(b" ")[1] in (b"204", b"304")
                if no_body or (length is not None and len(body) >= int(length.group(1))):
                    return received
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk


def request(method: str, target: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gw.test", "User-Agent: fastpass-test"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


REQUESTS = [
    request("GET", "/svc/pass/items?a=%2F&b=1"),
    request("GET", "/svc/pass/items", If_None_Match='"v1"', Range="bytes=0-3"),
    request("GET", "/svc/pass/items", X_Forwarded_Host="evil", Connection="keep-alive, x-a"),
    request("HEAD", "/svc/pass/items"),
    request("POST", "/svc/pass/items", b'{"note": "' + b"x" * 1000 + b'"}'),
    request("PUT", "/svc/kept/items/1", b"put body"),
    request("DELETE", "/svc/kept/items/1"),
    request("POST", "/svc/pass/created", b"{}"),
    request("GET", "/svc/pass/gone"),
    request("GET", "/svc/pass/nothing"),
]


def _stub_at(stub: StubUpstream, base: str) -> None:
    stub.route(
        "/pass/created",
        status=201,
        headers=[(b"location", f"{base}/kept/items/9".encode())],
        body=b"made",
    )
    stub.route("/pass/gone", status=503, headers=[(b"retry-after", b"3")], body=b"down")
    stub.route("/pass/nothing", status=204, headers=[(b"x-empty", b"yes")])


def _run(
    upstream: str,
    stub: StubUpstream,
    fast: bool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> Any:
    caplog.clear()
    seen = len(stub.requests)
    with gateway(upstream, fast=fast, monkeypatch=monkeypatch) as (base, taken):
        answers = [exchange(base, data) for data in REQUESTS]
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS]
    for line in lines:
        for field in ("time", "duration_ms", "upstream_ms"):
            line.pop(field, None)
    return answers, stub.requests[seen:], lines, taken


def test_the_fast_pass_through_answers_as_the_ordinary_path_does(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    stub = StubUpstream()
    with run_uvicorn(stub) as upstream:
        _stub_at(stub, upstream)
        fast = _run(upstream, stub, True, monkeypatch, caplog)
        ordinary = _run(upstream, stub, False, monkeypatch, caplog)
    answers, upstream_saw, lines, taken = fast
    # Every one of them taken at the protocol level.
    assert taken == [data.split(b" HTTP/1.1")[0].decode().split("?")[0] for data in REQUESTS]
    assert ordinary[3] == []
    # Byte for byte the same responses, requests upstream, and access lines.
    assert answers == ordinary[0]
    assert upstream_saw == ordinary[1]
    assert lines == ordinary[2]
    assert len(lines) == len(REQUESTS)
    # And they are what the contract says, not only equal.
    get = answers[0]
    assert get.startswith(b"HTTP/1.1 200 ") and b"cache-status: cachegw; fwd=uri-miss" in get
    assert upstream_saw[0]["query_string"] == "a=%2F&b=1"  # byte for byte
    sent = dict(upstream_saw[2]["headers"])
    assert "x-a" not in sent and sent.get("x-forwarded-host") is None
    assert sent["x-forwarded-for"] == "127.0.0.1" and sent["via"] == "1.1 cachegw"
    assert dict(upstream_saw[1]["headers"])["range"] == "bytes=0-3"  # as it came
    assert answers[3].startswith(b"HTTP/1.1 200 ") and answers[3].endswith(b"\r\n\r\n")
    assert upstream_saw[3]["method"] == "HEAD"
    assert upstream_saw[4]["body"] == REQUESTS[4].partition(b"\r\n\r\n")[2].decode()
    assert b"location: /svc/kept/items/9\r\n" in answers[7]
    assert answers[8].startswith(b"HTTP/1.1 503 ") and answers[8].endswith(b"down")
    assert answers[9].startswith(b"HTTP/1.1 204 ")
    assert [line["status"] for line in lines] == [200, 200, 200, 200, 200, 200, 200, 201, 503, 204]


def test_a_post_through_the_fast_path_invalidates_what_it_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stub = StubUpstream()
    with (
        run_uvicorn(stub) as upstream,
        gateway(upstream, fast=True, monkeypatch=monkeypatch) as (base, taken),
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        assert client.get("/svc/kept/items/1").headers["x-cache-status"] == "MISS"
        assert client.get("/svc/kept/items/1").headers["x-cache-status"] == "HIT"
        assert client.get("/svc/kept/items/2").headers["x-cache-status"] == "MISS"
        assert client.post("/svc/kept/items/1", content=b"new").status_code == 200
        after = client.get("/svc/kept/items/1")
        other = client.get("/svc/kept/items/2")
    assert "POST /svc/kept/items/1" in taken
    assert after.headers["x-cache-status"] == "MISS"
    assert other.headers["x-cache-status"] == "HIT"
    assert stub.hits["/kept/items/1"] == 3  # GET, POST, GET after the invalidation


def test_a_body_that_never_ends_is_not_forwarded_on_the_fast_path(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    stub = StubUpstream()
    with (
        run_uvicorn(stub) as upstream,
        gateway(upstream, fast=True, monkeypatch=monkeypatch) as (base, taken),
    ):
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /svc/pass/items HTTP/1.1\r\nHost: gw.test\r\n"
                b"Content-Length: 100\r\n\r\n" + b"x" * 10
            )
            sock.shutdown(socket.SHUT_WR)  # gone before its body's end
            assert sock.recv(65536) == b""  # nothing answered to a client that left
        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.get("/svc/pass/after").status_code == 200  # logged after it
    assert taken[0] == "POST /svc/pass/items"
    assert stub.hits["/pass/items"] == 0  # the upstream never saw a partial request
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS]
    assert [(line["method"], line["status"]) for line in lines] == [("POST", 499), ("GET", 200)]


@pytest.mark.parametrize(
    "data",
    [
        # Refused by the ordinary path's checks: never taken by the fast one.
        b"POST /svc/pass/x HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 1\r\n\r\nx",
        b"POST http://evil/svc/pass/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\n\r\nx",
        b"POST /svc/pass/%2e%2e/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\n\r\nx",
        b"GET /svc/nothing HTTP/1.1\r\nHost: gw\r\n\r\n",
        # Not for the fast path: a body of unknown length, a large one, Expect.
        b"POST /svc/pass/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\nx\r\n0\r\n\r\n",
        b"POST /svc/pass/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 70000\r\n\r\n" + b"x" * 70000,
        b"POST /svc/pass/x HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\n"
        b"Content-Length: 1\r\n\r\nx",
        b"GET /svc/kept/x HTTP/1.1\r\nHost: gw\r\n\r\n",
    ],
)
def test_what_the_fast_path_leaves_gets_the_ordinary_answer(
    data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = []
    with run_uvicorn(StubUpstream()) as upstream:
        for fast in (True, False):
            with gateway(upstream, fast=fast, monkeypatch=monkeypatch) as (base, taken):
                answers.append(exchange(base, data))
                assert taken == []
    assert answers[0] == answers[1]
    assert answers[0].startswith(b"HTTP/1.1 ")


def test_an_abandoned_get_on_the_fast_path_is_let_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends a ttl = 0 GET and leaves: its forwarding task is cancelled (the
    upstream request aborted, the pool's connection freed) and counted, as on the
    ordinary path."""
    stub = StubUpstream()
    stub.route("/pass/slow", body=b"late", delay=30.0)
    with (
        run_uvicorn(stub) as upstream,
        gateway(upstream, fast=True, monkeypatch=monkeypatch) as (base, taken),
    ):
        stats = httpx.get(f"{base}/_cachegw/health", timeout=10).json()["stats"]
        before = int(stats.get("abandoned", 0))
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /svc/pass/slow HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            deadline = time.monotonic() + 10
            while stub.hits["/pass/slow"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)  # polling: until the upstream has the request
            assert stub.hits["/pass/slow"] == 1
        deadline = time.monotonic() + 10
        abandoned = before
        while abandoned == before and time.monotonic() < deadline:
            stats = httpx.get(f"{base}/_cachegw/health", timeout=10).json()["stats"]
            abandoned = int(stats.get("abandoned", 0))
    assert taken == ["GET /svc/pass/slow"]
    assert abandoned == before + 1
