"""Cache keys from request parts (pure)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachegw import _keys
from cachegw._keys import (
    canonical_query,
    format_tag,
    handler_key,
    hash_parts,
    origin,
    vary_values,
)

# -- canonical_query ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (b"a=1&b=2", b"b=2&a=1"),  # order of different names is irrelevant
        (b"q=a+b", b"q=a%20b"),  # + is a space, as Starlette decodes it
        (b"a", b"a="),
        (b"p=%2f", b"p=%2F"),  # percent-encoding case
        (b"p=/", b"p=%2F"),
        (b"p=%7E", b"p=~"),
        (b"x=%C3%A9", b"x=%c3%a9"),
        (b"a=1&&b=2", b"a=1&b=2"),  # empty pairs are nothing
        (b"a=1&", b"a=1"),
        (b"", b""),
        (b"b=1&a=2&b=3", b"a=2&b=1&b=3"),  # stable sort keeps repeated values' order
    ],
)
def test_canonical_query_equal(a: bytes, b: bytes) -> None:
    assert canonical_query(a) == canonical_query(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (b"a=1&a=2", b"a=2&a=1"),  # order of repeated values is seen by the handler
        (b"a=1;b=2", b"a=1&b=2"),  # ; is data, never a separator (parameter cloaking)
        (b"a=1;b=2", b"a=1"),
        (b"a=%26b", b"a=&b"),  # an encoded & is data
        (b"a=%2Bb", b"a=+b"),  # %2B is '+', + is ' '
        (b"q=a", b"q=b"),
        (b"q=a", b"Q=a"),
        (b"a", b""),
        (b"a=1", b"a=1&b="),
    ],
)
def test_canonical_query_different(a: bytes, b: bytes) -> None:
    assert canonical_query(a) != canonical_query(b)


def test_canonical_query_form() -> None:
    assert canonical_query(b"b=2&a=x+y&c") == "a=x%20y&b=2&c="
    assert canonical_query(b"") == ""


def test_canonical_query_tolerates_bad_bytes() -> None:
    # Neither a stray % nor invalid UTF-8 may raise: the query is the client's to choose.
    assert canonical_query(b"a=%zz") != canonical_query(b"a=zz")
    assert canonical_query(b"a=%ff") != canonical_query(b"a=%fe")
    # A raw non-ASCII byte reaches the handler as Starlette decodes it (latin-1), the same
    # value as its UTF-8 percent-encoding.
    assert canonical_query(b"a=\xff") == canonical_query(b"a=%C3%BF")


# -- hash_parts --------------------------------------------------------------------------


def test_hash_parts_length_prefixed() -> None:
    assert hash_parts("p", ["ab", "c"]) != hash_parts("p", ["a", "bc"])
    assert hash_parts("p", ["a", ""]) != hash_parts("p", ["a"])
    assert hash_parts("p", ["1:a"]) != hash_parts("p", ["a"])
    assert hash_parts("p", ["a", "b"]) != hash_parts("p", ["b", "a"])
    assert hash_parts("p", ["x"]) == hash_parts("p", ["x"])


def test_hash_parts_prefix() -> None:
    key = hash_parts("myapp", ["x"])
    assert key.startswith("myapp:")
    assert len(key) == len("myapp:") + 64
    assert hash_parts("a", ["x"]).split(":")[1] == hash_parts("b", ["x"]).split(":")[1]


# Pinned: keys are shared by every process (and every release) that reads one Redis.
EXPECTED = "p:430fb1b4ac43316eca81fab27a1930ab8eff8fef6a1dc7903dce44bbc2790dc5"


def test_hash_parts_fixed_value() -> None:
    assert hash_parts("p", ["ab", "c"]) == EXPECTED


def test_hash_parts_stable_across_processes() -> None:
    # A fresh interpreter has a different str hash seed: the key must not depend on it.
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from cachegw._keys import hash_parts; print(hash_parts('p', ['ab', 'c']))",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    assert out.stdout.strip() == EXPECTED


def test_hash_parts_accepts_surrogates() -> None:
    # Parts decoded with surrogateescape (undecodable query bytes) must hash, not raise.
    assert hash_parts("p", ["\udcff"]) != hash_parts("p", ["\udcfe"])


# -- vary_values -------------------------------------------------------------------------


def test_vary_values_absent_differs_from_empty() -> None:
    absent = vary_values(["accept-language"], {})
    empty = vary_values(["accept-language"], {"accept-language": ""})
    assert absent != empty
    assert hash_parts("p", absent) != hash_parts("p", empty)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("gzip,br", "gzip, br"),
        ("gzip , br", "gzip,br"),
        (" en ", "en"),
    ],
)
def test_vary_values_whitespace_normalised(a: str, b: str) -> None:
    names = ["accept-encoding"]
    assert vary_values(names, {"accept-encoding": a}) == vary_values(names, {"accept-encoding": b})


def test_vary_values_distinguish() -> None:
    names = ["accept-language"]
    assert vary_values(names, {"accept-language": "en"}) != vary_values(
        names, {"accept-language": "fr"}
    )
    assert vary_values(names, {"accept-language": "en,fr"}) != vary_values(
        names, {"accept-language": "fr,en"}
    )
    # A value may not impersonate another header's part.
    two = vary_values(["a", "b"], {"a": "1", "b": "2"})
    assert two == ["a=1", "b=2"]
    assert vary_values(["a"], {"a": "1\x00b=2"}) != two[:1]


def test_vary_values_in_order_of_names() -> None:
    headers = {"a": "1", "b": "2"}
    assert vary_values(["a", "b"], headers) == ["a=1", "b=2"]
    assert vary_values([], headers) == []


# -- format_tag --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "params", "expected"),
    [
        ("items", {}, "items"),
        ("item:{item_id}", {"item_id": 42}, "item:42"),
        ("item:{item_id}", {"item_id": "a b"}, "item:a b"),
        ("{a}/{b}", {"a": 1, "b": 2}, "1/2"),
        ("item:{missing}", {"item_id": 42}, "item:{missing}"),  # kept literally
        ("item:{0}", {}, "item:{0}"),
        ("item:{", {}, "item:{"),
    ],
)
def test_format_tag(template: str, params: dict[str, object], expected: str) -> None:
    assert format_tag(template, params) == expected


# -- origin and handler keys (issue 18) --------------------------------------------------


def _scope(**kw: Any) -> dict[str, Any]:
    return {"scheme": "http", "headers": [], "query_string": b"", **kw}


def test_origin_is_what_starlette_builds_base_url_from() -> None:
    from starlette.requests import Request

    scopes = [
        _scope(headers=[(b"host", b"Api.Example:8080")]),
        _scope(scheme="https", headers=[(b"host", b"api.example")]),
        _scope(server=("10.0.0.1", 80)),
        _scope(server=("10.0.0.1", 8000)),
        _scope(scheme="https", server=("10.0.0.1", 443)),
    ]
    for scope in scopes:
        request = Request({"type": "http", "path": "/", "root_path": "", **scope})
        assert origin(scope) == str(request.base_url).rstrip("/")


def test_handler_key_separates_hosts_schemes_and_mount_points() -> None:
    def key(per_host: bool = True, **kw: Any) -> str:
        return handler_key(
            "p", _scope(**kw), "m:get_item", "/items/{id}", {"id": 1}, per_host=per_host
        )

    a = key(headers=[(b"host", b"a.example")])
    assert a == key(headers=[(b"host", b"a.example")])
    assert a != key(headers=[(b"host", b"b.example")])
    assert a != key(headers=[(b"host", b"a.example:80")])
    assert a != key(scheme="https", headers=[(b"host", b"a.example")])
    assert a != key(headers=[(b"host", b"a.example")], root_path="/v2")
    shared = key(per_host=False, headers=[(b"host", b"a.example")])
    assert shared == key(per_host=False, headers=[(b"host", b"b.example")], scheme="https")
    assert shared != key(per_host=False, root_path="/v2")


def test_vary_values_case_normalised_only_where_values_are_caseless() -> None:
    assert vary_values(["accept-language"], {"accept-language": "eN, De"}) == vary_values(
        ["accept-language"], {"accept-language": "en, de"}
    )
    assert vary_values(["accept-encoding"], {"accept-encoding": "GZIP"}) == vary_values(
        ["accept-encoding"], {"accept-encoding": "gzip"}
    )
    # Other headers keep their case: X-Tenant: A and a may well be different tenants.
    assert vary_values(["x-tenant"], {"x-tenant": "A"}) != vary_values(
        ["x-tenant"], {"x-tenant": "a"}
    )
    # Order is kept: without q-values it may still express a preference.
    assert vary_values(["accept-language"], {"accept-language": "en, de"}) != vary_values(
        ["accept-language"], {"accept-language": "de, en"}
    )


# -- handler_key's memo ------------------------------------------------------------------

_small = st.sampled_from(["", "a", "b", "é", "a/b", "%2F", "1", "1.0"])
_handler_args = st.fixed_dictionaries(
    {
        "prefix": st.sampled_from(["p", "q"]),
        "route": st.sampled_from(["m:get_item", "m:get_other"]),
        "template": st.sampled_from(["/items/{id}", "/items/{id:int}"]),
        "root_path": st.sampled_from(["", "/v2"]),
        "path": _small.map(lambda s: "/items/" + s),
        "query": st.sampled_from([b"", b"a=1", b"a=1&b=2", b"b=2&a=1", b"a=%31"]),
        "params": st.dictionaries(
            st.sampled_from(["id", "x"]),
            st.one_of(_small, st.integers(0, 2), st.floats(0, 2)),
            max_size=2,
        ),
        "key_extra": _small,
        "inputs": st.lists(_small, max_size=3),
        "per_host": st.booleans(),
        "scheme": st.sampled_from(["http", "https"]),
        "host": st.sampled_from([None, b"a.example", b"a.example:80", b"A.example"]),
        "server": st.sampled_from(
            [("127.0.0.1", 80), ("127.0.0.1", 8080), None, ["127.0.0.1", 81]]
        ),
    }
)


def _handler_key(args: dict[str, Any]) -> str:
    headers = [] if args["host"] is None else [(b"host", args["host"])]
    scope = {
        "type": "http",
        "root_path": args["root_path"],
        "path": args["path"],
        "query_string": args["query"],
        "scheme": args["scheme"],
        "server": args["server"],
        "headers": headers,
    }
    return handler_key(
        args["prefix"],
        scope,
        args["route"],
        args["template"],
        args["params"],
        args["key_extra"],
        args["inputs"],
        per_host=args["per_host"],
    )


@settings(max_examples=300, deadline=None)
@given(_handler_args, _handler_args)
def test_handler_key_memo_answers_what_computing_answers(
    a: dict[str, Any], b: dict[str, Any]
) -> None:
    """The memo never hands one request's key to another: keys read through a warm memo
    equal keys computed with an empty one, whatever two requests differ in."""
    warm = (_handler_key(a), _handler_key(b), _handler_key(a))
    _keys._key_memo.clear()
    cold_a = _handler_key(a)
    _keys._key_memo.clear()
    cold_b = _handler_key(b)
    assert warm == (cold_a, cold_b, cold_a)


def test_handler_key_memo_is_bounded() -> None:
    _keys._key_memo.clear()
    for n in range(_keys._KEY_MEMO_SIZE * 3):
        handler_key("p", _scope(path=f"/items/{n}"), "m:f", "/items/{id}", {"id": n})
    assert 0 < len(_keys._key_memo) <= _keys._KEY_MEMO_SIZE
    _keys._key_memo.clear()
    long = "/" + "x" * _keys._KEY_MEMO_PART_MAX
    assert handler_key("p", _scope(path=long), "m:f", "/{x}", {}) == handler_key(
        "p", _scope(path=long), "m:f", "/{x}", {}
    )
    assert not _keys._key_memo  # long targets are computed each time, never kept
