"""The contract between cachegw and uvicorn (`cachegw._server`): the protocol-level fast
path and the raw request target use uvicorn internals, so this fails on a uvicorn that
changed them. cachegw uses them only on the releases `VERIFIED_UVICORN` names (the dev
extra installs one of those); on others `cachegw serve` takes the ordinary path."""

from __future__ import annotations

import importlib.metadata
import logging
import socket
from typing import Any

import pytest
import uvicorn
from packaging.requirements import Requirement
from starlette.types import Receive, Scope, Send

from cachegw._server import (
    VERIFIED_UVICORN,
    FastHitServer,
    GatewayHttpToolsProtocol,
    fast_path_of,
    protocol_verified,
    response_bytes,
    uvicorn_options,
)
from tests.servers import run_uvicorn

FAST = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nx-path: fast\r\n\r\nfast"


class App(FastHitServer):
    """Answers GET /fast at the protocol level; everything else through ASGI."""

    def __init__(self) -> None:
        self.fast_calls: list[tuple[bytes, bytes, str]] = []
        self.targets: list[str | None] = []

    def fast_hit(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        scheme: str,
    ) -> bytes | None:
        self.fast_calls.append((method, target, scheme))
        assert (b"host", b"t") in headers and client is not None
        return FAST if target == b"/fast" else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.targets.append(scope.get("extensions", {}).get("cachegw.request_target"))
        body = b"slow"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"4"), (b"x-path", b"asgi")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _exchange(base: str, *requests: bytes) -> list[bytes]:
    """Each request in turn on one keep-alive connection; the answers (4-byte bodies)."""
    host, port = base.removeprefix("http://").split(":")
    answers = []
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        for request in requests:
            sock.sendall(request)
            buffer = b""
            while not (b"\r\n\r\n" in buffer and len(buffer.partition(b"\r\n\r\n")[2]) >= 4):
                chunk = sock.recv(65536)
                assert chunk, f"connection closed after {buffer!r}"
                buffer += chunk
            answers.append(buffer)
    return answers


def _uvicorn_requirements() -> dict[str, Requirement]:
    """cachegw's uvicorn requirement per extra ("" for the package's own)."""
    found = {}
    for line in importlib.metadata.requires("cachegw") or []:
        requirement = Requirement(line)
        if requirement.name == "uvicorn":
            marker = str(requirement.marker or "")
            found["dev" if "dev" in marker else ""] = requirement
    return found


def test_users_get_no_uvicorn_upper_bound_and_the_suite_a_verified_uvicorn() -> None:
    # Installing cachegw never moves a user's uvicorn (issue 28); the dev extra pins the
    # verified releases, so the suite checks the protocol cachegw serve runs.
    requirements = _uvicorn_requirements()
    assert not any(spec.operator in ("<", "<=", "==", "~=") for spec in requirements[""].specifier)
    (low_major, low_minor), (high_major, high_minor) = VERIFIED_UVICORN
    dev = requirements["dev"].specifier
    assert dev.contains(f"{low_major}.{low_minor}.0") and dev.contains(
        f"{high_major}.{high_minor}.9"
    )
    assert not dev.contains(f"{high_major}.{high_minor + 1}.0")
    assert protocol_verified(uvicorn.__version__), uvicorn.__version__


def test_an_unverified_uvicorn_gets_the_ordinary_protocol_and_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert protocol_verified("0.54.0") and protocol_verified("0.55.3")
    assert not protocol_verified("0.53.9") and not protocol_verified("0.56.0")
    assert not protocol_verified("1.0.0") and not protocol_verified("weird")
    assert uvicorn_options()["http"] is GatewayHttpToolsProtocol
    monkeypatch.setattr(uvicorn, "__version__", "0.99.1")
    with caplog.at_level(logging.WARNING, logger="cachegw"):
        first, second = uvicorn_options(), uvicorn_options(lifespan="off")
    assert first["http"] == second["http"] == "httptools"
    [warning] = [r.getMessage() for r in caplog.records if "0.99.1" in r.getMessage()]
    assert "ordinary ASGI path" in warning
    # Served that way, a FastHitServer answers everything through ASGI.
    app = App()
    with run_uvicorn(app, **second) as base:
        answers = _exchange(base, b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n")
    assert answers[0].endswith(b"slow") and app.fast_calls == []


@pytest.mark.parametrize("log_level", ["warning", "trace"])
def test_fast_hits_and_the_ordinary_path_share_a_connection(log_level: str) -> None:
    # At trace level uvicorn wraps the app in its message logger: still found.
    app = App()
    options: dict[str, Any] = uvicorn_options(lifespan="off", log_level=log_level)
    with run_uvicorn(app, **options) as base:
        get = b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n"
        answers = _exchange(base, get % b"/fast", get % b"/slow?q", get % b"/fast")
    assert [a.rpartition(b"\r\n\r\n")[2] for a in answers] == [b"fast", b"slow", b"fast"]
    assert answers[1].startswith(b"HTTP/1.1 200 OK\r\n") and b"x-path: asgi" in answers[1]
    # The fast path saw the request as sent; the ASGI path got the raw target too.
    assert (b"GET", b"/fast", "http") in app.fast_calls
    assert app.targets == [b"/slow?q"]


def test_an_app_that_is_not_a_fast_hit_server_is_served_normally() -> None:
    async def plain(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = [(b"content-length", b"4")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"slow"})

    assert fast_path_of(plain) is None
    with run_uvicorn(plain, **uvicorn_options(lifespan="off")) as base:
        [answer] = _exchange(base, b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n")
    assert answer.endswith(b"slow")


def test_response_bytes_applies_uvicorns_header_checks() -> None:
    ok = response_bytes(200, [(b"content-length", b"2")], b"ok")
    assert ok == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    assert response_bytes(200, [(b"content-length", b"2"), (b"x", b"a\r\nb")], b"ok") is None
    assert response_bytes(200, [(b"bad name", b"v"), (b"content-length", b"0")], b"") is None
    assert response_bytes(200, [], b"no length") is None
