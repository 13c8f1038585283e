"""The public namespace: what `from cachegw import ...` offers, and that importing it is inert."""

from __future__ import annotations

import importlib
import subprocess
import sys

import cachegw

# Adding a name here is a public API decision; removing or renaming one breaks users.
PUBLIC_API = [
    "CacheGWError",
    "CachePolicy",
    "CachedHits",
    "ConfigError",
    "Gateway",
    "MemoryBackend",
    "RedisBackend",
    "Service",
    "__version__",
    "cached",
    "create_app",
    "purge",
]


def test_all_is_pinned_and_sorted() -> None:
    assert cachegw.__all__ == PUBLIC_API
    assert sorted(cachegw.__all__) == cachegw.__all__


def test_every_public_name_resolves() -> None:
    for name in cachegw.__all__:
        assert getattr(cachegw, name) is not None, name
        if name != "__version__":
            assert getattr(cachegw, name).__module__.startswith("cachegw"), name


def test_no_undeclared_public_names() -> None:
    exported = {
        name
        for name, value in vars(cachegw).items()
        if not name.startswith("_") and not isinstance(value, type(sys))  # submodules
    }
    assert exported <= set(PUBLIC_API)


def test_version() -> None:
    assert isinstance(cachegw.__version__, str)
    assert cachegw.__version__.count(".") >= 2


def test_exception_tree() -> None:
    assert issubclass(cachegw.ConfigError, cachegw.CacheGWError)
    assert issubclass(cachegw.ConfigError, ValueError)
    assert issubclass(cachegw.CacheGWError, Exception)


def test_private_modules_declare_all() -> None:
    for module in (
        "_policy",
        "_keys",
        "_entry",
        "_models",
        "_engine",
        "_decorator",
        "_errors",
        "_backends",
    ):
        mod = importlib.import_module(f"cachegw.{module}")
        assert isinstance(mod.__all__, list), module
        for name in mod.__all__:
            assert hasattr(mod, name), f"cachegw.{module}.{name}"


IMPORT_IS_INERT = """
import gc, logging, threading
import fastapi_cache
from fastapi_cache import FastAPICache
from fastapi_cache.types import Backend

before_threads = threading.active_count()
import cachegw

assert FastAPICache._init is False, "import called FastAPICache.init"
assert FastAPICache._backend is None, "import set a fastapi-cache2 backend"
backends = [o for o in gc.get_objects() if isinstance(o, Backend)]
assert backends == [], f"module-level backend instances: {backends!r}"
assert threading.active_count() == before_threads, "import started a thread"
assert logging.getLogger("cachegw").handlers == [], "import configured logging"
assert logging.getLogger().handlers == [], "import configured the root logger"
print("inert")
"""


def test_import_has_no_side_effects() -> None:
    # A fresh interpreter: this test process has long imported (and used) everything.
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_IS_INERT], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "inert"
