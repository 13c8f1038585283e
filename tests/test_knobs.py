"""A policy knob is declared once (a `CachePolicy` field with ``metadata=knob(...)``) and
shows up everywhere it must: validation, the TOML keys, `@cached`, `cachegw check`, the
docs. Each test fails when a knob is missing from one of them."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cachegw import CachePolicy, ConfigError, Gateway, Service, cached
from cachegw._checks import settings_lines
from cachegw._cli import main, server_flags
from cachegw._config import (
    _ROUTE_KEYS,
    _SERVICE_KEYS,
    field_names,
    load_gateway,
    service_keys,
    setting_tables,
)
from cachegw._knobs import (
    Setting,
    as_duration,
    as_whole,
    defaults_of,
    seconds_cell,
    setting,
    settings_of,
)
from cachegw._limits import ServerLimits, UpstreamLimits
from cachegw._policy import KNOB_SPECS, KNOBS
from cachegw._reload import restart_needed

DOCS = Path(__file__).parent.parent / "docs"
DECORATOR_KNOBS = sorted(name for name, k in KNOB_SPECS.items() if k.decorator)


def test_every_policy_field_but_key_is_a_knob() -> None:
    fields = {f.name for f in dataclasses.fields(CachePolicy)}
    assert fields - KNOBS == {"key"}


@pytest.mark.parametrize("name", sorted(KNOBS))
def test_a_knob_is_validated(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{name} must be"):
        CachePolicy(**{name: object()})


def test_every_knob_is_a_toml_key_of_services_and_routes() -> None:
    assert KNOBS <= _SERVICE_KEYS and KNOBS <= _ROUTE_KEYS


def test_cached_takes_every_decorator_knob() -> None:
    parameters = inspect.signature(cached).parameters
    missing = [n for n in DECORATOR_KNOBS if n not in parameters]
    assert not missing, f"cached() has no parameter for {missing}"
    assert "methods" not in parameters  # the route decorator says which methods
    for name in DECORATOR_KNOBS:
        default = parameters[name].default
        if name not in ("ttl", "statuses"):  # both None: FastAPICache.init / decorator statuses
            declared = CachePolicy.__dataclass_fields__[name].default
            assert default == declared, (name, default, declared)


@pytest.mark.parametrize("name", DECORATOR_KNOBS)
def test_cached_passes_the_knob_on(name: str) -> None:
    # A bad value is refused where the decorator is applied: it reached CachePolicy.
    with pytest.raises(ConfigError, match=rf"^{name} must be"):
        cached(**{name: object()})


def test_check_has_a_column_per_knob(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[[services]]\nname = "s"\nupstream = "http://127.0.0.1:9"\n'
        "early_refresh = 1\nignore_request_cache_control = true\n"
        '[[services.routes]]\npath = "/{rest:path}"\n'
    )
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 0, result.output
    header, row = (line.split() for line in result.output.splitlines()[:2])
    columns = [k.column for k in KNOB_SPECS.values()]
    assert header == ["SERVICE", "PATH", "UPSTREAM", *columns]
    cells = dict(zip(header, row, strict=True))
    assert (cells["EARLY_REFRESH"], cells["IGNORE_REQUEST_CC"]) == ("1", "yes")


def test_every_knob_has_its_docs_lines() -> None:
    policies = (DOCS / "policies.md").read_text()
    decorator = (DOCS / "decorator.md").read_text()
    gateway = (DOCS / "gateway.md").read_text()
    docstring = CachePolicy.__doc__ or ""
    for name, k in KNOB_SPECS.items():
        row = rf"^\| `{name}` \| {re.escape(k.default_doc)} \| \S"
        assert re.search(row, policies, re.M), f"docs/policies.md has no row {row}"
        assert f"`{name}`" in gateway, f"docs/gateway.md does not name {name}"
        assert f"**{name}**" in docstring, f"CachePolicy's docstring does not describe {name}"
        if k.decorator:
            assert f"| `{name}` |" in decorator, f"docs/decorator.md has no row for {name}"


# -- [cache] and [server] settings ------------------------------------------------------------
#
# A gateway-wide setting is declared once, on `Gateway` or on `ServerLimits`, with
# ``metadata=setting(...)``: its TOML table and key, validation, `cachegw check`'s
# settings line, `cachegw serve`'s flag and the reload rule follow.

SETTINGS = setting_tables(Gateway)
EVERY_SETTING = sorted((table, name) for table, found in SETTINGS.items() for name in found)
ODD = {
    "backend": "redis://127.0.0.1:1/0",
    "trusted_proxies": ["10.0.0.0/8"],
    "token_env": "OTHER_TOKEN",
}
#: The field of each setting whose TOML key is another name ([admin] token_env).
FIELDS = field_names(Gateway)


def _odd(declared: Setting, name: str) -> object:
    """A valid value other than the default, as a TOML file or the CLI would give it."""
    if name in ODD:
        return ODD[name]
    return {
        "size": "3MiB",
        "duration": "7s",
        "integer": 7,
        "boolean": not _default(name),
        "string": "X-Other",
    }[declared.type_doc]


def _default(name: str) -> object:
    return (defaults_of(Gateway) | defaults_of(ServerLimits))[FIELDS.get(name, name)]


@pytest.mark.parametrize(("table", "name"), EVERY_SETTING)
def test_a_setting_is_read_from_its_table_and_validated(
    tmp_path: Path, table: str, name: str
) -> None:
    declared = SETTINGS[table][name]
    good = tmp_path / "good.toml"
    good.write_text(_file({table: {name: _odd(declared, name)}}))
    gateway = Gateway.from_toml(good)
    owner = gateway.server if name in settings_of(ServerLimits) else gateway
    value = getattr(owner, FIELDS.get(name, name))
    assert value == declared.parse(_odd(declared, name), name)
    assert value != _default(name)
    bad = tmp_path / "bad.toml"
    bad.write_text(_file({table: {name: {"a": 1}}}))
    with pytest.raises(ConfigError, match=rf"bad.toml: {table}.{name} must be"):
        Gateway.from_toml(bad)


@pytest.mark.parametrize(("table", "name"), EVERY_SETTING)
def test_check_names_a_setting_that_is_not_at_its_default(
    tmp_path: Path, table: str, name: str
) -> None:
    declared = SETTINGS[table][name]
    path = tmp_path / "gateway.toml"
    path.write_text(_file({table: {name: _odd(declared, name)}}))
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith(f"[{table}] ")]
    assert f" {name}=" in line
    path.write_text(_file({}))
    assert f"[{table}]" not in CliRunner().invoke(main, ["check", str(path)]).output


@pytest.mark.parametrize(("table", "name"), EVERY_SETTING)
def test_a_reload_that_changes_a_setting_needs_a_restart_unless_it_is_live(
    tmp_path: Path, table: str, name: str
) -> None:
    declared = SETTINGS[table][name]
    old, new = tmp_path / "old.toml", tmp_path / "new.toml"
    old.write_text(_file({}))
    new.write_text(_file({table: {name: _odd(declared, name)}}))
    reason = restart_needed(Gateway.from_toml(old), Gateway.from_toml(new))
    if declared.live:
        assert reason is None
    else:
        assert reason is not None and "restart the gateway" in reason
        assert name in reason


def test_serve_has_a_flag_per_server_limit_declared_with_one() -> None:
    flags = {p.name: p for p in main.commands["serve"].params}
    for name, declared in settings_of(ServerLimits).items():
        assert declared.flag is not None, f"{name}: a [server] limit has its serve flag"
        assert flags[name].opts == [f"--{name.replace('_', '-')}"]
        assert flags[name].help == declared.flag[1]


def test_every_setting_has_its_docs_row() -> None:
    gateway = (DOCS / "gateway.md").read_text()
    docstrings = (Gateway.__doc__ or "") + (ServerLimits.__doc__ or "")
    for table, found in SETTINGS.items():
        section = gateway.partition(f"### `[{table}]`")[2].partition("\n### ")[0]
        for name, declared in found.items():
            row = rf"^\| `{name}` \| {re.escape(declared.type_doc)} \| "
            row += rf"{re.escape(declared.default_doc)} \| \S"
            assert re.search(row, section, re.M), f"docs/gateway.md [{table}] has no row {row}"
            described = FIELDS.get(name, name)
            assert f"**{described}**" in docstrings, f"no docstring describes {described}"


def _file(tables: dict[str, dict[str, object]]) -> str:
    text = ""
    for table, values in tables.items():
        text += f"[{table}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
    return text + (
        '[[services]]\nname = "s"\nupstream = "http://127.0.0.1:9"\n'
        '[[services.routes]]\npath = "/{rest:path}"\n'
    )


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


# A throwaway setting in each table: one declaration, and every derived place sees it.


@dataclass(frozen=True, kw_only=True, slots=True)
class _SpareLimits(ServerLimits):
    """Limits with one more: **spare**."""

    spare: int = field(
        default=1, metadata=setting("server", as_whole(1), "integer", "`1`", flag=(int, "Spare."))
    )


@dataclass(kw_only=True, repr=False)
class _SpareGateway(Gateway):
    throwaway: float = field(
        default=1.0,
        metadata=setting("cache", as_duration, "duration", "`1`", cell=seconds_cell),
    )
    server: ServerLimits = field(default_factory=_SpareLimits)
    # An [admin] setting whose TOML key is not its field's name, applied by a reload.
    admin_spare: int = field(
        default=1,
        metadata=setting("admin", as_whole(1), "integer", "`1`", live=True, key="spare"),
    )


def test_a_throwaway_setting_is_seen_everywhere(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    # TOML reading: the keys of its tables, their values reach the gateway.
    tables = {"cache": {"throwaway": "5s"}, "admin": {"spare": 2}, "server": {"spare": 7}}
    path.write_text(_file(tables))
    gateway = _SpareGateway.from_toml(path)
    assert gateway.throwaway == 5.0 and gateway.server.spare == 7 and gateway.admin_spare == 2
    # Validation, with the file and the key named.
    for table, name in (("cache", "throwaway"), ("admin", "spare"), ("server", "spare")):
        path.write_text(_file({table: {name: -1}}))
        with pytest.raises(ConfigError, match=rf"gateway.toml: {table}.{name} must be"):
            _SpareGateway.from_toml(path)
    path.write_text(_file({"cache": {"throwawy": 1}}))
    with pytest.raises(ConfigError, match="did you mean 'throwaway'"):
        _SpareGateway.from_toml(path)
    # `cachegw check`'s settings lines.
    assert settings_lines(gateway) == [
        "[cache] throwaway=5s",
        "[admin] spare=2",
        "[server] spare=7",
    ]
    # The reload rule: neither the [cache] nor the [server] one is live, the [admin] one is.
    same = _SpareGateway(services=gateway.services, throwaway=5, server=_SpareLimits(spare=7))
    assert restart_needed(gateway, same) is None
    moved = _SpareGateway(services=gateway.services, throwaway=6, server=_SpareLimits(spare=7))
    assert "cache.throwaway changed" in (restart_needed(gateway, moved) or "")
    limits = _SpareGateway(services=gateway.services, throwaway=5, server=_SpareLimits(spare=8))
    assert "the [server] table changed" in (restart_needed(gateway, limits) or "")
    # `cachegw serve`'s flags: the command line overrides the limit.

    @click.command()
    @server_flags(_SpareLimits)
    def serve(**limits: object) -> None:
        click.echo(repr(_SpareLimits(**{k: v for k, v in limits.items() if v is not None})))

    result = CliRunner().invoke(serve, ["--spare", "3", "--header-timeout", "2"])
    assert result.exit_code == 0, result.output
    assert "spare=3" in result.output and "header_timeout=2.0" in result.output
    assert re.search(r"--spare INTEGER +Spare\.", CliRunner().invoke(serve, ["--help"]).output)


# -- a service's upstream limits ---------------------------------------------------------------
#
# Declared once, on `UpstreamLimits` (``metadata=setting("services", ...)``): the keys of a
# ``[[services]]`` table, validation in Python and in the file, the service's upstream client
# settings (and so the reload rule, which compares them) follow.

UPSTREAM = settings_of(UpstreamLimits)


def _service_file(values: dict[str, object]) -> str:
    keys = "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
    return (
        f'[[services]]\nname = "s"\nupstream = "http://127.0.0.1:9"\n{keys}'
        '[[services.routes]]\npath = "/{rest:path}"\n'
    )


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_an_upstream_limit_is_a_service_key_and_validated(tmp_path: Path, name: str) -> None:
    assert name in _SERVICE_KEYS
    value = 7 if UPSTREAM[name].type_doc == "integer" else "7s"
    path = tmp_path / "gateway.toml"
    path.write_text(_service_file({name: value}))
    [service] = Gateway.from_toml(path).services
    assert getattr(service, name) == 7 and service.client_settings[name] == 7
    path.write_text(_service_file({name: {"a": 1}}))
    with pytest.raises(ConfigError, match=rf"gateway.toml: services\[0\]\.{name} must be"):
        Gateway.from_toml(path)
    with pytest.raises(ConfigError, match=rf"^{name} of service 's' must be"):
        Service("s", "http://127.0.0.1:9", **{name: -1})


def test_every_upstream_limit_has_its_docs_row() -> None:
    gateway = (DOCS / "gateway.md").read_text()
    section = gateway.partition("### `[[services]]`")[2].partition("\n### ")[0]
    for name, declared in UPSTREAM.items():
        row = rf"^\| `{name}` \| {re.escape(declared.type_doc)} \| "
        row += rf"{re.escape(declared.default_doc)} \| \S"
        assert re.search(row, section, re.M), f"docs/gateway.md [[services]] has no row {row}"
        assert f"**{name}**" in (Service.__doc__ or ""), f"Service's docstring lacks {name}"


@dataclass(frozen=True, kw_only=True, slots=True)
class _SpareUpstream(UpstreamLimits):
    spare: int = field(default=1, metadata=setting("services", as_whole(1), "integer", "`1`"))


class _SpareService(Service):
    upstream_limits = _SpareUpstream


def test_a_throwaway_upstream_limit_is_seen_everywhere(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    # TOML reading: a key of [[services]], its value reaches the service and its client.
    assert "spare" in service_keys(_SpareService) and "spare" not in _SERVICE_KEYS
    path.write_text(_service_file({"spare": 3, "timeout": 4}))
    [service] = load_gateway(path, Gateway, _SpareService).services
    assert service.spare == 3  # type: ignore[attr-defined]
    assert service.client_settings["spare"] == 3 and service.client_settings["timeout"] == 4
    # Validation, with the file and the key named; in Python too.
    path.write_text(_service_file({"spare": 0}))
    with pytest.raises(ConfigError, match=r"gateway.toml: services\[0\]\.spare must be"):
        load_gateway(path, Gateway, _SpareService)
    path.write_text(_service_file({"sparee": 3}))
    with pytest.raises(ConfigError, match="did you mean 'spare'"):
        load_gateway(path, Gateway, _SpareService)
    with pytest.raises(ConfigError, match="spare of service 's' must be a whole number"):
        _SpareService("s", "http://127.0.0.1:9", spare=0)
    # The default, when not given; the reload rule compares the client settings.
    other = _SpareService("s", "http://127.0.0.1:9")
    assert other.client_settings["spare"] == 1
    assert other.client_settings != service.client_settings
