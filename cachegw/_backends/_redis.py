"""A Redis (or Redis Cluster) cache backend on redis-py's asyncio client."""

from __future__ import annotations

import asyncio
import inspect
import math
import re
from typing import Any, cast
from urllib.parse import parse_qs, unquote

import redis
from fastapi_cache.types import Backend
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from .._errors import ConfigError
from ._base import OP_TIMEOUT

__all__ = [
    "CLUSTER_REDIS_PY",
    "SENTINEL_REDIS_PY",
    "RedisBackend",
    "close_redis",
    "require_redis_py",
]

_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")
_CLEAR_BATCH = 1000


#: The redis-py release Redis Cluster needs: its asyncio cluster client has pub/sub from
#: 8.0 on, which wakes waiters and drops stale in-process copies across the fleet.
CLUSTER_REDIS_PY = (8, 0)
#: The redis-py release Sentinel was verified on: with redis-py 4.6 a gateway kept reading
#: entries from a demoted master after a graceful failover (tests/test_sentinel.py).
SENTINEL_REDIS_PY = (8, 0)


def require_redis_py(needed: tuple[int, int], feature: str, installed: str | None = None) -> None:
    """Raise ConfigError when the installed redis-py (or ``installed``) is older than
    ``needed`` for ``feature``; everything else works from redis-py 4.6 on."""
    version = installed or redis.__version__
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return  # a development build: assume it is recent
    if found < needed:
        wanted = ".".join(map(str, needed))
        raise ConfigError(
            f"{feature} needs redis-py {wanted} or later, but redis-py {version} is installed; "
            f"upgrade it with: pip install 'redis>={wanted}'"
        )


def _no_client_setinfo() -> dict[str, Any]:
    """Client options that skip CLIENT SETINFO on each new connection, in the spelling of
    the installed redis-py (``driver_info`` from 7, ``lib_name`` from 5; 4.x sends none)."""
    params = inspect.signature(AbstractConnection.__init__).parameters
    if "driver_info" in params:
        return {"driver_info": None}
    if "lib_name" in params:
        return {"lib_name": None, "lib_version": None}
    return {}


def _no_maint_notifications() -> dict[str, Any]:
    """Client options that skip redis-py 8's maintenance-notifications handshake (``CLIENT
    MAINT_NOTIFICATIONS`` on each new RESP3 connection, for Redis Enterprise and Redis
    Cloud's maintenance events). It is one more round trip per connection, and on Redis 6.2
    the ACL user docs/backends.md recommends may not run ``CLIENT`` at all (every one of its
    subcommands is ``@dangerous`` there), so each connection added a denial to the ACL log.
    redis-py before 8 has no such handshake."""
    try:
        from redis.maint_notifications import MaintNotificationsConfig
    except ImportError:
        return {}
    return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}


async def close_redis(closable: Any) -> None:
    """Close a redis-py asyncio client or pub/sub: ``aclose`` from redis-py 5.0.1 on,
    ``close`` before (redis 4.x, what fastapi-cache2[redis] installs)."""
    aclose = getattr(closable, "aclose", None)
    if aclose is not None:
        await aclose()
    elif isinstance(closable, Redis):
        # 4.x leaves a from_url client's pool open unless told to close it.
        await closable.close(close_connection_pool=True)
    else:
        await closable.close()


def _positive(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{what} must be a number of seconds > 0, got {value!r}")
    return float(value)


class RedisBackend(Backend):
    """A cache backend on Redis or Redis Cluster, shared by every gateway process.

    Usage::

        from fastapi_cache import FastAPICache
        from cachegw import RedisBackend

        backend = RedisBackend.from_url("redis://127.0.0.1:6379/0")
        FastAPICache.init(backend)
        ...
        await backend.aclose()

    Every key it writes has a TTL (``default_ttl`` when the caller gives none),
    values are bytes in and bytes out (nothing is pickled), and ``clear`` walks
    the keyspace with ``SCAN``, never ``KEYS``. Errors propagate: the engine
    catches them and fails open, so a client built by :meth:`from_url` bounds
    every operation by ``op_timeout`` instead of retrying.

    Parameters:
        client: a ``redis.asyncio.Redis`` or ``RedisCluster`` (``decode_responses``
            must be off). Its timeouts and retries are the caller's business:
            note that ``Redis(host=..., ...)`` retries 10 times with backoff by
            default (seconds against a stalled or stopped server) unless given
            ``retry=Retry(NoBackoff(), 0)``; :meth:`from_url` does that for you.
        default_ttl: seconds a key lives when ``set`` is given no ``expire``.
        op_timeout: the per-operation bound :meth:`from_url` configured (informative
            here; the engine may use it for its own deadline).
    """

    #: Operations do network I/O: the engine awaits them under its own deadline.
    inline = False
    #: Whether the client itself bounds every operation by ``op_timeout`` (see from_url).
    bounded = False

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        default_ttl: float = 3600,
        op_timeout: float = OP_TIMEOUT,
    ) -> None:
        self._pending: list[tuple[str, asyncio.Future[bytes | None]]] = []
        self._batches: set[asyncio.Task[None]] = set()
        self.client = client
        self.default_ttl = _positive(default_ttl, "default_ttl")
        self.op_timeout = _positive(op_timeout, "op_timeout")

    def __repr__(self) -> str:
        return f"RedisBackend({self.client!r}, default_ttl={self.default_ttl})"

    def node_of(self, key: str) -> str | None:
        """The cluster node (``host:port``) holding ``key``'s slot, if known: the engine
        keeps a circuit breaker per node (None on a single Redis, or before the slot map
        is loaded)."""
        client = self.client
        if not isinstance(client, RedisCluster):
            return None
        if not client.nodes_manager.slots_cache:
            return None  # not loaded yet
        try:
            node = client.get_node_from_key(key)
        except Exception:
            node = None
        # A slot no node serves (its master failed, no replica took over) is a "node" of
        # its own: its keys fail fast once its breaker opens, the others keep serving.
        return "unassigned" if node is None else str(node.name)

    @property
    def shared_client(self) -> Redis | RedisCluster:
        """Every process on this Redis shares purges, fetch locks and landing messages."""
        return self.client

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        op_timeout: float = OP_TIMEOUT,
        default_ttl: float = 3600,
        **client_kwargs: Any,
    ) -> RedisBackend:
        """Build a backend from ``redis://``, ``rediss://``, ``unix://``,
        ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` for TLS: any of
        the seed nodes may be down at start) or
        ``redis+sentinel://[[user]:password@]host:port[,host:port...]/master[/db]``
        (``rediss+sentinel://`` for TLS; ``?sentinel_password=...`` when the sentinels have
        a password of their own).

        Every operation is bounded by ``op_timeout`` seconds: connect and socket
        timeouts are set to it and retries are off. redis-py 8 retries failed
        commands by default, which would multiply a stalled server's cost;
        a cache must fail open fast instead. ``client_kwargs`` override these.
        """
        op_timeout = _positive(op_timeout, "op_timeout")
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        options: dict[str, Any] = {
            "socket_timeout": op_timeout,
            "socket_connect_timeout": op_timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
            # No CLIENT SETINFO round trips on every new connection: under a burst of
            # new connections they doubled the time to the first answer (measured: a
            # first burst of 100 GETs, p50 70 ms with them, 35 ms without).
            **_no_client_setinfo(),
            **_no_maint_notifications(),
            **client_kwargs,
        }
        client: Redis | RedisCluster
        # Connections are opened as concurrency needs them, up to a bound well above
        # what one process's event loop keeps in flight (redis-py's default pool raises
        # past 100, and so does each node of a cluster client; its blocking pool wakes
        # every waiter on each release).
        options.setdefault("max_connections", 1024)
        if sep and scheme in ("redis", "rediss", "unix"):
            client = Redis.from_url(url, **options)
        elif sep and scheme in ("redis+cluster", "rediss+cluster"):
            client = _cluster(scheme.removesuffix("+cluster"), rest, options)
        elif sep and scheme in ("redis+sentinel", "rediss+sentinel"):
            client = _sentinel(scheme == "rediss+sentinel", rest, options, op_timeout)
        else:
            raise ConfigError(
                "Redis URL must start with redis://, rediss://, unix://, redis+cluster://, "
                f"rediss+cluster://, redis+sentinel:// or rediss+sentinel://, got {url!r}"
            )
        backend = cls(client, default_ttl=default_ttl, op_timeout=op_timeout)
        # Socket timeouts of op_timeout and no retries bound every operation already: the
        # store need not add a deadline of its own (it costs a timer per operation).
        backend.bounded = not client_kwargs
        return backend

    async def get(self, key: str) -> bytes | None:
        # bytes, not str: the client must not decode responses (documented above).
        if not isinstance(self.client, Redis):
            return cast("bytes | None", await self.client.get(key))
        # GETs asked for in the same turn of the event loop go out as one MGET: one command
        # to pack, send and parse for many requests (hot keys under load), the same answers.
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes | None] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((key, future))
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._mget(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _mget(self, batch: list[tuple[str, asyncio.Future[bytes | None]]]) -> None:
        try:
            if len(batch) == 1:
                values = [await self.client.get(batch[0][0])]
            else:
                values = await self.client.mget([key for key, _ in batch])
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), value in zip(batch, values, strict=True):
            if not future.done():
                future.set_result(cast("bytes | None", value))

    async def get_with_ttl(self, key: str) -> tuple[int, bytes | None]:
        """Return ``(seconds left, rounded up, value)``; ``-1`` for a key without a TTL,
        ``(0, None)`` on a miss."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.pttl(key)
            pipe.get(key)
            pttl, value = await pipe.execute()
        if value is None:
            return 0, None
        if pttl == -1:
            return -1, value
        return math.ceil(max(pttl, 0) / 1000), value

    async def set(self, key: str, value: bytes, expire: float | None = None) -> None:
        """Store ``value`` for ``expire`` seconds (``default_ttl`` when ``None``);
        ``expire <= 0`` deletes the key instead."""
        if expire is None:
            expire = self.default_ttl
        elif expire <= 0:
            await self.client.unlink(key)
            return
        await self.client.set(key, value, px=max(1, round(expire * 1000)))

    async def delete(self, key: str) -> bool:
        return bool(await self.client.unlink(key))

    async def clear(self, namespace: str | None = None, key: str | None = None) -> int:
        """Delete ``key``, or else every key starting with ``namespace``; return how many.

        ``key`` wins when both are given (``FastAPICache.clear(key=...)`` passes its
        prefix as ``namespace`` too); it also takes the entries stored under
        ``{key}:...`` (the `cachegw.compat` entries of a key builder's key, with their
        locks). ``namespace=""`` matches every key in the database. Uses ``SCAN`` (on
        every primary of a cluster) and batched ``UNLINK``, so Redis is never blocked by
        a large keyspace.
        """
        client = self.client
        removed = 0
        if key is not None:
            removed = int(await client.unlink(key))
            namespace = f"{key}:"
        elif namespace is None:
            return 0
        pattern = _GLOB_SPECIALS.sub(r"\\\1", namespace) + "*"
        batch: list[bytes] = []
        async for found in client.scan_iter(match=pattern, count=_CLEAR_BATCH):
            batch.append(found)
            if len(batch) >= _CLEAR_BATCH:
                removed += int(await client.unlink(*batch))
                batch.clear()
        if batch:
            removed += int(await client.unlink(*batch))
        return removed

    async def warm(self, connections: int = 8) -> None:
        """Open ``connections`` pooled connections now (per primary on a cluster, after
        loading its slot map), so the first burst of requests does not pay for
        connecting. Best effort: errors are ignored (fail open)."""
        client = self.client
        try:
            if isinstance(client, RedisCluster):
                await client.initialize()
                await asyncio.gather(
                    *(_warm_node(node, connections) for node in client.get_primaries())
                )
            else:
                await _warm_pool(client.connection_pool, connections)
        except Exception:  # noqa: S110 - Redis not up yet: the cache fails open anyway
            pass

    async def aclose(self) -> None:
        """Close the client and its connections (and the sentinels' clients)."""
        await close_redis(self.client)
        manager = getattr(getattr(self.client, "connection_pool", None), "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            await close_redis(sentinel)


def _hosts(text: str, what: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` (``[v6]:port`` too) as pairs; ConfigError saying which."""
    found = []
    for item in text.split(","):
        host, colon, port = item.strip().rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"{what} must be a comma-separated list of host:port, got {item.strip()!r}"
            )
        found.append((host, int(port)))
    return found


def _credentials(userinfo: str) -> dict[str, Any]:
    user, colon, password = userinfo.partition(":")
    found: dict[str, Any] = {}
    if colon:
        found["password"] = unquote(password)
        if user:
            found["username"] = unquote(user)
    elif user:
        found["password"] = unquote(user)  # redis://secret@host: Redis's own form
    return found


def _cluster(plain: str, rest: str, options: dict[str, Any]) -> RedisCluster:
    """A cluster client on one or several seed nodes: redis-py tries them in turn, so the
    client starts while some of them are down."""
    netloc, _, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    seeds = _hosts(hosts, "redis+cluster:// nodes") if "," in hosts else None
    require_redis_py(CLUSTER_REDIS_PY, "Redis Cluster (redis+cluster://)")
    if seeds is None:
        return RedisCluster.from_url(f"{plain}://{rest}", **options)
    query = parse_qs(tail.partition("?")[2])
    extra: dict[str, Any] = _credentials(userinfo) if at else {}
    if plain == "rediss" or query.get("ssl") == ["true"]:
        extra["ssl"] = True
    nodes = [ClusterNode(host, port) for host, port in seeds]
    return RedisCluster(startup_nodes=nodes, **extra, **options)


def check_url(url: str) -> None:
    """Raise ConfigError when a ``redis+sentinel://`` URL or a ``redis+cluster://`` list of
    seed nodes is malformed (without connecting); other URLs are left to redis-py."""
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme.endswith("+sentinel"):
        _sentinel_parts(rest)
    elif scheme.endswith("+cluster"):
        _hosts(rest.partition("/")[0].rpartition("@")[2], "redis+cluster:// nodes")


def _sentinel_parts(
    rest: str,
) -> tuple[str, int | None, list[tuple[str, int]], dict[str, Any], dict[str, list[str]]]:
    """master name, db, sentinels, master credentials, query of a sentinel URL's rest."""
    body, _, query_text = rest.partition("?")
    netloc, _, path = body.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    master, _, db = path.strip("/").partition("/")
    if not master:
        raise ConfigError(
            "a redis+sentinel:// URL must name the master after the sentinels: "
            "redis+sentinel://host:port,host:port/mymaster[/db]"
        )
    if db and not db.isdigit():
        raise ConfigError(f"the database in a redis+sentinel:// URL must be a number, got {db!r}")
    query = parse_qs(query_text)
    unknown = set(query) - {"sentinel_password", "sentinel_username"}
    if unknown:
        raise ConfigError(
            f"redis+sentinel:// URL: unknown option(s) {', '.join(sorted(unknown))}; "
            "known: sentinel_password, sentinel_username"
        )
    sentinels = _hosts(hosts, "redis+sentinel:// sentinels")
    credentials = _credentials(userinfo) if at else {}
    return master, int(db) if db else None, sentinels, credentials, query


def _sentinel(tls: bool, rest: str, options: dict[str, Any], op_timeout: float) -> Redis:
    """The master a set of sentinels names, followed across failovers: every new
    connection asks the sentinels where the master is (redis-py's `SentinelConnectionPool`),
    and a connection to a demoted master is dropped."""
    master, db, sentinels, credentials, query = _sentinel_parts(rest)
    require_redis_py(SENTINEL_REDIS_PY, "Redis Sentinel (redis+sentinel://)")
    master_options: dict[str, Any] = {**options, **credentials}
    if db is not None:
        master_options["db"] = db
    sentinel_options: dict[str, Any] = {
        "socket_timeout": op_timeout,
        "socket_connect_timeout": op_timeout,
        "retry": Retry(NoBackoff(), 0),
        **_no_client_setinfo(),
    }
    if "sentinel_password" in query:
        sentinel_options["password"] = query["sentinel_password"][0]
    if "sentinel_username" in query:
        sentinel_options["username"] = query["sentinel_username"][0]
    if tls:
        master_options["ssl"] = sentinel_options["ssl"] = True
    max_connections = master_options.pop("max_connections", None)
    sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_options, **master_options)
    pool_options = {} if max_connections is None else {"max_connections": max_connections}
    return cast("Redis", sentinel.master_for(master, **pool_options))


async def _warm_pool(pool: Any, connections: int) -> None:
    opened = []
    try:
        for _ in range(connections):
            opened.append(await pool.get_connection())
    finally:
        for connection in opened:
            await pool.release(connection)


async def _warm_node(node: Any, connections: int) -> None:
    """Connect ``connections`` of a cluster node's pooled connections."""
    opened = []
    try:
        for _ in range(connections):
            connection = node.acquire_connection()
            opened.append(connection)
            try:
                await connection.connect()
            except BaseException:
                await connection.disconnect()  # not half-open back into the pool
                raise
    finally:
        for connection in opened:
            node.release(connection)
