"""How cachegw runs uvicorn: the settings a caching gateway needs, in one place."""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["GatewayHttpToolsProtocol", "uvicorn_options"]


class _NoEvent:
    def set(self) -> None:
        pass


class _Answered:
    """Stands for the cycle of a request answered by the fast path: already complete."""

    response_complete = True
    message_event = _NoEvent()


_ANSWERED = _Answered()


class GatewayHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, keeping the request target as the client sent it, and
    answering plain cache hits itself.

    httptools reduces an absolute-form target (``GET http://evil/x``) to its path, so the
    application could not tell it from ``GET /x``. The raw target goes into the scope's
    ``extensions`` and `check_target` refuses anything but origin-form.

    A plain ``GET``/``HEAD`` that the gateway can answer from an entry already decoded in
    the process (`cachegw._app._Proxy.fast_hit`: no credentials, conditionals, cache
    directives or body; fresh; no Vary) is answered here, with one write, without an ASGI
    cycle. Everything else, and any doubt, takes the ordinary path.
    """

    def on_headers_complete(self) -> None:
        fast_hit = getattr(self.app, "fast_hit", None)
        if (
            fast_hit is not None
            and (self.cycle is None or self.cycle.response_complete)
            and not self.pipeline
            and self.limit_concurrency is None
            and not self.server_state.default_headers
            and self.parser.get_http_version() == "1.1"
            and self.parser.should_keep_alive()
            and not self.parser.should_upgrade()
        ):
            answer = fast_hit(
                self.parser.get_method(), self.url, self.headers, self.client, self.scheme
            )
            if answer is not None:
                self.transport.write(answer)
                self.cycle = _ANSWERED  # type: ignore[assignment]
                self.on_response_complete()
                return
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions["cachegw.request_target"] = self.url
        super().on_headers_complete()


def uvicorn_options(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config`` / ``uvicorn.run`` serving a gateway.

    * no ``Date`` or ``Server`` header of uvicorn's own: the upstream's ``Date`` passes
      through, and a second one breaks HTTP caches downstream;
    * ``proxy_headers=False``: ``X-Forwarded-For`` from a client is not trusted, the
      gateway sets it from the socket peer;
    * the httptools parser with the raw request target kept (see above);
    * a bounded graceful shutdown (10 s for requests in flight).
    """
    options: dict[str, Any] = {
        "http": GatewayHttpToolsProtocol,
        "date_header": False,
        "server_header": False,
        "proxy_headers": False,
        "h11_max_incomplete_event_size": 64 * 1024,
        # On SIGTERM: stop accepting, let requests in flight finish for up to 10 s, then
        # close; the lifespan then waits (bounded) for background refreshes.
        "timeout_graceful_shutdown": 10,
    }
    try:
        import uvloop  # noqa: F401

        options["loop"] = "uvloop"
    except ImportError:  # pragma: no cover - uvicorn[standard] installs it
        options["loop"] = "asyncio"
    options.update(overrides)
    return options
