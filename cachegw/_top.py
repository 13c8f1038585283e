"""``cachegw top``: a live terminal view of a running gateway, from its metrics endpoint.

Two scrapes of ``GET /_cachegw/metrics`` a second apart give rates, cache-status shares
and latency quantiles over that second, per service and per route, as ``varnishstat``
does for Varnish. A gateway with several workers answers a scrape with the figures of
all of them merged (prometheus-client's multi-process mode), so the view is the host's.

The arithmetic (`Scrape`, `compute`, in cachegw._top_view) is pure and separate from the
drawing (`render`, with rich) and from the terminal loop (`run`), so a recorded sequence
of scrapes can be checked figure by figure.
"""

from __future__ import annotations

import io
import os
import re
import select
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cachegw._top_view import Row, Scrape, View, compute, sort_rows

__all__ = ["SORTS", "Scrape", "View", "compute", "fetch", "render", "run"]

#: Sort orders: key pressed in the live view → (name, description).
SORTS = {
    "r": ("rps", "req/s"),
    "h": ("hit", "hit %"),
    "p": ("p99", "p99"),
    "e": ("errors", "upstream errors"),
    "n": ("name", "name"),
}
_BY_NAME = {name: key for key, (name, _) in SORTS.items()}
# C0 and C1 control characters and DEL: label values, URLs and error messages come from
# the gateway, its clients or the network, and a terminal would act on an escape sequence
# among them (move the cursor, set the title, ...). Shown as \xNN instead (issue 25).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """``text`` with every control character shown as ``\\xNN``: safe to print."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


# -- drawing ------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.2f}" if value < 0.01 else f"{value * 1000:.1f}"


def _rate(value: float | None, seconds: float) -> str:
    return "" if value is None else f"{value / seconds:.1f}"


def _size(value: float) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= factor:
            return f"{value / factor:.1f} {unit}"
    return f"{value:.0f} B"


def _bounded(found: Mapping[str, float]) -> str:
    parts = []
    if "entries" in found:
        parts.append(f"{found['entries']:.0f}/{found.get('max_entries', 0):.0f} entries")
    if "bytes" in found:
        parts.append(f"{_size(found['bytes'])}/{_size(found.get('max_bytes', 0))}")
    return ", ".join(parts)


def header(view: View) -> Text:
    """The lines above the table: gateway, configuration generation, backend state."""
    text = Text()
    text.append("cachegw top", style="bold")
    text.append(f"  {clean(view.url)}  every {view.seconds:.1f} s  sorted by ")
    text.append(SORTS[_BY_NAME.get(view.sort, "r")][1], style="bold")
    gens = view.generations
    if gens:
        workers = f", {len(gens)} workers" if len(gens) > 1 else ""
        if gens[0] == gens[-1]:
            text.append(f"\nconfig generation {gens[0]:.0f}{workers}")
        else:
            text.append(f"\nconfig generation {gens[0]:.0f}..{gens[-1]:.0f}{workers}")
            text.append(" (workers differ: a reload is on its way)", style="yellow")
    else:
        text.append("\nconfig generation -")
    text.append("  circuit ")
    if view.circuit_open:
        text.append("OPEN (cache skipped)", style="bold red")
    else:
        text.append("closed", style="green")
    if view.memory or view.l1:
        text.append("\n")
    if view.memory:
        text.append(f"memory {_bounded(view.memory)}  ")
    if view.l1:
        text.append(f"L1 {_bounded(view.l1)}")
    if view.note:
        text.append(f"\n{clean(view.note)}", style="yellow")
    if view.error:
        text.append(f"\n{clean(view.error)}", style="bold red")
    return text


def table(view: View) -> Table:
    """Per service (bold) and its routes: rates, cache-status shares, latency, upstream."""
    grid = Table(box=None, pad_edge=False, header_style="bold reverse", expand=False)
    grid.add_column("SERVICE / ROUTE", no_wrap=True)
    for name in (
        "REQ/S",
        "HIT%",
        "STALE%",
        "MISS%",
        "BYPASS%",
        "P50 ms",
        "P99 ms",
        "UPS ERR/s",
        "TIMEOUT/s",
        "COALESCED/s",
    ):
        grid.add_column(name, justify="right", no_wrap=True)
    s = view.seconds
    for total, routes in view.services:
        for row in (total, *routes):
            grid.add_row(
                # Text, not str: a cell given as str is read as rich markup ("[red]").
                Text(clean(row.service) if not row.route else f"  {clean(row.route)}"),
                f"{row.rps:.1f}",
                _percent(row.share("HIT")),
                _percent(row.share("STALE")),
                _percent(row.share("MISS", "EXPIRED")),
                _percent(row.share("BYPASS")),
                _ms(row.quantile(0.50)),
                _ms(row.quantile(0.99)),
                _rate(row.errors, s),
                _rate(row.timeouts, s),
                _rate(row.coalesced, s),
                style="bold" if not row.route else None,
            )
    if not view.services:
        grid.add_row("(no requests yet)")
    return grid


def render(view: View) -> Group:
    return Group(header(view), Text(""), table(view))


def as_text(view: View, width: int = 132) -> str:
    """The frame as plain text (``--once``, tests, docs)."""
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(render(view))
    text = console.export_text()
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


# -- I/O ----------------------------------------------------------------------------------


class TopError(Exception):
    """The gateway could not be read."""


def fetch(client: httpx.Client, url: str, token: str | None = None) -> Scrape:
    """A scrape of ``url``'s metrics. The endpoint needs no token: ``token`` is sent only
    when it asks for one (a ``401`` with a ``Bearer`` challenge, from a proxy in front,
    say), and from then on to it alone."""
    endpoint = url.rstrip("/") + "/_cachegw/metrics"
    try:
        response = client.get(endpoint)
        challenge = response.headers.get("www-authenticate", "").lower()
        if response.status_code == 401 and token and challenge.startswith("bearer"):
            response = client.get(endpoint, headers={"authorization": f"Bearer {token}"})
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise TopError(f"cannot reach the gateway at {endpoint}: {exc}") from None
    if response.status_code != 200:
        raise TopError(f"{endpoint} answered {response.status_code}, not metrics")
    try:
        return Scrape.parse(response.text, time.monotonic())
    except ValueError as exc:
        raise TopError(f"{endpoint} did not answer in the Prometheus text format: {exc}") from None


def client_for() -> httpx.Client:
    # trust_env=False: a token must not go through a proxy taken from HTTP_PROXY. No
    # default headers: the token is added only to a request that is asked for it.
    return httpx.Client(trust_env=False, timeout=5)


def once(url: str, token: str | None, interval: float, sort: str, width: int) -> str:
    """One frame: two scrapes ``interval`` apart, as text; when no request arrived in
    between, the figures since the gateway started (see `since_start`)."""
    with client_for() as client:
        before = fetch(client, url, token)
        time.sleep(interval)
        now = fetch(client, url, token)
    view = compute(before, now, url, sort)
    if not _requests(view):
        view = since_start(now, url, sort, interval) or view
    return as_text(view, width)


def since_start(now: Scrape, url: str, sort: str, interval: float) -> View | None:
    """The view from the gateway's start to ``now`` (its counters against zero), noted
    as such: what `once` shows right after traffic rather than a frame of zeros. None if
    the gateway does not say when it started, or had no requests."""
    started = now.values("cachegw_start_time_seconds")
    if not started:
        return None
    uptime = max(time.time() - min(started), 1e-3)
    view = compute(Scrape(now.at - uptime, {}), now, url, sort)
    if not _requests(view):
        return None
    view.note = (
        f"no requests in the last {interval:g} s: figures since the gateway started "
        f"{_duration(uptime)} ago"
    )
    return view


def _requests(view: View) -> float:
    return sum(total.requests for total, _ in view.services)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run(url: str, token: str | None, interval: float, sort: str) -> None:
    """The live view, until ``q`` or Ctrl-C."""
    console = Console()
    with client_for() as client, _keys() as pressed:
        before: Scrape | None = None
        view = View(url, interval, [], [], False, {}, {}, sort)
        with Live(render(view), console=console, auto_refresh=False, screen=False) as live:
            while True:
                try:
                    now = fetch(client, url, token)
                except TopError as exc:
                    view.error = f"{exc} (retrying)"
                    before = None
                else:
                    if before is not None:
                        view = compute(before, now, url, sort)
                    before = now
                live.update(render(view), refresh=True)
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    key = pressed(left)
                    if key in ("q", "Q"):
                        return
                    if key in SORTS:
                        sort = SORTS[key][0]
                        if before is not None:
                            view.sort = sort
                            view.services = _resort(view, sort)
                            live.update(render(view), refresh=True)


def _resort(view: View, sort: str) -> list[tuple[Row, list[Row]]]:
    routes = {total.service: sort_rows(rows, sort) for total, rows in view.services}
    return [(t, routes[t.service]) for t in sort_rows([t for t, _ in view.services], sort)]


@contextmanager
def _keys() -> Iterator[_KeyReader]:
    """Single key presses from the terminal (none when stdin is not one)."""
    if not sys.stdin.isatty():
        yield _KeyReader(None)
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield _KeyReader(fd)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class _KeyReader:
    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def __call__(self, timeout: float) -> str | None:
        if self.fd is None:
            time.sleep(timeout)
            return None
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return None
        return os.read(self.fd, 1).decode("latin-1", "replace")
