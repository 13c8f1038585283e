"""cachegw: per-route response caching for FastAPI API gateways.

Two faces, one engine: the `cached` decorator for route handlers (on fastapi-cache2's
backend) and a caching reverse-proxy router (`Gateway`, `Service`, `create_app`).
"""

from cachegw._app import create_app
from cachegw._backends import MemoryBackend, RedisBackend
from cachegw._decorator import cached, purge
from cachegw._errors import CacheGWError, ConfigError
from cachegw._gateway import Gateway, Service
from cachegw._hits import CachedHits
from cachegw._policy import CachePolicy
from cachegw._version import __version__

__all__ = [
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
