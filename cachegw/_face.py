"""What the decorator faces share (``@cached`` and the fastapi-cache2-compatible ``@cache``):
a `Face` (how an entry point drives the serving path), its `PolicyFor`, the misuse warnings
given once per handler, and the engine per backend."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi_cache.types import Backend
from starlette.requests import Request
from starlette.responses import Response

from cachegw import _fc2
from cachegw._backends import cache_backend
from cachegw._engine import CacheEngine
from cachegw._inputs import RouteInputs
from cachegw._policy import DEFAULT_STATUSES, CachePolicy
from cachegw._purge import purges_for
from cachegw._store import L1

__all__ = [
    "DECORATOR_STATUSES",
    "DEFAULT_TTL",
    "READ_DEADLINE",
    "REQUEST_PARAM",
    "RESPONSE_PARAM",
    "Face",
    "KeyBuilderCall",
    "PolicyFor",
    "Warned",
    "engine_for",
]

logger = logging.getLogger("cachegw")

#: ``@cached``'s ttl when neither the decorator nor ``FastAPICache.init(expire=...)`` sets one.
DEFAULT_TTL = 60


REQUEST_PARAM = "__cachegw_request"
RESPONSE_PARAM = "__cachegw_response"

#: Scope key where `cachegw.CachedHits` leaves the end of the request's read budget after
#: a lookup that found no hit, so the ordinary path does not start a second budget.
READ_DEADLINE = "cachegw.read_deadline"

#: A handler's 2xx answers are its deliberate responses (errors arrive as exceptions), so
#: the decorator stores them all by default, plus the shared-cache defaults. 206 is a
#: partial body and never stored.
DECORATOR_STATUSES = DEFAULT_STATUSES | (frozenset(range(200, 300)) - {206})

_engines: weakref.WeakKeyDictionary[Backend, CacheEngine] = weakref.WeakKeyDictionary()


def engine_for(backend: Backend) -> CacheEngine:
    """The engine (coalescing state, counters) that serves `@cached` routes on ``backend``."""
    engine = _engines.get(backend)
    if engine is None:
        prefix = _fc2.prefix()
        # No L1 copies in front of a shared backend: without the gateway's landing channel
        # another process's refresh would only be seen after the L1's ttl. (In front of
        # the memory backend the L1 only saves decoding and is never stale.)
        cache = cache_backend(backend)
        l1 = None if cache.inline else L1(max_entries=0, max_bytes=0, ttl=0)
        engine = _engines[backend] = CacheEngine(cache, purges=purges_for(cache, prefix), l1=l1)
    return engine


class PolicyFor:
    """A route's policy, whose ttl may follow ``FastAPICache.init(expire=...)``.

    ``init`` usually runs in the lifespan, after the decorators, so the default ttl is
    looked up per request (and each distinct value's policy built once).
    """

    def __init__(self, make: Callable[[float | str], CachePolicy], ttl: float | str | None):
        self._make = make
        self._follows_init = ttl is None
        # Built now, so a bad value is an error where the decorator is applied.
        self._own = make(DEFAULT_TTL if ttl is None else ttl)
        self._by_expire: dict[float, CachePolicy] = {}

    @classmethod
    def fixed(cls, policy: CachePolicy) -> PolicyFor:
        return cls(lambda _ttl: policy, 0)

    def __call__(self, expire: float | None) -> CachePolicy:
        """The policy while ``FastAPICache.init(expire=...)`` is ``expire``."""
        if not self._follows_init or expire is None:
            return self._own
        policy = self._by_expire.get(expire)
        if policy is None:
            policy = self._by_expire[expire] = self._make(expire)
        return policy


#: Compat key function: ``(request, response, args, kwargs) -> (part, decides)``, or
#: None to serve uncached (it failed). ``decides``: the part is the user's own key
#: (it replaces the default key's parts and identity rule); else it joins the default key.
KeyBuilderCall = Callable[
    [Request, Response, tuple[Any, ...], dict[str, Any]], Awaitable[tuple[str, bool] | None]
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Face:
    """How one entry point (``@cached``, or the fastapi-cache2-compatible ``@cache``)
    drives the shared machinery below."""

    name: str  # in messages: "@cached", "@cache"
    policy: PolicyFor
    per_host: bool = True
    # The answer depends only on declared inputs, whatever the route can read.
    shared: bool = False
    # fastapi-cache2's namespace: keys start with ``{prefix}:{namespace}:`` so that
    # ``FastAPICache.clear(namespace=...)`` finds them.
    namespace: str = ""
    # Keys the handler's resolved arguments too (fastapi-cache2 keys on them).
    key_arguments: bool = False
    request_param: str = REQUEST_PARAM
    response_param: str = RESPONSE_PARAM
    # Replaces the default key's identity rule: its result is the key's own part
    # (with the route template and origin) and entries are per-principal.
    key_builder: KeyBuilderCall | None = None
    extra_tags: tuple[str, ...] = ()
    # Adjusts the outgoing response (e.g. fastapi-cache2's headers).
    finish: Callable[[Response, Request, CachePolicy, RouteInputs], None] | None = None


class Warned:
    """Misuse warnings already given for one decorated handler (one of each kind)."""

    __slots__ = ("kinds",)

    def __init__(self) -> None:
        self.kinds: set[str] = set()

    def once(self, kind: str, message: str, *args: object) -> None:
        if kind not in self.kinds:
            self.kinds.add(kind)
            logger.warning(message, *args)
