"""The app's side of the pass-through at the protocol level: a request the cache will not
answer, decided early and forwarded without an ASGI cycle (issue 26).

`plan` is asked by cachegw's uvicorn protocol once a request head is complete (through
``FastHitServer.fast_forward``, see `cachegw._forwarding`). It runs the ordinary path's
checks and route (`Proxy.route`) and takes only what it serves exactly as the ordinary
path does with a body already read: a ``GET``/``HEAD`` without a body of a route that keeps
nothing (``ttl = 0``), and a request of another method whose body is of known length and
small enough to be read before forwarding anyway (`BUFFERED_BODY`), on a route without a
key function. Everything else — a refusal, a chunked or large body, ``Expect``, an
upgrade, a cacheable ``GET`` — returns None and takes the ordinary path. What it takes is
served by the same code (`Proxy.serve`, `Proxy.forward`): header hygiene, timeouts,
limits, invalidation, the access line and metrics are the ordinary path's.
"""

from __future__ import annotations

import time
from typing import Any

from cachegw._exchange import BodyEnded, Routed, Trace, send_served
from cachegw._forwarding import ForwardCycle, Forwarder
from cachegw._models import Served
from cachegw._proxy import BUFFERED_BODY, Proxy

__all__ = ["plan"]


def plan(proxy: Proxy, scope: dict[str, Any]) -> Forwarder | None:
    """How to forward this request at the protocol level, or None for the ordinary path."""
    started = time.perf_counter()
    trace = Trace()
    try:
        routed = proxy.route(scope, trace)
    except Exception:
        return None  # a bug of ours: the ordinary path logs it and answers 500
    if isinstance(routed, Served):
        return None  # refused: by the ordinary path
    policy = routed.route.policy
    if routed.method in ("GET", "HEAD"):
        if routed.length != 0 or not policy.stores_nothing:
            return None
    elif routed.length is None or routed.length > BUFFERED_BODY or policy.key is not None:
        return None
    return _Forward(proxy, routed, scope, trace, started).run


class _Forward:
    """One request forwarded at the protocol level."""

    __slots__ = ("cycle", "proxy", "routed", "scope", "started", "trace")

    def __init__(
        self, proxy: Proxy, routed: Routed, scope: dict[str, Any], trace: Trace, started: float
    ) -> None:
        self.proxy = proxy
        self.routed = routed
        self.scope = scope
        self.trace = trace
        self.started = started
        self.cycle: ForwardCycle | None = None

    async def run(self, cycle: ForwardCycle) -> None:
        self.cycle = cycle
        await self.proxy.serve(self.scope, self.trace, self.handle, self.respond, self.started)

    async def handle(self, trace: Trace) -> Served:
        cycle = self.cycle
        assert cycle is not None
        if cycle.more_body:
            # The client left, broke the body's framing or was too slow (body_timeout)
            # before its body ended: nothing was forwarded.
            raise BodyEnded(self.scope)
        routed = self.routed
        content = bytes(cycle.body) if routed.length else None
        return await self.proxy.forward(routed, self.scope, trace, None, content)

    async def respond(self, served: Served) -> int:
        cycle = self.cycle
        assert cycle is not None
        head = self.scope["method"] == "HEAD"
        if served.stream is None and cycle.write(
            served.status, served.headers, b"" if head else served.body
        ):
            return 0 if head else len(served.body)
        return await send_served(cycle.asgi_send(), served, self.scope)
