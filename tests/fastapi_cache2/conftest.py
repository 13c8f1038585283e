"""Runs fastapi-cache2's own decorator tests (vendored, see README.md) against
``cachegw.compat.cache``.

The example app they import is fastapi-cache2's, unchanged but for the import of
``cache``: this directory goes on ``sys.path`` so ``examples.in_memory.main`` resolves,
and the app is imported here once, ignoring FastAPI's deprecation of the
``@app.on_event("startup")`` it uses (that warning is about the example, not cachegw).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "\\s*on_event is deprecated", DeprecationWarning)
    import examples.in_memory.main  # noqa: F401
