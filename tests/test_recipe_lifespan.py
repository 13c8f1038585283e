"""The test-isolation recipe of docs/migration.md, as a user writes it: ``FastAPICache.init``
in the app's lifespan (with ``reset()`` on the way out), and tests that each start the app.

Each test expects a MISS first: without the ``reset()`` the second test's ``init`` would be
ignored (fastapi-cache2's ``init`` only acts once) and it would see the first test's entry.
This module is also shown in the docs (tests/test_docs.py checks they agree).
"""

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.testclient import TestClient
from fastapi_cache import FastAPICache

from cachegw import MemoryBackend, cached


@asynccontextmanager
async def lifespan(app: FastAPI):
    FastAPICache.init(MemoryBackend(max_entries=10_000, max_bytes="64MiB"))
    yield
    FastAPICache.reset()


app = FastAPI(lifespan=lifespan)


@app.get("/items/{item_id}")
@cached(ttl=60)
async def get_item(item_id: int) -> dict[str, int]:
    return {"id": item_id}


def test_first_request_is_a_miss_then_a_hit():
    with TestClient(app) as client:
        assert client.get("/items/1").headers["X-Cache-Status"] == "MISS"
        assert client.get("/items/1").headers["X-Cache-Status"] == "HIT"


def test_each_test_starts_with_an_empty_cache():
    with TestClient(app) as client:
        assert client.get("/items/1").headers["X-Cache-Status"] == "MISS"
