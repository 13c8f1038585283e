from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from cachegw._upstream import Upstream, request_headers, response_headers, upstream_url
from tests.servers import StubUpstream, free_port, raw_server, run_uvicorn


@pytest.fixture(scope="module")
def stub_server() -> Iterator[tuple[StubUpstream, str]]:
    stub = StubUpstream()
    with run_uvicorn(stub) as base:
        yield stub, base


@pytest.fixture
async def upstream(stub_server: tuple[StubUpstream, str]) -> AsyncIterator[Upstream]:
    up = Upstream(stub_server[1], timeout=2.0)
    yield up
    await up.aclose()


def echo(fetched: Any) -> dict[str, Any]:
    assert fetched.status == 200, fetched
    return json.loads(fetched.body)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "path",
    ["//evil.com/x", "/@evil.com/x", "/x?@evil", "/:80@evil.com/", "/%2F%2Fevil.com", "/x#@evil"],
)
@pytest.mark.parametrize("query", [b"", b"@evil.com", b"x=//evil.com/", b"#@evil"])
def test_upstream_url_never_changes_host(path: str, query: bytes) -> None:
    try:
        url = upstream_url("http://10.0.0.1:9001/api/", path, query)
    except httpx.InvalidURL:  # refused outright is fine too
        return
    assert (url.scheme, url.host, url.port) == ("http", "10.0.0.1", 9001)
    assert url.raw_path.startswith(b"/api/")


@pytest.mark.parametrize("query", [b"a=1;b=2", b"%ZZ&a=%2F&b=%2f", b"q=caf%C3%A9&x=+", b"a&&b="])
def test_upstream_url_query_byte_for_byte(query: bytes) -> None:
    url = upstream_url("http://h:1", "/p%2e", query)
    assert url.raw_path == b"/p%2e?" + query


def test_upstream_url_requires_a_path() -> None:
    with pytest.raises(ValueError, match="must start with"):
        upstream_url("http://h", "x", b"")


def test_request_headers() -> None:
    scope = {
        "headers": [
            (b"host", b"gw.example"),
            (b"connection", b"keep-alive, X-Secret"),
            (b"x-secret", b"1"),
            (b"keep-alive", b"timeout=5"),
            (b"te", b"trailers"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"websocket"),
            (b"proxy-authorization", b"Basic x"),
            (b"proxy-connection", b"keep-alive"),
            (b"http2-settings", b"x"),
            (b"x-forwarded-for", b"6.6.6.6"),
            (b"x-forwarded-host", b"evil"),
            (b"x-forwarded-proto", b"gopher"),
            (b"forwarded", b"for=6.6.6.6"),
            (b"via", b"1.1 evil"),
            (b"x-real-ip", b"6.6.6.6"),
            (b"accept", b"*/*"),
            (b"content-length", b"3"),
            (b"cookie", b"a=1"),
            *OVERRIDE_HEADERS,
        ]
    }
    out = request_headers(scope, client_ip="1.2.3.4", proto="https", host="gw.example")
    assert out == [
        (b"accept", b"*/*"),
        (b"content-length", b"3"),
        (b"cookie", b"a=1"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"gw.example"),
        (b"via", b"1.1 cachegw"),
    ]
    # nginx's default: no X-Forwarded-Host at all when the service has no `hosts`.
    out = request_headers(scope, client_ip="1.2.3.4", proto="http", host=None)
    assert not any(name == b"x-forwarded-host" for name, _ in out)
    # Allowed override headers pass, as the client sent them; the others still do not.
    allow = frozenset({b"x-forwarded-prefix", b"x-original-host"})
    out = request_headers(scope, client_ip="1.2.3.4", proto="http", host=None, allow=allow)
    passed = [pair for pair in out if pair in OVERRIDE_HEADERS]
    assert passed == [(b"x-forwarded-prefix", b"/evil"), (b"x-original-host", b"evil")]


def test_request_headers_connection_names_earlier_headers() -> None:
    # The Connection header may come after the headers it names (issue 26 builds the
    # list in one pass): they are removed all the same, in either spelling.
    scope = {
        "headers": [
            (b"host", b"gw"),
            (b"x-early", b"1"),
            (b"x_under", b"2"),
            (b"x-kept", b"3"),
            (b"connection", b"X-Early, x_under, x-late"),
            (b"x-late", b"4"),
        ]
    }
    out = request_headers(scope, client_ip="1.2.3.4", proto="http", host=None)
    assert [name for name, _ in out] == [
        b"x-kept",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"via",
    ]


#: Override headers common frameworks honour (Rails, Django, Express, Symfony, IIS, Spring).
OVERRIDE_HEADERS = [
    (b"x-forwarded-scheme", b"http"),
    (b"x-forwarded-prefix", b"/evil"),
    (b"x-forwarded-port", b"1"),
    (b"x-forwarded-server", b"evil"),
    (b"x-forwarded-ssl", b"off"),
    (b"x-original-url", b"/admin"),
    (b"x-original-uri", b"/admin"),
    (b"x-rewrite-url", b"/admin"),
    (b"x-http-method-override", b"DELETE"),
    (b"x-method-override", b"DELETE"),
    (b"x-http-method", b"DELETE"),
    (b"x-original-host", b"evil"),
    (b"x-host", b"evil"),
    (b"x-scheme", b"gopher"),
    (b"front-end-https", b"off"),
]


def test_response_headers() -> None:
    raw = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"X-Hop, close"),
        (b"X-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Content-Length", b"5"),
        (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
        (b"Via", b"1.0 origin"),
    ]
    assert response_headers(raw) == [
        (b"content-type", b"text/plain"),
        (b"content-length", b"5"),
        (b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
        (b"via", b"1.0 origin, 1.1 cachegw"),
    ]


def test_response_headers_with_the_length_sent() -> None:
    # The length of the body as read replaces the upstream's, last; a Connection header
    # after the headers it names removes them too.
    raw = [
        (b"X-Hop", b"1"),
        (b"Content-Length", b"999"),
        (b"Via", b"1.0 a"),
        (b"Connection", b"x-hop"),
        (b"Via", b"1.0 b"),
        (b"ETag", b'"e"'),
    ]
    assert response_headers(raw, 5) == [
        (b"etag", b'"e"'),
        (b"via", b"1.0 a, 1.0 b, 1.1 cachegw"),
        (b"content-length", b"5"),
    ]
    assert response_headers(raw) == [
        (b"content-length", b"999"),
        (b"etag", b'"e"'),
        (b"via", b"1.0 a, 1.0 b, 1.1 cachegw"),
    ]


async def test_forwarding_end_to_end(stub_server: tuple[StubUpstream, str]) -> None:
    upstream = Upstream(stub_server[1] + "/base/", timeout=2.0)
    headers = request_headers(
        {
            "headers": [
                (b"host", b"gw"),
                (b"connection", b"x-a"),
                (b"x-a", b"1"),
                (b"x-b", b"2"),
                (b"x-forwarded-for", b"6.6.6.6"),
            ]
        },
        client_ip="1.2.3.4",
        proto="http",
        host="gw",
    )
    fetched = await upstream.fetch(
        "GET", "/p%2e/x", b"a=1;b=2&%ZZ&c=%2F", headers, None, max_body=1 << 20
    )
    seen = echo(fetched)
    assert seen["raw_path"] == "/base/p%2e/x"
    assert seen["query_string"] == "a=1;b=2&%ZZ&c=%2F"
    got = dict(seen["headers"])
    assert got["x-b"] == "2" and "x-a" not in got
    assert got["x-forwarded-for"] == "1.2.3.4" and got["via"] == "1.1 cachegw"
    assert got["host"].startswith("127.0.0.1:")
    assert "accept-encoding" not in got and "user-agent" not in got and "cookie" not in got
    assert [n for n, _ in seen["headers"]].count("x-forwarded-for") == 1
    assert dict(fetched.headers)[b"via"] == b"1.1 cachegw"
    assert int(dict(fetched.headers)[b"content-length"]) == len(fetched.body or b"")
    assert not fetched.failed and fetched.response_time == pytest.approx(time.time(), abs=5)
    await upstream.aclose()


async def test_gzip_passthrough(stub_server: tuple[StubUpstream, str], upstream: Upstream) -> None:
    stub, _ = stub_server
    payload = gzip.compress(b"hello " * 1000)
    stub.route("/gz", headers=[(b"content-encoding", b"gzip")], body=payload)
    fetched = await upstream.fetch(
        "GET", "/gz", b"", [(b"accept-encoding", b"gzip")], None, max_body=1 << 20
    )
    assert fetched.body == payload
    assert dict(fetched.headers)[b"content-encoding"] == b"gzip"
    assert dict(fetched.headers)[b"content-length"] == str(len(payload)).encode()


async def test_redirect_not_followed(
    stub_server: tuple[StubUpstream, str], upstream: Upstream
) -> None:
    stub, _ = stub_server
    stub.route("/moved", status=302, headers=[(b"location", b"/elsewhere")])
    fetched = await upstream.fetch("GET", "/moved", b"", [], None, max_body=100)
    assert fetched.status == 302 and dict(fetched.headers)[b"location"] == b"/elsewhere"
    assert stub.hits["/elsewhere"] == 0


async def test_proxy_env_ignored(monkeypatch: pytest.MonkeyPatch, upstream: Upstream) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, closed)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert echo(await upstream.fetch("GET", "/env", b"", [], None, max_body=1 << 20))


async def test_large_body_streams(
    stub_server: tuple[StubUpstream, str], upstream: Upstream
) -> None:
    stub, _ = stub_server
    big = bytes(range(256)) * 4096  # 1 MiB
    stub.route("/big", body=big)
    fetched = await upstream.fetch("GET", "/big", b"", [], None, max_body=1000)
    assert fetched.body is None and fetched.stream is not None
    assert dict(fetched.headers)[b"content-length"] == str(len(big)).encode()
    assert b"".join([chunk async for chunk in fetched.stream]) == big


async def test_large_chunked_body_streams(upstream: Upstream) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(100):
            await send({"type": "http.response.body", "body": b"x" * 1000, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    with run_uvicorn(app) as base:
        up = Upstream(base, timeout=2)
        fetched = await up.fetch("GET", "/", b"", [], None, max_body=5000)
        assert fetched.body is None and fetched.stream is not None
        assert b"".join([c async for c in fetched.stream]) == b"x" * 100_000
        # A stream dropped unread still releases its connection.
        fetched = await up.fetch("GET", "/", b"", [], None, max_body=5000)
        assert fetched.stream is not None
        await fetched.stream.aclose()  # type: ignore[attr-defined]
        small = await up.fetch("GET", "/", b"", [], None, max_body=1 << 20)
        assert small.body == b"x" * 100_000
        assert dict(small.headers)[b"content-length"] == b"100000"
        await up.aclose()


async def test_request_body_streamed(upstream: Upstream) -> None:
    async def body() -> AsyncIterator[bytes]:
        for i in range(3):
            yield b"part%d;" % i

    seen = echo(await upstream.fetch("POST", "/post", b"", [], body(), max_body=1 << 20))
    assert seen["body"] == "part0;part1;part2;"
    seen = echo(
        await upstream.fetch(
            "PUT", "/put", b"", [(b"content-length", b"4")], b"abcd", max_body=1 << 20
        )
    )
    assert seen["body"] == "abcd" and seen["method"] == "PUT"


async def test_m_search_forwarded(upstream: Upstream) -> None:
    assert (
        echo(await upstream.fetch("M-SEARCH", "/", b"", [], None, max_body=1000))["method"]
        == "M-SEARCH"
    )


async def test_refused_is_fast_502_and_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    base = f"http://127.0.0.1:{free_port()}"
    up = Upstream(base, timeout=60)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="cachegw"):
        fetched = await up.fetch("GET", "/items/1", b"", [], None, max_body=1000)
    # Not the 60 s timeout: a refused connection fails at once (the margin is for a
    # loaded machine, not a speed requirement).
    assert time.perf_counter() - start < 30
    assert fetched.status == 502 and fetched.failed
    assert dict(fetched.headers)[b"content-type"] == b"application/problem+json"
    assert json.loads(fetched.body or b"")["detail"] == "The upstream service could not be reached."
    # The operator's line names the upstream and the error; the client's answer does not.
    [line] = [r.getMessage() for r in caplog.records if r.name == "cachegw"]
    assert line.startswith(f"cachegw: 502 upstream: GET {base}/items/1 failed (connect): ")
    assert "Connect" in line
    await up.aclose()


async def test_slow_upstream_504(stub_server: tuple[StubUpstream, str]) -> None:
    stub, base = stub_server
    stub.route("/slow", delay=3.0, body=b"late")
    up = Upstream(base, timeout=0.2, service="catalog")
    start = time.perf_counter()
    fetched = await up.fetch("GET", "/slow", b"", [], None, max_body=1000)
    assert time.perf_counter() - start < 2.5  # the timeout, not the answer 3 s later
    assert fetched.status == 504 and fetched.failed
    # The problem names the service, never the upstream's (internal) address.
    detail = json.loads(fetched.body or b"")["detail"]
    assert detail == "The service 'catalog' did not answer within 0.2 s."
    assert base.split("//")[1] not in (fetched.body or b"").decode()
    await up.aclose()


async def test_slow_body_is_cut_only_by_a_total_timeout() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            for _ in range(100):  # each read is quick; the whole exchange is not
                writer.write(b"x")
                await asyncio.sleep(0.01)

    async with raw_server(handle) as base:
        # timeout bounds each phase (here: the time between reads), not the exchange
        up = Upstream(base, timeout=0.3)
        fetched = await up.fetch("GET", "/", b"", [], None, max_body=1000)
        assert fetched.status == 200 and fetched.body == b"x" * 100
        await up.aclose()
        up = Upstream(base, timeout=0.3, total_timeout=0.3)
        fetched = await up.fetch("GET", "/", b"", [], None, max_body=1000)
        assert fetched.status == 504
        await up.aclose()


async def short_content_length_origin(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """`/short` answers `Content-Length: 3` with the body `hello`; anything else `ok`."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /short "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nhello")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()


@pytest.mark.parametrize("transport", ["default", "httpcore"])
async def test_short_content_length_origin(transport: str) -> None:
    """An origin sending `Content-Length: 3` with body `hello` must not corrupt the pool."""
    async with raw_server(short_content_length_origin) as base:
        client = httpx.AsyncClient(trust_env=False) if transport == "httpcore" else None
        up = Upstream(base, timeout=2, client=client)
        try:
            first = await up.fetch("GET", "/short", b"", [], None, max_body=1000)
            second = await up.fetch("GET", "/2", b"", [], None, max_body=1000)
            third = await up.fetch("GET", "/3", b"", [], None, max_body=1000)
            posted = await up.fetch("POST", "/short", b"", [], b"x", max_body=1000)
            after = await up.fetch("POST", "/4", b"", [], b"x", max_body=1000)
        finally:
            await up.aclose()
            if client is not None:
                await client.aclose()
        assert (first.body, first.status) == (b"hel", 200)
        assert dict(first.headers)[b"content-length"] == b"3"
        assert second.body == b"ok" and third.body == b"ok"
        # Unsafe methods are not retried: the default transport refuses the response (502)
        # and httpcore serves the declared bytes; the pool is sound either way.
        assert posted.status in (200, 502)
        assert after.status == 200 and after.body == b"ok"
