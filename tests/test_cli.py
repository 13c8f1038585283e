"""The cachegw command: check, purge (against a real server), --version, and demo end to end."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from test_config import GOOD

import cachegw
from cachegw._cli import main


@pytest.fixture
def gateway_file(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(GOOD, encoding="utf-8")
    return path


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.output == f"cachegw {cachegw.__version__}\n"


def test_check_prints_route_table(gateway_file: Path) -> None:
    result = run("check", str(gateway_file))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "SERVICE",
        "PATH",
        "UPSTREAM",
        "TTL",
        "MAX_TTL",
        "SWR",
        "SIE",
        "VARY",
        "TAGS",
        "METHODS",
        "MAX_BODY",
        "STATUSES",
        "HEURISTIC",
        "EARLY_REFRESH",
        "IGNORE_REQUEST_CC",
    ]
    # The route table, then the [cache], [admin] and [server] settings the file changes.
    settings = [line for line in lines if line.startswith(("[cache] ", "[admin] ", "[server] "))]
    rows = [line.split() for line in lines[1:-2] if line not in settings]
    assert settings == ["[cache] status_header=X-Cache", "[admin] token_env=CACHEGW_ADMIN_TOKEN"]
    # What one process may hold: docs/operations.md, "Memory budget".
    assert re.fullmatch(
        r"memory per process: at most \d+MiB \(\d+MiB store \+ \d+MiB L1 \+ .*\)", lines[-2]
    ), lines[-2]
    assert rows == [
        [
            "catalog",
            "/catalog/items/{item_id}",
            "http://127.0.0.1:9001",
            "60s",
            "60s",
            "30s",
            "300s",
            "accept-language",
            "items,item:{item_id}",
            "*",
            "1MiB",
            "default",
            "-",
            "-",
            "-",
        ],
        [
            "catalog",
            "/catalog/search",
            "http://127.0.0.1:9001",
            "30s",
            "30s",
            "0s",
            "0s",
            "accept",
            "-",
            "GET",
            "2MiB",
            "default",
            "-",
            "-",
            "-",
        ],
        [
            "catalog",
            "/catalog/{rest:path}",
            "http://127.0.0.1:9001",
            "0s",
            "0s",
            "0s",
            "0s",
            "accept",
            "-",
            "*",
            "1MiB",
            "default",
            "-",
            "-",
            "-",
        ],
        [
            "users",
            "/{rest:path}",
            "http://127.0.0.1:9002/api",
            "0s",
            "3600s",
            "0s",
            "0s",
            "-",
            "-",
            "*",
            "1MiB",
            "default",
            "-",
            "-",
            "-",
        ],
    ]
    assert lines[-1] == "OK: 2 services, 4 routes"


LINTED = """
[cache]
backend = "memory"

[[services]]
name = "files"
upstream = "http://127.0.0.1:9001"
prefix = "/files"

  [[services.routes]]
  path = "/docs/{rest:path}"
  ttl = 60

  [[services.routes]]
  path = "/docs/{name}"
  tags = ["doc:{name}"]

  [[services.routes]]
  path = "/items/{item_id}"
  tags = ["items", "item:{id}"]

  [[services.routes]]
  path = "/{rest:path}"

  [[services.routes]]
  path = "/late"
"""


def test_check_warns_on_shadowed_routes_and_unknown_tag_params(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(LINTED, encoding="utf-8")
    result = run("check", str(path))
    assert result.exit_code == 0, result.output  # warnings, not errors
    assert result.stderr.splitlines() == [
        f"warning: {path}: services[0].routes[1] (files /docs/{{name}}) is never used: the "
        "earlier catch-all /docs/{rest:path} takes every path it would match (the first "
        "declared route that matches wins; declare the catch-all last)",
        f"warning: {path}: services[0].routes[2] (files /items/{{item_id}}): tag 'item:{{id}}' "
        "names id, which is not a path param of /items/{item_id} (its params: item_id); it is "
        "stored as written",
        f"warning: {path}: services[0].routes[4] (files /late) is never used: the earlier "
        "catch-all /{rest:path} takes every path it would match (the first declared route "
        "that matches wins; declare the catch-all last)",
    ]
    assert result.stdout.splitlines()[-1] == "OK: 1 service, 5 routes, 3 warnings"


def test_check_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(GOOD.replace("ttl = 60", "ttl = -5"), encoding="utf-8")
    result = run("check", str(path))
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"error: {path}: services[0].routes[0].ttl must be a number of seconds ≥ 0 "
        f"(or a string like '90s', '5m', '1h'), got -5\n"
    )
    assert "Traceback" not in result.output


def test_check_missing_file(tmp_path: Path) -> None:
    result = run("check", str(tmp_path / "nope.toml"))
    assert result.exit_code == 2
    assert "nope.toml: cannot read the file" in result.stderr


def test_reload_of_a_bad_file_is_refused_with_exit_1_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    # As docs/operations.md says: a refused reload exits 1 (2 is for usage errors).
    path = tmp_path / "gateway.toml"
    path.write_text(GOOD.replace("ttl = 60", "ttl = -5"), encoding="utf-8")
    result = run("reload", str(path), "--url", "http://127.0.0.1:9")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: the reload would be refused, nothing was sent: ")
    assert "-5" in result.stderr
    assert run("reload").exit_code == 2  # no FILE: a usage error


def test_serve_bad_file_exits_2(tmp_path: Path) -> None:
    result = run("serve", str(tmp_path / "nope.toml"))
    assert result.exit_code == 2
    assert "nope.toml: cannot read the file" in result.stderr


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--send-timeout", "0", "--send-timeout must be a number of seconds > 0"),
        ("--max-header-fields", "0", "--max-header-fields must be a whole number from 1"),
    ],
)
def test_serve_bad_limit_flag_exits_2(
    gateway_file: Path, flag: str, value: str, expected: str
) -> None:
    result = run("serve", str(gateway_file), flag, value)
    assert result.exit_code == 2
    assert expected in result.stderr


def test_serve_port_in_use(gateway_file: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("serve", str(gateway_file), "--port", str(port))
    assert result.exit_code == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr


def test_serve_prints_the_check_warnings(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(LINTED, encoding="utf-8")
    with socket.socket() as busy:  # stops the command right after its start-up messages
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run("serve", str(path), "--port", str(busy.getsockname()[1]))
    assert result.exit_code == 1
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3 and "is never used" in warnings[0]


# --- purge: the client side, against a real server standing in for the admin API ------


class AdminStub:
    def __init__(self) -> None:
        self.requests: list[tuple[str | None, Any]] = []
        self.app = Starlette(routes=[Route("/_cachegw/purge", self.purge, methods=["POST"])])

    async def purge(self, request: Request) -> JSONResponse:
        auth = request.headers.get("authorization")
        self.requests.append((auth, await request.json()))
        if auth != "Bearer s3cret":
            return JSONResponse({"detail": "bad token"}, status_code=401)
        body = self.requests[-1][1]
        if body.get("paths") == ["/nowhere"]:
            problem = {"title": "Bad Request", "detail": "no route serves /nowhere"}
            return JSONResponse(problem, status_code=400)
        if body.get("tags") == ["redis-down"]:
            return JSONResponse({"title": "Service Unavailable"}, status_code=503)
        return JSONResponse({"purged": 3})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def admin() -> Iterator[tuple[AdminStub, str]]:
    stub = AdminStub()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(stub.app, log_config=None, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield stub, f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(5)
    sock.close()


@pytest.mark.parametrize(
    ("args", "body"),
    [
        (["--tag", "items", "--tag", "item:1"], {"tags": ["items", "item:1"]}),
        (["--path", "/catalog/items/1"], {"paths": ["/catalog/items/1"]}),
        (["--service", "users", "--soft"], {"service": "users", "soft": True}),
        (["--all"], {"all": True}),
    ],
)
def test_purge(
    gateway_file: Path, admin: tuple[AdminStub, str], args: list[str], body: dict[str, Any]
) -> None:
    stub, url = admin
    result = run(
        "purge", str(gateway_file), *args, "--url", url, env={"CACHEGW_ADMIN_TOKEN": "s3cret"}
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"purged": 3}
    assert stub.requests == [("Bearer s3cret", body)]


def test_purge_wrong_token(gateway_file: Path, admin: tuple[AdminStub, str]) -> None:
    _, url = admin
    result = run(
        "purge", str(gateway_file), "--all", "--url", url, env={"CACHEGW_ADMIN_TOKEN": "nope"}
    )
    assert result.exit_code == 1
    assert "refused the admin token (401)" in result.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--path", "/nowhere"], 2, "the gateway rejected the purge (400): no route serves"),
        (["--tag", "redis-down"], 1, "answered 503"),
    ],
)
def test_purge_exit_codes_of_refusals(
    gateway_file: Path, admin: tuple[AdminStub, str], args: list[str], code: int, message: str
) -> None:
    """As docs/operations.md says: 2 for a purge the gateway finds bad (400), 1 when it
    cannot do it (503)."""
    _, url = admin
    result = run(
        "purge", str(gateway_file), *args, "--url", url, env={"CACHEGW_ADMIN_TOKEN": "s3cret"}
    )
    assert result.exit_code == code, result.output
    assert message in result.stderr


def test_purge_needs_one_selector(gateway_file: Path) -> None:
    result = run("purge", str(gateway_file))
    assert result.exit_code == 2
    assert "give exactly one of --tag, --path, --service or --all" in result.stderr
    result = run("purge", str(gateway_file), "--all", "--tag", "x")
    assert result.exit_code == 2
    assert "(got --tag, --all)" in result.stderr


def test_purge_unknown_service(gateway_file: Path) -> None:
    result = run("purge", str(gateway_file), "--service", "nope")
    assert result.exit_code == 2
    assert "declares no service 'nope'; its services are: catalog, users" in result.stderr


def test_purge_token_unset(gateway_file: Path) -> None:
    result = run("purge", str(gateway_file), "--all", env={"CACHEGW_ADMIN_TOKEN": ""})
    assert result.exit_code == 2
    assert "CACHEGW_ADMIN_TOKEN (named by [admin] token_env" in result.stderr
    assert "is not set" in result.stderr


def test_purge_without_admin_table(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(GOOD.replace('[admin]\ntoken_env = "CACHEGW_ADMIN_TOKEN"\n', ""))
    result = run("purge", str(path), "--all")
    assert result.exit_code == 2
    assert "has no admin API: add [admin] token_env" in result.stderr


def test_purge_gateway_down(gateway_file: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run(
        "purge", str(gateway_file), "--all", "--url", url, env={"CACHEGW_ADMIN_TOKEN": "t"}
    )
    assert result.exit_code == 1
    assert f"cannot reach the gateway at {url}/_cachegw/purge" in result.stderr


# --- demo: the real command, as a process --------------------------------------------


def test_demo_miss_then_hit() -> None:
    port = free_port()
    code = "from cachegw._cli import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, trust_env=False, timeout=5) as client:
            deadline = time.monotonic() + 20
            while True:
                assert proc.poll() is None, "cachegw demo exited early"
                try:
                    if client.get("/_cachegw/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "cachegw demo did not start"
                time.sleep(0.05)
            first = client.get("/catalog/items/42")
            second = client.get("/catalog/items/42")
            # The catch-all's example answers something it stores, not a 404.
            page = [client.get("/catalog/pages/about") for _ in range(2)]
            assert [r.status_code for r in page] == [200, 200]
            assert [r.headers["x-cache-status"] for r in page] == ["MISS", "HIT"]
        assert first.status_code == second.status_code == 200
        assert first.headers["x-cache-status"] == "MISS"
        assert second.headers["x-cache-status"] == "HIT"
        assert second.json() == first.json()
        assert first.json()["id"] == 42
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    assert proc.returncode == 0, output.decode()
    text = output.decode()
    assert f"curl -i {base}/catalog/items/42" in text
    assert f"curl -i {base}/catalog/pages/about" in text
    assert "Traceback" not in text
    # As the intro says: every request to the gateway is a line of the log, hits answered
    # by the fast path included, and the upstream's lines show which ones reached it.
    lines = [json.loads(line) for line in text.splitlines() if line.startswith('{"time"')]
    items = [line["cache_status"] for line in lines if line["path"] == "/catalog/items/42"]
    assert items == ["MISS", "HIT"]
    assert text.count("upstream: GET /items/42 -> 200") == 1
