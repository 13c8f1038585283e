"""`@cached` keeps a handler's signature for type checkers (ParamSpec), sync or async."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from mypy import api

USER_APP = """
from fastapi import FastAPI

from cachegw import cached

app = FastAPI()


@app.get("/a/{x}")
@cached(ttl=60)
async def a(x: int, q: str | None = None) -> dict[str, object]:
    return {"x": x}


@app.get("/b")
@cached(ttl=60)
def b() -> dict[str, int]:
    return {"b": 1}


async def use() -> None:
    await a(1, q="z")
    await b()
    reveal_type(a)
"""

WRONG_CALL = (
    USER_APP
    + """

async def wrong() -> None:
    await a("not an int")
"""
)


@dataclass(frozen=True)
class Checked:
    """One mypy run over both user modules (a run costs most of a minute on a busy
    machine, whatever the number of files): its report, and each module's lines."""

    stdout: str
    status: int

    def lines(self, module: str) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.startswith(f"{module}.py:")]

    def errors(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if ": error:" in line]


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> Checked:
    root = tmp_path_factory.mktemp("typing")
    (root / "user_app.py").write_text(USER_APP)
    (root / "wrong_app.py").write_text(WRONG_CALL)
    stdout, _, status = api.run(
        [
            "--strict",
            "--no-incremental",
            "--cache-dir",
            str(root / ".mypy"),
            "--no-error-summary",
            "--show-absolute-path",
            str(root / "user_app.py"),
            str(root / "wrong_app.py"),
        ]
    )
    # Paths relative to the files' folder, so lines read "user_app.py:12: ...".
    return Checked(stdout.replace(f"{root}/", ""), status)


def test_decorated_handlers_type_check_strictly(checked: Checked) -> None:
    user = checked.lines("user_app")
    assert any('Revealed type is "def (x: int, q: str | None =)' in line for line in user), user
    assert not any("error" in line for line in user), user
    # The run's only errors are wrong_app's (none in cachegw's own modules).
    assert all(line.startswith("wrong_app.py:") for line in checked.errors()), checked.stdout


def test_wrong_arguments_are_caught(checked: Checked) -> None:
    assert checked.status == 1
    wrong = checked.errors()
    assert len(wrong) == 1, checked.stdout
    assert wrong[0].startswith("wrong_app.py:")
    assert 'incompatible type "str"; expected "int"' in wrong[0]
