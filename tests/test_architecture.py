"""The package's structure: which module may import which.

Every import counts, including those under ``TYPE_CHECKING`` and inside functions: a
cycle there is still two modules that cannot be read (or changed) one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

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
