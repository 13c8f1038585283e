"""What ``cachegw check`` prints of a valid gateway: its routes with their effective
policies (a column per knob), the declarations that are valid but almost certainly not
what was meant, and the memory one process may hold."""

from __future__ import annotations

import re
import string

from cachegw._errors import redact
from cachegw._gateway import Gateway, policy_table
from cachegw._knobs import defaults_of, settings_of
from cachegw._policy import KNOB_SPECS

__all__ = ["budget_line", "lint", "plural", "route_table", "settings_lines"]


_COLUMNS = ("SERVICE", "PATH", "UPSTREAM", *(k.column for k in KNOB_SPECS.values()))


def route_table(gateway: Gateway) -> str:
    """Every route with its effective policy: a column per knob (`Knob.column`)."""
    rows = [list(_COLUMNS)]
    for service, path, upstream, policy in policy_table(gateway):
        cells = [k.cell(getattr(policy, name)) for name, k in KNOB_SPECS.items()]
        rows.append([service, path, upstream, *cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def settings_lines(gateway: Gateway) -> list[str]:
    """A line per table, ``[cache]``, ``[admin]`` then ``[server]``, naming the settings
    it sets to something other than their defaults (none: no line); passwords in a URL
    redacted."""
    values: dict[str, list[str]] = {"cache": [], "admin": [], "server": []}
    for owner in (gateway, gateway.server):
        defaults = defaults_of(type(owner))
        for name, declared in settings_of(type(owner)).items():
            value = getattr(owner, name)
            if value != defaults[name]:
                values[declared.table].append(f"{declared.key or name}={declared.cell(value)}")
    return [redact(f"[{table}] {' '.join(found)}") for table, found in values.items() if found]


def budget_line(gateway: Gateway) -> str:
    """The memory one gateway process may hold, part by part (see docs/operations.md)."""
    from cachegw._app import memory_budget  # the app's modules, only for this line

    parts = memory_budget(gateway)
    total = sum(size for _, size in parts)
    listed = " + ".join(f"{_mib(size)} {name}" for name, size in parts)
    return f"memory per process: at most {_mib(total)} ({listed})"


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f}MiB" if size >= 2**20 else f"{size / 1024:.0f}KiB"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def lint(gateway: Gateway) -> list[str]:
    """Declarations that are valid but almost certainly not what was meant.

    - A route that can never match because an earlier catch-all of its service
      (``/{rest:path}``, ``/files/{rest:path}``) takes every path it would (the first
      declared route that matches wins).
    - A tag placeholder naming no path param of its route: the tag is then stored
      literally (``item:{id}``), so one purge takes back every entry of the route.
    """
    found = []
    for i, service in enumerate(gateway.services):
        catch_alls: list[tuple[str, str]] = []
        for j, route in enumerate(service.routes):
            where = f"services[{i}].routes[{j}] ({service.name} {route.path})"
            shadow = next((path for path, lead in catch_alls if route.path.startswith(lead)), None)
            if shadow is not None:
                found.append(
                    f"{where} is never used: the earlier catch-all {shadow} takes every path "
                    "it would match (the first declared route that matches wins; declare the "
                    "catch-all last)"
                )
            lead = _catch_all_lead(route.path)
            if lead is not None:
                catch_alls.append((route.path, lead))
            params = set(route.convertors)
            for tag in route.policy.tags:
                missing = [name for name in _placeholders(tag) if name not in params]
                if missing:
                    have = ", ".join(sorted(params)) or "none"
                    found.append(
                        f"{where}: tag {tag!r} names {', '.join(missing)}, which is not a path "
                        f"param of {route.path} (its params: {have}); it is stored as written"
                    )
    return found


def _catch_all_lead(path: str) -> str | None:
    """``/files/`` for ``/files/{rest:path}``: the literal start of a route that takes
    every path beginning with it; None for any other route."""
    lead, brace, rest = path.partition("{")
    if brace and "{" not in lead and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*:path\}", rest):
        return lead
    return None


def _placeholders(template: str) -> list[str]:
    try:
        return [
            name.split(".")[0].split("[")[0]
            for _, name, _, _ in string.Formatter().parse(template)
            if name
        ]
    except ValueError:
        return []
