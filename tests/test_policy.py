"""The pure caching rules: Cache-Control parsing, durations, CachePolicy, freshness, storability."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from cachegw import CachePolicy, ConfigError
from cachegw._policy import (
    DEFAULT_STATUSES,
    CacheControl,
    Freshness,
    freshness,
    parse_cache_control,
    parse_duration,
    parse_http_date,
    storable_response,
)

# -- parse_cache_control ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], {}),
        ([""], {}),
        (["no-store"], {"no-store": None}),
        (["No-Store"], {"no-store": None}),
        (["MAX-AGE=60"], {"max-age": "60"}),
        (["public, max-age=60"], {"public": None, "max-age": "60"}),
        (["public", "max-age=60"], {"public": None, "max-age": "60"}),
        (["  public ,  max-age = 60 , ,"], {"public": None, "max-age": "60"}),
        (['no-cache="a, b", max-age=5'], {"no-cache": "a, b", "max-age": "5"}),
        (['private="Set-Cookie", public'], {"private": "Set-Cookie", "public": None}),
        (['ext="x\\"y, z"'], {"ext": 'x"y, z'}),
        (["max-age=5, max-age=10"], {"max-age": "5"}),
        (["max-age=5", "max-age=10"], {"max-age": "5"}),
        (["max-age=abc"], {"max-age": "abc"}),
        (['max-age="60"'], {"max-age": "60"}),
    ],
)
def test_parse_cache_control(values: list[str], expected: dict[str, str | None]) -> None:
    assert dict(parse_cache_control(values).directives) == expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("max-age=60", 60),
        ("max-age=0", 0),
        ("Max-Age=7", 7),
        ("max-age=abc", None),
        ("max-age=-1", None),
        ("max-age=1.5", None),
        ("max-age=", None),
        ("max-age", None),
        ("max-age=\xb2", None),  # a latin-1 superscript two: str.isdigit() says yes, int() no
        ("max-age=99999999999999999999", 2**31),
        ("public", None),
    ],
)
def test_cache_control_seconds(value: str, seconds: int | None) -> None:
    assert parse_cache_control([value]).seconds("max-age") == seconds


def test_cache_control_membership_and_truth() -> None:
    cc = parse_cache_control(["Public, NO-CACHE"])
    assert "public" in cc
    assert "no-cache" in cc
    assert "private" not in cc
    assert cc
    assert not parse_cache_control([])
    assert not CacheControl({})


# -- parse_duration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (90, 90.0),
        (2.5, 2.5),
        ("90", 90.0),
        ("90s", 90.0),
        (" 90 s ", 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1H", 3600.0),
        ("2d", 172800.0),
        ("250ms", 0.25),
        ("1.5m", 90.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value, what="ttl") == seconds


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (-5, "-5"),
        ("-5", "'-5'"),
        ("abc", "'abc'"),
        ("5 minutes", "'5 minutes'"),
        ("", "''"),
        (True, "True"),
        (False, "False"),
        (math.nan, "nan"),
        (math.inf, "inf"),
        (None, "None"),
        ([5], "[5]"),
    ],
)
def test_parse_duration_errors(value: object, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, what="stale_if_error")
    message = str(info.value)
    assert "stale_if_error" in message
    assert f"got {shown}" in message
    assert "'90s'" in message  # says what was expected


# -- CachePolicy -------------------------------------------------------------------------


def test_policy_defaults() -> None:
    policy = CachePolicy()
    assert policy.ttl == 60
    assert policy.max_ttl == 60
    assert policy.stale_while_revalidate == 0
    assert policy.stale_if_error == 0
    assert policy.vary == ()
    assert policy.tags == ()
    assert policy.methods is None
    assert policy.statuses == DEFAULT_STATUSES
    assert policy.max_body == 1024 * 1024
    assert policy.key is None


def test_policy_converts_durations() -> None:
    policy = CachePolicy(ttl="5m", max_ttl="1h", stale_while_revalidate="30s", stale_if_error=2.5)
    assert (policy.ttl, policy.max_ttl) == (300, 3600)
    assert (policy.stale_while_revalidate, policy.stale_if_error) == (30, 2.5)
    assert policy.stale_window == 30


@pytest.mark.parametrize(
    ("knobs", "fragments"),
    [
        ({"ttl": -5}, ["ttl", "-5"]),
        ({"ttl": "abc"}, ["ttl", "'abc'"]),
        ({"ttl": None}, ["ttl", "None"]),
        ({"max_ttl": -1}, ["max_ttl", "-1"]),
        ({"ttl": 60, "max_ttl": 30}, ["max_ttl", "60", "30"]),
        ({"stale_while_revalidate": "x"}, ["stale_while_revalidate", "'x'"]),
        ({"stale_if_error": -1}, ["stale_if_error", "-1"]),
        ({"vary": ["Accept Language"]}, ["vary", "'Accept Language'"]),
        ({"vary": [""]}, ["vary", "''"]),
        ({"vary": 5}, ["vary", "5"]),
        ({"tags": [""]}, ["tags", "['']"]),
        ({"tags": [5]}, ["tags", "[5]"]),
        ({"methods": ["G T"]}, ["methods", "G T"]),
        ({"statuses": [99]}, ["statuses", "[99]"]),
        ({"statuses": [600]}, ["statuses", "[600]"]),
        ({"statuses": ["200"]}, ["statuses", "['200']"]),
        ({"statuses": [True]}, ["statuses", "[True]"]),
        ({"statuses": "200"}, ["statuses", "'200'"]),
        ({"statuses": 200}, ["statuses", "200"]),
        ({"max_body": -1}, ["max_body", "-1"]),
        ({"max_body": 1.5}, ["max_body", "1.5"]),
        ({"max_body": "lots"}, ["max_body", "'lots'"]),
        ({"max_body": True}, ["max_body", "True"]),
        ({"key": "notcallable"}, ["key", "'notcallable'"]),
    ],
)
def test_policy_validation(knobs: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        CachePolicy(**knobs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_policy_normalises_collections() -> None:
    policy = CachePolicy(
        vary=["X-B", "accept-language", "Accept-Language"],
        tags=["items", "item:{item_id}"],
        methods=["post", "GET", "get"],
        statuses=[200, 404],
        max_body="1MiB",
    )
    assert policy.vary == ("accept-language", "x-b")
    assert policy.tags == ("items", "item:{item_id}")
    assert policy.methods == ("GET", "POST")
    assert policy.statuses == frozenset({200, 404})
    assert policy.max_body == 1024 * 1024
    assert CachePolicy(vary="Accept").vary == ("accept",)
    assert CachePolicy(max_body="64KiB").max_body == 65536


def test_policy_is_frozen_and_comparable() -> None:
    policy = CachePolicy(ttl=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.ttl = 10  # type: ignore[misc]
    assert policy == CachePolicy(ttl="5s")
    assert policy != CachePolicy(ttl=6)
    assert hash(policy) == hash(CachePolicy(ttl=5))


def test_policy_repr() -> None:
    assert repr(CachePolicy()) == "CachePolicy(ttl=60, max_ttl=60)"

    def user_key(request: object) -> str:
        return "u"

    policy = CachePolicy(
        ttl=30,
        max_ttl=3600,
        stale_if_error=300,
        vary=["Accept-Language"],
        tags=["items"],
        statuses=[200],
        key=user_key,
    )
    text = repr(policy)
    assert text.startswith("CachePolicy(ttl=30, max_ttl=3600, stale_if_error=300, ")
    assert "vary=['accept-language']" in text
    assert "tags=['items']" in text
    assert "statuses=[200]" in text
    assert "user_key" in text
    assert "<function" not in text


# -- CachePolicy.from_mapping ------------------------------------------------------------


def test_from_mapping_unknown_knob() -> None:
    with pytest.raises(ConfigError) as info:
        CachePolicy.from_mapping({"ttl": 5, "tll": 5}, where="services[0] of gw.toml")
    message = str(info.value)
    assert "'tll'" in message
    assert "services[0] of gw.toml" in message
    for allowed in ("ttl", "max_ttl", "stale_while_revalidate", "vary", "max_body"):
        assert allowed in message


def test_from_mapping_bad_value_names_where() -> None:
    with pytest.raises(ConfigError) as info:
        CachePolicy.from_mapping({"ttl": -5}, where="services[0].routes[2] of gw.toml")
    assert "-5" in str(info.value)
    assert "services[0].routes[2] of gw.toml" in str(info.value)


def test_from_mapping_inherits_from_base() -> None:
    base = CachePolicy(ttl=30, stale_if_error=300, vary=["Accept"], tags=["svc"], statuses=[200])
    route = CachePolicy.from_mapping({"stale_while_revalidate": 10}, where="r", base=base)
    assert route.ttl == 30
    assert route.max_ttl == 30
    assert route.stale_if_error == 300
    assert route.stale_while_revalidate == 10
    assert route.vary == ("accept",)
    assert route.tags == ("svc",)
    assert route.statuses == frozenset({200})
    assert CachePolicy.from_mapping({}, where="r", base=base) == base
    assert CachePolicy.from_mapping({}, where="r") == CachePolicy()


@pytest.mark.parametrize(
    ("base", "values", "ttl", "max_ttl"),
    [
        (CachePolicy(ttl=30), {"ttl": 60}, 60, 60),  # follows ttl up
        (CachePolicy(ttl=30), {"ttl": 10}, 10, 10),  # and down
        (CachePolicy(ttl=30), {"ttl": "2m"}, 120, 120),
        (CachePolicy(ttl=30, max_ttl=3600), {"ttl": 60}, 60, 3600),  # set on its own: kept
        (CachePolicy(ttl=30), {"ttl": 60, "max_ttl": 90}, 60, 90),
        (CachePolicy(ttl=30), {"max_ttl": 90}, 30, 90),
        (CachePolicy(ttl=0, max_ttl=86400), {"ttl": 5}, 5, 86400),
    ],
)
def test_from_mapping_max_ttl_follows_ttl(
    base: CachePolicy, values: dict[str, Any], ttl: float, max_ttl: float
) -> None:
    policy = CachePolicy.from_mapping(values, where="r", base=base)
    assert (policy.ttl, policy.max_ttl) == (ttl, max_ttl)


# -- freshness (RFC 9111 §4.2.1) ---------------------------------------------------------

DATE = "Sun, 06 Nov 1994 08:49:37 GMT"
DATE_PLUS_100 = "Sun, 06 Nov 1994 08:51:17 GMT"


def fresh(
    cc: str = "", *, expires: str | None = None, date: str | None = None, **knobs: Any
) -> Freshness:
    policy = CachePolicy(**{"ttl": 60, "max_ttl": 1000, **knobs})
    response_cc = parse_cache_control([cc] if cc else [])
    received = parse_http_date(DATE)
    return freshness(response_cc, expires=expires, date=date, policy=policy, received=received)


@pytest.mark.parametrize(
    ("cc", "expires", "date", "lifetime", "explicit"),
    [
        ("", None, None, 60, False),  # policy ttl
        ("max-age=10", None, None, 10, True),
        ("s-maxage=20, max-age=10", None, None, 20, True),
        ("max-age=10, s-maxage=20", None, None, 20, True),
        ("max-age=10", DATE_PLUS_100, DATE, 10, True),  # max-age beats Expires
        ("", DATE_PLUS_100, DATE, 100, True),  # Expires - Date
        ("", DATE, DATE_PLUS_100, 0, True),  # Expires before Date: already stale
        ("", "0", DATE, 0, True),  # invalid Expires = already expired (RFC 9111 §5.3)
        ("", "not a date", None, 0, True),
        ("max-age=0", None, None, 0, True),
        ("max-age=5000", None, None, 1000, True),  # capped at max_ttl
        ("s-maxage=5000", None, None, 1000, True),
        ("max-age=abc", None, None, 0, True),  # invalid freshness: stale (RFC 9111 §4.2.1)
        ("", DATE_PLUS_100, None, 100, True),  # no Date: Expires counts from receipt
    ],
)
def test_freshness_lifetime(
    cc: str, expires: str | None, date: str | None, lifetime: float, explicit: bool
) -> None:
    result = fresh(cc, expires=expires, date=date)
    assert result.lifetime == lifetime
    assert result.explicit is explicit


def test_freshness_policy_ttl_capped_by_max_ttl() -> None:
    # max_ttl defaults to ttl, so an upstream's longer max-age is capped at ttl.
    policy = CachePolicy(ttl=30)
    result = freshness(parse_cache_control(["max-age=600"]), expires=None, date=None, policy=policy)
    assert result.lifetime == 30


def test_freshness_stale_windows_from_policy() -> None:
    result = fresh("max-age=10", stale_while_revalidate=5, stale_if_error=50)
    assert (result.stale_while_revalidate, result.stale_if_error) == (5, 50)
    assert result.must_revalidate is False


@pytest.mark.parametrize(
    ("cc", "swr", "sie"),
    [
        ("max-age=10, stale-while-revalidate=30", 30, 50),  # response's longer swr wins
        ("max-age=10, stale-if-error=500", 5, 500),
        ("max-age=10, stale-while-revalidate=1, stale-if-error=2", 5, 50),  # policy's longer
        ("max-age=10, stale-if-error=abc", 5, 50),
    ],
)
def test_freshness_response_lengthens_stale_windows(cc: str, swr: float, sie: float) -> None:
    result = fresh(cc, stale_while_revalidate=5, stale_if_error=50)
    assert (result.stale_while_revalidate, result.stale_if_error) == (swr, sie)


@pytest.mark.parametrize(
    "cc",
    [
        "max-age=10, must-revalidate",
        "max-age=10, proxy-revalidate",
        "s-maxage=10",
        "no-cache",
        "max-age=10, must-revalidate, stale-if-error=500",
    ],
)
def test_freshness_revalidation_drops_stale_windows(cc: str) -> None:
    result = fresh(cc, stale_while_revalidate=5, stale_if_error=50)
    assert (result.stale_while_revalidate, result.stale_if_error) == (0, 0)
    assert result.must_revalidate is True


# -- storable_response (RFC 9111 §3, §3.5) -------------------------------------------------


def storable(
    *,
    method: str = "GET",
    status: int = 200,
    cc: str = "",
    set_cookie: bool = False,
    vary: tuple[str, ...] = (),
    request_cc: str = "",
    authorized: bool = False,
    per_principal: bool = False,
    policy: CachePolicy | None = None,
    explicit: bool = False,
) -> str | None:
    return storable_response(
        method=method,
        status=status,
        response_cc=parse_cache_control([cc] if cc else []),
        set_cookie=set_cookie,
        vary=vary,
        request_cc=parse_cache_control([request_cc] if request_cc else []),
        authorized=authorized,
        per_principal=per_principal,
        policy=policy or CachePolicy(),
        explicit=explicit,
    )


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({}, None),
        ({"method": "HEAD"}, None),
        ({"method": "POST"}, "method"),
        ({"status": 206}, "partial"),
        ({"status": 206, "policy": CachePolicy(statuses=[200, 206])}, "partial"),
        ({"status": 500}, "status"),
        # Default statuses: any other final status below 500 with explicit freshness or
        # public (RFC 9111 §3); never 5xx, never when statuses is the user's own list.
        ({"status": 302}, "status"),
        ({"status": 302, "explicit": True}, None),
        ({"status": 299, "explicit": True}, None),
        ({"status": 400, "cc": "public"}, None),
        ({"status": 500, "explicit": True}, "status"),
        ({"status": 599, "cc": "public", "explicit": True}, "status"),
        ({"status": 304, "explicit": True}, "status"),
        ({"status": 302, "explicit": True, "policy": CachePolicy(statuses=[200])}, "status"),
        ({"status": 500, "explicit": True, "policy": CachePolicy(statuses=[500])}, None),
        # must-understand: only statuses whose rules are known (RFC 9111 §5.2.2.3).
        (
            {"status": 599, "cc": "must-understand", "policy": CachePolicy(statuses=[599])},
            "status not understood",
        ),
        (
            {"status": 299, "cc": "must-understand, max-age=9", "explicit": True},
            "status not understood",
        ),
        ({"cc": "must-understand, max-age=9", "explicit": True}, None),
        ({"status": 201, "policy": CachePolicy(statuses=[200, 201])}, None),
        ({"status": 203, "policy": CachePolicy(statuses=[200])}, "status"),
        ({"status": 404}, None),
        ({"request_cc": "no-store"}, "request no-store"),
        ({"request_cc": "NO-STORE"}, "request no-store"),
        ({"cc": "no-store"}, "no-store"),
        ({"cc": "public, No-Store"}, "no-store"),
        ({"cc": "private"}, "private"),
        ({"cc": 'private="x-user", max-age=60'}, "private"),
        ({"cc": "no-cache"}, None),  # stored, but only to be revalidated (lifetime 0)
        ({"set_cookie": True}, "set-cookie"),
        ({"set_cookie": True, "cc": "public"}, "set-cookie"),
        ({"vary": ("*",)}, "vary-star"),
        ({"vary": ("accept", " * ")}, "vary-star"),
        ({"vary": ("accept-language",)}, None),
        ({"authorized": True}, "authorization"),
        ({"authorized": True, "cc": "max-age=60"}, "authorization"),
        ({"authorized": True, "cc": "public"}, None),
        ({"authorized": True, "cc": "s-maxage=60"}, None),
        ({"authorized": True, "cc": "must-revalidate"}, None),
        ({"authorized": True, "per_principal": True}, None),
        ({"authorized": True, "per_principal": True, "cc": "private"}, "private"),
        ({"authorized": True, "per_principal": True, "set_cookie": True}, "set-cookie"),
    ],
)
def test_storable_response(kwargs: dict[str, Any], reason: str | None) -> None:
    assert storable(**kwargs) == reason
