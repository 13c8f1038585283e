"""Every fenced ``python``, ``toml`` and shell block of README.md and docs/*.md, checked.

* ``python``: the blocks of one page run in order in one namespace (a page reads top to
  bottom, a later block may use an earlier one's ``app``); top-level ``await`` is allowed.
  ``uvicorn.run`` is replaced by a recorder: a block that starts a server is run up to
  that call, and the app it was given must be an ASGI app.
* ``toml``: read through cachegw's own loader (`Gateway.from_toml`); a fragment without
  ``[[services]]`` gets a minimal one, a lone ``[[services.routes]]`` its service.
* ``sh`` / ``shell`` / ``bash`` / ``console``: every command exists (on PATH, in the venv,
  or as a file of this checkout); every ``cachegw`` command line parses with the CLI's own
  click parser (subcommand, options and their values).

No block is skipped: a new block in a new language fails `test_every_block_is_checked`
until this module knows the language.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from cachegw import Gateway
from cachegw._cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"sh", "shell", "bash", "console"}
CHECKED = {"python", "toml"} | SHELLS
#: Languages shown, not run: program output, JSON bodies, PromQL, nginx, plain text.
SHOWN = {"text", "json", "promql", "nginx", "yaml", ""}

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.S | re.M
)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _blocks() -> Iterator[Block]:
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in _FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            code = textwrap.dedent(match["body"])
            yield Block(page, line, match["lang"].lower(), code)


BLOCKS = list(_blocks())


def test_every_block_is_checked() -> None:
    unknown = [f"{b} ```{b.lang}" for b in BLOCKS if b.lang not in CHECKED | SHOWN]
    assert not unknown, f"code blocks in a language this test does not check: {unknown}"
    assert sum(b.lang == "python" for b in BLOCKS) >= 10  # the pattern still finds them


# --- python ----------------------------------------------------------------------------


#: Runs one page's python blocks in a process of its own: blocks configure logging, init
#: FastAPICache and the like, which must not leak into the rest of the suite.
_RUNNER = """
import ast, asyncio, json, sys, types
import uvicorn

class Served(Exception):
    pass

served = []

def run(app, *args, **kwargs):
    served.append(app)
    raise Served

uvicorn.run = run
# A module of its own (dataclasses and pydantic look their class's module up).
module = types.ModuleType("cachegw_docs_page")
sys.modules[module.__name__] = module

async def execute():
    for name, code in json.load(sys.stdin):
        compiled = compile(code, name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        try:
            result = eval(compiled, module.__dict__)
            if asyncio.iscoroutine(result):
                await result
        except Served:
            assert callable(served[-1]), f"{name}: uvicorn.run got {served[-1]!r}"

asyncio.run(execute())
"""


def _run_page(blocks: list[Block], cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", _RUNNER],
        input=json.dumps([[str(b), b.code] for b in blocks]),
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,  # a deadline for a block that hangs, not a speed test
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


PYTHON_PAGES = sorted({b.page for b in BLOCKS if b.lang == "python"})


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page: Path, tmp_path: Path) -> None:
    blocks = [b for b in BLOCKS if b.lang == "python" and b.page == page]
    _run_page(blocks, tmp_path)


# --- toml ------------------------------------------------------------------------------

_SERVICE = '[[services]]\nname = "docs"\nupstream = "http://127.0.0.1:9"\n'
_ROUTE = '[[services.routes]]\npath = "/{rest:path}"\n'


def _as_gateway_file(code: str) -> str:
    # Placeholders the pages explain in prose.
    code = code.replace(":PORT", ":9")
    if re.search(r"^\s*\[\[services\]\]", code, re.M):
        if re.search(r"^\s*\[\[services\.routes\]\]", code, re.M):
            return code
        # Services shown for their own keys: each gets a catch-all route.
        parts = re.split(r"(?m)^(?=\s*\[\[services\]\])", code)
        return parts[0] + "".join(part + "\n" + _ROUTE for part in parts[1:])
    if re.search(r"^\s*\[\[services\.routes\]\]", code, re.M):
        return _SERVICE + code
    if not re.search(r"^\s*\[", code, re.M):  # bare keys: a service's or a route's
        return _SERVICE + code + _ROUTE
    return code + "\n" + _SERVICE + _ROUTE


TOML = [b for b in BLOCKS if b.lang == "toml"]


@pytest.mark.parametrize("block", TOML, ids=str)
def test_toml_blocks_load(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_PASSWORD", "CACHEGW_REDIS_PASSWORD"):
        monkeypatch.setenv(name, "docs")
    path = tmp_path / "gateway.toml"
    path.write_text(_as_gateway_file(block.code), encoding="utf-8")
    gateway = Gateway.from_toml(path)
    assert gateway.services


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "yaml"], ids=str)
def test_yaml_blocks_parse(block: Block) -> None:
    import yaml

    assert yaml.safe_load(block.code) is not None


# --- shell -----------------------------------------------------------------------------

#: Shell builtins and words the blocks use that are not programs on PATH.
_BUILTINS = {"export", "cd", "kill", "echo", "set", "source", "."}


def _commands(code: str, lang: str) -> Iterator[list[str]]:
    lines = code.splitlines()
    if lang == "console":  # a prompt, then output
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in {"&&", "||", "|", ";"}:
                while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0]):
                    command = command[1:]  # VAR=value before a command
                if command:
                    yield command
                command = []
            else:
                command.append(word)


def _check_cachegw(args: list[str]) -> None:
    parent = cli.make_context("cachegw", list(args))
    # click 8.2 keeps the subcommand apart (its public name is deprecated).
    protected = getattr(parent, "_protected_args", None) or []
    name, command, rest = cli.resolve_command(parent, [*protected, *parent.args])
    assert command is not None, f"no cachegw subcommand {name!r}"
    command.make_context(name or "", rest, parent=parent)


SHELL = [b for b in BLOCKS if b.lang in SHELLS]


@pytest.mark.parametrize("block", SHELL, ids=str)
def test_shell_blocks_name_real_commands(block: Block) -> None:
    commands = list(_commands(block.code, block.lang))
    assert commands, f"{block}: no command found"
    venv_bin = Path(sys.executable).parent
    for command in commands:
        program, args = command[0], command[1:]
        name = Path(program).name
        if name == "cachegw":
            try:
                _check_cachegw(args)
            except click.ClickException as exc:
                pytest.fail(f"{block}: `{shlex.join(command)}`: {exc.format_message()}")
            continue
        if name in {"python", "python3"} and args and args[0].endswith(".py"):
            assert (ROOT / args[0]).is_file(), f"{block}: no script {args[0]}"
            continue
        found = (
            name in _BUILTINS
            or shutil.which(program) is not None
            or (venv_bin / name).exists()
            or (program.startswith(".venv/bin/") and name in {"pip", "python", "pytest"})
        )
        assert found, f"{block}: `{program}` is not a command here"
    assert os.environ.get("PATH")


def test_purge_after_write_recipe_serves_the_new_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/operations.md's put_item: after the PUT, the next GET is the new item."""
    from fastapi.testclient import TestClient

    page = ROOT / "docs" / "operations.md"
    block = next(b for b in BLOCKS if b.page == page and "async def put_item" in b.code)
    module = types.ModuleType("cachegw_docs_recipe")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(block.code, str(block), "exec"), module.__dict__)
    with TestClient(module.app) as client:
        first = client.get("/items/1")
        assert (first.json(), first.headers["x-cache-status"]) == ({}, "MISS")
        assert client.get("/items/1").headers["x-cache-status"] == "HIT"
        client.put("/items/1", json={"name": "new"}).raise_for_status()
        after = client.get("/items/1")
    assert (after.json(), after.headers["x-cache-status"]) == ({"name": "new"}, "MISS")
