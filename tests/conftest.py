"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis_process import RedisProcess

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
