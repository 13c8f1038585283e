"""Byte ranges: the pure rules of `cachegw._ranges`, then end to end through `cachegw serve`
(both backends, both hit paths) with httpx, raw sockets and curl."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachegw._ranges import if_range_matches, ranged, select_range
from tests.gateway_process import gateway_processes
from tests.servers import StubUpstream, run_uvicorn

# -- the rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes=0-3", (0, 3)),
        ("bytes=2-", (2, 9)),
        ("bytes=-3", (7, 9)),
        ("bytes=-30", (0, 9)),  # a suffix longer than the body is the whole body
        ("bytes=5-500", (5, 9)),
        ("BYTES = 1-1", (1, 1)),
        ("bytes=10-", False),  # starts past the end
        ("bytes=-0", False),
        ("bytes=0-1,3-4", None),  # several ranges: the full response
        ("bytes=3-1", None),  # invalid: ignored
        ("bytes=a-b", None),
        ("bytes=-", None),
        ("bytes=1", None),
        ("items=0-1", None),
        ("bytes=0-1,", None),
        ("bytes=" + "9" * 40 + "-", None),
        ("bytes=²-3", None),
    ],
)
def test_select_range(value: str, expected: object) -> None:
    assert select_range(value, 10) == expected


@given(first=st.integers(0, 200), span=st.integers(0, 200), length=st.integers(0, 150))
def test_ranged_slices_like_python(first: int, span: int, length: int) -> None:
    body = bytes(i % 251 for i in range(length))
    headers = [(b"content-length", str(length).encode()), (b"etag", b'"x"')]
    out = ranged({"range": f"bytes={first}-{first + span}"}, 200, headers, body)
    assert out is not None
    status, got_headers, part = out
    if first >= length:
        assert (status, part) == (416, b"")
        assert (b"content-range", f"bytes */{length}".encode()) in got_headers
    else:
        last = min(first + span, length - 1)
        assert (status, part) == (206, body[first : last + 1])
        assert (b"content-range", f"bytes {first}-{last}/{length}".encode()) in got_headers
    assert dict(got_headers)[b"content-length"] == str(len(part)).encode()


def test_if_range() -> None:
    strong = [(b"etag", b'"v1"')]
    assert if_range_matches('"v1"', strong)
    assert not if_range_matches('"v2"', strong)
    assert not if_range_matches('W/"v1"', strong)  # weak never matches (§13.1.5)
    assert not if_range_matches('"v1"', [(b"etag", b'W/"v1"')])
    lm = b"Fri, 27 Nov 2026 10:00:00 GMT"
    dated = [(b"last-modified", lm), (b"date", b"Fri, 27 Nov 2026 10:00:05 GMT")]
    assert if_range_matches(lm.decode(), dated)
    same_second = [(b"last-modified", lm), (b"date", lm)]  # weak Last-Modified
    assert not if_range_matches(lm.decode(), same_second)
    assert not if_range_matches("Fri, 27 Nov 2026 09:00:00 GMT", dated)
    # A failing If-Range turns the answer into the full response.
    assert ranged({"range": "bytes=0-1", "if-range": '"v2"'}, 200, strong, b"abcd") is None
    assert ranged({"range": "bytes=0-1"}, 404, [], b"abcd") is None  # only a 200 is cut


# -- end to end ------------------------------------------------------------------------

TOML = """
[cache]
backend = "{backend}"
op_timeout = "5s"  # a loaded machine must not turn HITs into misses
prefix = "r"

[[services]]
name = "files"
upstream = "{upstream}"
prefix = ""
ttl = 60

  [[services.routes]]
  path = "/{{rest:path}}"
"""

BODY = b"0123456789abcdefghij"


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory"
    url: str = request.getfixturevalue("redis_url")
    return url


def _config(tmp_path: Path, upstream: str, backend: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(TOML.format(upstream=upstream, backend=backend))
    return path


def _raw_get(base: str, path: str, *lines: str) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{h}\r\n" for h in lines)
        sock.sendall((head + "Connection: close\r\n\r\n").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_ranges_from_the_cache(tmp_path: Path, backend: str) -> None:
    stub = StubUpstream()
    etag = b'"abc"'
    stub.route("/f", body=BODY, headers=[(b"content-type", b"text/plain"), (b"etag", etag)])
    with (
        run_uvicorn(stub) as upstream,
        gateway_processes(_config(tmp_path, upstream, backend)) as [gw],
        httpx.Client(base_url=gw.base, headers={"accept-encoding": "identity"}) as client,
    ):
        miss = client.get("/f", headers={"range": "bytes=2-5"})
        hit = client.get("/f", headers={"range": "bytes=2-5"})
        suffix = client.get("/f", headers={"range": "bytes=-4"})
        open_ended = client.get("/f", headers={"range": "bytes=15-"})
        beyond = client.get("/f", headers={"range": "bytes=20-"})
        several = client.get("/f", headers={"range": "bytes=0-1,4-5"})
        if_range_ok = client.get("/f", headers={"range": "bytes=0-0", "if-range": '"abc"'})
        if_range_old = client.get("/f", headers={"range": "bytes=0-0", "if-range": '"old"'})
        head = client.head("/f", headers={"range": "bytes=0-0"})
        whole = client.get("/f")  # the fast path: no Range, the full body
        raw = _raw_get(gw.base, "/f", "Range: bytes=1-2")
    assert (miss.status_code, miss.headers["x-cache-status"]) == (206, "MISS")
    assert (hit.status_code, hit.headers["x-cache-status"]) == (206, "HIT")
    for response in (miss, hit):
        assert response.content == b"2345"
        assert response.headers["content-range"] == "bytes 2-5/20"
        assert response.headers["content-length"] == "4"
        assert response.headers["etag"] == '"abc"'
    assert (suffix.status_code, suffix.content) == (206, b"ghij")
    assert suffix.headers["content-range"] == "bytes 16-19/20"
    assert (open_ended.status_code, open_ended.content) == (206, b"fghij")
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == "bytes */20"
    assert beyond.content == b""
    assert (several.status_code, several.content) == (200, BODY)  # documented: the full 200
    assert (if_range_ok.status_code, if_range_ok.content) == (206, b"0")
    assert (if_range_old.status_code, if_range_old.content) == (200, BODY)
    assert head.status_code == 200 and "content-range" not in head.headers
    assert (whole.status_code, whole.content, whole.headers["x-cache-status"]) == (200, BODY, "HIT")
    assert raw.startswith(b"HTTP/1.1 206 ") and raw.endswith(b"\r\n\r\n12")
    # One upstream request, for the whole representation: no Range reached it.
    assert stub.hits["/f"] == 1
    sent = {k for k, _ in stub.requests[0]["headers"]}
    assert "range" not in sent and "if-range" not in sent


def test_partial_upstream_answer_is_never_stored(tmp_path: Path) -> None:
    """An upstream that answers 206 to a request without Range (misbehaving) is passed on,
    never stored as if it were the whole representation."""
    stub = StubUpstream()
    stub.route(
        "/p",
        status=206,
        body=b"01",
        headers=[(b"content-range", b"bytes 0-1/20"), (b"cache-control", b"max-age=60")],
    )
    with (
        run_uvicorn(stub) as upstream,
        gateway_processes(_config(tmp_path, upstream, "memory")) as [gw],
    ):
        first = httpx.get(f"{gw.base}/p")
        second = httpx.get(f"{gw.base}/p", headers={"range": "bytes=0-0"})
        third = httpx.get(f"{gw.base}/p")
    assert [r.status_code for r in (first, second, third)] == [206, 206, 206]
    assert second.content == b"01"  # passed on as the upstream sent it, not cut again
    assert [r.headers["x-cache-status"] for r in (first, third)] == ["MISS", "MISS"]
    assert stub.hits["/p"] == 3


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_range(tmp_path: Path) -> None:
    stub = StubUpstream()
    stub.route("/c", body=BODY, headers=[(b"content-type", b"text/plain")])
    with (
        run_uvicorn(stub) as upstream,
        gateway_processes(_config(tmp_path, upstream, "memory")) as [gw],
    ):
        parts = [
            subprocess.run(
                ["curl", "-s", "--max-time", "10", "-r", spec, f"{gw.base}/c"],
                capture_output=True,
                check=True,
            ).stdout
            for spec in ("0-4", "-3", "10-")
        ]
    assert parts == [b"01234", b"hij", b"abcdefghij"]
    assert stub.hits["/c"] == 1
