"""A real upstream that versions every item, for the consistency tests and bench.

``GET /items/{n}`` and ``GET /vitems/{n}`` answer the item's current version (header
``X-Version`` and the JSON body); ``/vitems`` answers also depend on ``Accept-Language``
and say so with ``Vary``. ``PUT`` makes a new version, ``DELETE`` too (later GETs are a
404 carrying that version). Versions only grow, so a reader can tell an old answer from
a new one.

`hold` parks the next GET of a path after it has read the version, until the test
releases it: the deterministic "a fetch is in flight while a write happens".
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["Hold", "VersionedItems"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Hold:
    """The next GET of one path, parked once it has read the version."""

    def __init__(self) -> None:
        self.arrived = threading.Event()  # the GET reached the upstream and read the version
        self.released = threading.Event()
        self.version = -1  # the version it read

    def release(self) -> None:
        self.released.set()


class VersionedItems:
    """ASGI app; thread-safe counters (the tests read them from another thread)."""

    def __init__(self, latency: float = 0.0) -> None:
        #: A GET answers after a random delay of up to twice this (after reading the
        #: version, like a service that reads then renders): the window in which a write
        #: can overtake it.
        self.latency = latency
        self.versions: dict[str, int] = {}
        self.deleted: set[str] = set()
        self.holds: dict[str, Hold] = {}
        self.gets = 0
        self._lock = threading.Lock()

    def hold(self, path: str) -> Hold:
        hold = self.holds[path] = Hold()
        return hold

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        varied = path.startswith("/vitems/")
        if not (path.startswith("/items/") or varied):
            await _answer(send, 404, [], b"{}")
            return
        while True:  # drain the request body
            message = await receive()
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        lang = headers.get("accept-language", "")
        extra: list[tuple[bytes, bytes]] = [(b"vary", b"Accept-Language")] if varied else []
        if method in ("PUT", "DELETE"):
            with self._lock:
                version = self.versions[path] = self.versions.get(path, 0) + 1
                if method == "DELETE":
                    self.deleted.add(path)
                else:
                    self.deleted.discard(path)
            body = json.dumps({"path": path, "version": version}).encode()
            await _answer(send, 200, [(b"x-version", b"%d" % version)], body)
            return
        if method not in ("GET", "HEAD"):
            await _answer(send, 405, [], b"{}")
            return
        with self._lock:
            version = self.versions.get(path, 0)
            gone = path in self.deleted
            self.gets += 1
            hold = self.holds.pop(path, None)
        if self.latency:
            await asyncio.sleep(random.uniform(0, 2 * self.latency))
        if hold is not None:
            hold.version = version
            hold.arrived.set()
            # The test releases it from its own thread.
            await asyncio.to_thread(hold.released.wait, 30)
        body = json.dumps(
            {"path": path, "version": version, "lang": lang, "deleted": gone}
        ).encode()
        status = 404 if gone else 200
        await _answer(send, status, [(b"x-version", b"%d" % version), *extra], body)


async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def main() -> None:  # pragma: no cover - the bench runs it as a process of its own
    """``python -m tests.items_upstream PORT [LATENCY]``: serve a `VersionedItems`."""
    import sys

    import uvicorn

    uvicorn.run(
        VersionedItems(float(sys.argv[2]) if len(sys.argv) > 2 else 0.0),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        lifespan="off",
        date_header=False,
        server_header=False,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
