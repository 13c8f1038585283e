"""The gateway end to end: a real upstream on loopback, the gateway served by uvicorn."""

from __future__ import annotations

import gzip
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from cachegw import Gateway, MemoryBackend, Service, create_app
from cachegw._server import uvicorn_options
from tests.redis_process import HEALTHY
from tests.servers import StubUpstream, free_port, run_uvicorn


@contextmanager
def gateway_for(
    stub: StubUpstream | None,
    *routes: tuple[str, dict[str, Any]],
    backend: Any = None,
    **service: Any,
) -> Iterator[tuple[httpx.Client, str]]:
    """A gateway with one service ``svc`` at ``/svc`` in front of ``stub``."""
    token_env = service.pop("admin_token_env", None)
    with run_uvicorn(stub or StubUpstream()) as upstream:
        svc = Service("svc", service.pop("upstream", upstream), prefix="/svc", **service)
        for path, knobs in routes or (("/{rest:path}", {"ttl": 60}),):
            svc.route(path, **knobs)
        gateway = Gateway(
            services=[svc],
            backend=backend or MemoryBackend(),
            admin_token_env=token_env,
            op_timeout=HEALTHY,  # a loaded machine must not turn a HIT into a miss (issue 28)
        )
        with (
            run_uvicorn(create_app(gateway), **uvicorn_options(lifespan="on")) as base,
            httpx.Client(base_url=base, timeout=10) as client,
        ):
            yield client, base


def raw_request(base: str, data: bytes) -> bytes:
    """Send bytes as they are (no client-side normalisation) and read the whole answer."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    None,
                )
                if length is not None and len(rest) >= length:
                    break
        return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# -- caching basics ---------------------------------------------------------------------


def test_miss_then_hit_replays_the_upstream_response() -> None:
    stub = StubUpstream()
    stub.route(
        "/items/42",
        headers=[(b"content-type", b"application/json"), (b"x-origin", b"yes")],
        body=b'{"id": 42}',
    )
    with gateway_for(stub, ("/items/{item_id}", {"ttl": 60})) as (client, _):
        first = client.get("/svc/items/42")
        second = client.get("/svc/items/42")
    assert first.status_code == second.status_code == 200
    assert first.content == second.content == b'{"id": 42}'
    assert first.headers["x-cache-status"] == "MISS"
    assert first.headers["cache-status"] == "cachegw; fwd=uri-miss; stored"
    assert second.headers["x-cache-status"] == "HIT"
    assert second.headers["cache-status"].startswith("cachegw; hit; ttl=")
    assert second.headers["x-origin"] == "yes"
    assert int(second.headers["age"]) >= 0
    assert first.headers["etag"] == second.headers["etag"]
    assert stub.hits["/items/42"] == 1


def test_a_route_that_keeps_nothing_forwards_the_request_as_it_came() -> None:
    """ttl = 0 (max_ttl follows it): nothing can be stored, so the request is forwarded
    without the cache's work (issue 26): the client's conditionals, Range and
    Accept-Encoding reach the upstream, HEAD stays HEAD, and nothing is stored even when
    the upstream marks its answer fresh."""
    stub = StubUpstream()
    stub.route("/fresh", headers=[(b"cache-control", b"max-age=600")], body=b"fresh")
    with gateway_for(stub, ("/{rest:path}", {"ttl": 0})) as (client, _):
        asked = {
            "if-none-match": '"v1"',
            "range": "bytes=0-1",
            "accept-encoding": "br, zstd",
        }
        echoed = client.get("/svc/echo", headers=asked)
        head = client.head("/svc/echo")
        answers = [client.get("/svc/fresh") for _ in range(3)]
    seen = {k: v for k, v in echoed.json()["headers"]}
    assert {k: seen.get(k) for k in asked} == asked
    assert echoed.headers["x-cache-status"] == "MISS"
    assert echoed.headers["cache-status"] == "cachegw; fwd=uri-miss"
    assert stub.requests[1]["method"] == "HEAD" and head.status_code == 200
    assert [a.headers["x-cache-status"] for a in answers] == ["MISS"] * 3
    assert stub.hits["/fresh"] == 3


def test_prefix_stripped_and_raw_query_forwarded_byte_for_byte() -> None:
    stub = StubUpstream()
    with gateway_for(stub) as (_, base):
        answer = raw_request(
            base,
            b"GET /svc/echo?b=2;a=%2F&x=%zz&&y HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        )
    assert status_of(answer) == 200
    seen = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert seen["raw_path"] == "/echo"
    assert seen["query_string"] == "b=2;a=%2F&x=%zz&&y"


def test_query_string_is_part_of_the_key() -> None:
    stub = StubUpstream()
    with gateway_for(stub) as (client, _):
        a = client.get("/svc/list?page=1")
        b = client.get("/svc/list?page=2")
        a2 = client.get("/svc/list?page=1")
    assert json.loads(a.content)["query_string"] == "page=1"
    assert json.loads(b.content)["query_string"] == "page=2"
    assert a2.headers["x-cache-status"] == "HIT"
    assert a2.content == a.content
    assert stub.hits["/list"] == 2


def test_undeclared_path_is_404_and_upstream_untouched() -> None:
    stub = StubUpstream()
    with gateway_for(stub, ("/items/{item_id}", {"ttl": 60})) as (client, _):
        response = client.get("/svc/admin/users")
        outside = client.get("/other")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert outside.status_code == 404
    assert sum(stub.hits.values()) == 0


def test_methods_knob_gives_405() -> None:
    stub = StubUpstream()
    with gateway_for(stub, ("/items/{item_id}", {"ttl": 60, "methods": ["GET"]})) as (client, _):
        response = client.delete("/svc/items/1")
    assert response.status_code == 405
    # The path the client asked for, not the route template.
    assert response.json()["detail"] == "DELETE is not allowed on /svc/items/1"
    assert "GET" in response.headers["allow"]
    assert sum(stub.hits.values()) == 0


def test_upstream_max_age_honoured_and_capped_by_max_ttl() -> None:
    stub = StubUpstream()
    stub.route("/short", headers=[(b"cache-control", b"max-age=1")], body=b"s")
    stub.route("/long", headers=[(b"cache-control", b"max-age=3600")], body=b"l")
    routes = ("/{rest:path}", {"ttl": 0, "max_ttl": 1})
    with gateway_for(stub, routes) as (client, _):
        client.get("/svc/short")
        client.get("/svc/long")
        hit_short = client.get("/svc/short")
        hit_long = client.get("/svc/long")
        time.sleep(1.3)
        again_short = client.get("/svc/short")
        again_long = client.get("/svc/long")
        plain = client.get("/svc/plain")
        plain2 = client.get("/svc/plain")
    assert hit_short.headers["x-cache-status"] == hit_long.headers["x-cache-status"] == "HIT"
    assert again_short.headers["x-cache-status"] == "MISS"
    assert again_long.headers["x-cache-status"] == "MISS"  # capped at max_ttl = 1 s
    # ttl = 0: no explicit freshness, not stored
    assert plain.headers["x-cache-status"] == plain2.headers["x-cache-status"] == "MISS"
    assert stub.hits["/plain"] == 2


@pytest.mark.parametrize(
    "header",
    [
        (b"cache-control", b"no-store"),
        (b"cache-control", b"private, max-age=60"),
        (b"Cache-Control", b"PRIVATE"),
        (b"set-cookie", b"session=abc"),
        (b"vary", b"*"),
        (b"cache-control", b"no-cache"),
    ],
)
def test_unsafe_responses_are_never_stored(header: tuple[bytes, bytes]) -> None:
    stub = StubUpstream()
    stub.route("/x", headers=[header], body=b"personal")
    with gateway_for(stub) as (client, _):
        statuses = []
        for _ in range(3):
            client.cookies.clear()  # a cookie would make the request bypass anyway
            statuses.append(client.get("/svc/x").headers["x-cache-status"])
    assert statuses == ["MISS", "MISS", "MISS"]
    assert stub.hits["/x"] == 3


def test_statuses_outside_the_list_are_not_stored() -> None:
    stub = StubUpstream()
    stub.route("/e", status=500, body=b"boom")
    stub.route("/gone", status=404, body=b"nope")
    with gateway_for(stub) as (client, _):
        for _ in range(2):
            client.get("/svc/e")
            client.get("/svc/gone")
    assert stub.hits["/e"] == 2
    assert stub.hits["/gone"] == 1  # 404 is storable by default


def test_upstream_vary_is_part_of_the_key() -> None:
    stub = StubUpstream()
    stub.route("/v", headers=[(b"vary", b"Accept-Language")], body=b"v")
    with gateway_for(stub) as (client, _):
        en = client.get("/svc/v", headers={"accept-language": "en"})
        fr = client.get("/svc/v", headers={"accept-language": "fr"})
        en2 = client.get("/svc/v", headers={"accept-language": "en"})
        fr2 = client.get("/svc/v", headers={"accept-language": "fr"})
    assert [r.headers["x-cache-status"] for r in (en, fr, en2, fr2)] == [
        "MISS",
        "MISS",
        "HIT",
        "HIT",
    ]
    assert stub.hits["/v"] == 2


def test_declared_vary_is_part_of_the_key() -> None:
    stub = StubUpstream()
    with gateway_for(stub, ("/{rest:path}", {"ttl": 60, "vary": ["X-Tenant"]})) as (client, _):
        a = client.get("/svc/t", headers={"x-tenant": "a"})
        b = client.get("/svc/t", headers={"x-tenant": "b"})
        a2 = client.get("/svc/t", headers={"x-tenant": "a"})
    assert [r.headers["x-cache-status"] for r in (a, b, a2)] == ["MISS", "MISS", "HIT"]
    assert "x-tenant" in a.headers["vary"].lower()


def test_credentials_bypass_shared_entries() -> None:
    stub = StubUpstream()
    with gateway_for(stub) as (client, _):
        mine = client.get("/svc/me", headers={"authorization": "Bearer alice"})
        theirs = client.get("/svc/me", headers={"authorization": "Bearer bob"})
        cookie = client.get("/svc/me", headers={"cookie": "s=carol"})
        anonymous = client.get("/svc/me")
    assert mine.headers["x-cache-status"] == "BYPASS"
    assert theirs.headers["x-cache-status"] == "BYPASS"
    assert cookie.headers["x-cache-status"] == "BYPASS"
    assert "bob" in theirs.text and "alice" not in theirs.text
    assert "alice" not in anonymous.text and "bob" not in anonymous.text
    assert stub.hits["/me"] == 4


def test_public_response_to_authorized_request_may_be_shared() -> None:
    stub = StubUpstream()
    stub.route("/pub", headers=[(b"cache-control", b"public, max-age=60")], body=b"public")
    with gateway_for(stub) as (client, _):
        client.get("/svc/pub", headers={"authorization": "Bearer alice"})
        again = client.get("/svc/pub", headers={"authorization": "Bearer bob"})
    assert again.headers["x-cache-status"] == "HIT"
    assert stub.hits["/pub"] == 1


def test_per_principal_key_function() -> None:
    stub = StubUpstream()

    def user(request: Any) -> str:
        return str(request.headers["authorization"])

    with gateway_for(stub, ("/{rest:path}", {"ttl": 60, "key": user})) as (client, _):
        alice = client.get("/svc/me", headers={"authorization": "Bearer alice"})
        bob = client.get("/svc/me", headers={"authorization": "Bearer bob"})
        alice2 = client.get("/svc/me", headers={"authorization": "Bearer alice"})
    assert alice2.headers["x-cache-status"] == "HIT"
    assert alice2.content == alice.content
    assert "alice" in alice2.text and "bob" in bob.text
    assert stub.hits["/me"] == 2


def test_head_is_answered_from_the_get_entry() -> None:
    stub = StubUpstream()
    stub.route("/h", body=b"hello world")
    with gateway_for(stub) as (client, _):
        client.get("/svc/h")
        head = client.head("/svc/h")
    assert head.headers["x-cache-status"] == "HIT"
    assert head.headers["content-length"] == "11"
    assert head.content == b""
    assert stub.hits["/h"] == 1


def test_unsafe_method_invalidates_the_get_entry() -> None:
    stub = StubUpstream()
    stub.route("/doc", body=b"v1")
    with gateway_for(stub) as (client, _):
        client.get("/svc/doc")
        assert client.get("/svc/doc").headers["x-cache-status"] == "HIT"
        client.post("/svc/doc", content=b"new")
        after = client.get("/svc/doc")
    assert after.headers["x-cache-status"] == "MISS"
    assert stub.hits["/doc"] == 3


def test_if_none_match_gets_304_from_cache() -> None:
    stub = StubUpstream()
    stub.route("/c", body=b"content")
    with gateway_for(stub) as (client, _):
        first = client.get("/svc/c")
        conditional = client.get("/svc/c", headers={"if-none-match": first.headers["etag"]})
    assert conditional.status_code == 304
    assert conditional.content == b""
    assert stub.hits["/c"] == 1


def test_request_no_cache_is_parsed_not_string_compared() -> None:
    stub = StubUpstream()
    with gateway_for(stub) as (client, _):
        client.get("/svc/n")
        forced = client.get("/svc/n", headers={"cache-control": "max-stale=5, NO-CACHE"})
        zero = client.get("/svc/n", headers={"cache-control": "Max-Age=0"})
        normal = client.get("/svc/n")
    assert forced.headers["x-cache-status"] == "BYPASS"
    assert zero.headers["x-cache-status"] == "BYPASS"
    assert normal.headers["x-cache-status"] == "HIT"
    assert stub.hits["/n"] == 3


# -- forwarding ---------------------------------------------------------------------------


def test_hop_by_hop_headers_removed_and_forwarded_headers_set_by_gateway() -> None:
    stub = StubUpstream()
    with gateway_for(stub) as (client, _):
        response = client.get(
            "/svc/echo",
            headers={
                "connection": "keep-alive, x-secret",
                "x-secret": "hop",
                "keep-alive": "timeout=5",
                "te": "trailers",
                "x-forwarded-for": "6.6.6.6",
                "x-forwarded-host": "evil.example",
                "forwarded": "for=6.6.6.6",
                "x-end-to-end": "kept",
            },
        )
    seen = {k.lower(): v for k, v in json.loads(response.content)["headers"]}
    assert "x-secret" not in seen and "keep-alive" not in seen and "te" not in seen
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert "x-forwarded-host" not in seen  # nginx's default: the upstream's own host only
    assert "forwarded" not in seen
    assert seen["x-end-to-end"] == "kept"
    assert "cachegw" in seen["via"]


def test_via_names_the_protocol_version_the_client_used() -> None:
    """RFC 9110 §7.6.3: the forwarded request's Via has the version the gateway received."""
    stub = StubUpstream()
    with gateway_for(stub) as (_, base):
        vias = {}
        for version in ("1.0", "1.1"):
            answer = raw_request(
                base,
                f"GET /svc/echo?v={version} HTTP/{version}\r\nHost: gw\r\n"
                "Connection: close\r\n\r\n".encode(),
            )
            assert status_of(answer) == 200
            body = json.loads(answer.partition(b"\r\n\r\n")[2])
            vias[version] = {k.lower(): v for k, v in body["headers"]}["via"]
    assert vias == {"1.0": "1.0 cachegw", "1.1": "1.1 cachegw"}


def test_hop_by_hop_response_headers_removed() -> None:
    stub = StubUpstream()
    stub.route(
        "/r",
        headers=[(b"connection", b"x-internal"), (b"x-internal", b"1"), (b"x-public", b"2")],
        body=b"r",
    )
    with gateway_for(stub) as (client, _):
        response = client.get("/svc/r")
    assert "x-internal" not in response.headers
    assert response.headers["x-public"] == "2"


def test_content_encoding_passes_through_raw() -> None:
    stub = StubUpstream()
    packed = gzip.compress(b"x" * 1000)
    stub.route("/z", headers=[(b"content-encoding", b"gzip")], body=packed)
    with gateway_for(stub) as (_, base):
        for _ in range(2):
            answer = raw_request(
                base, b"GET /svc/z HTTP/1.1\r\nHost: gw\r\nAccept-Encoding: gzip\r\n\r\n"
            )
            head, _, body = answer.partition(b"\r\n\r\n")
            assert b"content-encoding: gzip" in head.lower()
            assert body == packed
    assert stub.hits["/z"] == 1


def test_redirects_are_returned_not_followed() -> None:
    stub = StubUpstream()
    stub.route("/old", status=302, headers=[(b"location", b"/new")], body=b"")
    with gateway_for(stub) as (client, _):
        response = client.get("/svc/old")
    assert response.status_code == 302
    assert response.headers["location"] == "/new"
    assert stub.hits["/new"] == 0


def test_bodies_over_max_body_stream_through_uncached() -> None:
    stub = StubUpstream()
    big = bytes(range(256)) * 4096  # 1 MiB
    stub.route("/big", body=big)
    with gateway_for(stub, ("/{rest:path}", {"ttl": 60, "max_body": 1000})) as (client, _):
        first = client.get("/svc/big")
        second = client.get("/svc/big")
    assert first.content == second.content == big
    assert first.headers["x-cache-status"] == second.headers["x-cache-status"] == "MISS"
    assert stub.hits["/big"] == 2


def test_request_body_forwarded() -> None:
    stub = StubUpstream()
    with gateway_for(stub) as (client, _):
        response = client.post("/svc/echo", content=b"payload" * 1000)
    assert json.loads(response.content)["body"] == "payload" * 1000


def test_connect_failure_is_a_fast_502_problem() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with gateway_for(None, upstream=closed) as (client, _):
        started = time.perf_counter()
        response = client.get("/svc/x")
        elapsed = time.perf_counter() - started
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"
    assert elapsed < 1.0


def test_upstream_timeout_is_504_problem() -> None:
    stub = StubUpstream()
    stub.route("/slow", delay=2.0, body=b"late")
    with gateway_for(stub, timeout=0.3) as (client, _):
        started = time.perf_counter()
        response = client.get("/svc/slow")
        elapsed = time.perf_counter() - started
    assert response.status_code == 504
    assert response.headers["content-type"] == "application/problem+json"
    assert elapsed < 1.5


def test_concurrent_cold_requests_are_coalesced() -> None:
    stub = StubUpstream()
    stub.route("/cold", delay=0.3, body=b"cold")
    with gateway_for(stub) as (_, base):
        results: list[httpx.Response] = []

        def get() -> None:
            with httpx.Client(base_url=base, timeout=10) as c:
                results.append(c.get("/svc/cold"))

        threads = [threading.Thread(target=get) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 20
    assert all(r.content == b"cold" for r in results)
    assert stub.hits["/cold"] == 1


def test_stale_if_error_serves_the_stale_entry() -> None:
    stub = StubUpstream()
    stub.route("/s", headers=[(b"cache-control", b"max-age=1")], body=b"good")
    with gateway_for(stub, ("/{rest:path}", {"ttl": 1, "stale_if_error": 60})) as (client, _):
        client.get("/svc/s")
        time.sleep(1.2)
        stub.route("/s", status=503, body=b"down")
        stale = client.get("/svc/s")
        stub.route("/s", headers=[(b"cache-control", b"max-age=1")], body=b"good again")
    assert stale.status_code == 200
    assert stale.content == b"good"
    assert stale.headers["x-cache-status"] == "STALE"


# -- hostile input: the upstream canary must see nothing --------------------------------


ATTACKS = [
    b"GET /svc/a/../../admin HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /svc/a/%2e%2e/%2E%2E/admin HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /svc/a%2F..%2F..%2Fadmin HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /svc/a%252F..%252Fadmin HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /svc/a;/../admin HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /svc/a%5C..%5Cadmin HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /svc//evil.example/x HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET //evil.example/svc/x HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET http://evil.example/svc/x HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /svc/x%00 HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"POST /svc/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /svc/x HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
]


def test_hostile_targets_get_4xx_and_never_reach_the_upstream() -> None:
    canary = StubUpstream()
    with gateway_for(canary) as (_, base):
        answers = [raw_request(base, attack) for attack in ATTACKS]
    for attack, answer in zip(ATTACKS, answers, strict=True):
        assert answer, attack
        assert 400 <= status_of(answer) < 500, (attack[:60], answer[:200])
    assert canary.requests == []


def test_client_supplied_forwarding_headers_cannot_poison_entries() -> None:
    stub = StubUpstream()
    with gateway_for(stub) as (client, _):
        poisoned = client.get("/svc/page", headers={"x-forwarded-host": "evil.example"})
        clean = client.get("/svc/page")
    assert "evil.example" not in poisoned.text
    assert clean.headers["x-cache-status"] == "HIT"
    assert "evil.example" not in clean.text


def test_fat_get_body_bypasses_the_cache() -> None:
    stub = StubUpstream()
    with gateway_for(stub) as (client, _):
        client.get("/svc/fat")
        fat = client.request("GET", "/svc/fat", content=b"poison")
        plain = client.get("/svc/fat")
    assert fat.headers["x-cache-status"] == "BYPASS"
    assert "poison" not in plain.text
    assert plain.headers["x-cache-status"] == "HIT"


def test_unsafe_method_invalidates_every_variant() -> None:
    stub = StubUpstream()
    stub.route("/v", headers=[(b"vary", b"Accept-Language")], body=b"v1")
    with gateway_for(stub) as (client, _):
        for lang in ("en", "fr"):
            client.get("/svc/v", headers={"accept-language": lang})
        client.put("/svc/v", content=b"new")
        after = [
            client.get("/svc/v", headers={"accept-language": lang}).headers["x-cache-status"]
            for lang in ("en", "fr")
        ]
    assert after == ["MISS", "MISS"]


def test_declared_vary_variants_are_invalidated_together() -> None:
    stub = StubUpstream()
    with gateway_for(stub, ("/{rest:path}", {"ttl": 60, "vary": ["X-Tenant"]})) as (client, _):
        for tenant in ("a", "b"):
            client.get("/svc/t", headers={"x-tenant": tenant})
        client.delete("/svc/t")
        after = [
            client.get("/svc/t", headers={"x-tenant": t}).headers["x-cache-status"]
            for t in ("a", "b")
        ]
    assert after == ["MISS", "MISS"]


def test_longest_prefix_owns_its_paths() -> None:
    """A path under a service's prefix that none of its routes declares is a 404, even
    when a root service with a catch-all exists."""
    stub = StubUpstream()
    with run_uvicorn(stub) as upstream:
        root = Service("root", upstream, prefix="").route("/{rest:path}", ttl=0)
        catalog = Service("catalog", upstream, prefix="/catalog").route("/items/{id}", ttl=0)
        gateway = Gateway(services=[root, catalog])
        with (
            run_uvicorn(create_app(gateway), **uvicorn_options(lifespan="on")) as base,
            httpx.Client(base_url=base) as client,
        ):
            declared = client.get("/catalog/items/1")
            undeclared = client.get("/catalog/admin")
            elsewhere = client.get("/other")
    assert declared.status_code == 200
    assert undeclared.status_code == 404
    assert elsewhere.status_code == 200
    assert stub.hits["/admin"] == 0


def test_metrics_follow_a_known_sequence_of_requests() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    stub = StubUpstream()
    stub.route("/s", headers=[(b"cache-control", b"max-age=1")], body=b"s")
    routes = ("/{rest:path}", {"ttl": 60, "stale_if_error": 60})
    with gateway_for(stub, routes) as (client, _):
        client.get("/svc/a")  # MISS
        client.get("/svc/a")  # HIT
        client.get("/svc/a")  # HIT
        client.get("/svc/a", headers={"authorization": "Bearer x"})  # BYPASS
        client.get("/svc/../x")  # refused (400) before routing: ERROR
        client.get("/svc/s")  # MISS
        time.sleep(1.1)
        stub.route("/s", status=503, body=b"down")
        client.get("/svc/s")  # STALE (stale-if-error), upstream 5xx
        text = client.get("/_cachegw/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def requests(status: str, route: str = "/{rest:path}", service: str = "svc") -> float:
        labels = (("cache_status", status), ("route", route), ("service", service))
        return samples.get(("cachegw_requests_total", labels), 0.0)

    assert requests("MISS") == 2
    assert requests("HIT") == 2
    assert requests("BYPASS") == 1
    assert requests("STALE") == 1
    assert requests("ERROR", route="", service="") == 1
    upstream_count = samples[
        ("cachegw_upstream_request_duration_seconds_count", (("service", "svc"),))
    ]
    assert upstream_count == 4  # two misses, the bypass, the failed refresh
    errors = samples[
        ("cachegw_upstream_errors_total", (("kind", "status_5xx"), ("service", "svc")))
    ]
    assert errors == 1
    stale = samples[
        ("cachegw_stale_served_total", (("reason", "stale-if-error"), ("service", "svc")))
    ]
    assert stale == 1
    assert samples[("cachegw_memory_entries", ())] >= 2


def _read_responses(
    sock: socket.socket, count: int, *, head: bool = False
) -> list[tuple[int, dict[str, str], bytes]]:
    """Read ``count`` HTTP/1.1 responses (with Content-Length) from a keep-alive socket;
    ``head``: answers to HEAD, which have no body whatever their Content-Length says."""
    buffer = b""
    answers = []
    while len(answers) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, "connection closed early"
            buffer += chunk
        start, _, buffer = buffer.partition(b"\r\n\r\n")
        lines = start.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = 0 if head else int(headers.get("content-length", "0"))
        while len(buffer) < length:
            buffer += sock.recv(65536)
        body, buffer = buffer[:length], buffer[length:]
        answers.append((int(lines[0].split()[1]), headers, body))
    return answers


def test_pipelined_hits_and_misses_keep_their_order(caplog: pytest.LogCaptureFixture) -> None:
    """Hits answered by cachegw's own protocol and misses answered by the ASGI app share a
    keep-alive connection: pipelined requests get their answers in order."""
    stub = StubUpstream()
    stub.route("/a", body=b"AAAA")
    stub.route("/b", body=b"BBBBBB", delay=0.1)
    with gateway_for(stub) as (client, base):
        client.get("/svc/a")  # stored
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            request = b"GET /svc/%s HTTP/1.1\r\nHost: gw\r\n\r\n"
            head = b"HEAD /svc/a HTTP/1.1\r\nHost: gw\r\n\r\n"
            sock.sendall(request % b"a" + request % b"b" + request % b"a")
            answers = _read_responses(sock, 3)
            sock.sendall(head)
            (head_answer,) = _read_responses(sock, 1, head=True)
            sock.sendall(request % b"b")
            answers += _read_responses(sock, 1)
    statuses = [(a[1]["x-cache-status"], a[2]) for a in answers]
    assert statuses == [("HIT", b"AAAA"), ("MISS", b"BBBBBB"), ("HIT", b"AAAA"), ("HIT", b"BBBBBB")]
    # The HEAD answer has no body but declares the GET's length.
    assert head_answer[1]["x-cache-status"] == "HIT"
    assert head_answer[1]["content-length"] == "4"
    # Closing a connection whose last answer came from the fast path is clean.
    time.sleep(0.1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert stub.hits["/a"] == 1 and stub.hits["/b"] == 1


def test_fast_hits_count_in_metrics_and_health() -> None:
    stub = StubUpstream()
    with gateway_for(stub) as (client, _):
        client.get("/svc/x")
        for _ in range(3):
            assert client.get("/svc/x").headers["x-cache-status"] == "HIT"
        stats = client.get("/_cachegw/health").json()["stats"]
        text = client.get("/_cachegw/metrics").text
    assert stats["HIT"] == 3
    assert (
        'cachegw_requests_total{cache_status="HIT",route="/{rest:path}",service="svc"} 3.0' in text
    )


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_fast_path_applies_the_header_limits_of_the_ordinary_path(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """A hit the fast path could answer, with one header line of 9 to 16 KB: a 431 as on
    the ordinary path, never the entry (issue 24)."""
    store: Any = None
    if backend == "redis":
        store = request.getfixturevalue("redis_url")  # opened and closed by the gateway
    stub = StubUpstream()
    stub.route("/x", body=b"entry", headers=[(b"cache-control", b"max-age=60")])
    with gateway_for(stub, backend=store) as (client, base):
        assert client.get("/svc/x").status_code == 200
        assert client.get("/svc/x").headers["x-cache-status"] == "HIT"
        for size in (8200, 9 * 1024, 12 * 1024, 16 * 1024 - 100):
            big = b"GET /svc/x HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
            answer = raw_request(base, big)
            assert status_of(answer) == 431, answer[:200]
        # Lines under the limit, together under 16 KiB: still a hit.
        fine = b"GET /svc/x HTTP/1.1\r\nHost: gw\r\nX-A: " + b"a" * 7000 + b"\r\n"
        fine += b"X-B: " + b"b" * 7000 + b"\r\n\r\n"
        assert b"x-cache-status: HIT" in raw_request(base, fine)
    assert stub.hits["/x"] == 1


def test_admin_prefix_answers_an_index_of_its_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /_cachegw/ lists the admin endpoints (not FastAPI's 404), and says whether the
    token-protected ones are on."""
    with gateway_for(None, admin_token_env="CACHEGW_TEST_INDEX_TOKEN") as (client, _):
        off = client.get("/_cachegw/")
        monkeypatch.setenv("CACHEGW_TEST_INDEX_TOKEN", "t")
        on = client.get("/_cachegw/")
    assert off.status_code == on.status_code == 200
    listed = {(e["method"], e["path"]): e for e in off.json()["endpoints"]}
    assert set(listed) == {
        ("GET", "/_cachegw/health"),
        ("GET", "/_cachegw/metrics"),
        ("POST", "/_cachegw/purge"),
        ("POST", "/_cachegw/reload"),
    }
    assert off.json()["admin_api"] is False
    assert listed["POST", "/_cachegw/purge"]["available"] is False
    assert on.json()["admin_api"] is True
    assert all(e["available"] for e in on.json()["endpoints"])
    assert off.headers["cache-control"] == "no-store"
