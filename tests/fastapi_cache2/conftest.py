"""Runs fastapi-cache2's own decorator tests (vendored, see README.md) against
``cachegw.compat.cache``.

The example app they import is fastapi-cache2's, unchanged but for the import of
``cache``: this directory goes on ``sys.path`` so ``examples.in_memory.main`` resolves,
and the app is imported here once, ignoring FastAPI's deprecation of the
``@app.on_event("startup")`` it uses (that warning is about the example, not cachegw).
``test_datetime`` runs aligned to wall-clock seconds (see `_SecondAlignedTime`).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "\\s*on_event is deprecated", DeprecationWarning)
    import examples.in_memory.main  # noqa: F401


class _SecondAlignedTime:
    """The ``time`` module as ``test_datetime`` sees it, with a ``sleep`` that ends just
    after a wall-clock second begins.

    ``test_datetime`` compares the second a response was made in with ``pendulum.now()``
    taken right after it: run across a second boundary it fails whatever the cache does
    (it is flaky upstream too). Starting the test, and ending its ``sleep(3)``, at the
    start of a second leaves the comparisons a whole second; the file stays unchanged.
    """

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(seconds)
        _to_next_second()


def _to_next_second() -> None:
    time.sleep(1.01 - time.time() % 1.0)


@pytest.fixture(autouse=True)
def _second_aligned(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.name == "test_datetime":
        monkeypatch.setattr(request.module, "time", _SecondAlignedTime())
        _to_next_second()
