"""The stored entry's data-only envelope and the content ETag."""

from __future__ import annotations

import json
import math
import pickle
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import cachegw
from cachegw._entry import MAGIC, Entry, VaryMarker, decode, encode, strong_etag


def full_entry() -> Entry:
    return Entry(
        status=203,
        headers=[
            (b"content-type", b"application/octet-stream"),
            (b"x-latin", "caf\xe9".encode("latin-1")),
            (b"x-repeat", b"1"),
            (b"x-repeat", b"2"),
        ],
        body=b"\x00\x01binary\x00\xff\xfe" + bytes(range(256)),
        stored_at=1_700_000_000.25,
        lifetime=60.5,
        age0=3.0,
        stale_while_revalidate=10.0,
        stale_if_error=300.0,
        must_revalidate=True,
        shared_auth=True,
        etag='"abc"',
        tags=["items", "item:42"],
    )


def test_round_trip_every_field() -> None:
    entry = full_entry()
    data = encode(entry)
    assert isinstance(data, bytes)
    assert data.startswith(MAGIC)
    assert decode(data) == entry


def test_round_trip_defaults_and_empty_body() -> None:
    entry = Entry(status=204, headers=[], body=b"", stored_at=0.0, lifetime=0.0)
    decoded = decode(encode(entry))
    assert decoded == entry
    assert isinstance(decoded, Entry)
    assert decoded.etag is None
    assert decoded.tags == []


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode(full_entry())
    assert decode(bytearray(data)) == full_entry()
    assert decode(memoryview(data)) == full_entry()


def test_vary_marker_round_trip() -> None:
    marker = VaryMarker(names=["accept-encoding", "accept-language"], stored_at=12.5)
    data = encode(marker)
    assert data.startswith(MAGIC)
    assert decode(data) == marker


def test_entry_age_arithmetic() -> None:
    entry = Entry(status=200, headers=[], body=b"", stored_at=100.0, lifetime=60, age0=5)
    assert entry.age(100.0) == 5
    assert entry.age(110.0) == 15
    assert entry.age(90.0) == 5  # a clock that goes back never makes it younger
    assert entry.ttl_left(110.0) == 45
    entry.stale_if_error = 30
    entry.stale_while_revalidate = 10
    assert entry.storage_ttl(110.0) == 75


def _envelope(head: Any, body: bytes = b"") -> bytes:
    raw = json.dumps(head).encode()
    return MAGIC + struct.pack(">I", len(raw)) + raw + body


def _good_head(**changes: Any) -> dict[str, Any]:
    head = json.loads(encode(full_entry())[8:].split(b"}", 1)[0] + b"}")
    head.update(changes)
    return head


def test_good_head_helper_is_good() -> None:
    assert isinstance(decode(_envelope(_good_head())), Entry)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"CGW", id="short"),
        pytest.param(b"CGX\x01" + encode(full_entry())[4:], id="wrong-magic"),
        pytest.param(b"CGW\x03" + encode(full_entry())[4:], id="wrong-version"),
        pytest.param(b"CGW\x00" + encode(full_entry())[4:], id="version-0"),
        pytest.param(encode(full_entry())[:6], id="truncated-length"),
        pytest.param(encode(full_entry())[:20], id="truncated-head"),
        pytest.param(MAGIC + struct.pack(">I", 10**9) + b"{}", id="length-past-end"),
        pytest.param(MAGIC + struct.pack(">I", 5) + b"{nope", id="bad-json"),
        pytest.param(MAGIC + struct.pack(">I", 2) + b"\xff\xfe", id="not-utf8"),
        pytest.param(_envelope([1, 2]), id="head-is-list"),
        pytest.param(_envelope({}), id="head-empty"),
        pytest.param(_envelope({"k": "zz"}), id="unknown-kind"),
        pytest.param(_envelope({"k": "v", "n": "accept", "t": 1}), id="marker-names-str"),
        pytest.param(_envelope({"k": "v", "n": [1], "t": 1}), id="marker-names-int"),
        pytest.param(_envelope({"k": "v", "n": [], "t": "x"}), id="marker-time-str"),
        pytest.param(_envelope(_good_head(s="200")), id="status-str"),
        pytest.param(_envelope(_good_head(s=99)), id="status-99"),
        pytest.param(_envelope(_good_head(s=600)), id="status-600"),
        pytest.param(_envelope(_good_head(s=200.0)), id="status-float"),
        pytest.param(_envelope(_good_head(s=True)), id="status-bool"),
        pytest.param(_envelope(_good_head(h="x")), id="headers-str"),
        pytest.param(_envelope(_good_head(h=[["a", 1]])), id="header-value-int"),
        pytest.param(_envelope(_good_head(h=[["a"]])), id="header-pair-short"),
        pytest.param(_envelope(_good_head(h=[["\u20ac", "x"]])), id="header-not-latin1"),
        pytest.param(_envelope(_good_head(h=["\u20ac", "x"])), id="flat-header-not-latin1"),
        pytest.param(_envelope(_good_head(h=["a", "1", "b"])), id="header-value-missing"),
        pytest.param(_envelope(_good_head(h=["a", 1])), id="flat-header-value-int"),
        pytest.param(_envelope(_good_head(h=[10])), id="coded-name-value-missing"),
        pytest.param(_envelope(_good_head(h=[99])), id="header-code-unknown"),
        pytest.param(_envelope(_good_head(h=[-1])), id="header-code-negative"),
        pytest.param(_envelope(_good_head(h=[True])), id="header-code-bool"),
        pytest.param(_envelope(_good_head(h=[1.0])), id="header-code-float"),
        pytest.param(_envelope(_good_head(g=1, h=[])), id="derived-etag-without-header"),
        pytest.param(_envelope(_good_head(g=True)), id="etag-bool"),
        pytest.param(_envelope(_good_head(o=1.5)), id="fetch-offset-float"),
        pytest.param(_envelope(_good_head(o="1")), id="fetch-offset-str"),
        pytest.param(_envelope(_good_head(a="1")), id="age-str"),
        pytest.param(_envelope(_good_head(c="br")), id="coding-unknown"),
        pytest.param(_envelope(_good_head(l="60")), id="lifetime-str"),
        pytest.param(_envelope(_good_head(l=None)), id="lifetime-null"),
        pytest.param(_envelope(_good_head(t=True)), id="stored-at-bool"),
        pytest.param(MAGIC + struct.pack(">I", 9) + b'{"l":NaN}', id="nan"),
        pytest.param(_envelope(_good_head(m="false")), id="flag-str"),
        pytest.param(_envelope(_good_head(g=5)), id="etag-int"),
        pytest.param(_envelope(_good_head(x="items")), id="tags-str"),
        pytest.param(_envelope(_good_head(x=[1])), id="tags-int"),
        pytest.param(pickle.dumps({"status": 200, "body": b"x"}), id="pickle"),
        pytest.param(pickle.dumps(full_entry()), id="pickled-entry"),
        pytest.param(b'{"k": "r"}', id="bare-json"),
    ],
)
def test_decode_rejects(data: bytes) -> None:
    assert decode(data) is None


# A version-1 envelope as cachegw wrote it before version 2 (a gzip-coded entry).
V1_ENTRY = (
    b"CGW\x01\x00\x00\x01\x52"
    b'{"k":"r","s":200,"h":[["content-type","application/json"],'
    b'["etag","\\"abc-gzip\\""],["content-encoding","gzip"],["content-length","4"],'
    b'["vary","Accept-Encoding"]],"t":1796016093.5953474,"l":3600.0,"a":1.0,"w":2.0,'
    b'"e":3.0,"m":true,"p":false,"g":"\\"abc\\"","x":["*","svc:api"],'
    b'"f":1796016093.5953455,"r":4.0,"d":1.9073486328125e-06,"c":"gzip"}'
    b"gzip"
)


def test_version_1_envelopes_still_decode() -> None:
    size = struct.unpack(">I", V1_ENTRY[4:8])[0]
    assert V1_ENTRY[8 + size :] == b"gzip"  # the literal is a well-formed envelope
    entry = decode(V1_ENTRY)
    assert entry == Entry(
        status=200,
        headers=[
            (b"content-type", b"application/json"),
            (b"etag", b'"abc-gzip"'),
            (b"content-encoding", b"gzip"),
            (b"content-length", b"4"),
            (b"vary", b"Accept-Encoding"),
        ],
        body=b"gzip",
        stored_at=1796016093.5953474,
        lifetime=3600.0,
        age0=1.0,
        stale_while_revalidate=2.0,
        stale_if_error=3.0,
        must_revalidate=True,
        shared_auth=False,
        etag='"abc"',
        tags=["*", "svc:api"],
        fetched_at=1796016093.5953455,
        keep=4.0,
        fetch_time=1.9073486328125e-06,
        coding="gzip",
    )
    assert decode(b"CGW\x01" + V1_ENTRY[4:].replace(b'"a":1.0', b'"a":"1"')) is None
    # Re-encoded, it is version 2 and means the same (times no later, to the millisecond).
    assert isinstance(entry, Entry)
    again = decode(encode(entry))
    assert isinstance(again, Entry)
    assert again.headers == entry.headers and again.etag == entry.etag
    assert entry.stored_at - 0.001 < again.stored_at <= entry.stored_at
    assert entry.fetched_at - 0.002 < again.fetched_at <= entry.fetched_at


def gateway_entry() -> Entry:
    """A gzip-coded JSON entry shaped like the gateway's."""
    body = b"\x1f\x8b" + bytes(range(200))
    return Entry(
        status=200,
        headers=[
            (b"content-type", b"application/json"),
            (b"cache-control", b"max-age=3600"),
            (b"via", b"1.1 cachegw"),
            (b"etag", b'"cab62d75702e0577b3dfc348a517ce14-gzip"'),
            (b"content-encoding", b"gzip"),
            (b"content-length", str(len(body)).encode()),
            (b"vary", b"Accept-Encoding"),
        ],
        body=body,
        stored_at=1796016117.2730608,
        lifetime=3600.0,
        etag='"cab62d75702e0577b3dfc348a517ce14"',
        tags=["*", "svc:api", "path:api:/users/octocat/repos", "route:api:/{rest:path}"],
        fetched_at=1796016117.2681386,
        fetch_time=0.004922151565551758,
        coding="gzip",
    )


def test_version_2_is_compact_and_exact() -> None:
    entry = gateway_entry()
    data = encode(entry)
    head = data[8 : len(data) - len(entry.body)]
    # Defaults left out, common headers as numbers, the body's length and the ETag the
    # gateway made up not written twice: the fixed cost version 1 had was 510 bytes.
    assert len(head) < 250, head
    assert b"content-length" not in head and b"gzip" in head and head.count(b"cab62d") == 1
    decoded = decode(data)
    assert isinstance(decoded, Entry)
    assert decoded.headers == entry.headers  # in order, byte for byte
    assert decoded.body == entry.body and decoded.etag == entry.etag
    assert decoded.tags == entry.tags and decoded.coding == "gzip"
    assert (decoded.lifetime, decoded.age0, decoded.keep) == (3600.0, 0.0, 0.0)
    assert decoded.must_revalidate is False and decoded.shared_auth is False
    assert decoded.fetch_time == pytest.approx(entry.fetch_time, abs=1e-4)  # kept to 0.1 ms


def test_a_content_length_other_than_the_body_length_is_kept() -> None:
    entry = gateway_entry()
    entry.headers = [
        (b"content-length", b"999"),
        (b"content-length", str(len(entry.body)).encode()),
    ]
    entry.etag = '"other"'  # not the header's: written as it is
    decoded = decode(encode(entry))
    assert isinstance(decoded, Entry)
    assert decoded.headers == entry.headers and decoded.etag == '"other"'


@given(
    stored_at=st.floats(0, 4e9),
    back=st.floats(-1e6, 1e6),
)
def test_times_are_rounded_towards_the_past(stored_at: float, back: float) -> None:
    entry = gateway_entry()
    entry.stored_at = stored_at
    entry.fetched_at = stored_at - back or 1.0
    decoded = decode(encode(entry))
    assert isinstance(decoded, Entry)
    # Never later (a purge after the fetch began is never missed), at most ~1 ms earlier.
    assert entry.stored_at - 0.0011 < decoded.stored_at <= entry.stored_at
    assert entry.fetched_at - 0.0021 < decoded.fetched_at <= entry.fetched_at


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_times_are_written_and_refused(value: float) -> None:
    entry = gateway_entry()
    entry.stored_at = value
    assert decode(encode(entry)) is None
    entry = gateway_entry()
    entry.lifetime = value
    assert decode(encode(entry)) is None


def test_decode_rejects_non_finite_numbers() -> None:
    head = _good_head()
    raw = json.dumps(head).replace('"l": 60.5', '"l": Infinity').encode()
    assert b"Infinity" in raw
    assert decode(MAGIC + struct.pack(">I", len(raw)) + raw) is None


def test_decode_rejects_non_bytes() -> None:
    assert decode("CGW\x01...") is None  # type: ignore[arg-type]
    assert decode(None) is None  # type: ignore[arg-type]


class _Boom:
    def __reduce__(self) -> tuple[Any, ...]:
        return (pytest.fail, ("unpickled: decode ran pickle",))


def test_decode_never_unpickles() -> None:
    payload = pickle.dumps(_Boom())
    assert decode(payload) is None
    assert decode(MAGIC + payload) is None


PICKLE_USE = re.compile(
    r"^\s*(import|from)\s+(c?pickle|dill|marshal)\b|\b(c?pickle|dill|marshal)\."
)


def test_package_source_never_uses_pickle() -> None:
    package = Path(cachegw.__file__).parent
    sources = sorted(package.rglob("*.py"))
    assert len(sources) > 5
    offenders = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PICKLE_USE.search(line)
    ]
    assert offenders == []


# -- strong_etag -------------------------------------------------------------------------


def test_strong_etag_fixed_value() -> None:
    assert strong_etag(b"hello") == '"2cf24dba5fb0a30e26e83b2ac5b9e29e"'


@pytest.mark.parametrize("body", [b"", b"hello", b"\x00" * 10, bytes(range(256)) * 100])
def test_strong_etag_shape(body: bytes) -> None:
    tag = strong_etag(body)
    assert re.fullmatch(r'"[0-9a-f]{32}"', tag)  # quoted, strong (no W/)
    assert strong_etag(body) == tag
    assert strong_etag(body + b"x") != tag


def test_strong_etag_same_in_another_process() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from cachegw._entry import strong_etag; print(strong_etag(b'hello\\x00world'))",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "777", "PATH": ""},
    )
    assert out.stdout.strip() == strong_etag(b"hello\x00world")
