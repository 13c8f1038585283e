"""The contract with fastapi-cache2's ``FastAPICache`` (`cachegw._fc2`, the one module that
reads its class attributes): each ``init`` setting is read back, and ``reset`` clears it.
A fastapi-cache2 release that renames or drops one fails here first."""

from collections.abc import Iterator

import pytest
from fastapi_cache import FastAPICache
from fastapi_cache.key_builder import default_key_builder

from cachegw import MemoryBackend, _fc2


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    FastAPICache.reset()
    yield
    FastAPICache.reset()


def test_settings_before_init() -> None:
    assert _fc2.backend() is None
    assert _fc2.enabled() is True
    assert _fc2.prefix() == "cachegw" and _fc2.prefix("") == ""
    assert _fc2.expire() is None
    assert _fc2.key_builder() is None
    assert _fc2.status_header() == "X-FastAPI-Cache"


def test_every_init_setting_is_read_back() -> None:
    def builder(*args: object, **kwargs: object) -> str:
        return "k"

    backend = MemoryBackend()  # defines __len__: empty, it is falsy (get_backend asserts)
    FastAPICache.init(
        backend, prefix="p", expire=42, key_builder=builder, cache_status_header="X-C", enable=False
    )
    assert _fc2.backend() is backend
    assert _fc2.prefix() == "p"
    assert _fc2.expire() == 42
    assert _fc2.key_builder() is builder
    assert _fc2.status_header() == "X-C"
    assert _fc2.enabled() is False


def test_init_defaults() -> None:
    FastAPICache.init(MemoryBackend())
    assert _fc2.prefix() == "cachegw"  # fastapi-cache2's default prefix is ""
    assert _fc2.key_builder() is default_key_builder
    assert _fc2.enabled() is True
