"""The daemon, end to end: a real `lutstore serve` subprocess over a real
RocksDB written through Store, spoken to with the generated stubs and
LutClient; plus the row LRU and the admin subcommands."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rocksdict import Options, Rdict

from lutstore.daemon.cache import ByteLRU
from lutstore.cli import main as cli_main
from lutstore.client import LutClient, LutError
from lutstore.formats.codec import Encoding, RowFormat, decode_rows
from lutstore.daemon.rows import CorruptRow, RowSource
from lutstore.storage.rocksdb import Store, row_key
from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

from conftest import REPO, start_server, write_table

FORMATS = [RowFormat(2, 3, 16, enc, z, block_size=8) for enc in Encoding for z in (False, True)]  # block: nf4 only


def _name(fmt: RowFormat) -> str:
    return f"t-{fmt.encoding.value}{'-zstd' if fmt.zstd else ''}"


def _stub(address: str) -> pb_grpc.LutStoreStub:
    return pb_grpc.LutStoreStub(grpc.insecure_channel(address))


def _rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if not isinstance(result, pb.TableInfo):
            list(result)
    return info.value


def _still_serving(stub: pb_grpc.LutStoreStub) -> None:
    assert stub.ListTables(pb.ListTablesRequest(), timeout=10).tables


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server over a DB holding a table of every encoding (with and without zstd)."""
    db = tmp_path_factory.mktemp("served") / "db"
    tables = {}
    for i, fmt in enumerate(FORMATS):
        meta, rows, values = write_table(db, _name(fmt), fmt, vocab_size=40, seed=i,
                                         artifacts={"config.json": b'{"x": 1}'})
        tables[_name(fmt)] = (meta, rows, values)
    server = start_server(db, "--max-batch-rows", "32", "--max-message-mb", "0.01")
    yield server, tables
    assert server.stop() == 0


def test_every_served_row_equals_the_stored_one(served) -> None:
    server, tables = served
    ids = [39, 0, 5, 5, 17, 0]
    with LutClient(server.address) as client:
        for name, (meta, rows, values) in tables.items():
            raw = client.get_raw(name, ids)
            assert raw == {t: values[t] for t in set(ids)}, name
            got = client.get_rows(name, ids)
            expected = decode_rows(meta.row_format(), [values[t] for t in ids])
            assert got.dtype == np.float32 and got.shape == (len(ids), 2, 3, 16)
            np.testing.assert_array_equal(got, expected, err_msg=name)
            all_rows = client.get_rows(name, np.arange(40)[::-1])  # more ids than max_batch_rows: split
            np.testing.assert_array_equal(all_rows, decode_rows(meta.row_format(), values[::-1]), err_msg=name)


def test_ascending_distinct_rows_in_small_messages(served) -> None:
    server, tables = served
    stub = _stub(server.address)
    name = _name(FORMATS[0])  # fp32: 388-byte stored rows
    values = tables[name][2]
    responses = list(stub.BatchGet(pb.BatchGetRequest(table=name, token_ids=[9, 3, 3, 31, 0, 9, 30, 1] * 4)))
    answered = [row.token_id for r in responses for row in r.rows]
    assert answered == [0, 1, 3, 9, 30, 31]
    assert all(row.data == values[row.token_id] for r in responses for row in r.rows)
    assert {r.version for r in responses} == {1}
    # 10 KiB message limit -> rows grouped in several messages, each well below it.
    responses = list(stub.BatchGet(pb.BatchGetRequest(table=name, token_ids=list(range(32)))))
    assert len(responses) > 1
    assert all(r.ByteSize() <= 0.6 * 0.01 * (1 << 20) for r in responses)
    assert [row.token_id for r in responses for row in r.rows] == list(range(32))


def test_bad_requests_get_clear_status_codes(served) -> None:
    server, _ = served
    stub = _stub(server.address)
    name = _name(FORMATS[2])

    e = _rpc_error(lambda: stub.BatchGet(pb.BatchGetRequest(table="nope", token_ids=[1])))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "nope" in e.details() and name in e.details()
    e = _rpc_error(lambda: stub.GetTableInfo(pb.GetTableInfoRequest(table="nope")))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    e = _rpc_error(lambda: stub.BatchGet(pb.BatchGetRequest(table=name, version=9, token_ids=[1])))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "latest is 1" in e.details()
    e = _rpc_error(lambda: stub.BatchGet(pb.BatchGetRequest(table=name, token_ids=[])))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in e.details()
    e = _rpc_error(lambda: stub.BatchGet(pb.BatchGetRequest(table=name, token_ids=[3, 40, 2])))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "token id 40" in e.details() and "vocab_size 40" in e.details()
    e = _rpc_error(lambda: stub.BatchGet(pb.BatchGetRequest(table=name, token_ids=list(range(33)))))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_batch_rows=32" in e.details()
    e = _rpc_error(lambda: stub.BatchGet(pb.BatchGetRequest(table="", token_ids=[1])))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    e = _rpc_error(lambda: stub.GetArtifact(pb.GetArtifactRequest(table=name, name="weights.bin")))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "config.json" in e.details()
    _still_serving(stub)
    assert stub.GetTableInfo(pb.GetTableInfoRequest(table=name)).max_batch_rows == 32

    with LutClient(server.address) as client:
        with pytest.raises(LutError) as err:
            client.get_rows(name, [0, 40])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "vocab_size 40" in str(err.value)
        with pytest.raises(LutError) as err:
            client.info("nope")
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(served) -> None:
    server, _ = served
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "lutstore.v1.LutStore"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    (resp,) = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in resp.list_services_response.service}
    assert {"lutstore.v1.LutStore", "grpc.health.v1.Health"} <= names
    (resp,) = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="lutstore.v1.LutStore")]))
    assert resp.file_descriptor_response.file_descriptor_proto


def test_artifact_round_trip_with_sha256(tmp_path: Path, any_db: Path | str, serve) -> None:
    blob = np.random.default_rng(1).bytes(50_000)  # several 5 KiB pieces under a 10 KiB message limit
    write_table(any_db, "m", vocab_size=8, artifacts={"backbone.safetensors": blob, "config.json": b"{}"})
    server = serve(any_db, "--max-message-mb", "0.01")
    with LutClient(server.address) as client:
        info = client.info("m")
        assert {a.name: a.sha256 for a in info.artifacts}["backbone.safetensors"] == hashlib.sha256(blob).hexdigest()
        dest = client.fetch_artifacts("m", tmp_path / "cache" / "m")
    assert (dest / "backbone.safetensors").read_bytes() == blob
    assert (dest / "config.json").read_bytes() == b"{}"
    assert sorted(p.name for p in dest.iterdir()) == ["backbone.safetensors", "config.json"]  # no temp files left


def test_corrupt_row_is_data_loss_and_verify_names_it(db_path: Path, serve, capsys) -> None:
    meta, _, values = write_table(db_path, "c", RowFormat(2, 2, 8, Encoding.INT8), vocab_size=16)
    bad = bytearray(values[5])
    bad[3] ^= 0xFF  # flip one payload byte: the CRC no longer matches
    db = Rdict(str(db_path), Options(raw_mode=True))
    db[row_key(meta.table_id, 5)] = bytes(bad)
    db.close()

    assert cli_main(["verify", "--db", str(db_path)]) == 1
    err = capsys.readouterr().err
    assert "BAD table 'c' v1 token 5" in err and "token 4" not in err

    server = serve(db_path)
    stub = _stub(server.address)
    e = _rpc_error(lambda: stub.BatchGet(pb.BatchGetRequest(table="c", token_ids=[4, 5, 6])))
    assert e.code() == grpc.StatusCode.DATA_LOSS and "row 5" in e.details() and "'c'" in e.details()
    rows = [row for r in stub.BatchGet(pb.BatchGetRequest(table="c", token_ids=[4, 6])) for row in r.rows]
    assert [(r.token_id, r.data) for r in rows] == [(4, values[4]), (6, values[6])]
    with LutClient(server.address) as client:
        with pytest.raises(LutError) as err:
            client.get_rows("c", [0, 5])
        assert err.value.code == grpc.StatusCode.DATA_LOSS
    _still_serving(stub)


def test_ingest_and_drop_while_serving(any_db: Path | str, serve) -> None:
    m1, _, v1 = write_table(any_db, "a", vocab_size=8, seed=1)
    server = serve(any_db, "--refresh-seconds", "0.2")
    stub = _stub(server.address)
    with LutClient(server.address) as client:
        # A new table is found at once (a miss triggers a refresh).
        _, _, vb = write_table(any_db, "b", vocab_size=8, seed=2)
        assert client.get_raw("b", [3]) == {3: vb[3]}
        # A new version: pinned to v2 it is found at once; "latest" follows at the next refresh.
        m2, _, v2 = write_table(any_db, "a", vocab_size=8, seed=3)
        assert client.get_raw("a", [1], version=2) == {1: v2[1]}
        deadline = time.monotonic() + 120   # a bound for a refresher that never catches up, not a speed
        while client.info("a").version != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.info("a").version == 2
        assert list(client.info("a").live_versions) == [1, 2]
        assert client.get_raw("a", [1], version=1) == {1: v1[1]}  # the old version keeps serving
        # Dropping v1 (as its own writer process) makes it FAILED_PRECONDITION, naming the latest.
        done = subprocess.run([sys.executable, "-m", "lutstore.cli", "drop", "a", "--version", "1", "--db",
                               str(any_db)], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "dropped a v1" in done.stdout
    deadline = time.monotonic() + 120  # servers see a drop at their next refresh (a bound that holds on a loaded box)
    while time.monotonic() < deadline and 1 in stub.GetTableInfo(pb.GetTableInfoRequest(table="a")).live_versions:
        time.sleep(0.1)
    e = _rpc_error(lambda: stub.BatchGet(pb.BatchGetRequest(table="a", version=1, token_ids=[1])))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "latest is 2" in e.details()
    _still_serving(stub)


def test_serve_missing_db_is_a_clear_error(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "lutstore.cli", "serve", "--db", str(tmp_path / "none"),
                           "--port", "0"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no lutstore database at" in lines[0] and "Traceback" not in done.stderr


def test_sigterm_stops_gracefully_with_exit_0(db_path: Path) -> None:
    write_table(db_path, "a", vocab_size=8)
    server = start_server(db_path)
    with LutClient(server.address) as client:
        assert client.get_rows("a", [1]).shape == (1, 2, 4, 16)
    assert server.stop() == 0
    assert any("stopping" in line for line in server.output)


def test_admin_info_and_verify(any_db: Path | str, capsys) -> None:
    import json

    write_table(any_db, "x", RowFormat(2, 2, 8, Encoding.FP16, zstd=True), vocab_size=8,
                artifacts={"config.json": b"{}"})
    write_table(any_db, "x", RowFormat(2, 2, 8, Encoding.FP16, zstd=True), vocab_size=8, seed=1)
    assert cli_main(["info", "--db", str(any_db), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [(t["name"], t["version"], t["zstd"], t["row_bytes"]) for t in listing["tables"]] == \
        [("x", 1, True, 64), ("x", 2, True, 64)]
    assert listing["tables"][0]["artifacts"][0]["name"] == "config.json"
    assert cli_main(["info", "--db", str(any_db)]) == 0
    out = capsys.readouterr().out
    assert "x v1" in out and "fp16+zstd" in out and "config.json" in out
    assert cli_main(["verify", "--db", str(any_db), "--table", "x", "--version", "2"]) == 0
    assert "8 rows in 1 table version(s) OK" in capsys.readouterr().out
    assert cli_main(["verify", "--db", str(any_db), "--table", "nope"]) == 2
    assert "no table named 'nope'" in capsys.readouterr().err
    assert cli_main(["drop", "x", "--version", "3", "--db", str(any_db)]) == 2
    assert "latest is 2" in capsys.readouterr().err


# ---- the row LRU and the row source ------------------------------------------


def test_lru_obeys_its_byte_budget_and_counts() -> None:
    cache = ByteLRU(100)
    for i in range(5):
        cache.put(i, bytes(30))
    s = cache.stats()
    assert s.bytes == 90 and s.entries == 3 and s.evictions == 2  # 0 and 1 went first
    assert cache.get(0) is None and cache.get(2) == bytes(30)
    cache.put(5, bytes(30))  # evicts 3: 2 was used more recently
    assert cache.get_many([2, 3, 4, 5]) == [bytes(30), None, bytes(30), bytes(30)]
    cache.put(6, bytes(101))  # larger than the whole budget: never kept
    assert cache.get(6) is None
    s = cache.stats()
    assert (s.hits, s.misses, s.bytes) == (4, 3, 90) and s.bytes <= s.budget_bytes
    assert cache.evict_where(lambda k: k in (2, 4)) == 2 and cache.stats().bytes == 30
    assert ByteLRU(0).get_many([1]) == [None]


def test_lru_under_threads_stays_within_budget() -> None:
    cache = ByteLRU(10_000)

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for k in rng.integers(0, 200, 2000):
            if cache.get(int(k)) is None:
                cache.put(int(k), bytes(int(k) + 1))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = cache.stats()
    assert s.bytes <= 10_000 and s.hits + s.misses == 8000 and s.hits > 0
    assert s.bytes == sum(len(cache.get(k) or b"") for k in range(200))


def test_row_source_caches_verified_rows_only(db_path: Path) -> None:
    meta, _, values = write_table(db_path, "r", vocab_size=8)
    db = Rdict(str(db_path), Options(raw_mode=True))
    db[row_key(meta.table_id, 7)] = values[7][:-1] + bytes([values[7][-1] ^ 1])  # bad checksum
    db.close()
    with Store.open(db_path, "secondary") as store:
        cache = ByteLRU(1 << 20)
        rows = RowSource(store, cache)
        assert rows.rows(meta, [1, 2]) == [values[1], values[2]]
        assert (cache.stats().hits, cache.stats().misses) == (0, 2)
        assert rows.rows(meta, [1, 2, 3]) == values[1:4]
        assert (cache.stats().hits, cache.stats().misses) == (2, 3)
        with pytest.raises(CorruptRow, match="row 7 of table 'r' v1"):
            rows.rows(meta, [6, 7])
        assert cache.get((meta.table_id, 7)) is None


def test_a_stored_name_that_is_not_utf8_is_left_out_of_list_tables(db_path, serve, monkeypatch) -> None:
    """Databases written before names were checked may hold a name with a lone surrogate (a folder
    name with a stray byte): ListTables leaves it out and says so, instead of failing for everyone."""
    import lutstore.storage.model as table_model

    write_table(db_path, "good", vocab_size=8)
    monkeypatch.setattr(table_model, "check_table_name", lambda name: None)   # the old, unchecked writer
    write_table(db_path, "bad\udcff", vocab_size=8)
    monkeypatch.undo()
    server = serve(db_path)
    with LutClient(server.address) as client:
        assert [t.name for t in client.tables()] == ["good"]
        assert client.get_rows("good", [1]).shape[0] == 1
    deadline = time.monotonic() + 5       # the log line is drained by a thread
    while "is left out of ListTables: its name is not valid UTF-8" not in "".join(server.output):
        assert time.monotonic() < deadline, "".join(server.output)
        time.sleep(0.05)


def test_sigterm_ends_idle_sessions_at_once_and_says_what_it_waits_for(db_path: Path) -> None:
    """An open BatchGetStream session that is not answering, or a health Watch, is no work in flight:
    SIGTERM ends it at once.
    A call still sending is drained, and the daemon says on stderr what it waits for."""
    fmt = RowFormat(2, 4, 256, Encoding.FP32)     # 8 KiB rows: a call of 200 rows stalls on an unread stream
    write_table(db_path, "a", fmt, vocab_size=200)
    server = start_server(db_path, "--max-message-mb", "0.05")
    with LutClient(server.address) as client:
        session = client.session("a")
        done = threading.Event()
        session.submit([1, 2], on_group=lambda *a: None, on_error=lambda e: done.set(), on_done=done.set)
        assert done.wait(10)          # answered: the session is open and idle
        with grpc.insecure_channel(server.address) as channel:   # and a health Watch, as a balancer keeps
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            started = time.monotonic()
            assert server.stop(timeout=60) == 0
            took = time.monotonic() - started
        session.close()
    # The drain's grace is 10 s; an idle session used to hold all of it. Stopping takes well under a
    # second; 8 s leaves room for a loaded machine and still tells the two apart.
    assert took < 8, (took, "".join(server.output))
    assert not any("waiting up to" in line for line in server.output), "".join(server.output)

    server = start_server(db_path, "--max-message-mb", "0.05")
    # No BDP probing: the stream's window stays at 64 KiB, so the unread answer holds the call open.
    with grpc.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        stub = pb_grpc.LutStoreStub(channel)
        call = stub.BatchGet(pb.BatchGetRequest(table="a", token_ids=list(range(200))), timeout=60)
        first = next(call)            # the rest waits in flow control until we read it
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not any("waiting up to" in line for line in server.output) and time.monotonic() < deadline:
            time.sleep(0.05)
        said = [line for line in server.output if "waiting up to" in line]
        assert said and "1 call(s) in flight" in said[0] and "(BatchGet: 1)" in said[0], "".join(server.output)
        rows = sum(len(m.rows) for m in [first, *call])   # reading it lets the drain finish
    assert rows == 200
    assert server.stop(timeout=30) == 0
