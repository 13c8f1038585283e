"""The package's structure: which module may import which.

Every import counts, including those under ``TYPE_CHECKING`` and inside functions: a
cycle there is still two modules that cannot be read (or changed) one without the other.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Collection, Iterator
from pathlib import Path
from textwrap import indent

import cachegw

PACKAGE = Path(cachegw.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the cachegw modules it imports anywhere in its source."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base]) if base else ".".join(up)
                # `from pkg import mod` imports the submodule when there is one.
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                # Importing a.b.c runs a.b's __init__ first (the package root aside: it
                # is the public facade every private module sits under).
                while target and target != "cachegw":
                    if target != name and not name.startswith(f"{target}."):
                        graph[name].add(target)
                    target = target.rpartition(".")[0]
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert _cycles(import_graph()) == []


def test_the_graph_sees_type_checking_and_local_imports() -> None:
    # The check above is only as good as the graph: a lazy import and a TYPE_CHECKING one
    # both show up (the CLI imports the app inside a command).
    graph = import_graph()
    assert "cachegw._app" in graph["cachegw._cli"]
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]


def test_models_do_not_depend_on_the_engine() -> None:
    graph = import_graph()
    assert "cachegw._engine" not in graph["cachegw._upstream"]
    assert graph["cachegw._models"] <= {"cachegw._entry"}


# -- private names stay in their module ---------------------------------------------------


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _parsed(root: Path) -> dict[str, tuple[Path, ast.Module]]:
    """Module name -> its path and syntax tree, for the package at ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = (path, ast.parse(path.read_text(), str(path)))
    return modules


def _private_definitions(tree: ast.Module) -> set[str]:
    """The private names a module defines: functions, classes, variables, parameters,
    attributes it sets on ``self`` or ``cls``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
    return {name for name in names if _is_private(name)}


def _module_aliases(
    name: str, path: Path, tree: ast.Module, modules: Collection[str]
) -> tuple[dict[str, str], list[tuple[str, int, str]]]:
    """The local names bound to the package's modules (to ``""``: to another library's
    modules and names), and each private name imported from one of the package's
    (``from pkg._x import _name``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    root = name.partition(".")[0]
    aliases: dict[str, str] = {}
    imported: list[tuple[str, int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.partition(".")[0] == root:
                    aliases[alias.asname or root] = alias.name if alias.asname else root
                else:
                    aliases[alias.asname or alias.name.partition(".")[0]] = ""
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base]) if base else ".".join(up)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
                elif base.partition(".")[0] != root:
                    aliases[alias.asname or alias.name] = ""
                elif _is_private(alias.name):
                    imported.append((name, node.lineno, f"from {base} import {alias.name}"))
    return aliases, imported


def _attribute_reads(tree: ast.Module) -> Iterator[tuple[int, ast.expr, str]]:
    """Each ``owner.name``, and ``getattr(owner, "name")`` and its kin."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            yield node.lineno, node.value, node.attr
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            yield node.lineno, node.args[0], node.args[1].value


def private_reads(root: Path = PACKAGE) -> list[tuple[str, int, str]]:
    """Every place a module of the package reads another module's private name, as
    (module, line, what): ``from pkg._x import _name``; ``_x._name`` on an imported
    module; ``obj._name`` (or ``getattr(obj, "_name")``) of a name that the reading
    module does not define itself but another one does. Private *modules* (``_x``) are
    fine to import: it is the underscore names inside them that count."""
    modules = _parsed(root)
    defined = {name: _private_definitions(tree) for name, (_, tree) in modules.items()}
    found: list[tuple[str, int, str]] = []
    for name, (path, tree) in modules.items():
        others = set().union(*(d for m, d in defined.items() if m != name))
        aliases, imported = _module_aliases(name, path, tree, modules)
        found += imported
        for line, owner, attr in _attribute_reads(tree):
            if not _is_private(attr):
                continue
            module = aliases.get(owner.id) if isinstance(owner, ast.Name) else None
            if module == "":
                continue  # another library's: see the adapters' test below
            if module is not None and f"{module}.{attr}" in modules:
                continue  # a private submodule: fine to import
            if module is not None or (attr not in defined[name] and attr in others):
                found.append((name, line, f"{ast.unparse(owner)}.{attr}"))
    return found


def test_no_module_reads_another_modules_private_names() -> None:
    assert private_reads() == []


def test_the_private_read_check_sees_each_form(tmp_path: Path) -> None:
    # The check above is only as good as its reading of the source: each form it looks
    # for, and what it lets pass, in a package of its own.
    pkg = tmp_path / "pkg"
    (pkg / "_sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "_sub" / "__init__.py").write_text("")
    (pkg / "_a.py").write_text(
        "_LIMIT = 1\n"
        "class Thing:\n"
        "    def __init__(self):\n"
        "        self._count = 0\n"
        "    def _bump(self, other):\n"
        "        other._count += 1\n"  # its own class's private: fine
        "    def __repr__(self):\n"  # a dunder is not private
        "        return ''\n"
    )
    (pkg / "_sub" / "_b.py").write_text(
        "from pkg._a import _LIMIT\n"
        "from pkg import _a\n"
        "from .. import _a as a\n"
        "import pkg._a as aa\n"
        "import pkg\n"
        "from pkg._a import Thing\n"
        "from json import decoder\n"
        "def f(thing: Thing):\n"
        "    _own = thing.__repr__()\n"
        "    return (_a._LIMIT, a.Thing, aa._LIMIT, thing._count, getattr(thing, '_bump'),"
        " _own, pkg._sub, decoder._LIMIT)\n"
    )
    assert [(m, what) for m, _, what in private_reads(pkg)] == [
        ("pkg._sub._b", "from pkg._a import _LIMIT"),
        ("pkg._sub._b", "_a._LIMIT"),
        ("pkg._sub._b", "aa._LIMIT"),
        ("pkg._sub._b", "thing._count"),
        ("pkg._sub._b", "thing._bump"),
    ]


def test_fastapi_cache2_internals_are_read_in_its_adapter_only() -> None:
    # fastapi-cache2's FastAPICache keeps its settings in private class attributes; the
    # one module that reads them is _fc2 (pinned range, contract: tests/test_fc2.py).
    readers = set()
    for name, (_, tree) in _parsed(PACKAGE).items():
        bound = {"FastAPICache"}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastapi_cache"):
                bound |= {a.asname or a.name for a in node.names}
        for _, owner, attr in _attribute_reads(tree):
            if _is_private(attr) and ast.unparse(owner).rpartition(".")[2] in bound:
                readers.add(name)
    assert readers == {"cachegw._fc2"}


def test_third_party_internals_are_read_in_their_adapters_only() -> None:
    # A private name read on something imported from a library, or that no cachegw
    # module defines, belongs to a library: each library's are read in one adapter
    # (fastapi-cache2: _fc2; prometheus-client: _prom).
    modules = _parsed(PACKAGE)
    ours = set().union(*(_private_definitions(tree) for _, tree in modules.values()))
    readers: dict[str, set[str]] = {}
    for name, (path, tree) in modules.items():
        aliases, _ = _module_aliases(name, path, tree, modules)
        for _, owner, attr in _attribute_reads(tree):
            root = owner
            while isinstance(root, ast.Attribute):
                root = root.value
            library = isinstance(root, ast.Name) and aliases.get(root.id) == ""
            if _is_private(attr) and (library or attr not in ours):
                readers.setdefault(name, set()).add(f"{ast.unparse(owner)}.{attr}")
    assert sorted(readers) == ["cachegw._fc2", "cachegw._prom"], readers
    assert "self.child._buckets" in readers["cachegw._prom"]  # the check sees them
    assert "FastAPICache._backend" in readers["cachegw._fc2"]


# -- functions and modules a reader can hold in their head --------------------------------

MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500

#: Today's longer functions, in files other engineers are changing (issues 22, 23, 26, 28);
#: the list only shrinks, and a new long function anywhere fails the test.
LONG_FUNCTIONS_TO_SPLIT: set[str] = set()
#: Today's longer modules, likewise.
LONG_MODULES_TO_SPLIT: set[str] = set()


def _code_lines(source: str) -> set[int]:
    """The lines holding code: not blank, not only a comment."""
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in _NOT_CODE:
            lines.update(range(token.start[0], token.end[0] + 1))
    return lines


_NOT_CODE = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENDMARKER,
}


def _docstring_lines(node: ast.AST) -> set[int]:
    lines: set[int] = set()
    for inner in ast.walk(node):
        if isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module):
            first = inner.body[0] if inner.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return lines


def long_functions(root: Path = PACKAGE, limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """``module:Class.function`` -> its code lines, for every function longer than
    ``limit``: from its ``def`` line to its end (nested functions included, decorators
    not), counting neither blank lines, comments nor docstrings."""
    found: dict[str, int] = {}
    for name, (path, tree) in _parsed(root).items():
        _visit(tree, f"{name}:", _code_lines(path.read_text()), limit, found)
    return found


def _visit(node: ast.AST, qualname: str, code: set[int], limit: int, found: dict[str, int]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef):
            _visit(child, f"{qualname}{child.name}.", code, limit, found)
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            span = range(child.lineno, (child.end_lineno or child.lineno) + 1)
            count = len(code.intersection(span) - _docstring_lines(child))
            if count > limit:
                found[f"{qualname}{child.name}"] = count
            _visit(child, f"{qualname}{child.name}.", code, limit, found)


def long_modules(root: Path = PACKAGE, limit: int = MAX_MODULE_LINES) -> dict[str, int]:
    """Module -> its lines (all of them), for every module longer than ``limit``."""
    found = {}
    for name, (path, _) in _parsed(root).items():
        count = len(path.read_text().splitlines())
        if count > limit:
            found[name] = count
    return found


def test_no_function_is_over_60_code_lines() -> None:
    found = long_functions()
    assert {f: n for f, n in found.items() if f not in LONG_FUNCTIONS_TO_SPLIT} == {}
    assert set(found) >= LONG_FUNCTIONS_TO_SPLIT, "split: remove it from the list"


def test_no_module_is_over_500_lines() -> None:
    found = long_modules()
    assert {m: n for m, n in found.items() if m not in LONG_MODULES_TO_SPLIT} == {}
    assert set(found) >= LONG_MODULES_TO_SPLIT, "split: remove it from the list"


def test_the_length_checks_count_code_only(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    body = "".join(f"x{i} = {i}\n" for i in range(59))
    padding = '"""A docstring\n\nof lines."""\n\n# a comment\n\n'
    three = "return (\n1\n)"
    (pkg / "_m.py").write_text(
        # 60 code lines with its def: not listed, whatever its docstring and comments.
        f"@decorator\ndef short():\n{indent(padding + body, '    ')}\n"
        # 63: a statement over three lines is three.
        f"class C:\n    def long(self):\n{indent(body + three, ' ' * 8)}\n"
        # 62 with the function inside it (itself 60: not listed).
        f"    def nested(self):\n        def inner():\n{indent(body, ' ' * 12)}"
        "        return inner\n"
    )
    assert long_functions(pkg) == {"pkg._m:C.long": 63, "pkg._m:C.nested": 62}
    assert long_modules(pkg, limit=190) == {"pkg._m": 194}
    assert long_modules(pkg, limit=194) == {}


def test_the_architecture_page_names_every_module() -> None:
    # docs/architecture.md's module table is the map a newcomer reads first: every module
    # of the package is in it, and nothing that is not one.
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    table = page.partition("## Modules")[2].partition("\n## ")[0]
    named = {
        name
        for row in table.splitlines()
        if row.startswith("|") and row.count("|") >= 4
        for name in re.findall(r"`(\w+)`", row.split("|")[2])
    }
    modules = {p.stem for p in PACKAGE.glob("*.py")} | {
        p.parent.name for p in PACKAGE.glob("*/__init__.py")
    }
    assert named == modules - {"__init__", "__main__"}
