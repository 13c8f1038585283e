"""Shared fixtures, and the ``redis`` marker.

Every test that runs against a Redis-compatible server is marked ``redis``, so
``pytest -m redis`` runs exactly those (``.ci/run`` runs them a second time on another
server version, chosen by ``CACHEGW_TEST_REDIS``: see tests/redis_process.py). A test
is marked when it uses one of the fixtures below, when one of its parameters names a
Redis backend, or by hand (``@pytest.mark.redis``) when it starts a server itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis_process import RedisProcess

#: Fixtures that start or hand out a Redis server (here and in the test modules).
REDIS_FIXTURES = frozenset(
    {"redis_proc", "redis_url", "redis_proc_private", "cluster", "cluster_url", "fleet", "faulty"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec is not None else ()
        if REDIS_FIXTURES.intersection(getattr(item, "fixturenames", ())) or any(
            isinstance(value, str) and "redis" in value for value in params
        ):
            item.add_marker(pytest.mark.redis)


# --- Redis: a real redis-server started by the suite (never fakeredis, never :6379) ---


@pytest.fixture(scope="session")
def redis_proc() -> Iterator[RedisProcess]:
    """One redis-server for the whole session. Do not stop it: use redis_proc_private."""
    with RedisProcess() as proc:
        yield proc


@pytest.fixture
def redis_url(redis_proc: RedisProcess) -> Iterator[str]:
    """URL of the session server, emptied before each test."""
    with redis_proc.client() as client:
        client.flushall()
    yield redis_proc.url


@pytest.fixture
def redis_proc_private() -> Iterator[RedisProcess]:
    """A dedicated redis-server for a test that stops, restarts or stalls it."""
    with RedisProcess() as proc:
        yield proc
