"""Helpers for the resilience tests and the stampede bench: a controllable origin and a
raw-socket request burst.

    origin = Origin().start()                      # its own thread and event loop
    origin.route("/slow", delay=0.3, body=b"x")    # change replies at any time
    results = burst([(port, request_bytes)] * 100) # all sockets opened, then all sent
    origin.hits["/slow"], origin.sent["/slow"]     # requests seen, when answers left
    origin.stop(); origin.start()                  # refused connections, same port again

Times are ``time.monotonic()`` (CLOCK_MONOTONIC: comparable across threads and processes
of this machine), so a client's completion time minus the origin's send time is the
latency the gateway added after the upstream answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Answer", "Gateway", "Origin", "Reply", "burst", "get", "request_bytes"]


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    delay: float = 0.0


_REASONS = {200: "OK", 404: "Not Found", 500: "Internal Server Error", 502: "Bad Gateway"}
_REASONS |= {503: "Service Unavailable", 504: "Gateway Timeout"}


class Origin:
    """A raw asyncio HTTP/1.1 origin (keep-alive, Content-Length bodies) in a thread.

    Replies per path (``route``); unknown paths get 200 with body ``path``. Counts
    requests per path (``hits``), records when each answer was written (``sent``), and
    can be stopped — listening socket and open connections closed, like a killed
    process — and started again on the same port.
    """

    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        self.hits: Counter[str] = Counter()
        self.sent: defaultdict[str, list[float]] = defaultdict(list)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(
        self,
        path: str,
        *,
        status: int = 200,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        delay: float = 0.0,
    ) -> None:
        self.replies[path] = Reply(status, list(headers), body, delay)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Origin:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
            self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(5)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Close the listening socket and every connection (connections are refused)."""
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def close(self) -> None:
        if self._loop is None:
            return
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(5)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> Origin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- serving -----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                if length:
                    await reader.readexactly(length)
                path = target.split("?", 1)[0]
                with self._lock:
                    self.hits[path] += 1
                reply = self.replies.get(path) or Reply(body=path.encode())
                if reply.delay:
                    await asyncio.sleep(reply.delay)
                reason = _REASONS.get(reply.status, "Status")
                out = [f"HTTP/1.1 {reply.status} {reason}"]
                out += [f"{name}: {value}" for name, value in reply.headers]
                out.append(f"content-length: {len(reply.body)}")
                data = ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")
                if method != "HEAD":
                    data += reply.body
                writer.write(data)
                with self._lock:
                    self.sent[path].append(time.monotonic())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


# -- clients ----------------------------------------------------------------------------


@dataclass
class Answer:
    """One response read from a raw socket (status 0: no answer)."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    sent: float = 0.0  # when the request bytes were written
    done: float = 0.0  # when the last byte of the response arrived
    error: str = ""

    @property
    def cache(self) -> str:
        return self.headers.get("x-cache-status", "")

    @property
    def detail(self) -> str:
        return self.headers.get("cache-status", "")

    @property
    def latency(self) -> float:
        return self.done - self.sent


def request_bytes(path: str, host: str = "127.0.0.1", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: {host}\r\n{extra}connection: close\r\n\r\n".encode()


def _parse(buffer: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """Status, headers and body once ``buffer`` holds a whole response, else None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buffer[:end].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "-1"))
    body = buffer[end + 4 :]
    if length < 0 or len(body) < length:
        return None
    return status, headers, body[:length]


def burst(
    targets: Sequence[tuple[int, bytes]], *, timeout: float = 15.0
) -> tuple[list[Answer], float]:
    """Open one loopback connection per ``(port, request)``, then write every request in
    one tight loop, then read the answers with epoll; (answers in order, send spread)."""
    socks = []
    try:
        for port, _ in targets:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
        answers = [Answer() for _ in targets]
        for sock in socks:
            sock.setblocking(False)
        # Everything is connected: now the requests, back to back.
        for sock, (_, data), answer in zip(socks, targets, answers, strict=True):
            sock.send(data)  # ~100 bytes into an empty socket buffer: never partial
            answer.sent = time.monotonic()
        spread = answers[-1].sent - answers[0].sent
        selector = selectors.DefaultSelector()
        buffers: dict[int, bytearray] = {}
        for index, sock in enumerate(socks):
            selector.register(sock, selectors.EVENT_READ, index)
            buffers[index] = bytearray()
        pending = len(socks)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                index = key.data
                try:
                    chunk = socks[index].recv(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    chunk = b""
                    answers[index].error = str(exc)
                now = time.monotonic()
                if chunk:
                    buffers[index] += chunk
                    parsed = _parse(bytes(buffers[index]))
                    if parsed is None:
                        continue
                    answers[index].status, answers[index].headers, answers[index].body = parsed
                elif not answers[index].error:
                    answers[index].error = "closed without a whole answer"
                answers[index].done = now
                selector.unregister(socks[index])
                pending -= 1
        for answer in answers:
            if not answer.done:
                answer.error = answer.error or "timed out"
        selector.close()
        return answers, spread
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()


def get(port: int, path: str, *, timeout: float = 15.0, extra: str = "") -> Answer:
    """One request on its own connection, timed like a burst of one."""
    answers, _ = burst([(port, request_bytes(path, extra=extra))], timeout=timeout)
    return answers[0]


# -- gateway processes ------------------------------------------------------------------


class Gateway:
    """``cachegw serve FILE`` as a real process, its output going to a file (a pipe that
    nobody reads would fill up with access-log lines and stall the gateway)."""

    def __init__(self, config: Path, *, log_dir: Path | None = None) -> None:
        from tests.servers import free_port

        self.config = config
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = (log_dir or config.parent) / f"gateway-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Gateway:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cachegw", "serve", str(self.config),
                 "--port", str(self.port), "--log-level", "warning"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cachegw serve exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError, ValueError):
                if get(self.port, "/_cachegw/health", timeout=5).status == 200:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"cachegw serve did not become healthy:\n{self.output()}")

    def health(self) -> dict[str, Any]:
        answer = get(self.port, "/_cachegw/health", timeout=5)
        result: dict[str, Any] = json.loads(answer.body)
        return result

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
