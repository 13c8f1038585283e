"""Start a real Redis Sentinel setup for the test suite: a master, a replica and three
sentinels (``redis-server sentinel.conf --sentinel``), on free loopback ports.

The server binary is the one `redis_process` chooses (``CACHEGW_TEST_REDIS``): Redis 6.2,
7 and Valkey all run as a sentinel with ``--sentinel``. Nothing is kept on disk beyond
temporary directories, removed on `close`.

    with SentinelSetup() as setup:
        backend = RedisBackend.from_url(setup.url)  # redis+sentinel://...,.../mymaster
        setup.failover()                            # SENTINEL FAILOVER, waits for it
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.redis_process import RedisProcess, free_port, redis_server_binary

__all__ = ["SentinelSetup"]

MASTER = "mymaster"
START_TIMEOUT = 15.0


class SentinelSetup:
    """Master + replica + three sentinels (quorum 2, down after 1 s)."""

    def __init__(self, *server_args: str) -> None:
        self.master = RedisProcess(*server_args)
        self.replica: RedisProcess | None = None
        self.server_args = server_args
        self.sentinel_ports: list[int] = []
        self._sentinels: list[subprocess.Popen[bytes]] = []
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER}"

    def servers(self) -> list[RedisProcess]:
        return [self.master, *([self.replica] if self.replica else [])]

    def sentinel(self, index: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.sentinel_ports[index], socket_timeout=5)

    def master_port(self) -> int:
        with self.sentinel() as client:
            _, port = client.sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def start(self) -> SentinelSetup:
        self._tmpdir = tempfile.TemporaryDirectory(prefix="cachegw-sentinel-")
        try:
            self.master.start()
            with self.master.client() as client:
                # Redis 7+ syncs replicas diskless after a 5 s delay by default.
                client.config_set("repl-diskless-sync-delay", 0)
            self.replica = RedisProcess(
                *self.server_args, "--replicaof", "127.0.0.1", str(self.master.port)
            ).start()
            self._wait(self._replica_in_sync, "the replica to sync")
            with self.replica.client() as client:
                client.config_set("repl-diskless-sync-delay", 0)  # once it is the master
            for n in range(3):
                port = free_port()
                conf = Path(self._tmpdir.name) / f"sentinel-{n}.conf"
                conf.write_text(
                    f"port {port}\n"
                    "bind 127.0.0.1\n"
                    f"dir {self._tmpdir.name}\n"
                    f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 2\n"
                    f"sentinel down-after-milliseconds {MASTER} 1000\n"
                    f"sentinel failover-timeout {MASTER} 5000\n"
                    f"sentinel parallel-syncs {MASTER} 1\n"
                )
                log = open(Path(self._tmpdir.name) / f"sentinel-{n}.log", "ab")  # noqa: SIM115
                with log:
                    self._sentinels.append(
                        subprocess.Popen(
                            [redis_server_binary(), str(conf), "--sentinel"],
                            stdout=log,
                            stderr=subprocess.STDOUT,
                        )
                    )
                self.sentinel_ports.append(port)
            self._wait(
                self._sentinels_ready, "the sentinels to see the master, the replica and each other"
            )
        except BaseException:
            logs = self.logs()
            self.close()
            raise RuntimeError(f"Sentinel setup failed to start. Logs:\n{logs}") from None
        return self

    def _wait(self, ready: object, what: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.RedisError, OSError):
                if ready():  # type: ignore[operator]
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def _replica_in_sync(self) -> bool:
        assert self.replica is not None
        with self.replica.client() as client:
            info = client.info("replication")
        return info.get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        for index in range(len(self.sentinel_ports)):
            with self.sentinel(index) as client:
                master = client.sentinel_master(MASTER)
                replicas = client.sentinel_slaves(MASTER)
            if int(master.get("num-other-sentinels", 0)) < 2:
                return False
            if not any(r.get("is_slave") and not r.get("is_sdown") for r in replicas):
                return False
        return True

    def failover(self, timeout: float = START_TIMEOUT) -> int:
        """``SENTINEL FAILOVER`` (the replica becomes master, the master a replica, with no
        agreement needed); returns once every sentinel names the new master and it accepts
        writes. The new master's port."""
        old = self.master_port()
        with self.sentinel() as client:
            client.execute_command("SENTINEL", "FAILOVER", MASTER)
        new = self.wait_for_new_master(old, timeout)

        def demoted() -> bool:
            # Sentinel turns the old master into a replica and closes its clients
            # (CLIENT KILL TYPE normal): from then on every client talks to the new one.
            with redis.Redis(host="127.0.0.1", port=old, socket_timeout=5) as client:
                info = client.info("replication")
            return bool(info["role"] == "slave")

        self._wait(demoted, "the old master to follow the new one", timeout)
        return new

    def wait_for_new_master(self, old: int, timeout: float = START_TIMEOUT) -> int:
        def moved() -> bool:
            ports = set()
            for index in range(len(self.sentinel_ports)):
                with self.sentinel(index) as client:
                    ports.add(int(client.sentinel_get_master_addr_by_name(MASTER)[1]))
            if len(ports) != 1 or old in ports:
                return False
            with redis.Redis(host="127.0.0.1", port=ports.pop(), socket_timeout=5) as new:
                return bool(new.info("replication")["role"] == "master")

        self._wait(moved, "the failover", timeout)
        return self.master_port()

    def logs(self) -> str:
        if self._tmpdir is None:
            return ""
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(Path(self._tmpdir.name).glob("*.log"))
        )

    def close(self) -> None:
        for proc in self._sentinels:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._sentinels.clear()
        for server in self.servers():
            server.close()
        if self._tmpdir is not None:
            with contextlib.suppress(OSError):
                self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> SentinelSetup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
