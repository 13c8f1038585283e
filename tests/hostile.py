"""An origin and raw-socket clients for the hostile-connection tests and the soak run.

    origin = HostileOrigin().start()      # its own thread and event loop, a free port
    origin.uploads                        # [("complete" | "aborted", bytes received), ...]
    origin.streams                        # Counter: "finished" / "cut" large responses
    origin.hits, origin.methods           # Counters: per path, per "METHOD /path"
    origin.close()

Routes (any method unless said):

* ``/small/<x>``   200, 1 KiB, ``max-age=60`` (hits after the first)
* ``/nocache/<x>`` 200, 1 KiB, ``no-store`` (a miss every time)
* ``/medium``      200, 48 KiB, ``no-store``, written at once
* ``/big``         200, 64 MiB, ``no-store``, written 64 KiB at a time as the gateway reads
* ``/trickle``     200, 8 bytes, one every 0.3 s
* ``/silent``      200, 8 bytes declared, 2 sent, then 5 s of silence
* ``/hang``        200 after 2 s
* ``/large``       200, 12 MiB, ``no-store``, as ``/big`` (``streams``: "large finished")
* ``/bin/<x>``     200, 1 MiB of incompressible bytes, ``max-age=60``
* ``/text/<x>``    200, 512 KiB of compressible JSON, ``max-age=60``
* ``/slow/<x>``    200, ``max-age=60``, after 3 s, unless the gateway closes the connection
                   first: counted in ``slow`` as "answered" or "aborted"
* ``/bad``         200 with a control byte in a header value, ``max-age=60``
* ``/upload``      reads the body (chunked or Content-Length) and records how it ended
* ``/sink``        reads nothing for 2 s, then the body as ``/upload`` does
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time
from collections import Counter

from tests.redis_process import EVENTUALLY

__all__ = ["HostileOrigin", "read_response", "send_raw"]

_BIG = 64 * 1024 * 1024  # more than every socket buffer on the way holds
_PIECE = b"b" * 65536
_LARGE = 12 * 1024 * 1024
_BINARY = random.Random(24).randbytes(1024 * 1024)
_TEXT = b"[" + b",".join(b'{"id": %d, "name": "item %d"}' % (i, i) for i in range(18000))
_TEXT = _TEXT[: 512 * 1024 - 1] + b"]"


class HostileOrigin:
    def __init__(self) -> None:
        self.port = 0
        self.uploads: list[tuple[str, int]] = []
        self.streams: Counter[str] = Counter()
        self.slow: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        self.methods: Counter[str] = Counter()  # "METHOD /path"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HostileOrigin:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(5)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.sleep(0.05)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def wait_for(self, predicate: object, timeout: float = EVENTUALLY) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():  # type: ignore[operator]
                return True
            time.sleep(0.05)
        return False

    # --- serving ------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                path = target.split("?", 1)[0]
                self.hits[path] += 1
                self.methods[f"{method} {path}"] += 1
                if not await self._answer(method, path, headers, reader, writer):
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _answer(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer one request; False to close the connection."""
        if path == "/upload":
            outcome, size = await _read_body(reader, headers)
            self.uploads.append((outcome, size))
            if outcome != "complete":
                return False
            _write(writer, 200, [("cache-control", "no-store")], b"ok")
        elif path == "/sink":
            # Takes nothing of the body for 2 s, then reads what the gateway sent.
            await asyncio.sleep(2)
            outcome, size = await _read_body(reader, headers)
            self.uploads.append((outcome, size))
            return False
        elif path.startswith("/nobody/"):
            # A 304 with the representation's Content-Length (RFC 9110 8.6 allows it), or a
            # 204 with one (it does not): no content follows either way.
            status = int(path.split("/")[2])
            writer.write(b'HTTP/1.1 %d X\r\ncontent-length: 10\r\netag: "x"\r\n\r\n' % status)
        elif path.startswith("/small/"):
            _write(writer, 200, [("cache-control", "max-age=60")], b"s" * 1024)
        elif path.startswith("/nocache/"):
            _write(writer, 200, [("cache-control", "no-store")], b"n" * 1024)
        elif path == "/medium":
            _write(writer, 200, [("cache-control", "no-store")], b"m" * 48 * 1024)
        elif path == "/big":
            writer.write(
                b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: %d\r\n\r\n" % _BIG
            )
            try:
                for _ in range(_BIG // len(_PIECE)):
                    writer.write(_PIECE)
                    await writer.drain()
            except ConnectionError:
                self.streams["cut"] += 1
                return False
            self.streams["finished"] += 1
        elif path == "/trickle":
            writer.write(b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 8\r\n\r\n")
            for byte in b"trickled":
                await asyncio.sleep(0.3)
                writer.write(bytes([byte]))
        elif path == "/silent":
            writer.write(b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 8\r\n\r\n")
            writer.write(b"si")
            await asyncio.sleep(5)
            return False
        elif path.startswith("/slow/"):
            try:
                # Nothing more comes from the gateway on this connection but its close.
                closed = await asyncio.wait_for(reader.read(1), 3) == b""
            except TimeoutError:
                closed = False
            except ConnectionError:
                closed = True
            if closed:
                self.slow["aborted"] += 1
                return False
            self.slow["answered"] += 1
            _write(writer, 200, [("cache-control", "max-age=60")], b"slow")
        elif path == "/large":
            writer.write(
                b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: %d\r\n\r\n" % _LARGE
            )
            try:
                for _ in range(_LARGE // len(_PIECE)):
                    writer.write(_PIECE)
                    await writer.drain()
            except ConnectionError:
                self.streams["large cut"] += 1
                return False
            self.streams["large finished"] += 1
        elif path.startswith("/bin/"):
            headers = [
                ("cache-control", "max-age=60"),
                ("content-type", "application/octet-stream"),
            ]
            _write(writer, 200, headers, _BINARY)
        elif path.startswith("/text/"):
            _write(
                writer,
                200,
                [("cache-control", "max-age=60"), ("content-type", "application/json")],
                _TEXT,
            )
        elif path == "/hang":
            await asyncio.sleep(2)
            _write(writer, 200, [("cache-control", "no-store")], b"late")
        elif path == "/bad":
            _write(writer, 200, [("cache-control", "max-age=60"), ("x-bad", "a\x01b")], b"bad")
        else:
            _write(writer, 404, [], b"no such route")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        return True


def _write(
    writer: asyncio.StreamWriter, status: int, headers: list[tuple[str, str]], body: bytes
) -> None:
    head = [f"HTTP/1.1 {status} X", f"content-length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in headers]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> tuple[str, int]:
    """("complete" | "aborted", bytes of body received)."""
    size = 0
    try:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                line = await reader.readuntil(b"\r\n")
                length = int(line.split(b";")[0].strip(), 16)
                if length == 0:
                    await reader.readuntil(b"\r\n")
                    return "complete", size
                await reader.readexactly(length + 2)
                size += length
        declared = int(headers.get("content-length", "0"))
        await reader.readexactly(declared)
        return "complete", declared
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        return "aborted", size


def send_raw(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new connection, read until the gateway closes it; all bytes read."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_response(sock, until_close=True)


def read_head(sock: socket.socket) -> bytes:
    """One response head (up to its blank line; a 304, 204 or the answer to a HEAD has
    nothing after it), or what came before the peer closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_response(sock: socket.socket, *, until_close: bool = False) -> bytes:
    """Bytes of one response (its Content-Length), or everything until the peer closes."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionError, TimeoutError):
            return data
        if not chunk:
            return data
        data += chunk
        if until_close:
            continue
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and len(body) >= int(value):
                    return data
