"""The documentation site: complete, buildable, and its gateway example valid.

Pins what the docs must cover (every public name, every policy knob, every TOML key)
and runs the complete TOML example of docs/gateway.md through the loader and the CLI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cachegw
from cachegw import Gateway
from cachegw._config import _ROUTE_KEYS, _SERVICE_KEYS, setting_tables
from cachegw._policy import KNOBS

_CACHE_KEYS = frozenset(setting_tables(Gateway)["cache"])
_SERVER_KEYS = frozenset(setting_tables(Gateway)["server"])
_ADMIN_KEYS = frozenset(setting_tables(Gateway)["admin"])

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def _all_docs() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in sorted(DOCS.glob("*.md")))


def _in_code(name: str, text: str) -> bool:
    """``name`` appears as code: in backticks (alone or in an expression) or in a fence."""
    word = rf"(?<![\w.]){re.escape(name)}(?!\w)"
    inline = re.search(rf"`[^`\n]*{word}[^`\n]*`", text)
    fenced = any(re.search(word, block) for block in re.findall(r"```.*?```", text, re.S))
    return bool(inline) or fenced


def _gateway_example() -> str:
    match = re.search(r"```toml\n(.*?)```", _read("gateway.md"), re.S)
    assert match, "docs/gateway.md has no ```toml block"
    return match.group(1)


def test_every_public_name_is_documented() -> None:
    text = _all_docs()
    missing = [n for n in cachegw.__all__ if n != "__version__" and not _in_code(n, text)]
    assert not missing, f"public names not in docs/: {missing}"


def test_every_policy_knob_is_in_policies_page() -> None:
    text = _read("policies.md")
    missing = sorted(k for k in KNOBS if f"`{k}`" not in text)
    assert not missing, f"policy knobs not in docs/policies.md: {missing}"


def test_every_toml_key_is_in_gateway_guide() -> None:
    text = _read("gateway.md")
    keys = _CACHE_KEYS | _ADMIN_KEYS | _SERVER_KEYS | _SERVICE_KEYS | _ROUTE_KEYS
    missing = sorted(k for k in keys if f"`{k}`" not in text)
    assert not missing, f"TOML keys not in docs/gateway.md: {missing}"


def test_gateway_example_loads_and_checks(tmp_path: Path) -> None:
    example = _gateway_example()
    # Every key of the reference appears in the complete example.
    for table, keys in (
        ("cache", _CACHE_KEYS),
        ("admin", _ADMIN_KEYS),
        ("server", _SERVER_KEYS),
        ("services", _SERVICE_KEYS - {"routes"}),
        ("services.routes", _ROUTE_KEYS),
    ):
        absent = sorted(k for k in keys if not re.search(rf"^\s*{k} = ", example, re.M))
        assert not absent, f"the complete example lacks {table} keys {absent}"
    example = re.sub(r'^(\s*upstream = )"[^"]*"', r'\1"http://127.0.0.1:9"', example, flags=re.M)
    config = tmp_path / "gateway.toml"
    config.write_text(example, encoding="utf-8")

    gateway = Gateway.from_toml(config)
    assert gateway.services and all(s.routes for s in gateway.services)

    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    proc = subprocess.run(
        [sys.executable, "-m", "cachegw", "check", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK:" in proc.stdout


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    proc = subprocess.run(
        [str(mkdocs), "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,  # a deadline for a hung build, not a speed test
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_migration_page_shows_the_lifespan_recipe_that_the_suite_runs() -> None:
    """docs/migration.md's test-isolation example is tests/test_recipe_lifespan.py."""
    recipe = (ROOT / "tests" / "test_recipe_lifespan.py").read_text(encoding="utf-8")
    code = recipe.split('"""', 2)[2].strip()
    blocks = [
        "\n".join(line.removeprefix("    ") for line in block.splitlines()).strip()
        for block in re.findall(r"```python\n(.*?)```", _read("migration.md"), re.S)
    ]
    assert code in blocks
