"""Cache backends: fastapi-cache2 ``Backend`` subclasses with cachegw's extra powers."""

from __future__ import annotations

from ._memory import MemoryBackend
from ._redis import RedisBackend

__all__ = ["MemoryBackend", "RedisBackend"]
