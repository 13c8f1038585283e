"""Compression the gateway negotiates: the pure rules of `cachegw._encoding`, then end to end
through `cachegw serve` (both backends; the protocol-level fast path and the ordinary path)
against an uncompressed and a gzip upstream, with httpx, raw sockets and curl."""

from __future__ import annotations

import gzip as gzip_module
import json
import random
import shutil
import socket
import subprocess
import zlib
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachegw._encoding import (
    GZIP,
    ORIGIN,
    accepts_gzip,
    compressible_type,
    for_client,
    for_storage,
    gunzip,
    gzip,
    upstream_etag,
)
from cachegw._entry import Entry, decode, encode
from tests.gateway_process import gateway_processes
from tests.servers import StubUpstream, run_uvicorn

# -- the rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("gzip", True),
        ("gzip, deflate, br", True),
        ("GZIP", True),
        ("x-gzip", True),
        ("br;q=1.0, gzip;q=0.5", True),
        ("gzip;q=0", False),
        ("gzip; q=0.000", False),
        ("*", True),
        ("*, gzip;q=0", False),
        ("*;q=0", False),
        ("identity", False),
        ("br, deflate", False),
        ("gzip;q=abc", False),
        ("gzip;q=2", False),
        ("", False),
        (None, False),
    ],
)
def test_accepts_gzip(value: str | None, expected: bool) -> None:
    assert accepts_gzip(value) is expected


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("text/html", True),
        ("application/vnd.api+json", True),
        ("image/svg+xml", True),
        ("application/javascript", True),
        ("image/png", False),
        ("application/octet-stream", False),
        ("application/zip", False),
        (None, False),
    ],
)
def test_compressible_type(content_type: str | None, expected: bool) -> None:
    assert compressible_type(content_type) is expected


JSON = json.dumps([{"id": i, "name": f"item {i}", "tags": ["a", "b"]} for i in range(60)]).encode()
HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(JSON)).encode()),
    (b"etag", b'"v1"'),
    (b"cache-control", b"max-age=60"),
]


def store(headers: list[tuple[bytes, bytes]], body: bytes, **kw: object) -> tuple:  # type: ignore[type-arg]
    options = {"no_transform": False, "min_size": 1024, "max_size": 1 << 20, **kw}
    return for_storage(200, headers, body, **options)  # type: ignore[arg-type]


def test_stored_compressed_once_and_served_in_either_form() -> None:
    headers, body, coding = store(HEADERS, JSON)
    assert coding == GZIP
    assert gzip_module.decompress(body) == JSON
    assert len(body) < len(JSON) // 4
    as_dict = dict(headers)
    assert as_dict[b"content-encoding"] == b"gzip"
    assert as_dict[b"content-length"] == str(len(body)).encode()
    assert as_dict[b"etag"] == b'"v1-gzip"'  # a distinct ETag per encoding (RFC 9110 §8.8.3)
    assert as_dict[b"vary"] == b"Accept-Encoding"
    # A gzip client gets the stored bytes as they are: nothing to do per hit.
    assert for_client(coding, headers, body, "gzip, br") == (headers, body)
    plain_headers, plain = for_client(coding, headers, body, None)
    assert plain == JSON
    plain_dict = dict(plain_headers)
    assert b"content-encoding" not in plain_dict
    assert plain_dict[b"content-length"] == str(len(JSON)).encode()
    assert plain_dict[b"etag"] == b'"v1"'  # the upstream's own ETag on the upstream's form
    assert plain_dict[b"vary"] == b"Accept-Encoding"
    assert upstream_etag(coding, as_dict[b"etag"]) == b'"v1"'  # what revalidation sends


def test_upstream_gzip_is_kept_and_decompressed_for_identity_clients() -> None:
    packed = gzip(JSON)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-encoding", b"gzip"),
        (b"etag", b'W/"up"'),
        (b"vary", b"Accept-Encoding"),
    ]
    stored, body, coding = store(headers, packed)
    length = (b"content-length", str(len(packed)).encode())
    assert (stored, body, coding) == ([*headers, length], packed, ORIGIN)  # Vary already there
    plain_headers, plain = for_client(coding, stored, body, "identity")
    assert plain == JSON
    assert dict(plain_headers)[b"etag"] == b'W/"up-identity"'
    assert upstream_etag(coding, b'W/"up"') == b'W/"up"'


@pytest.mark.parametrize(
    ("headers", "body", "kw"),
    [
        (HEADERS, JSON[:500], {}),  # below min_size
        ([(b"content-type", b"image/png")], JSON, {}),  # not a text type
        (HEADERS, JSON, {"no_transform": True}),  # RFC 9111 §5.2.2.6
        ([*HEADERS, (b"content-range", b"bytes 0-1/2")], JSON, {}),
        ([*HEADERS, (b"content-encoding", b"br")], JSON, {}),  # another coding: as it came
        ([(b"content-encoding", b"gzip")], b"not gzip at all", {}),  # broken: as it came
        ([(b"content-type", b"text/plain")], random.Random(1).randbytes(2048), {}),  # no gain
    ],
)
def test_stored_as_it_came(headers: list[tuple[bytes, bytes]], body: bytes, kw: dict) -> None:  # type: ignore[type-arg]
    assert store(headers, body, **kw) == (headers, body, "")


def test_only_200_is_transformed() -> None:
    assert (
        for_storage(404, HEADERS, JSON, no_transform=False, min_size=1, max_size=1 << 20)[2] == ""
    )


def test_decompression_bomb_is_not_negotiated() -> None:
    bomb = gzip(b"\0" * (4 << 20))
    assert gunzip(bomb, 1 << 20) is None
    headers = [(b"content-encoding", b"gzip")]
    assert store(headers, bomb) == (headers, bomb, "")  # max_size 1 MiB


@given(st.binary(max_size=4096))
def test_gzip_round_trip_and_determinism(body: bytes) -> None:
    packed = gzip(body)
    assert gzip(body) == packed  # no timestamp: equal bodies, equal bytes
    assert gunzip(packed, len(body)) == body
    assert gunzip(packed + b"x", len(body)) is None  # trailing garbage
    assert gunzip(packed[:-1], len(body)) is None  # truncated


def test_coding_survives_the_envelope() -> None:
    entry = Entry(status=200, headers=[], body=gzip(b"x"), stored_at=1.0, lifetime=5.0)
    entry.coding = GZIP
    again = decode(encode(entry))
    assert isinstance(again, Entry) and again.coding == GZIP
    plain = Entry(status=200, headers=[], body=b"x", stored_at=1.0, lifetime=5.0)
    assert b'"c"' not in encode(plain)  # old and new envelopes are the same without a coding
    forged = encode(entry).replace(b'"c":"gzip"', b'"c":"zstd"')
    assert decode(forged) is None


# -- end to end ------------------------------------------------------------------------

TOML = """
[cache]
backend = "{backend}"
op_timeout = "5s"  # a loaded machine must not turn HITs into misses
prefix = "z"
{extra}

[[services]]
name = "api"
upstream = "{upstream}"
prefix = ""
ttl = 60

  [[services.routes]]
  path = "/{{rest:path}}"
"""


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory"
    url: str = request.getfixturevalue("redis_url")
    return url


def _config(tmp_path: Path, upstream: str, backend: str, extra: str = "") -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(TOML.format(upstream=upstream, backend=backend, extra=extra))
    return path


def _raw(base: str, path: str, *lines: str) -> tuple[bytes, dict[bytes, bytes], bytes]:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{h}\r\n" for h in lines)
        sock.sendall((head + "Connection: close\r\n\r\n").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status, *header_lines = head_bytes.split(b"\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def _upstream() -> StubUpstream:
    stub = StubUpstream()
    stub.route(
        "/plain",
        body=JSON,
        headers=[(b"content-type", b"application/json"), (b"etag", b'"p1"')],
    )
    stub.route(
        "/packed",
        body=gzip(JSON),
        headers=[
            (b"content-type", b"application/json"),
            (b"content-encoding", b"gzip"),
            (b"etag", b'"g1"'),
            (b"vary", b"Accept-Encoding"),
        ],
    )
    stub.route(  # compresses without saying Vary
        "/nv",
        body=gzip(JSON),
        headers=[(b"content-type", b"application/json"), (b"content-encoding", b"gzip")],
    )
    stub.route(
        "/nt",
        body=JSON,
        headers=[(b"content-type", b"application/json"), (b"cache-control", b"no-transform")],
    )
    return stub


def test_negotiated_on_both_hit_paths(tmp_path: Path, backend: str) -> None:
    stub = _upstream()
    with (
        run_uvicorn(stub) as upstream,
        gateway_processes(_config(tmp_path, upstream, backend)) as [gw],
    ):
        # Raw sockets: the bytes on the wire, the miss then (repeated) hits, which the
        # protocol-level fast path answers once the entry is decoded in the process.
        rounds = [
            [_raw(gw.base, "/plain", "Accept-Encoding: gzip, deflate") for _ in range(3)],
            [_raw(gw.base, "/plain") for _ in range(3)],
            [_raw(gw.base, "/plain", "Accept-Encoding: br;q=1, gzip;q=0") for _ in range(2)],
        ]
        conditional = _raw(gw.base, "/plain", "Accept-Encoding: gzip", 'If-None-Match: "p1-gzip"')
        wrong_tag = _raw(gw.base, "/plain", 'If-None-Match: "p1-gzip"')  # identity client
        ranged = _raw(gw.base, "/plain", "Accept-Encoding: gzip", "Range: bytes=0-9")
    zipped, plain, refused = rounds
    for status, headers, body in zipped:
        assert status.startswith(b"HTTP/1.1 200")
        assert headers[b"content-encoding"] == b"gzip"
        assert gzip_module.decompress(body) == JSON
        assert headers[b"etag"] == b'"p1-gzip"'
        assert headers[b"vary"] == b"Accept-Encoding"
        assert headers[b"content-length"] == str(len(body)).encode()
    for status, headers, body in plain + refused:
        assert status.startswith(b"HTTP/1.1 200")
        assert b"content-encoding" not in headers
        assert body == JSON
        assert headers[b"etag"] == b'"p1"'
        assert headers[b"vary"] == b"Accept-Encoding"
    assert [h[b"x-cache-status"] for _, h, _ in zipped] == [b"MISS", b"HIT", b"HIT"]
    assert all(h[b"x-cache-status"] == b"HIT" for _, h, _ in plain + refused)
    assert conditional[0].startswith(b"HTTP/1.1 304")
    assert wrong_tag[0].startswith(b"HTTP/1.1 200")  # another representation's ETag
    assert ranged[0].startswith(b"HTTP/1.1 206")
    # A range is cut from the identity form, gzip accepted or not (issue 25): a part of a
    # gzip stream is useless to clients, which decode each response whole.
    assert ranged[2] == JSON[:10]
    assert b"content-encoding" not in ranged[1]
    assert ranged[1][b"content-range"] == f"bytes 0-9/{len(JSON)}".encode()
    assert ranged[1][b"etag"] == b'"p1"'
    assert stub.hits["/plain"] == 1  # one upstream request served every client
    sent = dict((k, v) for k, v in stub.requests[0]["headers"])
    assert sent["accept-encoding"] == "gzip"  # normalised for the upstream


def test_gzip_upstream_served_to_every_client(tmp_path: Path, backend: str) -> None:
    stub = _upstream()
    with (
        run_uvicorn(stub) as upstream,
        gateway_processes(_config(tmp_path, upstream, backend)) as [gw],
    ):
        zipped = [_raw(gw.base, "/packed", "Accept-Encoding: gzip") for _ in range(2)]
        plain = [_raw(gw.base, "/packed") for _ in range(2)]
        # Without Vary, the gateway still never sends gzip to a client that does not take it.
        no_vary = [_raw(gw.base, "/nv", "Accept-Encoding: gzip"), _raw(gw.base, "/nv")]
        for path in ("/plain", "/packed"):
            for encoding in ("gzip", "identity", "gzip;q=0, *"):
                response = httpx.get(f"{gw.base}{path}", headers={"accept-encoding": encoding})
                assert response.json() == json.loads(JSON), (path, encoding)
    for _, headers, body in zipped:
        assert headers[b"content-encoding"] == b"gzip"
        assert headers[b"etag"] == b'"g1"'
        assert gzip_module.decompress(body) == JSON
    for _, headers, body in plain:
        assert b"content-encoding" not in headers
        assert body == JSON
    # The upstream varies on Accept-Encoding: the identity client is a variant of its own,
    # asked for without Accept-Encoding; whatever it sent, the client gets identity.
    assert [h[b"x-cache-status"] for _, h, _ in plain] == [b"MISS", b"HIT"]
    asked = [dict(r["headers"]).get("accept-encoding") for r in stub.requests]
    assert asked[:2] == ["gzip", None]
    assert no_vary[0][1][b"content-encoding"] == b"gzip"
    assert b"content-encoding" not in no_vary[1][1] and no_vary[1][2] == JSON
    assert no_vary[1][1][b"x-cache-status"] == b"HIT"
    assert stub.hits["/nv"] == 1


def test_no_transform_and_switch_off(tmp_path: Path) -> None:
    stub = _upstream()
    with (
        run_uvicorn(stub) as upstream,
        gateway_processes(_config(tmp_path, upstream, "memory")) as [gw],
    ):
        nt = [_raw(gw.base, "/nt", "Accept-Encoding: gzip") for _ in range(2)]
    for _, headers, body in nt:
        assert b"content-encoding" not in headers and body == JSON
    assert nt[1][1][b"x-cache-status"] == b"HIT"
    off = tmp_path / "off"
    off.mkdir()
    with (
        run_uvicorn(stub) as upstream,
        gateway_processes(_config(off, upstream, "memory", "compress = false")) as [gw],
    ):
        got = [_raw(gw.base, "/plain", "Accept-Encoding: gzip") for _ in range(2)]
    for _, headers, body in got:
        assert b"content-encoding" not in headers and body == JSON
        assert b"vary" not in headers


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_compressed_and_plain(tmp_path: Path) -> None:
    stub = _upstream()
    with (
        run_uvicorn(stub) as upstream,
        gateway_processes(_config(tmp_path, upstream, "memory")) as [gw],
    ):

        def curl(*args: str) -> bytes:
            return subprocess.run(
                ["curl", "-s", "--max-time", "10", *args, f"{gw.base}/plain"],
                capture_output=True,
                check=True,
            ).stdout

        compressed = [curl("--compressed") for _ in range(2)]
        raw_gzip = curl("-H", "Accept-Encoding: gzip")
        plain = curl()
        part = curl("-H", "Accept-Encoding: gzip", "-r", "0-9")
        # curl --compressed -r: it decodes what it gets, so it must get identity bytes
        # (a part of a gzip stream made it write nothing; issue 25).
        resumed = curl("--compressed", "-r", "10-")
    assert compressed == [JSON, JSON]  # curl decoded what the gateway sent compressed
    assert zlib.decompress(raw_gzip, 31) == JSON  # ... which was gzip on the wire
    assert plain == JSON
    assert part == JSON[:10]  # a range is of the identity form
    assert resumed == JSON[10:]
    assert stub.hits["/plain"] == 1
