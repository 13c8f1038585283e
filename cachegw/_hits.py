"""`CachedHits`: plain hits of ``@cached`` routes answered before FastAPI's routing.

A hit through FastAPI pays for routing, request parsing and dependency solving before the
decorator even looks at the cache. This layer looks first: for a plain ``GET`` or ``HEAD``
of a route whose endpoint *is* a ``@cached`` handler, it finds the route the way
Starlette's router would (the first route that fully matches), builds the same key as the
decorator (`cachegw._keys.handler_key`) and answers a fresh entry itself. Anything else,
and any doubt, goes on to the router unchanged.

It answers from the router's entrance — inside every middleware of the application,
whatever order they were added in (an authentication middleware still refuses a request
whose answer is cached) — by wrapping the router's ``middleware_stack`` (Starlette's
router-level middleware chain) the first time a request passes.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from cachegw import _fc2
from cachegw._core import SLOW_HEADERS
from cachegw._decorator import READ_DEADLINE, Marked, engine_for, marked
from cachegw._engine import CacheEngine
from cachegw._entry import Entry, VaryMarker
from cachegw._inputs import inputs_of
from cachegw._keys import handler_key
from cachegw._models import RequestInfo, Served
from cachegw._store import end_read_budget, read_budget

__all__ = ["CachedHits"]


_MEMO_SIZE = 4096
_MEMO_PART_MAX = 256  # memoised only for targets this long at most (see cachegw._proxy)
_NO_HEADERS: dict[str, str] = {}


class CachedHits:
    """Answers plain hits of ``@cached`` routes before FastAPI's routing.

    Usage::

        app = FastAPI(lifespan=lifespan)
        app.add_middleware(CachedHits)

    Wherever it is added, hits are answered at the router's entrance, after every
    middleware of the application (authentication, CORS, GZip, sessions, ...) has run:
    a middleware that refuses a request refuses it on hits too. ``CachedHits(app)``
    around a FastAPI app (served instead of it) works the same way.

    Only what needs no decision of the application is answered here: a ``GET``/``HEAD``
    without credentials, ``Cache-Control``, conditionals, ``Range`` or a body, of a route
    whose endpoint is the ``@cached`` handler itself (not a decorator wrapped around it,
    such as an authentication check) without a ``key`` function, whose parameters are
    path and query parameters only (no ``Depends``, headers, cookies, body or security:
    those run, and may refuse the request, on every request), found fresh and not purged.
    Everything else takes the ordinary path, which serves hits as before.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Where hits are answered, decided at the first request: here (a `_RouterHits`
        # around ``app``) when no middleware of the application is inside this one, else
        # at the router's entrance (False here).
        self._here: _RouterHits | Literal[False] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        here = self._here
        if here is None:
            here = self._here = self._place(scope)
        if here is not False:
            await here(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _place(self, scope: Scope) -> _RouterHits | Literal[False]:
        """Answer here when this is the innermost middleware the application declares (or
        the application declares none), which saves the layers between here and the router;
        else put the hit layer at the router's entrance, inside every middleware."""
        owner = scope.get("app") or self.app
        router = getattr(owner, "router", None)
        declared = getattr(owner, "user_middleware", None)
        if router is None or not isinstance(declared, list):
            return False  # not a Starlette application: nothing is answered early
        innermost = getattr(declared[-1], "cls", None) if declared else None
        inside_app = scope.get("app") is owner
        if (inside_app and innermost is CachedHits) or (not inside_app and not declared):
            return _RouterHits(self.app, router)
        _install(router)
        return False


def _install(router: Any) -> None:
    """Put a `_RouterHits` at the entrance of ``router`` (once): Starlette's router runs
    its ``middleware_stack`` (its own middleware chain, then routing) for every request."""
    stack = getattr(router, "middleware_stack", None)
    if stack is None or isinstance(stack, _RouterHits):
        return
    router.middleware_stack = _RouterHits(stack, router)


class _RouterHits:
    """The hit layer at a router's entrance (see `CachedHits`)."""

    def __init__(self, app: ASGIApp, router: Any) -> None:
        self.app = app
        self.router = router
        self._routes: dict[
            tuple[str, str, str], tuple[APIRoute, Marked, dict[str, Any]] | None
        ] = {}
        self._seen: tuple[int, int] = (0, 0)
        self._keys: dict[tuple[Any, ...], str] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            served = await self._hit(scope)
            if served is not None:
                await send(
                    {
                        "type": "http.response.start",
                        "status": served.status,
                        "headers": served.headers,
                    }
                )
                await send({"type": "http.response.body", "body": served.body})
                return
        await self.app(scope, receive, send)

    async def _hit(self, scope: Scope) -> Served | None:
        backend, enabled, prefix, expire = _fc2.settings()
        if backend is None or not enabled:
            return None
        host: bytes | None = None
        for name, value in scope["headers"]:
            if name in SLOW_HEADERS:
                return None
            if name == b"host" and host is None:
                host = value
        found = self._route(scope)
        if found is None:
            return None
        route, mark, path_params = found
        policy = mark.face.policy(expire)
        if policy.key is not None or policy.early_refresh:
            return None
        engine = engine_for(backend)
        key = self._key(scope, route, mark, path_params, host, prefix)
        info = RequestInfo(method=scope["method"], key=key, headers=_NO_HEADERS)
        if engine.store.inline:
            entry = await self._lookup(engine, info, scope)
        else:
            # The request's one read budget: the ordinary path goes on with what is left.
            scope[READ_DEADLINE], token = read_budget(engine.read_budget)
            try:
                if engine.purges.due():
                    await engine.purges.refresh()  # as the ordinary path would first
                entry = await self._lookup(engine, info, scope)
            finally:
                end_read_budget(token)
        if entry is None:
            return None
        now = engine.clock()
        decision = engine.plain_hit(entry, scope["method"], policy, now)
        if decision is None:
            return None  # stale, purged...: the ordinary path decides
        return engine.hit(entry, info, now, decision.left)

    @staticmethod
    async def _lookup(engine: CacheEngine, info: RequestInfo, scope: Scope) -> Entry | None:
        item = await engine.store.get(info.key)
        if isinstance(item, VaryMarker):
            info.headers = _headers(scope)  # only now: most entries do not vary
            entry, _ = await engine.lookup(info)
            return entry
        return item if isinstance(item, Entry) else None

    def _key(
        self,
        scope: Scope,
        route: APIRoute,
        mark: Marked,
        path_params: dict[str, Any],
        host: bytes | None,
        prefix: str,
    ) -> str:
        """`handler_key`, memoised on everything it reads (bounded)."""
        face = mark.face
        memo = (
            prefix,
            mark.route_id,
            scope.get("root_path", ""),
            route.path,
            scope["path"],
            scope.get("query_string", b""),
            face.per_host,
            scope.get("scheme", "http"),
            host,
            None if host is not None else scope.get("server"),
        )
        key = self._keys.get(memo)
        if key is None:
            # Eligible routes declare no header or cookie inputs: `parts` is empty, and
            # asked all the same so that the decorator's key rule has one owner.
            inputs = inputs_of(route.dependant, mark.own_params).parts(scope["headers"])
            key = handler_key(
                prefix,
                scope,
                mark.route_id,
                route.path,
                path_params,
                "",
                inputs,
                per_host=face.per_host,
            )
            # Bounded in bytes too (issue 24): long targets are not kept.
            if len(scope["path"]) + len(memo[5]) + len(host or b"") <= _MEMO_PART_MAX:
                if len(self._keys) >= _MEMO_SIZE:
                    self._keys.clear()
                self._keys[memo] = key
        return key

    def _route(self, scope: Scope) -> tuple[APIRoute, Marked, dict[str, Any]] | None:
        """The route Starlette's router would pick, when it is an eligible ``@cached``
        route, with its path params; memoised per path (bounded)."""
        routes = getattr(self.router, "routes", None)
        if routes is None:
            return None
        # Routes added later start a new memo.
        current = (id(routes), len(routes))
        if current != self._seen:
            self._routes.clear()
            self._seen = current
        memo = (scope.get("root_path", ""), scope["path"], scope["method"])
        if memo in self._routes:
            return self._routes[memo]
        found: tuple[APIRoute, Marked, dict[str, Any]] | None = None
        for route in routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                mark = marked(getattr(route, "endpoint", None))
                if (
                    isinstance(route, APIRoute)
                    and _stock(route)
                    and mark is not None
                    and mark.face.key_builder is None
                    and mark.face.finish is None
                    and _plain(route)
                ):
                    found = (route, mark, dict(child.get("path_params", {})))
                break
        if len(scope["path"]) <= _MEMO_PART_MAX:
            if len(self._routes) >= _MEMO_SIZE:
                self._routes.clear()
            self._routes[memo] = found
        return found


#: What a route class may override to run code of its own around the handler (an
#: authentication check in ``get_route_handler``, routing on a header in ``matches``).
_ROUTE_HOOKS = ("__init__", "__call__", "matches", "handle", "get_route_handler", "app")


def _stock(route: APIRoute) -> bool:
    """Whether the route runs as FastAPI's own ``APIRoute`` does: a custom ``route_class``
    that overrides how requests are matched or handled takes the ordinary path."""
    cls = type(route)
    return cls is APIRoute or all(
        getattr(cls, hook, None) is getattr(APIRoute, hook, None) for hook in _ROUTE_HOOKS
    )


def _plain(route: APIRoute) -> bool:
    """Whether answering the route from the cache needs nothing of FastAPI's request
    handling: only path and query parameters, nothing that runs (or refuses) per request."""
    dependant = route.dependant
    return not (
        dependant.dependencies
        or dependant.header_params
        or dependant.cookie_params
        or dependant.body_params
        or getattr(dependant, "security_requirements", None)
    )


def _headers(scope: Scope) -> dict[str, str]:
    """Request headers as the engine reads them: lower-case names, repeats joined."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers
