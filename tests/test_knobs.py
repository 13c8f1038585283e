"""A policy knob is declared once (a `CachePolicy` field with ``metadata=knob(...)``) and
shows up everywhere it must: validation, the TOML keys, `@cached`, `cachegw check`, the
docs. Each test fails when a knob is missing from one of them."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from cachegw import CachePolicy, ConfigError, cached
from cachegw._cli import main
from cachegw._config import _ROUTE_KEYS, _SERVICE_KEYS
from cachegw._policy import KNOB_SPECS, KNOBS

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
