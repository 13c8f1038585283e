"""The ``cachegw`` command: a thin layer over the public API.

User errors (a bad gateway file, a port in use, an unreachable gateway) end with a
one-line message on stderr and a non-zero exit code, never a traceback: 2 for a bad
file or bad arguments, 1 for a failure at run time.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import httpx
import uvicorn

from cachegw._accesslog import log_config
from cachegw._checks import budget_line, lint, plural, route_table, settings_lines
from cachegw._errors import ConfigError
from cachegw._gateway import Gateway
from cachegw._knobs import settings_of
from cachegw._limits import ServerLimits
from cachegw._metrics import multiprocess_dir
from cachegw._relay import ENV_VAR as RELAY_DIR
from cachegw._reload import ReloadingSupervisor
from cachegw._server import uvicorn_options
from cachegw._version import __version__

__all__ = ["main", "server_flags"]

_LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


F = TypeVar("F", bound=Callable[..., Any])


def server_flags(limits: type = ServerLimits) -> Callable[[F], F]:
    """``cachegw serve``'s flags that override the ``[server]`` limits: one per setting of
    ``limits`` declared with a flag (`cachegw._knobs.Setting`), named after it."""

    def apply(command: F) -> F:
        # click lists options in the reverse order of their decorators: the last first.
        for name, declared in reversed(settings_of(limits).items()):
            if declared.flag is not None:
                kind, text = declared.flag
                option = click.option(f"--{name.replace('_', '-')}", name, type=kind, help=text)
                command = option(command)
        return command

    return apply


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    __version__, "-V", "--version", prog_name="cachegw", message="%(prog)s %(version)s"
)
def main() -> None:
    """Per-route response caching for FastAPI API gateways.

    Start with `cachegw demo`, then write a gateway file and `cachegw check` it.
    """


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Worker processes; more than one needs a shared (Redis) backend to share the cache.",
)
@click.option("--log-level", default="info", show_default=True, type=click.Choice(_LOG_LEVELS))
@click.option(
    "--access-log/--no-access-log",
    default=True,
    show_default=True,
    help="One JSON line per request on stdout, with its cache status.",
)
@server_flags()
def serve(
    file: Path,
    host: str,
    port: int,
    workers: int,
    log_level: str,
    access_log: bool,
    **limits: Any,
) -> None:
    """Serve the gateway declared in FILE."""
    gateway = _load(file)
    for warning in lint(gateway):  # the same warnings as `cachegw check`
        click.echo(f"warning: {file}: {warning}", err=True)
    overrides = {name: value for name, value in limits.items() if value is not None}
    if overrides:
        try:
            gateway.server = dataclasses.replace(gateway.server, **overrides)
        except ConfigError as exc:
            name, _, rest = str(exc).partition(" ")  # "send_timeout must be ..."
            raise click.UsageError(f"--{name.replace('_', '-')} {rest}") from None
    _check_port(host, port)
    # No Date/Server header of uvicorn's own, no trusted proxy headers, the raw request
    # target kept: see uvicorn_options. uvicorn's own access lines are replaced by ours.
    options = uvicorn_options(
        host=host,
        port=port,
        log_level=log_level,
        log_config=log_config(access_log),
        access_log=False,
    )
    if workers == 1:
        from cachegw._app import serving_app

        uvicorn.run(serving_app(gateway, overrides), **options)
    else:
        _serve_workers(gateway, file, workers, options, overrides)


def _serve_workers(
    gateway: Gateway, file: Path, workers: int, options: dict[str, Any], overrides: dict[str, Any]
) -> None:
    """Serve with a supervisor and ``workers`` processes, each building its app from
    ``file`` (`app_from_env`)."""
    relay = None
    if gateway.backend == "memory":
        click.echo(
            f"note: {workers} workers on the memory backend each keep a copy of the cache "
            f"(max_bytes each); purges and invalidations reach every worker before they "
            f"are answered, and what one worker fetches is relayed to the others: use a "
            f"redis:// backend to share one copy between machines",
            err=True,
        )
        # Purges, invalidations and fetched entries are relayed between the workers, and
        # one worker fetches a key for all (see cachegw._relay).
        relay = tempfile.mkdtemp(prefix="cachegw-relay-")
        os.environ[RELAY_DIR] = relay
    # Workers are separate processes: each builds its app from the file, found here.
    os.environ["CACHEGW_CONFIG"] = str(file.resolve())
    # Workers reload on SIGHUP; a reload asked over HTTP is passed on through this process.
    os.environ["CACHEGW_SUPERVISOR"] = str(os.getpid())
    os.environ["CACHEGW_SERVER_LIMITS"] = json.dumps(overrides)
    # Metrics of all workers are merged through prometheus-client's multi-process files.
    with multiprocess_dir():
        config = uvicorn.Config(
            "cachegw._app:app_from_env", factory=True, workers=workers, **options
        )
        sock = config.bind_socket()
        try:
            ReloadingSupervisor(config, sockets=[sock]).run()
        except KeyboardInterrupt:
            pass
        finally:
            sock.close()
            if relay is not None:
                shutil.rmtree(relay, ignore_errors=True)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def check(file: Path) -> None:
    """Validate FILE and print every route with its effective policy."""
    gateway = _load(file)
    click.echo(route_table(gateway))
    found = lint(gateway)
    for warning in found:
        click.echo(f"warning: {file}: {warning}", err=True)
    for line in settings_lines(gateway):
        click.echo(line)
    click.echo(budget_line(gateway))
    routes = sum(len(service.routes) for service in gateway.services)
    click.echo(
        f"OK: {plural(len(gateway.services), 'service')}, {plural(routes, 'route')}"
        + (f", {plural(len(found), 'warning')}" if found else "")
    )


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--tag", "tags", multiple=True, help="Purge entries carrying this tag (repeatable).")
@click.option("--path", "paths", multiple=True, help="Purge this gateway path (repeatable).")
@click.option("--service", help="Purge every entry of this service.")
@click.option("--all", "purge_all", is_flag=True, help="Purge everything.")
@click.option("--soft", is_flag=True, help="Mark entries stale instead of deleting them.")
@click.option(
    "--url",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="Base URL of the running gateway.",
)
def purge(
    file: Path,
    tags: tuple[str, ...],
    paths: tuple[str, ...],
    service: str | None,
    purge_all: bool,
    soft: bool,
    url: str,
) -> None:
    """Purge entries from the running gateway declared in FILE.

    Give exactly one of --tag, --path, --service or --all. The admin token is read from
    the environment variable named by [admin] token_env in FILE.
    """
    given = {"--tag": tags, "--path": paths, "--service": service is not None, "--all": purge_all}
    chosen = [name for name, value in given.items() if value]
    if len(chosen) != 1:
        raise click.UsageError(
            "give exactly one of --tag, --path, --service or --all"
            + (f" (got {', '.join(chosen)})" if chosen else "")
        )
    gateway = _load(file)
    body: dict[str, Any]
    if tags:
        body = {"tags": list(tags)}
    elif paths:
        body = {"paths": list(paths)}
    elif service is not None:
        names = [s.name for s in gateway.services]
        if service not in names:
            raise click.UsageError(
                f"{file} declares no service {service!r}; its services are: {', '.join(names)}"
            )
        body = {"service": service}
    else:
        body = {"all": True}
    if soft:
        body["soft"] = True
    response = _admin_post(gateway, file, url, "purge", body)
    try:
        answer = response.json()
    except ValueError:
        click.echo(response.text)
    else:
        click.echo(json.dumps(answer, indent=2))


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--url",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="Base URL of the running gateway.",
)
def reload(file: Path, url: str) -> None:
    """Make the running gateway read its file again (as SIGHUP does).

    FILE is the gateway's file: it gives the admin token's variable ([admin] token_env),
    and it is checked here first, so a file the gateway would refuse is reported before
    anything is sent. A refused reload exits with 1 and the gateway's reason; the running
    configuration then stays in use.
    """
    try:
        gateway = Gateway.from_toml(file)
    except ConfigError as exc:
        # The gateway would refuse this file: a refused reload (exit 1), found before
        # anything is sent. Exit 2 stays for usage errors.
        _fail(f"the reload would be refused, nothing was sent: {exc}", code=1)
    response = _admin_post(gateway, file, url, "reload", None)
    answer = response.json()
    click.echo(
        f"{answer['outcome']}: generation {answer['generation']} ({answer['digest']}), "
        f"{answer['seconds'] * 1000:.1f} ms, workers: {answer['workers']}"
    )
    for scope in answer.get("soft_purged", []):
        click.echo(f"  soft-purged {scope}")


def _admin_post(gateway: Gateway, file: Path, url: str, action: str, body: Any) -> httpx.Response:
    """POST to an admin endpoint of the running gateway; exits on any failure."""
    token = _admin_token(gateway, file)
    endpoint = url.rstrip("/") + f"/_cachegw/{action}"
    try:
        # trust_env=False: the token must not go through a proxy taken from HTTP_PROXY.
        with httpx.Client(trust_env=False, timeout=30) as client:
            response = client.post(
                endpoint, json=body, headers={"Authorization": f"Bearer {token}"}
            )
    except httpx.HTTPError as exc:
        _fail(f"cannot reach the gateway at {endpoint}: {exc}", code=1)
    if response.status_code == 401:
        _fail(f"the gateway at {url} refused the admin token (401): is it the same token?", 1)
    if response.status_code == 404:
        _fail(
            f"the gateway at {url} has no admin API (404): start it with "
            f"{gateway.admin_token_env} set in its environment",
            code=1,
        )
    if response.status_code == 422 and action == "reload":
        try:
            detail = response.json()["detail"]
        except (ValueError, KeyError, TypeError):
            detail = response.text
        _fail(f"the gateway refused the reload: {detail}", code=1)
    if response.status_code == 400 and action == "purge":
        # The request itself is wrong (a path no route serves, ...): a bad argument.
        _fail(f"the gateway rejected the purge (400): {_problem_detail(response)}", code=2)
    if response.is_error:
        _fail(f"the gateway at {url} answered {response.status_code}: {response.text}", code=1)
    return response


@main.command()
@click.argument("url", default="http://127.0.0.1:8000")
@click.option(
    "--interval",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds between refreshes (and the window the rates are measured over).",
)
@click.option(
    "--sort",
    default="rps",
    show_default=True,
    type=click.Choice(["rps", "hit", "p99", "errors", "name"]),
    help="Initial order; in the view, press r, h, p, e or n to change it, q to quit.",
)
@click.option("--once", is_flag=True, help="Print one frame as text and exit (for scripts).")
@click.option(
    "--width", default=132, show_default=True, type=click.IntRange(min=60), help="With --once."
)
@click.option(
    "--token-env",
    default="CACHEGW_ADMIN_TOKEN",
    show_default=True,
    help="Environment variable whose value, when set, is sent as a bearer token to a "
    "metrics endpoint that asks for one (a 401); the gateway's own needs none.",
)
def top(url: str, interval: float, sort: str, once: bool, width: int, token_env: str) -> None:
    """A live view of the running gateway at URL, refreshed every second.

    Per service and route: requests per second, shares of HIT, STALE, MISS (and
    EXPIRED) and BYPASS, p50 and p99 latency, upstream errors and timeouts, coalesced
    requests; above them the configuration generation and the backend's state. Reads
    URL/_cachegw/metrics; with several workers the figures are all workers' together.
    """
    from cachegw._top import TopError, clean
    from cachegw._top import once as top_once
    from cachegw._top import run as top_run

    token = os.environ.get(token_env) or None
    try:
        if once:
            click.echo(top_once(url, token, interval, sort, width), nl=False)
        else:
            top_run(url, token, interval, sort)
    except TopError as exc:
        _fail(clean(str(exc)), code=1)
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--upstream-port",
    default=0,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port of the demo upstream (0 = any free port).",
)
def demo(port: int, upstream_port: int) -> None:
    """Run a demo upstream and a caching gateway in front of it."""
    from cachegw._app import create_app
    from cachegw._demo import demo_gateway, demo_upstream

    upstream_sock = _bind("127.0.0.1", upstream_port)
    gateway_sock = _bind("127.0.0.1", port)
    upstream_url = f"http://127.0.0.1:{upstream_sock.getsockname()[1]}"
    gateway_url = f"http://127.0.0.1:{gateway_sock.getsockname()[1]}"
    # The upstream runs in a thread with its own loop (uvicorn leaves signals to the main
    # thread, where the gateway takes Ctrl-C). Both log through uvicorn's global loggers:
    # the upstream configures none and starts before the gateway does, so its startup is
    # silent and its access lines show which requests reached it.
    upstream = uvicorn.Server(
        uvicorn.Config(demo_upstream(), log_config=None, log_level=None, server_header=False)
    )
    thread = threading.Thread(target=upstream.run, kwargs={"sockets": [upstream_sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not upstream.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not upstream.started:
        _fail("the demo upstream did not start", code=1)
    # cachegw's access log, as `cachegw serve` has it: a JSON line per request, hits
    # answered by the fast path included, with its cache status.
    options = uvicorn_options(log_level="info", log_config=log_config(True), access_log=False)
    gateway = uvicorn.Server(uvicorn.Config(create_app(demo_gateway(upstream_url)), **options))
    click.echo(_demo_intro(gateway_url, upstream_url))
    try:
        gateway.run(sockets=[gateway_sock])
    except KeyboardInterrupt:
        # uvicorn re-raises the Ctrl-C it handled once it has shut down.
        pass
    finally:
        # The upstream's shutdown is not news.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        upstream.should_exit = True
        thread.join(timeout=5)


# --- helpers ---------------------------------------------------------------------------


def _load(file: Path) -> Gateway:
    try:
        return Gateway.from_toml(file)
    except ConfigError as exc:
        _fail(str(exc), code=2)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, so a port in use is a clear message rather than a log line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As uvicorn does: a restarted server may reuse a port in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            _fail(f"port {port} on {host} is already in use; choose another with --port", 1)
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", code=1)
    sock.set_inheritable(True)
    return sock


def _check_port(host: str, port: int) -> None:
    # uvicorn binds the socket itself (its workers share it); fail early and clearly.
    _bind(host, port).close()


def _problem_detail(response: httpx.Response) -> str:
    try:
        problem = response.json()
    except ValueError:
        return response.text
    detail = problem.get("detail") if isinstance(problem, dict) else None
    return detail if isinstance(detail, str) else response.text


def _admin_token(gateway: Gateway, file: Path) -> str:
    if gateway.admin_token_env is None:
        _fail(
            f'{file} has no admin API: add [admin] token_env = "CACHEGW_ADMIN_TOKEN" '
            f"and set that variable for the gateway and for this command",
            code=2,
        )
    token = os.environ.get(gateway.admin_token_env)
    if not token:
        _fail(
            f"the environment variable {gateway.admin_token_env} (named by [admin] token_env "
            f"in {file}) is not set; set it to the gateway's admin token",
            code=2,
        )
    return token


def _demo_intro(gateway: str, upstream: str) -> str:
    return f"""\
cachegw demo: a caching gateway on {gateway} in front of a demo upstream on {upstream}

Try these twice each and watch X-Cache-Status (and the upstream's "generated_at"):

  curl -i {gateway}/catalog/items/42     # MISS (~100 ms upstream), then HIT for 30 s
  curl -i {gateway}/catalog/slow         # MISS takes 1 s; then HIT, then STALE while it refreshes
  curl -i {gateway}/catalog/fresh        # upstream says max-age=5: HIT for 5 s, then MISS again
  curl -i {gateway}/catalog/private      # upstream says private: never stored
  curl -i {gateway}/catalog/pages/about  # no route of its own: the catch-all stores it (max-age=60)
  curl -i {gateway}/_cachegw/health      # backend state and counters

In the log below, each JSON line is a request to the gateway, with its "cache_status"
(HIT, MISS, STALE, ...); "upstream:" lines are the requests that reached the upstream.
Press Ctrl-C to stop.
"""
