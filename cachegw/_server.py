"""How cachegw runs uvicorn: the settings a caching gateway needs, in one place."""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["GatewayHttpToolsProtocol", "uvicorn_options"]


class GatewayHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, keeping the request target as the client sent it.

    httptools reduces an absolute-form target (``GET http://evil/x``) to its path, so the
    application could not tell it from ``GET /x``. The raw target goes into the scope's
    ``extensions`` and `check_target` refuses anything but origin-form.
    """

    def on_headers_complete(self) -> None:
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
