"""One path (issue 10): routing, the method check, the key and the forwarded request agree on
one normalised path, through a real gateway (raw sockets: the bytes of the target matter) with
the fast path on. The upstream is the adversarial framework of test_poisoning."""

from __future__ import annotations

import itertools
import json
import re
import string
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_poisoning import Framework, gateway, send

UNRESERVED = string.ascii_letters + string.digits + "-._~"


def normal(path: str) -> str:
    """The test's own oracle for RFC 3986 §6.2.2.1-2 normalisation of a valid path."""

    def one(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in UNRESERVED else f"%{match.group(1).upper()}"

    return re.sub(r"%([0-9A-Fa-f]{2})", one, path)


def spellings(word: str) -> Iterator[str]:
    """Every spelling of ``word`` with each letter plain, ``%6d`` or ``%6D``."""
    for choice in itertools.product(range(3), repeat=len(word)):
        out = []
        for char, how in zip(word, choice, strict=True):
            code = f"{ord(char):02x}"
            out.append(char if how == 0 else f"%{code}" if how == 1 else f"%{code.upper()}")
        yield "".join(out)


@pytest.fixture(scope="module", params=["memory", "redis"])
def framework(request: pytest.FixtureRequest) -> Iterator[tuple[Framework, str]]:
    """The adversarial upstream behind a gateway on each backend (Redis: the session's
    server; entries of earlier examples are kept, and the checks allow for them)."""
    backend = "memory" if request.param == "memory" else request.getfixturevalue("redis_proc").url
    upstream = Framework()
    with gateway(upstream, backend) as base:
        yield upstream, base


def request(base: str, method: str, target: str) -> tuple[int, dict[str, str], bytes]:
    length = "\nContent-Length: 0" if method not in ("GET", "HEAD") else ""
    return send(base, f"{method} {target} HTTP/1.1\nHost: gw.example{length}")


def test_every_spelling_of_a_method_restricted_route_is_held_to_its_methods(
    framework: tuple[Framework, str],
) -> None:
    upstream, base = framework
    spelled = list(spellings("admin"))
    assert len(spelled) == 243
    for index, word in enumerate(spelled):
        target = f"/svc/{word}/users/{index}"
        upstream.seen.clear()
        status, headers, _ = request(base, "DELETE", target)
        assert (status, headers.get("allow")) == (405, "GET, HEAD"), target
        assert upstream.seen == [], target
    # GET is allowed: the upstream runs exactly the path that was checked, and every
    # spelling shares the entry of the plain one.
    request(base, "GET", "/svc/admin/users/x")
    for word in spelled[:40]:
        upstream.seen.clear()
        status, headers, body = request(base, "GET", f"/svc/{word}/users/x")
        assert status == 200 and json.loads(body)["self"].endswith("/admin/users/x")
        assert headers["x-cache-status"] == "HIT" and upstream.seen == [], word


@pytest.mark.parametrize(
    "target",
    [
        "/svc/%2e%2e/svc/admin/users/1",
        "/svc/x/%2E%2e/admin/users/1",
        "/svc/x/%2e/../admin/users/1",
        "/svc/%2fadmin/users/1",
        "/svc/%5cadmin/users/1",
        "/svc/%2561dmin/users/1",
        "/svc/adm%00in/users/1",
        "/svc/%c0%aeadmin/users/1",
        "/svc/x/%c0%ae%c0%ae/admin/users/1",
    ],
)
def test_ambiguous_spellings_are_refused(framework: tuple[Framework, str], target: str) -> None:
    upstream, base = framework
    upstream.seen.clear()
    for method in ("GET", "DELETE"):
        status, headers, _ = request(base, method, target)
        assert status == 400 and headers["cache-control"] == "no-store", (method, target)
    assert upstream.seen == []


_escape = st.integers(0, 255).flatmap(lambda b: st.sampled_from([f"%{b:02x}", f"%{b:02X}"]))
_char = st.sampled_from(list(UNRESERVED + "!$&'()*+,=:@"))
_utf8 = st.sampled_from(["%C3%A9", "%c3%a9", "%E2%82%AC", "%F0%9F%98%80"])
_segment = st.lists(st.one_of(_char, _escape, _utf8), max_size=5).map("".join)
_word = st.sampled_from(["admin", "users", "page"]).flatmap(
    lambda w: st.sampled_from(list(itertools.islice(spellings(w), 0, None, 7)))
)
_targets = st.tuples(_word, st.lists(st.one_of(_segment, st.just("."), st.just("%2e")), max_size=3))


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(parts=_targets)
def test_property_route_method_key_and_upstream_agree(
    framework: tuple[Framework, str], parts: tuple[str, list[str]]
) -> None:
    upstream, base = framework
    word, segments = parts
    target = "/svc/" + "/".join([word, *segments])
    upstream.seen.clear()
    status, headers, body = request(base, "GET", target)
    if status == 400:
        assert upstream.seen == []
        return
    expected = normal(target).removeprefix("/svc")
    assert status == 200, (target, status, body)
    # The path the upstream received (the one it answered for) is the normal form.
    assert json.loads(body)["self"].endswith(expected), target
    assert all(seen["path"] == expected for seen in upstream.seen), target
    # The key: the normal form (and the target again) are the same entry.
    for again in (normal(target), target):
        _, hit_headers, hit = request(base, "GET", again)
        assert hit_headers["x-cache-status"] == "HIT" and hit == body, (target, again)
    # The route: the method list of /admin/{rest:path} applies iff the normal form is under it.
    upstream.seen.clear()
    status, headers, _ = request(base, "DELETE", target)
    if expected.startswith("/admin/"):
        assert (status, headers.get("allow")) == (405, "GET, HEAD"), target
        assert upstream.seen == []
    else:
        assert [s["method"] for s in upstream.seen] == ["DELETE"], target
        assert upstream.seen[0]["path"] == expected
