"""What a decorated route's answer can depend on, read from FastAPI's dependency tree.

The rule (docs/decorator.md, "What the key covers"): every input the route's dependency
tree declares is part of the key — path and query (always keyed), and the header, cookie
and security parameters of the handler and of every sub-dependency, router- and app-level
``dependencies=`` included — and what the route can read without declaring it (a
``Request``, ``HTTPConnection`` or ``WebSocket`` parameter anywhere in the tree) makes the
route per-principal: requests carrying credentials do not share its entries.

The tree is analysed once per route (`inputs_of`), not per request; `RouteInputs.parts`
reads the declared values of one request. Credential values are never stored in clear:
they only enter the key's sha256 digest (`cachegw._keys.hash_parts`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.security.base import SecurityBase
from pydantic import BaseModel
from starlette.requests import cookie_parser

from cachegw._models import CREDENTIAL_HEADERS

__all__ = ["NO_INPUTS", "RouteInputs", "inputs_of", "matched_dependant"]


@dataclass(frozen=True, slots=True)
class RouteInputs:
    """The inputs of one route, beyond its path and query."""

    #: Declared request header names (lower case, bytes as ASGI has them), sorted.
    headers: tuple[bytes, ...] = ()
    #: Declared cookie names, sorted.
    cookies: tuple[str, ...] = ()
    #: Header names that carry a credential on this route: the defaults plus the header
    #: names of its security schemes (``APIKeyHeader(name=...)``).
    credentials: frozenset[str] = CREDENTIAL_HEADERS
    #: A declared input carries a credential (a security scheme, a ``Header()`` named like
    #: a credential, a ``Cookie()``): its entries are keyed per credential.
    keys_principal: bool = False
    #: Why the route can read inputs nobody declared: ``"parameter 'request' of get_me"``.
    opaque: tuple[str, ...] = ()
    #: The route declares body parameters.
    body: bool = False

    def parts(self, raw_headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
        """The declared header and cookie values of one request, as key parts (an absent
        input differs from an empty one)."""
        if not self.headers and not self.cookies:
            return []
        found: dict[bytes, list[bytes]] = {}
        for name, value in raw_headers:
            if name in self.headers or (name == b"cookie" and self.cookies):
                found.setdefault(name, []).append(value)
        parts = []
        for name in self.headers:
            values = found.get(name)
            shown = "\x00".join(v.decode("latin-1") for v in values) if values else "\x01absent"
            parts.append(f"h:{name.decode('latin-1')}={shown}")
        if self.cookies:
            jar = cookie_parser("; ".join(v.decode("latin-1") for v in found.get(b"cookie", ())))
            for cookie in self.cookies:
                got = jar.get(cookie)
                parts.append(f"c:{cookie}=" + ("\x01absent" if got is None else got))
        return parts


NO_INPUTS = RouteInputs()

# id(dependant) -> (dependant, inputs): the dependant is kept so its id is not reused.
_analysed: dict[int, tuple[Dependant, RouteInputs]] = {}


def inputs_of(dependant: Dependant, own_params: Iterable[str] = ()) -> RouteInputs:
    """The inputs of the route whose dependency tree is ``dependant`` (memoised).

    ``own_params`` are parameters the decorator itself added to the handler (its
    ``Request`` and ``Response``): they read nothing the handler sees.
    """
    memo = _analysed.get(id(dependant))
    if memo is not None and memo[0] is dependant:
        return memo[1]
    inputs = _analyse(dependant, frozenset(own_params))
    _analysed[id(dependant)] = (dependant, inputs)
    return inputs


def _analyse(root: Dependant, own_params: frozenset[str]) -> RouteInputs:
    headers: set[str] = set()
    cookies: set[str] = set()
    credentials = set(CREDENTIAL_HEADERS)
    keys_principal = False
    opaque: list[str] = []
    body = False
    for dependant, top in _walk(root):
        scheme = _scheme(dependant.call)
        if scheme is not None:
            # A security scheme reads its credential from the request it is given.
            where, name = _scheme_input(scheme)
            keys_principal = True
            if where == "header":
                headers.add(name)
                credentials.add(name)
            elif where == "cookie":
                cookies.add(name)
            continue
        for field in dependant.header_params:
            for name in _names(field, headers=True):
                headers.add(name)
                if name in CREDENTIAL_HEADERS:
                    keys_principal = True
        for field in dependant.cookie_params:
            cookies.update(_names(field, headers=False))
            keys_principal = True
        body = body or bool(dependant.body_params)
        for attr in ("request_param_name", "http_connection_param_name", "websocket_param_name"):
            param = getattr(dependant, attr, None)
            if param is not None and not (top and param in own_params):
                opaque.append(f"parameter {param!r} of {_name(dependant.call)}")
    if "cookie" in headers:
        cookies.clear()  # the whole header is keyed already
    return RouteInputs(
        headers=tuple(sorted(name.encode("latin-1") for name in headers)),
        cookies=tuple(sorted(cookies)),
        credentials=frozenset(credentials),
        keys_principal=keys_principal,
        opaque=tuple(opaque),
        body=body,
    )


def _walk(root: Dependant) -> Iterator[tuple[Dependant, bool]]:
    seen: set[int] = set()
    stack = [(root, True)]
    while stack:
        dependant, top = stack.pop()
        if id(dependant) in seen:
            continue
        seen.add(id(dependant))
        yield dependant, top
        stack.extend((sub, False) for sub in dependant.dependencies)


def _unwrapped(call: Any) -> Any:
    while isinstance(call, functools.partial):
        call = call.func
    try:
        return inspect.unwrap(call)
    except ValueError:  # a cycle of __wrapped__
        return call


def _scheme(call: Any) -> SecurityBase | None:
    call = _unwrapped(call)
    return call if isinstance(call, SecurityBase) else None


def _scheme_input(scheme: SecurityBase) -> tuple[str, str]:
    """Where a security scheme reads its credential: ``("header", name)``,
    ``("cookie", name)`` or ``("query", name)`` (the query is always keyed)."""
    model = getattr(scheme, "model", None)
    where = getattr(getattr(model, "in_", None), "value", None)
    name = getattr(model, "name", None)
    if where in ("header", "cookie", "query") and isinstance(name, str):
        return where, name.lower() if where == "header" else name
    # HTTP Basic/Bearer/Digest, OAuth2 and OpenID Connect read Authorization.
    return "header", "authorization"


def _names(field: Any, *, headers: bool) -> set[str]:
    """Every name a header or cookie parameter may be read under (a Pydantic model
    parameter stands for all its fields). Over-approximated on purpose: keying a name the
    route does not read costs sharing, never correctness."""
    annotation = getattr(getattr(field, "field_info", None), "annotation", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        infos: Mapping[str, Any] = annotation.model_fields
        pairs = [(name, info) for name, info in infos.items()]
    else:
        pairs = [(getattr(field, "name", ""), getattr(field, "field_info", None))]
    names: set[str] = set()
    for name, info in pairs:
        for alias in (name, getattr(info, "alias", None), getattr(info, "validation_alias", None)):
            if isinstance(alias, str) and alias:
                names.add(alias.lower() if headers else alias)
                if headers:
                    names.add(alias.replace("_", "-").lower())
    if not headers and hasattr(field, "alias") and isinstance(field.alias, str):
        names.add(field.alias)
    if headers and hasattr(field, "alias") and isinstance(field.alias, str):
        names.add(field.alias.lower())
        names.add(field.alias.replace("_", "-").lower())
    return names


def _name(call: Any) -> str:
    call = _unwrapped(call)
    return getattr(call, "__qualname__", None) or type(call).__name__


def matched_dependant(scope: Mapping[str, Any]) -> Dependant | None:
    """The dependency tree FastAPI solves for the route this request matched.

    Read from FastAPI's scope in this one place. Up to FastAPI 0.13x an included route is
    a copy of the router's route carrying the include's dependencies; later versions keep
    the router's own route in ``scope["route"]`` and the include's effective tree (with
    its ``dependencies=``) in ``scope["fastapi"]["effective_route_context"]``
    (tests/test_inputs.py is the contract on the oldest and newest FastAPI allowed).
    """
    route = scope.get("route")
    state = scope.get("fastapi")
    if isinstance(state, dict):
        context = state.get("effective_route_context")
        if context is not None and getattr(context, "original_route", None) is route:
            dependant = getattr(context, "dependant", None)
            if isinstance(dependant, Dependant):
                return dependant
    dependant = getattr(route, "dependant", None)
    return dependant if isinstance(dependant, Dependant) else None
