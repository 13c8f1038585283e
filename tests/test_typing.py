"""`@cached` keeps a handler's signature for type checkers (ParamSpec), sync or async."""

from __future__ import annotations

from pathlib import Path

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


def check(tmp_path: Path, source: str) -> tuple[str, int]:
    path = tmp_path / "user_app.py"
    path.write_text(source)
    stdout, _, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / ".mypy"), str(path)]
    )
    return stdout, status


def test_decorated_handlers_type_check_strictly(tmp_path: Path) -> None:
    stdout, status = check(tmp_path, USER_APP)
    assert 'Revealed type is "def (x: int, q: str | None =)' in stdout
    assert "error" not in stdout, stdout
    assert status == 0, stdout


def test_wrong_arguments_are_caught(tmp_path: Path) -> None:
    stdout, status = check(tmp_path, WRONG_CALL)
    assert status == 1
    assert 'incompatible type "str"; expected "int"' in stdout
