"""fastapi-cache2's ``@cache``, on cachegw's engine: switch by changing one import.

Usage::

    # before: from fastapi_cache.decorator import cache
    from cachegw.compat import cache

    @app.get("/items/{item_id}")
    @cache(expire=60, namespace="items")
    async def get_item(item_id: int) -> Item: ...

It takes fastapi-cache2 0.2.2's arguments and sends its headers (``X-FastAPI-Cache:
HIT|MISS``, ``Cache-Control: max-age=N``, ``ETag``), while keeping cachegw's rules:
keys from the request (route, path params, canonical query, scheme and Host), no
shared entries for requests with credentials, response bytes replayed on a hit. The
migration guide (docs/migration.md) lists every difference.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec

from fastapi_cache.coder import Coder
from fastapi_cache.key_builder import default_key_builder
from fastapi_cache.types import KeyBuilder
from starlette.requests import Request
from starlette.responses import Response

from cachegw import _fc2
from cachegw._decorator import DECORATOR_STATUSES, Face, PolicyFor, wrap
from cachegw._inputs import RouteInputs
from cachegw._policy import CachePolicy

__all__ = ["cache"]

logger = logging.getLogger("cachegw")

P = ParamSpec("P")

#: fastapi-cache2's status header: ``X-Cache-Status``'s HIT and STALE answer from an
#: entry, MISS and EXPIRED ran the handler; BYPASS (not cached) gets no header, as in
#: fastapi-cache2 for requests it does not cache.
_FC2_STATUS = {"HIT": "HIT", "STALE": "HIT", "MISS": "MISS", "EXPIRED": "MISS"}


def cache(
    expire: int | None = None,
    coder: type[Coder] | None = None,
    key_builder: KeyBuilder | None = None,
    namespace: str = "",
    injected_dependency_namespace: str = "__fastapi_cache",
    *,
    per_host: bool = True,
    shared: bool = False,
) -> Callable[[Callable[P, Any]], Callable[P, Awaitable[Any]]]:
    """fastapi-cache2's ``@cache`` decorator, served by cachegw.

    Parameters (fastapi-cache2 0.2.2's, same order):

    * **expire** - seconds an answer stays fresh. ``None`` takes
      ``FastAPICache.init(expire=...)``, else 60 (fastapi-cache2 would keep the entry
      forever; cachegw gives every entry a lifetime). ``0`` stores only answers that set
      their own freshness.
    * **coder** - accepted and not used: cachegw stores the response bytes FastAPI
      sends, so nothing is encoded or decoded (and nothing is ever pickled).
    * **key_builder** - called as fastapi-cache2 calls it: ``key_builder(func,
      f"{prefix}:{namespace}", request=..., response=..., args=..., kwargs=...)``, sync
      or async. Its result decides the entry, together with the route, the header,
      cookie and security inputs the route declares and (unless ``per_host=False``) the
      scheme and ``Host``. A key builder also decides identity:
      requests with ``Authorization`` or ``Cookie`` are cached under its key, so
      include the user in it when answers differ per user. Without one (or with
      fastapi-cache2's default), the key is cachegw's: route, path params, canonical
      query, scheme and Host, namespace; requests with credentials are not cached.
    * **namespace** - part of the key, and a tag: ``await purge(tags=[f"namespace:{ns}"])``.
    * **injected_dependency_namespace** - prefix of the ``Request`` / ``Response``
      parameters added to the handler's signature when it has none.
    * **per_host** - cachegw's: ``False`` shares entries across hosts (see ``cached``).
    * **shared** - cachegw's: ``True`` states that the answer depends only on the inputs
      the route declares, although it takes a ``Request`` (see ``cached``).
    """
    _check_arguments(
        expire, coder, key_builder, namespace, injected_dependency_namespace, per_host, shared
    )

    def make(ttl: float | str) -> CachePolicy:
        return CachePolicy(ttl=ttl, statuses=DECORATOR_STATUSES)  # type: ignore[arg-type]

    policies = PolicyFor(make, expire)
    tag = f"namespace:{namespace}" if namespace else ""

    def decorator(func: Callable[P, Any]) -> Callable[P, Awaitable[Any]]:
        face = Face(
            name="@cache",
            policy=policies,
            per_host=per_host,
            shared=shared,
            request_param=f"{injected_dependency_namespace}_request",
            response_param=f"{injected_dependency_namespace}_response",
            key_builder=_key_function(func, key_builder, namespace),
            namespace=namespace,
            key_arguments=True,
            extra_tags=(tag,) if tag else (),
            finish=_fastapi_cache_headers,
        )
        return wrap(func, face)

    return decorator


def _check_arguments(
    expire: object,
    coder: object,
    key_builder: object,
    namespace: object,
    injected_dependency_namespace: object,
    per_host: object,
    shared: object,
) -> None:
    if not isinstance(per_host, bool):
        raise TypeError(f"per_host must be True or False, got {per_host!r}")
    if not isinstance(shared, bool):
        raise TypeError(f"shared must be True or False, got {shared!r}")
    if expire is not None and (isinstance(expire, bool) or not isinstance(expire, int | float)):
        raise TypeError(f"expire must be a number of seconds or None, got {expire!r}")
    if coder is not None and not (isinstance(coder, type) and issubclass(coder, Coder)):
        raise TypeError(
            f"coder must be a fastapi_cache.coder.Coder class, got {coder!r}; cachegw "
            "does not need one (it stores the response bytes), so it can be left out"
        )
    if key_builder is not None and not callable(key_builder):
        raise TypeError(f"key_builder must be callable, got {key_builder!r}")
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a string, got {namespace!r}")
    if not isinstance(injected_dependency_namespace, str) or not injected_dependency_namespace:
        raise TypeError(
            "injected_dependency_namespace must be a non-empty string, "
            f"got {injected_dependency_namespace!r}"
        )


def _key_function(
    func: Callable[..., Any], key_builder: KeyBuilder | None, namespace: str
) -> Callable[
    [Request, Response, tuple[Any, ...], dict[str, Any]], Awaitable[tuple[str, bool] | None]
]:
    """How `wrap` asks for a request's key part: fastapi-cache2's call of ``key_builder``
    (the one given, else ``FastAPICache.init``'s); ``(part, decides identity)``, or None
    to serve uncached when the key builder fails."""

    async def build_key(
        request: Request,
        response: Response,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[str, bool] | None:
        builder = key_builder or _fc2.key_builder()
        if builder is None or builder is default_key_builder:
            return f"namespace={namespace}", False
        # The kwargs fastapi-cache2 passes: the handler's, without the request and
        # response it receives.
        passed = {
            name: value
            for name, value in kwargs.items()
            if not isinstance(value, Request | Response)
        }
        prefix = _fc2.prefix("")
        try:
            key = builder(
                func,
                f"{prefix}:{namespace}",
                request=request,
                response=response,
                args=args,
                kwargs=passed,
            )
            if inspect.isawaitable(key):
                key = await key
            if not isinstance(key, str):
                raise TypeError(f"it returned {key!r}, not a str")
        except Exception as exc:
            logger.error(
                "cachegw: key_builder %s raised %s: %s on %s %s; serving uncached",
                getattr(builder, "__qualname__", repr(builder)),
                type(exc).__name__,
                exc,
                request.method,
                request.url.path,
            )
            return None
        return key, True

    return build_key


def _fastapi_cache_headers(
    response: Response, request: Request, policy: CachePolicy, inputs: RouteInputs
) -> None:
    """fastapi-cache2's headers on a response served through the cache.

    ``Cache-Control: max-age`` is added only when an entry backs the answer (a hit, or a
    stored miss) and the handler set no ``Cache-Control`` of its own; ``private`` when
    the request carried credentials (the route's: ``X-API-Key``, a scheme's header, ...)
    or the route keys declared header or cookie inputs, so no shared cache downstream,
    which knows nothing of that key, keeps a per-user or per-tenant answer for everyone.
    The ``ETag`` is cachegw's (stable content hash, on stored answers).
    """
    headers = response.raw_headers
    values = {name: value for name, value in headers}
    detail = values.get(b"cache-status", b"").decode("latin-1")
    parts = [part.strip() for part in detail.split(";")]
    status = None
    for name, value in headers:
        if name == b"x-cache-status":
            status = _FC2_STATUS.get(value.decode("latin-1"))
            if value == b"BYPASS" and "stored" in parts:
                # Request no-cache: the handler ran and its answer replaced the entry,
                # which fastapi-cache2 calls a MISS.
                status = "MISS"
    if status is None:
        return
    header = _fc2.status_header().lower().encode("latin-1")
    headers.append((header, status.encode("ascii")))
    if b"cache-control" in values:
        return
    if "hit" in parts:
        left = next((p[4:] for p in parts if p.startswith("ttl=")), "0")
        max_age = max(0, int(left))
    elif "stored" in parts:
        max_age = int(policy.ttl)
    else:
        return
    names = {name.decode("latin-1") for name, _ in request.scope["headers"]}
    keyed = inputs.headers or inputs.cookies or inputs.all_headers
    private = "private, " if keyed or not inputs.credentials.isdisjoint(names) else ""
    headers.append((b"cache-control", f"{private}max-age={max_age}".encode("ascii")))
