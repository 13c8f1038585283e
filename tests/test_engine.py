"""The caching engine, state by state, on a real MemoryBackend and an injected clock."""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from collections.abc import Iterable
from email.utils import formatdate

import pytest
from fastapi_cache.types import Backend

from cachegw import CachePolicy, MemoryBackend
from cachegw._engine import CacheEngine
from cachegw._entry import HitForMiss, decode, strong_etag
from cachegw._models import Fetched, RequestInfo, Served

LAST_MODIFIED = "Sun, 06 Nov 1994 08:49:37 GMT"
BEFORE = "Sat, 05 Nov 1994 08:49:37 GMT"
AFTER = "Mon, 07 Nov 1994 08:49:37 GMT"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Upstream:
    """A fetch function that counts its calls and answers as told.

    Without a fixed ``body`` the n-th call answers ``b"v<n>"``.
    """

    def __init__(
        self,
        *,
        status: int = 200,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes | None = None,
        delay: float = 0.0,
        failed: bool = False,
        gate: asyncio.Event | None = None,
    ) -> None:
        self.status = status
        self.headers = list(headers)
        self.body = body
        self.delay = delay
        self.failed = failed
        self.gate = gate  # when set: calls after the first wait until the test opens it
        self.calls = 0

    async def __call__(self) -> Fetched:
        self.calls += 1
        n = self.calls
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.gate is not None and n > 1:
            await self.gate.wait()
        body = self.body if self.body is not None else b"v%d" % n
        return Fetched(self.status, list(self.headers), body, failed=self.failed)


def req(
    method: str = "GET", key: str = "t:k", per_principal: bool = False, **headers: str
) -> RequestInfo:
    return RequestInfo(
        method=method,
        key=key,
        headers={name.replace("_", "-"): value for name, value in headers.items()},
        per_principal=per_principal,
    )


def header(served: Served, name: str) -> str | None:
    values = [v.decode("latin-1") for n, v in served.headers if n == name.encode()]
    assert len(values) <= 1, f"{name} repeated: {values}"
    return values[0] if values else None


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def backend(clock: Clock) -> MemoryBackend:
    return MemoryBackend(clock=clock)


@pytest.fixture
def engine(backend: MemoryBackend, clock: Clock) -> CacheEngine:
    return CacheEngine(backend, clock=clock)


POLICY = CachePolicy(ttl=60)


# -- fresh hits, age, expiry ---------------------------------------------------------------


async def test_miss_then_hit_replays_response(engine: CacheEngine, clock: Clock) -> None:
    up = Upstream(
        status=200,
        headers=[(b"content-type", b"text/plain"), (b"x-a", b"1"), (b"x-a", b"2")],
        body=b"hello",
    )
    miss = await engine.serve(req(), POLICY, up)
    assert (miss.status, miss.body, miss.cache_status) == (200, b"hello", "MISS")
    assert header(miss, "x-cache-status") == "MISS"
    assert header(miss, "cache-status") == "cachegw; fwd=uri-miss; stored"
    assert header(miss, "age") is None

    hit = await engine.serve(req(), POLICY, up)
    assert up.calls == 1
    assert (hit.status, hit.body, hit.cache_status) == (200, b"hello", "HIT")
    assert header(hit, "x-cache-status") == "HIT"
    assert header(hit, "cache-status") == "cachegw; hit; ttl=60"
    assert header(hit, "age") == "0"
    assert header(hit, "content-type") == "text/plain"
    assert [v for n, v in hit.headers if n == b"x-a"] == [b"1", b"2"]
    assert header(hit, "etag") == strong_etag(b"hello")
    assert header(miss, "etag") == strong_etag(b"hello")
    assert engine.stats["HIT"] == 1
    assert engine.stats["MISS"] == 1


async def test_age_grows_with_clock(engine: CacheEngine, clock: Clock) -> None:
    up = Upstream()
    await engine.serve(req(), POLICY, up)
    clock.advance(10)
    hit = await engine.serve(req(), POLICY, up)
    assert header(hit, "age") == "10"
    assert header(hit, "cache-status") == "cachegw; hit; ttl=50"
    clock.advance(49)
    hit = await engine.serve(req(), POLICY, up)
    assert header(hit, "age") == "59"
    assert up.calls == 1


async def test_upstream_age_counts(engine: CacheEngine, clock: Clock) -> None:
    up = Upstream(headers=[(b"age", b"50")])
    miss = await engine.serve(req(), POLICY, up)
    assert header(miss, "age") is None or header(miss, "age") == "50"
    clock.advance(5)
    hit = await engine.serve(req(), POLICY, up)
    assert header(hit, "age") == "55"
    clock.advance(6)  # 61 s old: past the 60 s lifetime
    assert (await engine.serve(req(), POLICY, up)).cache_status in ("MISS", "EXPIRED")
    assert up.calls == 2


@pytest.mark.parametrize("age", ["\xb2", "-1", "1e3", "abc", "", "7200;x=1", "0, 0"])
async def test_invalid_upstream_age_makes_the_response_stale(engine: CacheEngine, age: str) -> None:
    # An Age that is not one plain number cannot be trusted: the response is treated as
    # stale (as the cache-tests suite requires). "\xb2" (superscript two, valid latin-1)
    # passes str.isdigit() but not float(): it must not crash the request either.
    up = Upstream(headers=[(b"age", age.encode("latin-1"))])
    miss = await engine.serve(req(), POLICY, up)
    assert miss.status == 200
    again = await engine.serve(req(), POLICY, up)
    assert again.cache_status == "MISS"
    assert up.calls == 2


async def test_two_age_lines_make_the_response_stale(engine: CacheEngine) -> None:
    up = Upstream(headers=[(b"age", b"0"), (b"age", b"0")])
    await engine.serve(req(), POLICY, up)
    assert (await engine.serve(req(), POLICY, up)).cache_status == "MISS"


async def test_expired_entry_is_fetched_again(engine: CacheEngine, clock: Clock) -> None:
    up = Upstream()
    await engine.serve(req(), POLICY, up)
    clock.advance(60)
    again = await engine.serve(req(), POLICY, up)
    assert again.cache_status in ("MISS", "EXPIRED")
    assert again.body == b"v2"
    assert up.calls == 2
    hit = await engine.serve(req(), POLICY, up)
    assert (hit.cache_status, hit.body) == ("HIT", b"v2")


async def test_expired_entry_kept_for_stale_window_is_expired(
    engine: CacheEngine, clock: Clock
) -> None:
    policy = CachePolicy(ttl=10, stale_if_error=100)
    up = Upstream()
    await engine.serve(req(), policy, up)
    clock.advance(11)
    again = await engine.serve(req(), policy, up)
    assert (again.cache_status, again.body) == ("EXPIRED", b"v2")
    assert header(again, "x-cache-status") == "EXPIRED"
    assert (await engine.serve(req(), policy, up)).body == b"v2"


async def test_response_max_age_sets_lifetime(engine: CacheEngine, clock: Clock) -> None:
    policy = CachePolicy(ttl=0, max_ttl=86400)
    plain = Upstream()
    await engine.serve(req(key="t:plain"), policy, plain)
    await engine.serve(req(key="t:plain"), policy, plain)
    assert plain.calls == 2  # ttl 0: nothing without explicit freshness is stored

    marked = Upstream(headers=[(b"cache-control", b"max-age=30")])
    await engine.serve(req(key="t:marked"), policy, marked)
    clock.advance(29)
    assert (await engine.serve(req(key="t:marked"), policy, marked)).cache_status == "HIT"
    clock.advance(2)
    assert (await engine.serve(req(key="t:marked"), policy, marked)).cache_status != "HIT"
    assert marked.calls == 2


@pytest.mark.parametrize(
    "up",
    [
        Upstream(status=500),
        Upstream(status=206),
        Upstream(headers=[(b"cache-control", b"no-store")]),
        Upstream(headers=[(b"cache-control", b"private, max-age=60")]),
        Upstream(headers=[(b"cache-control", b"no-cache")]),
        Upstream(headers=[(b"set-cookie", b"a=1")]),
        Upstream(headers=[(b"vary", b"*")]),
        Upstream(headers=[(b"vary", b"Accept, *")]),
        Upstream(body=b"x" * 2000),
    ],
    ids=[
        "500",
        "206",
        "no-store",
        "private",
        "no-cache",
        "set-cookie",
        "vary-star",
        "vary-list-star",
        "too-big",
    ],
)
async def test_unstorable_responses(
    engine: CacheEngine, backend: MemoryBackend, up: Upstream
) -> None:
    policy = CachePolicy(ttl=60, max_body=1000)
    first = await engine.serve(req(), policy, up)
    second = await engine.serve(req(), policy, up)
    assert up.calls == 2
    assert first.cache_status == second.cache_status == "MISS"
    assert header(second, "cache-status") == "cachegw; fwd=uri-miss"
    # Nothing of the response is kept; at most a hit-for-miss marker (500 is an error:
    # not even that), so later requests don't queue behind a lock for it.
    stored = [decode(value) for value, _ in backend._data.values()]
    assert all(isinstance(item, HitForMiss) for item in stored)
    assert backend.stats()["entries"] == (0 if up.status >= 500 else 1)


# -- request directives ----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"cache_control": "no-cache"},
        {"cache_control": "No-Cache"},
        {"cache_control": "public, NO-CACHE"},
        {"cache_control": "max-age=0"},
        {"cache_control": "Max-Age=0, max-stale=5"},
        {"pragma": "no-cache"},
    ],
)
async def test_request_no_cache_fetches_and_refreshes(
    engine: CacheEngine, headers: dict[str, str]
) -> None:
    up = Upstream()
    await engine.serve(req(), POLICY, up)
    reloaded = await engine.serve(req(**headers), POLICY, up)
    assert up.calls == 2
    assert reloaded.body == b"v2"
    assert reloaded.cache_status != "HIT"
    after = await engine.serve(req(), POLICY, up)
    assert (after.cache_status, after.body) == ("HIT", b"v2")  # the entry was refreshed


async def test_pragma_ignored_when_cache_control_present(engine: CacheEngine) -> None:
    # RFC 9111 §5.4: Pragma only counts without Cache-Control.
    up = Upstream()
    await engine.serve(req(), POLICY, up)
    hit = await engine.serve(req(pragma="no-cache", cache_control="max-stale=10"), POLICY, up)
    assert hit.cache_status == "HIT"
    assert up.calls == 1


async def test_request_max_age_nonzero_is_a_constraint(engine: CacheEngine, clock: Clock) -> None:
    up = Upstream()
    await engine.serve(req(), POLICY, up)
    clock.advance(40)
    assert (await engine.serve(req(cache_control="max-age=50"), POLICY, up)).cache_status == "HIT"
    refreshed = await engine.serve(req(cache_control="max-age=30"), POLICY, up)
    assert refreshed.body == b"v2"
    assert up.calls == 2


async def test_request_bad_max_age_does_not_crash(engine: CacheEngine) -> None:
    up = Upstream()
    await engine.serve(req(), POLICY, up)
    for value in ("max-age=\xb2", "max-age=abc", "max-age", "min-fresh=\xb2", 'max-age="'):
        served = await engine.serve(req(cache_control=value), POLICY, up)
        assert served.status == 200


async def test_request_no_store_is_not_stored(engine: CacheEngine, backend: MemoryBackend) -> None:
    up = Upstream()
    first = await engine.serve(req(cache_control="no-store"), POLICY, up)
    assert first.body == b"v1"
    assert backend.stats()["entries"] == 0
    second = await engine.serve(req(), POLICY, up)
    assert second.cache_status == "MISS"
    assert up.calls == 2


async def test_only_if_cached(engine: CacheEngine) -> None:
    up = Upstream()
    empty = await engine.serve(req(cache_control="only-if-cached"), POLICY, up)
    assert empty.status == 504
    assert up.calls == 0
    await engine.serve(req(), POLICY, up)
    hit = await engine.serve(req(cache_control="only-if-cached"), POLICY, up)
    assert (hit.status, hit.body, hit.cache_status) == (200, b"v1", "HIT")
    assert up.calls == 1


async def test_max_stale(engine: CacheEngine, clock: Clock) -> None:
    policy = CachePolicy(ttl=10, stale_if_error=100)  # keeps the entry past freshness
    up = Upstream()
    await engine.serve(req(), policy, up)
    clock.advance(20)  # 10 s stale
    within = await engine.serve(req(cache_control="max-stale=30"), policy, up)
    assert (within.cache_status, within.body) == ("STALE", b"v1")
    assert header(within, "age") == "20"
    unbounded = await engine.serve(req(cache_control="max-stale"), policy, up)
    assert (unbounded.cache_status, unbounded.body) == ("STALE", b"v1")
    assert up.calls == 1
    beyond = await engine.serve(req(cache_control="max-stale=5"), policy, up)
    assert beyond.body == b"v2"
    assert up.calls == 2


async def test_max_stale_not_for_must_revalidate(clock: Clock) -> None:
    # A backend on the real clock keeps the entry: the engine itself must refuse it.
    engine = CacheEngine(MemoryBackend(), clock=clock)
    up = Upstream(headers=[(b"cache-control", b"max-age=10, must-revalidate")])
    await engine.serve(req(), POLICY, up)
    clock.advance(20)
    served = await engine.serve(req(cache_control="max-stale=60"), POLICY, up)
    assert served.body == b"v2"
    assert up.calls == 2


async def test_min_fresh(engine: CacheEngine, clock: Clock) -> None:
    up = Upstream()
    await engine.serve(req(), POLICY, up)
    clock.advance(50)  # 10 s fresh left
    assert (await engine.serve(req(cache_control="min-fresh=5"), POLICY, up)).cache_status == "HIT"
    assert up.calls == 1
    wants_more = await engine.serve(req(cache_control="min-fresh=20"), POLICY, up)
    assert wants_more.body == b"v2"
    assert up.calls == 2


# -- validators: 304 -------------------------------------------------------------------

ETAG = strong_etag(b"v1")


@pytest.mark.parametrize(
    "inm",
    [ETAG, f'"other", {ETAG}', f'"a",{ETAG} ,"b"', f"W/{ETAG}", "*", f" {ETAG} "],
)
async def test_if_none_match_gives_304(engine: CacheEngine, inm: str) -> None:
    up = Upstream(headers=[(b"content-type", b"text/plain"), (b"cache-control", b"max-age=60")])
    await engine.serve(req(), POLICY, up)
    served = await engine.serve(req(if_none_match=inm), POLICY, up)
    assert served.status == 304
    assert served.body == b""
    assert header(served, "etag") == ETAG
    assert header(served, "cache-control") == "max-age=60"
    assert header(served, "content-type") is None
    assert header(served, "x-cache-status") == "HIT"
    assert header(served, "age") == "0"
    assert up.calls == 1


@pytest.mark.parametrize("inm", ['"other"', 'W/"other"', ETAG[:-2] + '"', ""])
async def test_if_none_match_mismatch_gives_body(engine: CacheEngine, inm: str) -> None:
    up = Upstream()
    await engine.serve(req(), POLICY, up)
    served = await engine.serve(req(if_none_match=inm), POLICY, up)
    assert (served.status, served.body) == (200, b"v1")


async def test_if_none_match_weak_upstream_etag(engine: CacheEngine) -> None:
    up = Upstream(headers=[(b"etag", b'W/"x1"')])
    await engine.serve(req(), POLICY, up)
    hit = await engine.serve(req(), POLICY, up)
    assert header(hit, "etag") == 'W/"x1"'  # the upstream's own validator is kept
    assert (await engine.serve(req(if_none_match='"x1"'), POLICY, up)).status == 304
    assert (await engine.serve(req(if_none_match='W/"x1"'), POLICY, up)).status == 304
    assert (await engine.serve(req(if_none_match='"x2"'), POLICY, up)).status == 200


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"if_modified_since": LAST_MODIFIED}, 304),
        ({"if_modified_since": AFTER}, 304),
        ({"if_modified_since": BEFORE}, 200),
        ({"if_modified_since": "garbage"}, 200),
        # If-None-Match takes precedence over If-Modified-Since (RFC 9110 §13.1.3).
        ({"if_modified_since": AFTER, "if_none_match": '"nope"'}, 200),
    ],
)
async def test_if_modified_since(engine: CacheEngine, headers: dict[str, str], status: int) -> None:
    up = Upstream(headers=[(b"last-modified", LAST_MODIFIED.encode())])
    await engine.serve(req(), POLICY, up)
    served = await engine.serve(req(**headers), POLICY, up)
    assert served.status == status
    assert (served.body == b"") is (status == 304)


@pytest.mark.parametrize(("offset", "status"), [(0, 304), (5, 304), (-5, 200)])
async def test_if_modified_since_without_last_modified_uses_date(
    engine: CacheEngine, offset: int, status: int
) -> None:
    """RFC 9111 §4.3.2: a stored response without Last-Modified is judged by its Date."""
    now = engine.clock()
    up = Upstream(headers=[(b"date", formatdate(now, usegmt=True).encode())])
    await engine.serve(req(), POLICY, up)
    since = formatdate(now + offset, usegmt=True)
    assert (await engine.serve(req(if_modified_since=since), POLICY, up)).status == status


async def test_head_served_from_get_entry(engine: CacheEngine) -> None:
    up = Upstream(headers=[(b"content-length", b"2"), (b"content-type", b"text/plain")])
    await engine.serve(req(), POLICY, up)
    head = await engine.serve(req("HEAD"), POLICY, up)
    assert (head.status, head.body, head.cache_status) == (200, b"", "HIT")
    assert header(head, "content-length") == "2"
    assert header(head, "content-type") == "text/plain"
    assert up.calls == 1


async def test_head_miss_is_not_stored_as_get(engine: CacheEngine) -> None:
    up = Upstream()
    head = await engine.serve(req("HEAD"), POLICY, up)
    assert head.cache_status == "MISS"
    get = await engine.serve(req(), POLICY, up)
    assert get.body == b"v2"  # a HEAD response has no body to replay for a GET
    assert up.calls == 2


# -- Vary ------------------------------------------------------------------------------


def by_language(calls: list[str], *, delay: float = 0.0, cc: bytes = b"") -> object:
    """A fetch factory whose body names the request's Accept-Language."""

    def make(lang: str | None) -> Upstream:
        class LangUpstream(Upstream):
            async def __call__(self) -> Fetched:
                calls.append(str(lang))
                if delay:
                    await asyncio.sleep(delay)
                headers = [(b"vary", b"Accept-Language")]
                if cc:
                    headers.append((b"cache-control", cc))
                return Fetched(200, headers, f"{lang}-{len(calls)}".encode())

        return LangUpstream()

    return make


async def test_vary_separate_entries(engine: CacheEngine, backend: MemoryBackend) -> None:
    calls: list[str] = []
    fetch = by_language(calls)
    en = await engine.serve(req(accept_language="en"), POLICY, fetch("en"))  # type: ignore[operator]
    fr = await engine.serve(req(accept_language="fr"), POLICY, fetch("fr"))  # type: ignore[operator]
    none = await engine.serve(req(), POLICY, fetch(None))  # type: ignore[operator]
    assert (en.body, fr.body, none.body) == (b"en-1", b"fr-2", b"None-3")
    assert header(en, "vary") == "Accept-Language"
    en2 = await engine.serve(req(accept_language="en"), POLICY, fetch("en"))  # type: ignore[operator]
    fr2 = await engine.serve(req(accept_language="fr"), POLICY, fetch("fr"))  # type: ignore[operator]
    empty = await engine.serve(req(accept_language=""), POLICY, fetch(""))  # type: ignore[operator]
    assert (en2.cache_status, en2.body) == ("HIT", b"en-1")
    assert (fr2.cache_status, fr2.body) == ("HIT", b"fr-2")
    assert empty.body == b"-4"  # an empty header is not an absent one
    assert calls == ["en", "fr", "None", ""]
    assert backend.stats()["entries"] == 5  # one marker + four variants


async def test_policy_vary_is_advertised(engine: CacheEngine) -> None:
    policy = CachePolicy(ttl=60, vary=["X-Tenant"])
    served = await engine.serve(req(), policy, Upstream(headers=[(b"vary", b"Accept")]))
    vary = ",".join(v.decode() for n, v in served.headers if n == b"vary").lower()
    assert "accept" in vary
    assert "x-tenant" in vary


async def test_coalesced_waiter_with_other_variant_fetches_its_own(engine: CacheEngine) -> None:
    calls: list[str] = []
    fetch = by_language(calls, delay=0.05)
    results = await asyncio.gather(
        engine.serve(req(accept_language="en"), POLICY, fetch("en")),  # type: ignore[operator]
        engine.serve(req(accept_language="fr"), POLICY, fetch("fr")),  # type: ignore[operator]
        engine.serve(req(accept_language="en"), POLICY, fetch("en")),  # type: ignore[operator]
    )
    assert results[0].body.startswith(b"en-")
    assert results[1].body.startswith(b"fr-")
    assert results[2].body.startswith(b"en-")
    assert sorted(calls) == ["en", "fr"]


async def test_coalesced_waiter_with_other_variant_stores_its_own(
    engine: CacheEngine, backend: MemoryBackend
) -> None:
    # The "fr" request waited for the "en" fetch: its own answer is stored too, under the
    # same Vary marker (a new marker would orphan the "en" variant), so both hit next.
    calls: list[str] = []
    fetch = by_language(calls, delay=0.05)
    en, fr = await asyncio.gather(
        engine.serve(req(accept_language="en"), POLICY, fetch("en")),  # type: ignore[operator]
        engine.serve(req(accept_language="fr"), POLICY, fetch("fr")),  # type: ignore[operator]
    )
    assert "stored" in (header(fr, "cache-status") or "")
    en2 = await engine.serve(req(accept_language="en"), POLICY, fetch("en"))  # type: ignore[operator]
    fr2 = await engine.serve(req(accept_language="fr"), POLICY, fetch("fr"))  # type: ignore[operator]
    assert (en2.cache_status, en2.body) == ("HIT", en.body)
    assert (fr2.cache_status, fr2.body) == ("HIT", fr.body)
    assert sorted(calls) == ["en", "fr"]
    assert backend.stats()["entries"] == 3  # one marker + two variants


async def test_background_refresh_never_answers_another_variant(
    engine: CacheEngine, clock: Clock
) -> None:
    # An "en" entry is being refreshed in the background (stale-while-revalidate) when a
    # request for "fr", which has no variant yet, misses. It must not be handed the
    # refreshed "en" response: Vary says they differ.
    policy = CachePolicy(ttl=10, stale_while_revalidate=30)
    calls: list[str] = []
    fetch = by_language(calls, delay=0.05)
    await engine.serve(req(accept_language="en"), policy, fetch("en"))  # type: ignore[operator]
    clock.advance(15)
    stale = await engine.serve(req(accept_language="en"), policy, fetch("en"))  # type: ignore[operator]
    assert (stale.cache_status, stale.body) == ("STALE", b"en-1")
    fr = await engine.serve(req(accept_language="fr"), policy, fetch("fr"))  # type: ignore[operator]
    await engine.aclose()
    assert fr.body.startswith(b"fr-"), fr.body
    assert "fr" in calls


# -- credentials -------------------------------------------------------------------------


@pytest.mark.parametrize("credential", [{"authorization": "Bearer a"}, {"cookie": "s=a"}])
async def test_credentials_bypass_private_entries(
    engine: CacheEngine, credential: dict[str, str]
) -> None:
    up = Upstream()
    await engine.serve(req(), POLICY, up)
    mine = await engine.serve(req(**credential), POLICY, up)
    assert (mine.cache_status, mine.body) == ("BYPASS", b"v2")
    assert header(mine, "x-cache-status") == "BYPASS"
    shared = await engine.serve(req(), POLICY, up)
    assert (shared.cache_status, shared.body) == ("HIT", b"v1")  # the private one was not stored
    assert up.calls == 2


async def test_credentials_on_cold_key_are_not_stored(engine: CacheEngine) -> None:
    up = Upstream()
    mine = await engine.serve(req(authorization="Bearer a"), POLICY, up)
    assert (mine.cache_status, mine.body) == ("BYPASS", b"v1")
    other = await engine.serve(req(), POLICY, up)
    assert (other.cache_status, other.body) == ("MISS", b"v2")


@pytest.mark.parametrize(
    "cc", [b"public, max-age=60", b"s-maxage=60", b"max-age=60, must-revalidate"]
)
async def test_credentials_may_use_shareable_entries(engine: CacheEngine, cc: bytes) -> None:
    up = Upstream(headers=[(b"cache-control", cc)])
    await engine.serve(req(), POLICY, up)
    hit = await engine.serve(req(authorization="Bearer a"), POLICY, up)
    assert (hit.cache_status, hit.body) == ("HIT", b"v1")
    assert up.calls == 1


async def test_per_principal_entries_serve_credentials(engine: CacheEngine) -> None:
    up = Upstream()
    a1 = await engine.serve(req(key="t:alice", per_principal=True, authorization="A"), POLICY, up)
    a2 = await engine.serve(req(key="t:alice", per_principal=True, authorization="A"), POLICY, up)
    b1 = await engine.serve(req(key="t:bob", per_principal=True, authorization="B"), POLICY, up)
    assert (a1.cache_status, a2.cache_status, a2.body) == ("MISS", "HIT", b"v1")
    assert (b1.cache_status, b1.body) == ("MISS", b"v2")


# -- unsafe methods ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "status", "invalidates"),
    [
        ("POST", 201, True),
        ("PUT", 200, True),
        ("DELETE", 204, True),
        ("PATCH", 302, True),
        ("POST", 400, False),
        ("POST", 500, False),
        ("OPTIONS", 200, False),
    ],
)
async def test_unsafe_method_invalidates(
    engine: CacheEngine, clock: Clock, method: str, status: int, invalidates: bool
) -> None:
    get = Upstream()
    await engine.serve(req(), POLICY, get)
    clock.advance(0.001)  # an invalidation covers fetches that started before it
    write = Upstream(status=status, body=b"w")
    done = await engine.serve(req(method), POLICY, write)
    assert (done.status, done.body, done.cache_status) == (status, b"w", "BYPASS")
    assert write.calls == 1
    clock.advance(0.001)
    after = await engine.serve(req(), POLICY, get)
    assert after.cache_status == ("MISS" if invalidates else "HIT")


async def test_unsafe_method_invalidates_all_variants(engine: CacheEngine, clock: Clock) -> None:
    calls: list[str] = []
    fetch = by_language(calls)
    await engine.serve(req(accept_language="en"), POLICY, fetch("en"))  # type: ignore[operator]
    clock.advance(0.001)
    await engine.serve(req("POST"), POLICY, Upstream(status=200))
    after = await engine.serve(req(accept_language="en"), POLICY, fetch("en"))  # type: ignore[operator]
    assert after.cache_status == "MISS"


# -- coalescing ----------------------------------------------------------------------------


async def test_concurrent_misses_fetch_once(engine: CacheEngine) -> None:
    up = Upstream(delay=0.05)
    results = await asyncio.gather(*(engine.serve(req(), POLICY, up) for _ in range(50)))
    assert up.calls == 1
    assert {r.body for r in results} == {b"v1"}
    assert {r.status for r in results} == {200}
    assert sorted(r.cache_status for r in results) == ["HIT"] * 49 + ["MISS"]
    assert engine.stats["coalesced"] == 49


async def test_coalescing_never_shares_an_unstorable_response(engine: CacheEngine) -> None:
    class CookieUpstream(Upstream):
        async def __call__(self) -> Fetched:
            self.calls += 1
            n = self.calls
            await asyncio.sleep(0.05)
            return Fetched(200, [(b"set-cookie", b"s=%d" % n)], b"v%d" % n)

    up = CookieUpstream()
    results = await asyncio.gather(*(engine.serve(req(), POLICY, up) for _ in range(20)))
    assert up.calls == 20
    cookies = [header(r, "set-cookie") for r in results]
    assert len(set(cookies)) == 20
    for served, cookie in zip(results, cookies, strict=True):
        assert cookie is not None
        assert served.body == b"v" + cookie.removeprefix("s=").encode()  # its own response


async def test_coalescing_separate_keys_fetch_separately(engine: CacheEngine) -> None:
    up = Upstream(delay=0.02)
    await asyncio.gather(*(engine.serve(req(key=f"t:{i % 3}"), POLICY, up) for i in range(9)))
    assert up.calls == 3


async def test_leader_failure_does_not_wedge_waiters(engine: CacheEngine) -> None:
    class Flaky(Upstream):
        async def __call__(self) -> Fetched:
            self.calls += 1
            if self.calls == 1:
                await asyncio.sleep(0.03)
                raise RuntimeError("boom")
            return Fetched(200, [], b"ok")

    up = Flaky()
    results = await asyncio.gather(
        *(engine.serve(req(), POLICY, up) for _ in range(5)), return_exceptions=True
    )
    assert isinstance(results[0], RuntimeError)
    assert all(isinstance(r, Served) and r.body == b"ok" for r in results[1:])
    assert not engine._flights


# -- stale-if-error --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failing",
    [
        Upstream(status=503, body=b"down"),
        Upstream(status=502, body=b"", failed=True),
        Upstream(status=500, body=b"oops"),
    ],
)
async def test_stale_if_error_serves_stale(
    engine: CacheEngine, clock: Clock, failing: Upstream
) -> None:
    policy = CachePolicy(ttl=10, stale_if_error=60)
    await engine.serve(req(), policy, Upstream(body=b"old"))
    clock.advance(30)
    served = await engine.serve(req(), policy, failing)
    assert (served.status, served.body, served.cache_status) == (200, b"old", "STALE")
    assert header(served, "x-cache-status") == "STALE"
    assert header(served, "age") == "30"
    assert f"fwd-status={failing.status}" in (header(served, "cache-status") or "")
    assert failing.calls == 1


async def test_stale_if_error_beyond_window_gives_the_error(clock: Clock) -> None:
    # A backend on the real clock keeps the entry: the engine itself must refuse it.
    engine = CacheEngine(MemoryBackend(), clock=clock)
    policy = CachePolicy(ttl=10, stale_if_error=60)
    await engine.serve(req(), policy, Upstream(body=b"old"))
    clock.advance(71)
    served = await engine.serve(req(), policy, Upstream(status=503, body=b"down"))
    assert (served.status, served.body) == (503, b"down")
    assert served.cache_status != "STALE"


async def test_stale_if_error_entry_expired_from_backend(engine: CacheEngine, clock: Clock) -> None:
    policy = CachePolicy(ttl=10, stale_if_error=60)
    await engine.serve(req(), policy, Upstream(body=b"old"))
    clock.advance(71)
    served = await engine.serve(req(), policy, Upstream(status=503, body=b"down"))
    assert (served.status, served.body, served.cache_status) == (503, b"down", "MISS")


async def test_stale_if_error_from_response_directive(engine: CacheEngine, clock: Clock) -> None:
    await engine.serve(
        req(),
        POLICY,
        Upstream(body=b"old", headers=[(b"cache-control", b"max-age=5, stale-if-error=50")]),
    )
    clock.advance(30)
    served = await engine.serve(req(), POLICY, Upstream(status=503))
    assert (served.body, served.cache_status) == (b"old", "STALE")


async def test_must_revalidate_forbids_stale_if_error(clock: Clock) -> None:
    engine = CacheEngine(MemoryBackend(), clock=clock)
    policy = CachePolicy(ttl=10, max_ttl=10, stale_if_error=60)
    cc = [(b"cache-control", b"max-age=10, must-revalidate")]
    await engine.serve(req(), policy, Upstream(body=b"old", headers=cc))
    clock.advance(20)
    served = await engine.serve(req(), policy, Upstream(status=503, body=b"down"))
    assert (served.status, served.body) == (503, b"down")


async def test_success_after_stale_replaces_entry(engine: CacheEngine, clock: Clock) -> None:
    policy = CachePolicy(ttl=10, stale_if_error=60)
    await engine.serve(req(), policy, Upstream(body=b"old"))
    clock.advance(30)
    fresh = await engine.serve(req(), policy, Upstream(body=b"new"))
    assert (fresh.body, fresh.cache_status) == (b"new", "EXPIRED")
    assert (await engine.serve(req(), policy, Upstream())).body == b"new"


# -- stale-while-revalidate ----------------------------------------------------------------


async def test_stale_while_revalidate(engine: CacheEngine, clock: Clock) -> None:
    policy = CachePolicy(ttl=10, stale_while_revalidate=30)
    refresh_may_end = asyncio.Event()
    up = Upstream(gate=refresh_may_end)
    await engine.serve(req(), policy, up)
    clock.advance(15)
    # Served without waiting for the refresh: it cannot end before the answers are in
    # (an engine that waited for it would hit the deadline).
    async with asyncio.timeout(30):
        stale = await asyncio.gather(*(engine.serve(req(), policy, up) for _ in range(10)))
    refresh_may_end.set()
    assert {(s.cache_status, s.body) for s in stale} == {("STALE", b"v1")}
    assert all(header(s, "age") == "15" for s in stale)
    await engine.aclose()
    assert up.calls == 2  # exactly one background refresh
    hit = await engine.serve(req(), policy, up)
    assert (hit.cache_status, hit.body, header(hit, "age")) == ("HIT", b"v2", "0")
    assert up.calls == 2


async def test_stale_while_revalidate_failed_refresh_keeps_entry(
    engine: CacheEngine, clock: Clock
) -> None:
    policy = CachePolicy(ttl=10, stale_while_revalidate=30)
    await engine.serve(req(), policy, Upstream(body=b"old"))
    clock.advance(15)
    failing = Upstream(status=503)
    assert (await engine.serve(req(), policy, failing)).body == b"old"
    await engine.aclose()
    assert failing.calls == 1
    assert (await engine.serve(req(), policy, failing)).body == b"old"


async def test_stale_while_revalidate_beyond_window_fetches(clock: Clock) -> None:
    engine = CacheEngine(MemoryBackend(), clock=clock)
    policy = CachePolicy(ttl=10, stale_while_revalidate=30)
    up = Upstream()
    await engine.serve(req(), policy, up)
    clock.advance(45)
    served = await engine.serve(req(), policy, up)
    assert (served.cache_status, served.body) == ("EXPIRED", b"v2")


# -- failing backends: fail open ---------------------------------------------------------


class BrokenBackend(Backend):
    """Raises on every call: the engine's fail-open contract, not Redis behaviour."""

    def __init__(self) -> None:
        self.calls = 0

    def _fail(self) -> None:
        self.calls += 1
        raise ConnectionError("backend down")

    async def get(self, key: str) -> bytes | None:
        self._fail()
        return None

    async def get_with_ttl(self, key: str) -> tuple[int, bytes | None]:
        self._fail()
        return 0, None

    async def set(self, key: str, value: bytes, expire: int | None = None) -> None:
        self._fail()

    async def delete(self, key: str) -> bool:
        self._fail()
        return False

    async def clear(self, namespace: str | None = None, key: str | None = None) -> int:
        self._fail()
        return 0


class HangingBackend(BrokenBackend):
    async def _hang(self) -> None:
        self.calls += 1
        await asyncio.sleep(10)

    async def get(self, key: str) -> bytes | None:
        await self._hang()
        return None

    async def set(self, key: str, value: bytes, expire: int | None = None) -> None:
        await self._hang()

    async def delete(self, key: str) -> bool:
        await self._hang()
        return False


async def test_broken_backend_fails_open(caplog: pytest.LogCaptureFixture) -> None:
    backend = BrokenBackend()
    engine = CacheEngine(backend)
    up = Upstream()
    for n in range(1, 4):
        served = await engine.serve(req(), POLICY, up)
        assert (served.status, served.body, served.cache_status) == (200, b"v%d" % n, "MISS")
    assert up.calls == 3
    assert engine.stats["backend_errors"] == backend.calls >= 3
    write = await engine.serve(req("POST"), POLICY, Upstream(status=204))  # invalidation fails too
    assert write.status == 204
    assert "backend" in caplog.text
    assert "ConnectionError" in caplog.text


async def test_hanging_backend_bounded_by_op_timeout() -> None:
    backend = HangingBackend()
    engine = CacheEngine(backend, op_timeout=0.05)
    up = Upstream()
    started = time.monotonic()
    served = await engine.serve(req(), POLICY, up)
    elapsed = time.monotonic() - started
    assert (served.status, served.body, served.cache_status) == (200, b"v1", "MISS")
    assert elapsed < 1.0
    assert engine.stats["backend_errors"] >= 1


async def test_undecodable_value_is_a_miss_and_deleted(
    engine: CacheEngine, backend: MemoryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    for garbage in (b"garbage", pickle.dumps({"status": 200, "body": b"evil"}), b"CGW\x01\x00"):
        backend.set_nowait("t:k", garbage, 60)
        up = Upstream(headers=[(b"cache-control", b"no-store")])
        with caplog.at_level(logging.WARNING, logger="cachegw"):
            served = await engine.serve(req(), POLICY, up)
        assert (served.body, served.cache_status) == (b"v1", "MISS")
        assert up.calls == 1
        # The garbage is gone: at most the hit-for-miss marker of the no-store answer.
        value = backend.get_nowait("t:k")
        assert value is None or isinstance(decode(value), HitForMiss)
    assert "undecodable" in caplog.text


async def test_undecodable_variant_is_a_miss(engine: CacheEngine, backend: MemoryBackend) -> None:
    calls: list[str] = []
    fetch = by_language(calls)
    await engine.serve(req(accept_language="en"), POLICY, fetch("en"))  # type: ignore[operator]
    keys = [k for k in backend._data if k != "t:k"]
    assert len(keys) == 1
    backend.set_nowait(keys[0], b"junk", 60)
    again = await engine.serve(req(accept_language="en"), POLICY, fetch("en"))  # type: ignore[operator]
    assert (again.cache_status, again.body) == ("MISS", b"en-2")


async def test_fastapi_cache2_inmemory_backend_works(clock: Clock) -> None:
    from fastapi_cache.backends.inmemory import InMemoryBackend

    InMemoryBackend._store.clear()
    try:
        engine = CacheEngine(InMemoryBackend())
        up = Upstream()
        await engine.serve(req(key="t:fc2"), POLICY, up)
        hit = await engine.serve(req(key="t:fc2"), POLICY, up)
        assert (hit.cache_status, hit.body) == ("HIT", b"v1")
        await engine.serve(req("POST", key="t:fc2"), POLICY, Upstream(status=201))
        assert (await engine.serve(req(key="t:fc2"), POLICY, up)).cache_status == "MISS"
        await engine.serve(req("DELETE", key="t:never-stored"), POLICY, Upstream(status=204))
        assert engine.stats["backend_errors"] == 0
    finally:
        InMemoryBackend._store.clear()


# -- early refresh (XFetch) -----------------------------------------------------------------


async def test_early_refresh_near_expiry(
    engine: CacheEngine, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cachegw._engine

    policy = CachePolicy(ttl=10, early_refresh=1)
    up = Upstream()
    await engine.serve(req(), policy, up)
    # A draw of u = 0.999 gives -ln(1 - u) = 6.9: with the default 1 ms fetch time and
    # beta 1, the refresh starts when fewer than 6.9 ms of freshness are left.
    monkeypatch.setattr(cachegw._engine.random, "random", lambda: 0.999)
    clock.advance(5)  # 5 s left: far from expiry, no refresh
    far = await engine.serve(req(), policy, up)
    await engine.aclose()
    assert (far.cache_status, up.calls) == ("HIT", 1)
    clock.advance(4.995)  # 5 ms left: refresh early, still a HIT
    near = await engine.serve(req(), policy, up)
    await engine.aclose()
    assert (near.cache_status, near.body) == ("HIT", b"v1")
    assert up.calls == 2  # one background refresh
    after = await engine.serve(req(), policy, up)
    assert (after.cache_status, after.body) == ("HIT", b"v2")


async def test_no_early_refresh_without_the_knob(
    engine: CacheEngine, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cachegw._engine

    up = Upstream()
    await engine.serve(req(), CachePolicy(ttl=10), up)
    monkeypatch.setattr(cachegw._engine.random, "random", lambda: 0.999)
    clock.advance(9.999)
    assert (await engine.serve(req(), CachePolicy(ttl=10), up)).cache_status == "HIT"
    await engine.aclose()
    assert up.calls == 1
