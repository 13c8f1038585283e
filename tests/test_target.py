from __future__ import annotations

import json
from typing import Any

import pytest

from cachegw._target import BadTarget, check_headers, check_target, problem


def scope(raw_path: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {
        "type": "http",
        "http_version": "1.1",
        "raw_path": raw_path,
        "path": raw_path.decode("latin-1"),
        "headers": [(b"host", b"gw")] if headers is None else headers,
    }


@pytest.mark.parametrize(
    "raw",
    [
        b"/",
        b"/items/42",
        b"/items/42/",
        b"/a%20b/caf%C3%A9",
        b"/@evil.com/x",
        b"/a:b/~x/-/_/a.b/..a/a../...",
        b"/x=1&y=2,z!$'()*+",
        b"/a%3Bb/c",  # an encoded ";" is an ordinary data byte
    ],
)
def test_accepted(raw: bytes) -> None:
    assert check_target(scope(raw)) == raw.decode()


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        # RFC 3986 §6.2.2.2: encoded unreserved characters are the characters themselves.
        (b"/%41%62", "/Ab"),
        (b"/svc/%61dmin/users", "/svc/admin/users"),
        (b"/%61%64%6D%69%6e", "/admin"),
        (b"/%7e%2D%5f%2E%30", "/~-_.0"),
        (b"/a%2Ex/x%2e", "/a.x/x."),
        # §6.2.2.1: other escapes keep their meaning, in upper case.
        (b"/a%3bb/c", "/a%3Bb/c"),
        (b"/caf%c3%a9", "/caf%C3%A9"),
        (b"/a%20b", "/a%20b"),
        (b"/%e2%82%ac%41", "/%E2%82%ACA"),
    ],
)
def test_normal_form(raw: bytes, normal: str) -> None:
    assert check_target(scope(raw)) == normal
    assert check_target(scope(normal.encode())) == normal  # idempotent


@pytest.mark.parametrize(
    "raw",
    [
        b"http://evil/x",  # absolute-form as uvicorn's h11 protocol passes it
        b"HTTP://evil:81/a",
        b"*",
        b"evil.com/x",
        b"",
        b"//evil.com/x",
        b"/a//b",
        b"/a/%2e%2E/",
        b"/.",
        b"/..",
        b"/a/../b",
        b"/a/./b",
        b"/a/%2e%2e/b",
        b"/a/%2E%2E/b",
        b"/a/.%2E/b",
        b"/a/%2e./b",
        b"/a/%2e",
        b"/a%2F..%2F..%2Fadmin",
        b"/a%2fb",
        b"/a%5cb",
        b"/a%5Cb",
        b"/a\\b",
        b"/a\\..\\b",
        b"/a;jsessionid=1",
        b"/a;b/c",
        b"/a%252e%252e/b",
        b"/a%25",
        b"/a%00b",
        b"/a%0d%0aSet-Cookie:x",
        b"/a%7F",
        b"/a\x00b",
        b"/a\rb",
        b"/a\tb",
        b"/a b",
        b"/caf\xc3\xa9",
        b"/a\x7fb",
        b"/a%zz",
        b"/a%4",
        b"/a%C0%AF",  # overlong "/"
        b"/a%c0%ae%c0%ae/b",  # overlong ".."
        b"/a%E0%80%AF",  # overlong "/", three bytes
        b"/a%ED%A0%80",  # a UTF-16 surrogate
        b"/a%FF",
        b"/a%C3",  # truncated sequence
        b"/a%C3b",
        b"/a%",
        b"/a%g0",
        b"/a#frag",
        b"/a?b",
        b'/a"b',
        b"/a<b>",
        b"/a|b",
    ],
)
def test_rejected(raw: bytes) -> None:
    with pytest.raises(BadTarget) as info:
        check_target(scope(raw))
    assert info.value.status == 400


def test_missing_raw_path_uses_path() -> None:
    s = scope(b"/a")
    del s["raw_path"]
    assert check_target(s) == "/a"
    s["path"] = "/a/../b"
    with pytest.raises(BadTarget):
        check_target(s)


CL = b"content-length"
TE = b"transfer-encoding"
HOST = (b"host", b"gw")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([HOST, (CL, b"5"), (TE, b"chunked")], 400),
        ([HOST, (TE, b"chunked"), (CL, b"0")], 400),
        ([HOST, (CL, b"5"), (CL, b"6")], 400),
        ([HOST, (CL, b"5, 6")], 400),
        ([HOST, (CL, b"-1")], 400),
        ([HOST, (CL, b"0x10")], 400),
        ([HOST, (CL, b"")], 400),
        ([HOST, (CL, b"+5")], 400),
        ([], 400),
        ([HOST, (b"host", b"evil")], 400),
        ([HOST, (b"x-big", b"a" * 9000)], 431),
        ([HOST] + [(b"x-%d" % i, b"a" * 4000) for i in range(5)], 431),
    ],
)
def test_bad_headers(headers: list[tuple[bytes, bytes]], status: int) -> None:
    with pytest.raises(BadTarget) as info:
        check_headers(scope(b"/", headers))
    assert info.value.status == status


@pytest.mark.parametrize(
    ("headers", "length"),
    [
        ([HOST], 0),
        ([HOST, (CL, b"5")], 5),
        ([HOST, (CL, b"5"), (CL, b"5")], 5),
        ([HOST, (CL, b"5, 5")], 5),
        ([HOST, (CL, b"00")], 0),
        ([HOST, (TE, b"chunked")], None),
        ([HOST] + [(b"x-%d" % i, b"a" * 3000) for i in range(5)], 0),
    ],
)
def test_good_headers(headers: list[tuple[bytes, bytes]], length: int | None) -> None:
    """Accepted, with the body's declared length (None: chunked)."""
    assert check_headers(scope(b"/", headers)) == length


def test_http10_without_host_is_allowed() -> None:
    s = scope(b"/", [])
    s["http_version"] = "1.0"
    check_headers(s)


def test_custom_limit() -> None:
    with pytest.raises(BadTarget) as info:
        check_headers(scope(b"/", [HOST, (b"x", b"a" * 200)]), max_header_bytes=100)
    assert info.value.status == 431


def test_problem() -> None:
    status, headers, body = problem(502, "Bad Gateway", 'upstream "x" failed')
    assert status == 502
    assert dict(headers)[b"content-type"] == b"application/problem+json"
    assert int(dict(headers)[b"content-length"]) == len(body)
    assert json.loads(body) == {
        "type": "about:blank",
        "title": "Bad Gateway",
        "status": 502,
        "detail": 'upstream "x" failed',
    }
