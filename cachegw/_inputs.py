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
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_dependant
from fastapi.security.base import SecurityBase
from pydantic import BaseModel
from starlette.requests import cookie_parser

from cachegw._models import CREDENTIAL_HEADERS

__all__ = ["NO_INPUTS", "RouteInputs", "inputs_of", "matched", "matched_dependant"]


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
    #: A header model that receives every header (``extra="allow"``, a model validator):
    #: every header line is keyed.
    all_headers: bool = False
    #: Why the caller's identity cannot be seen: a security scheme with its own
    #: ``__call__`` (it may read any input). Such a route is not cached unless it says
    #: what the answer depends on (docs/decorator.md).
    unseen: tuple[str, ...] = ()

    def parts(self, raw_headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
        """The declared header and cookie values of one request, as key parts.

        Unambiguous whatever the values hold: each input is a part naming it and how many
        values follow (none: absent, which differs from empty), then one part per value
        (key parts are length-prefixed, see `cachegw._keys.hash_parts`).
        """
        if self.all_headers:
            # Header names are tokens (no ":"): each line is one unambiguous part.
            lines = sorted(raw_headers, key=lambda line: line[0])
            parts = [f"H#{len(lines)}"]
            parts += [f"{n.decode('latin-1')}:{v.decode('latin-1')}" for n, v in lines]
            return parts
        if not self.headers and not self.cookies:
            return []
        found: dict[bytes, list[bytes]] = {}
        for name, value in raw_headers:
            if name in self.headers or (name == b"cookie" and self.cookies):
                found.setdefault(name, []).append(value)
        parts = []
        for name in self.headers:
            values = found.get(name, ())
            parts.append(f"h:{name.decode('latin-1')}#{len(values)}")
            parts += ["=" + v.decode("latin-1") for v in values]
        if self.cookies:
            # Each Cookie line on its own: Starlette up to 0.4x reads the first line only,
            # later versions all of them (the last value of a name wins), so the key holds
            # every line's value and differs whenever either reading does.
            jars = [cookie_parser(line.decode("latin-1")) for line in found.get(b"cookie", ())]
            for cookie in self.cookies:
                got = [jar.get(cookie) for jar in jars]
                if all(v is None for v in got):
                    parts.append(f"c:{cookie}#0")  # absent, however many lines
                    continue
                parts.append(f"c:{cookie}#{len(got)}")
                parts += ["-" if v is None else "=" + v for v in got]
        return parts


NO_INPUTS = RouteInputs()

# id(dependant) -> (dependant, inputs): the dependant is kept so its id is not reused.
_analysed: dict[int, tuple[Dependant, RouteInputs]] = {}
# The same under ``app.dependency_overrides`` (usually tests): keyed on the overrides too.
_overridden: dict[tuple[int, tuple[tuple[int, int], ...]], tuple[Any, RouteInputs]] = {}
_OVERRIDDEN_SIZE = 1024


def inputs_of(
    dependant: Dependant,
    own_params: Iterable[str] = (),
    overrides: Mapping[Any, Any] | None = None,
) -> RouteInputs:
    """The inputs of the route whose dependency tree is ``dependant`` (memoised).

    ``own_params`` are parameters the decorator itself added to the handler (its
    ``Request`` and ``Response``): they read nothing the handler sees. ``overrides`` is
    the app's ``dependency_overrides``: FastAPI solves an override's own parameters in
    place of the dependency's, so they are what the route reads.
    """
    if overrides:
        items = tuple(overrides.items())
        memo_key = (id(dependant), tuple((id(k), id(v)) for k, v in items))
        found = _overridden.get(memo_key)
        if found is not None and found[0][0] is dependant and found[0][1] == items:
            return found[1]
        inputs = _analyse(dependant, frozenset(own_params), dict(items))
        if len(_overridden) >= _OVERRIDDEN_SIZE:
            _overridden.clear()
        _overridden[memo_key] = ((dependant, items), inputs)
        return inputs
    memo = _analysed.get(id(dependant))
    if memo is not None and memo[0] is dependant:
        return memo[1]
    inputs = _analyse(dependant, frozenset(own_params), {})
    _analysed[id(dependant)] = (dependant, inputs)
    return inputs


def _analyse(
    root: Dependant, own_params: frozenset[str], overrides: Mapping[Any, Any]
) -> RouteInputs:
    headers: set[str] = set()
    cookies: set[str] = set()
    credentials = set(CREDENTIAL_HEADERS)
    keys_principal = False
    opaque: list[str] = []
    unseen: list[str] = []
    body = all_headers = False
    for dependant, top in _walk(root, overrides):
        scheme = _scheme(dependant.call)
        stock_scheme = False
        if scheme is not None:
            # A security scheme reads its credential from the request it is given.
            where, name = _scheme_input(scheme)
            keys_principal = True
            if where == "header":
                headers.add(name)
                credentials.add(name)
            elif where == "cookie":
                cookies.add(name)
            # FastAPI's own scheme, called as it is (not through a function wrapped
            # around it, which FastAPI hands the scheme's parameters).
            called: Any = dependant.call
            stock_scheme = called is scheme and _stock_call(scheme)
            if not stock_scheme:
                # Its own __call__ may take the caller from anywhere in the request.
                unseen.append(f"security scheme {_name(dependant.call)} (its own __call__)")
        for field in dependant.header_params:
            for name in _names(field, headers=True):
                headers.add(name)
                if name in CREDENTIAL_HEADERS:
                    keys_principal = True
            if _takes_everything(field):
                all_headers = keys_principal = True
        for field in dependant.cookie_params:
            cookies.update(_names(field, headers=False))
            keys_principal = True
            if _takes_everything(field):
                headers.add("cookie")
        body = body or bool(dependant.body_params)
        if stock_scheme:
            continue  # FastAPI's own scheme reads only its credential
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
        all_headers=all_headers,
        unseen=tuple(unseen),
    )


def _walk(root: Dependant, overrides: Mapping[Any, Any]) -> Iterator[tuple[Dependant, bool]]:
    seen: set[int] = set()
    made: dict[int, Dependant] = {}  # overridden dependants, built once per analysis
    stack = [(root, True)]
    while stack:
        dependant, top = stack.pop()
        if id(dependant) in seen:
            continue
        seen.add(id(dependant))
        yield dependant, top
        for sub in dependant.dependencies:
            if overrides:
                sub = made.get(id(sub)) or made.setdefault(id(sub), _overridden_by(sub, overrides))
            stack.append((sub, False))


def _overridden_by(dependant: Dependant, overrides: Mapping[Any, Any]) -> Dependant:
    """The dependant FastAPI solves in place of ``dependant`` (as solve_dependencies
    does: the override's own parameters, under the dependency's path)."""
    try:
        call = overrides.get(dependant.call, dependant.call)
    except TypeError:  # an unhashable callable is never a key
        return dependant
    if call is dependant.call:
        return dependant
    return get_dependant(path=dependant.path or "", call=call, name=dependant.name)


def _stock_call(scheme: SecurityBase) -> bool:
    """Whether the scheme's ``__call__`` is FastAPI's own (it reads only its credential)."""
    module = getattr(type(scheme).__call__, "__module__", None) or ""
    return module.startswith("fastapi.security.")


def _takes_everything(field: Any) -> bool:
    """Whether a header/cookie model parameter receives every header/cookie of the
    request: FastAPI hands a model all the request's values, which ``extra="allow"``
    keeps and a ``before``/``wrap`` model validator sees."""
    for model in _models(field):
        if model.model_config.get("extra") == "allow":
            return True
        validators = model.__pydantic_decorators__.model_validators.values()
        if any(v.info.mode in ("before", "wrap") for v in validators):
            return True
    return False


def _models(field: Any) -> list[type[BaseModel]]:
    """The Pydantic models a header/cookie parameter may be read into: its annotation, or
    the models of a union (FastAPI 0.12x and later read ``Model | None`` as a model)."""
    found: list[type[BaseModel]] = []
    todo = [getattr(getattr(field, "field_info", None), "annotation", None)]
    while todo:
        annotation = todo.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.append(annotation)
        elif get_origin(annotation) in (Union, UnionType, Annotated):
            todo.extend(
                get_args(annotation)[:1]
                if get_origin(annotation) is Annotated
                else get_args(annotation)
            )
    return found


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
    pairs = [(getattr(field, "name", ""), getattr(field, "field_info", None))]
    for model in _models(field):
        infos: Mapping[str, Any] = model.model_fields
        pairs += [(name, info) for name, info in infos.items()]
    names: set[str] = set()
    for name, info in pairs:
        aliases = [name, getattr(info, "alias", None)]
        aliases += _alias_names(getattr(info, "validation_alias", None))
        for alias in aliases:
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


def _alias_names(alias: Any) -> list[str]:
    """The request names a Pydantic validation alias may read: a string, each choice of
    ``AliasChoices`` (FastAPI 0.12x and later read headers under every choice), the first
    step of an ``AliasPath``."""
    if isinstance(alias, str):
        return [alias]
    choices = getattr(alias, "choices", None)
    if isinstance(choices, list):
        return [name for choice in choices for name in _alias_names(choice)]
    path = getattr(alias, "path", None)
    if isinstance(path, list) and path and isinstance(path[0], str):
        return [path[0]]
    return []


def _name(call: Any) -> str:
    call = _unwrapped(call)
    return getattr(call, "__qualname__", None) or type(call).__name__


def matched(scope: Mapping[str, Any]) -> tuple[Dependant | None, Mapping[Any, Any] | None]:
    """The dependency tree FastAPI solves for the route this request matched, and the
    ``dependency_overrides`` it applies to it (the app's, through the route's provider;
    None when there are none).

    Read from FastAPI's scope in this one place. Up to FastAPI 0.13x an included route is
    a copy of the router's route carrying the include's dependencies; later versions keep
    the router's own route in ``scope["route"]`` and the include's effective tree (with
    its ``dependencies=``) in ``scope["fastapi"]["effective_route_context"]``
    (tests/test_inputs.py is the contract on the oldest and newest FastAPI allowed).
    """
    route = scope.get("route")
    provider = getattr(route, "dependency_overrides_provider", None)
    dependant = None
    state = scope.get("fastapi")
    if isinstance(state, dict):
        context = state.get("effective_route_context")
        if context is not None and getattr(context, "original_route", None) is route:
            dependant = getattr(context, "dependant", None)
            provider = getattr(context, "dependency_overrides_provider", provider)
    if not isinstance(dependant, Dependant):
        dependant = getattr(route, "dependant", None)
        if not isinstance(dependant, Dependant):
            dependant = None
    overrides = getattr(provider, "dependency_overrides", None)
    if not overrides or not isinstance(overrides, Mapping):  # the common case, first
        return dependant, None
    return dependant, overrides


def matched_dependant(scope: Mapping[str, Any]) -> Dependant | None:
    """The dependency tree of the route this request matched (see `matched`)."""
    return matched(scope)[0]
