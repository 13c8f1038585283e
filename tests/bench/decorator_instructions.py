"""CPU instructions per ``@cached`` hit, counted by valgrind's callgrind: a measure other
load on the machine does not move, for comparing a change before and after on a shared
machine (``decorator_hit.py`` gives the same comparison in CPU time, which load disturbs).

Serves one app of ``apps.py`` with uvicorn (httptools, uvloop, no access log) under
callgrind, sends ``GET /items`` one request at a time on one keep-alive connection, and
prints ``(instructions with N + 100 hits - instructions with 100 hits) / N``: startup and
shutdown cancel out. The garbage collector is off and hashing is seeded, so two runs of one
tree agree to within a few instructions. ``--src DIR`` serves the ``cachegw`` package of
another checkout (``git worktree add DIR <commit>``), side by side with this one:

    .venv/bin/python tests/bench/decorator_instructions.py [--hits 1000] [--src DIR ...] \\
        [--app cachegw_memory] [--app cachegw_memory_routed]

Needs valgrind. Under callgrind a server is ~50x slower: a run takes a few minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent.parent
SERVE = (
    "import gc, sys; gc.disable(); from uvicorn.main import main; sys.argv[0] = 'uvicorn'; main()"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(conn: socket.socket) -> bytes:
    """One ``GET /items``; the whole response head (read until the body is complete)."""
    conn.sendall(b"GET /items HTTP/1.1\r\nhost: bench\r\n\r\n")
    data = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            raise SystemExit("the server closed the connection")
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            if length is None:
                raise SystemExit(f"no content-length in {head!r}")
            if len(body) >= int(length.group(1)):
                return head


def instructions(src: Path, app: str, hits: int) -> int:
    """Total instructions of a server life that answered ``hits`` hits (after 6 warm-up
    requests, the last of which must be a HIT)."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{BENCH}", PYTHONHASHSEED="0")
        command = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            sys.executable, "-c", SERVE, "--factory", f"apps:{app}", "--port", str(port),
            "--no-access-log", "--http", "httptools", "--loop", "uvloop",
            "--log-level", "warning",
        ]  # fmt: skip
        server = subprocess.Popen(command, env=env, cwd=tmp, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 600
            while True:
                try:
                    conn = socket.create_connection(("127.0.0.1", port))
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"{app} from {src} did not start") from None
                    time.sleep(0.5)
            with conn:
                for _ in range(5):
                    _get(conn)
                if b"HIT" not in _get(conn):
                    raise SystemExit(f"{app} from {src} does not answer HIT")
                for _ in range(hits):
                    _get(conn)
        finally:
            server.send_signal(2)
            server.wait()
        totals = re.search(r"(?m)^(?:summary|totals): (\d+)", out.read_text())
        if totals is None:
            raise SystemExit("callgrind wrote no totals")
        return int(totals.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hits", type=int, default=1000, help="measured hits per count")
    parser.add_argument("--src", type=Path, action="append", default=[], help="another checkout")
    parser.add_argument("--app", action="append", default=[], help="factory in apps.py")
    args = parser.parse_args()
    apps = args.app or ["cachegw_memory", "cachegw_memory_routed"]
    trees = [ROOT, *args.src]
    for app in apps:
        for tree in trees:
            base = instructions(tree, app, 100)
            more = instructions(tree, app, 100 + args.hits)
            print(f"{app:28} {tree!s:32} {(more - base) // args.hits:>9,} instructions/hit")


if __name__ == "__main__":
    main()
