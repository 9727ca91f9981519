"""Disk damage as disks do it: bytes changed, truncated or missing inside RocksDB's own files
(not values rewritten through the RocksDB API), so RocksDB's block checksums and file checks
fire. Each test damages a copy of one small database whose tables span many data blocks
(rows of 4,100 bytes: one row per 4 KiB block), then asks a real `lutstore serve`, `info`,
`verify` and `drop` what they make of it. Also: the reader's temp folder after a kill -9, and
serving a database the daemon can only read."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest
from test_metrics import metrics_port, scrape, value

import lutstore as lutstore_package   # (lutstore() below runs the CLI)
from lutstore.child_server import ChildServer
from lutstore.cli import main as cli_main
from lutstore.formats.codec import Encoding, RowFormat
from lutstore.storage.rocksdb import SECONDARY_PREFIX, Store
from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

from conftest import READY, REPO, start_server, write_table

FMT = RowFormat(2, 4, 256, Encoding.FP16)  # 4,096-byte payload + CRC: one row per 4 KiB data block
VOCAB = {"a": 64, "t": 256}
DAMAGED = [100, 101, 200]  # rows of "t" whose blocks get a flipped bit (100, 101: neighbouring blocks)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    db = tmp_path_factory.mktemp("damage") / "db"
    out = {}
    for seed, (name, vocab) in enumerate(VOCAB.items()):
        _, _, out[name] = write_table(db, name, FMT, vocab_size=vocab, seed=seed)
    return {"db": db, "values": out}


@pytest.fixture
def copy(base, tmp_path: Path) -> Path:
    db = tmp_path / "db"
    shutil.copytree(base["db"], db)
    return db


def flip_bit_in_row(db: Path, value: bytes) -> tuple[Path, int]:
    """Flip one bit inside the stored bytes of one row: the middle of a data block (rows are
    stored uncompressed), far from the file's index blocks and footer."""
    for sst in sorted(db.glob("*.sst")):
        data = bytearray(sst.read_bytes())
        at = data.find(value[1000:1100])
        if at >= 0:
            offset = at + 50
            assert 1024 <= offset < len(data) - 4096, "not in the middle of the file"
            data[offset] ^= 0x10
            sst.write_bytes(bytes(data))
            return sst, offset
    raise AssertionError("row bytes not found in any SST file")


def rows_sst(db: Path, value: bytes) -> Path:
    return next(p for p in db.glob("*.sst") if value[1000:1100] in p.read_bytes())


def batch_get(stub, table: str, ids: list[int], version: int = 0) -> list[tuple[int, bytes]]:
    return [(r.token_id, r.data) for m in stub.BatchGet(pb.BatchGetRequest(table=table, token_ids=ids, version=version),
                                                        timeout=20) for r in m.rows]


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def lutstore(*args: str, timeout: float = 60, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "lutstore.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


# ---- a flipped bit in a data block ------------------------------------------------------------

def test_flipped_bit_in_a_data_block_is_data_loss_for_that_row_and_the_rest_serves(base, copy, serve) -> None:
    values = base["values"]
    flip_bit_in_row(copy, values["t"][100])
    server = serve(copy, "--metrics-port", "0")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LutStoreStub(channel)
        for ids in ([100], [5, 100, 150], list(range(90, 110))):
            e = rpc_error(lambda: batch_get(stub, "t", ids))
            assert e.code() == grpc.StatusCode.DATA_LOSS, e
            # The table, version and exactly the damaged id; no file, offset or path.
            assert re.search(r"\brow 100 of table 't' v1\b", e.details()), e.details()
            assert not re.search(r"\b(5|150|99|101) of", e.details()), e.details()
            assert "/" not in e.details() and ".sst" not in e.details() and "offset" not in e.details(), e.details()
        # A layer-sliced BatchGet reads the same rows: the same status.
        e = rpc_error(lambda: list(stub.BatchGet(pb.BatchGetRequest(table="t", token_ids=[100], layer_ends=[1, 2]),
                                                 timeout=20)))
        assert e.code() == grpc.StatusCode.DATA_LOSS and "row 100" in e.details()
        # Every other row of the table, on both sides of the damaged block, and the other table.
        ok = [0, 5, 99, 101, 150, 255]
        assert batch_get(stub, "t", ok) == [(i, values["t"][i]) for i in ok]
        assert batch_get(stub, "t", list(range(101, 256))) == [(i, values["t"][i]) for i in range(101, 256)]
        assert batch_get(stub, "a", list(range(64))) == list(enumerate(values["a"]))
    samples = scrape(metrics_port(server))
    assert value(samples, "lutstore_corrupt_rows_total", table="t") == 4  # three calls + the sliced one
    assert value(samples, "lutstore_corrupt_rows_total", table="a") == 0
    log = "".join(server.output)
    assert ".sst" in log and "row 100" in log  # the file and offset go to the server's log


def test_verify_names_exactly_the_damaged_rows_and_goes_on_past_them(base, copy, capsys) -> None:
    for token in DAMAGED:
        flip_bit_in_row(copy, base["values"]["t"][token])
    assert cli_main(["verify", "--db", str(copy)]) == 1
    err = capsys.readouterr().err
    named = sorted(int(t) for t in re.findall(r"BAD table 't' v1 token (\d+):", err))
    assert named == DAMAGED, err
    assert "row missing" not in err and "BAD table 'a'" not in err
    assert "unreadable on disk" in err and ".sst" in err  # the operator is told which file

    assert cli_main(["verify", "--db", str(copy), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["bad_rows"] == len(DAMAGED) and report["rows"] == sum(VOCAB.values())
    by_table = {t["table"]: t for t in report["tables"]}
    assert [b["token"] for b in by_table["t"]["bad"]] == DAMAGED and by_table["a"]["bad"] == []
    assert all("unreadable on disk" in b["problem"] for b in by_table["t"]["bad"])

    assert cli_main(["verify", "--db", str(copy), "--table", "a", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_way_back_reingest_as_a_new_version_then_drop_the_damaged_one(base, copy, serve, capsys) -> None:
    flip_bit_in_row(copy, base["values"]["t"][100])
    _, _, fresh = write_table(copy, "t", FMT, vocab_size=VOCAB["t"], seed=7)  # v2, from the same source
    assert cli_main(["drop", "t", "--db", str(copy), "--version", "1"]) == 0
    captured = capsys.readouterr()
    assert "dropped t v1" in captured.out and "stay on disk" in captured.err
    assert cli_main(["verify", "--db", str(copy)]) == 0
    # Writing goes on: a later ingest and an ordinary drop (whose compaction must not read the damaged block).
    write_table(copy, "later", FMT, vocab_size=16, seed=8)
    assert cli_main(["drop", "later", "--db", str(copy), "--version", "1"]) == 0
    write_table(copy, "later", FMT, vocab_size=16, seed=9)
    assert cli_main(["verify", "--db", str(copy)]) == 0
    server = serve(copy)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LutStoreStub(channel)
        assert batch_get(stub, "t", [99, 100, 101]) == [(i, fresh[i]) for i in (99, 100, 101)]
        e = rpc_error(lambda: batch_get(stub, "t", [100], version=1))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION  # gone, as any dropped version


def test_flipped_bit_in_an_artifact_is_data_loss_without_a_path_and_verify_names_it(tmp_path: Path, serve,
                                                                                     capsys) -> None:
    blob = os.urandom(64 * 1024)  # incompressible: stored as is, one value of its own block
    # The blob first, so that config.json's small value is not in the blob's (damaged) block.
    write_table(tmp_path / "db", "x", FMT, vocab_size=8, artifacts={"blob": blob, "config.json": b"{}"})
    flip_bit_in_row(tmp_path / "db", blob[:4096])
    server = serve(tmp_path / "db")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LutStoreStub(channel)
        e = rpc_error(lambda: list(stub.GetArtifact(pb.GetArtifactRequest(table="x", name="blob"), timeout=20)))
        assert e.code() == grpc.StatusCode.DATA_LOSS and "'blob' of x v1 is damaged" in e.details(), e.details()
        assert "/" not in e.details() and ".sst" not in e.details()
        config = list(stub.GetArtifact(pb.GetArtifactRequest(table="x", name="config.json"), timeout=20))
        assert b"".join(c.data for c in config) == b"{}"
        assert len(batch_get(stub, "x", list(range(8)))) == 8
    assert cli_main(["verify", "--db", str(tmp_path / "db"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["bad_rows"] == 0 and report["bad_artifacts"] == 1
    assert [a["artifact"] for a in report["tables"][0]["bad_artifacts"]] == ["blob"]


# ---- damaged files: a one-line refusal -------------------------------------------------------

def _truncate_sst(db: Path, values) -> None:
    sst = rows_sst(db, values["t"][0])
    os.truncate(sst, sst.stat().st_size // 2)


def _delete_sst(db: Path, values) -> None:
    rows_sst(db, values["t"][0]).unlink()


def _damage_manifest(db: Path, values) -> None:
    manifest = next(db.glob("MANIFEST-*"))
    data = bytearray(manifest.read_bytes())
    data[len(data) // 2] ^= 0x40
    manifest.write_bytes(bytes(data))


def _damage_current(db: Path, values) -> None:
    (db / "CURRENT").write_bytes(b"MANIFEST-0000?9\n")


def _delete_current(db: Path, values) -> None:
    (db / "CURRENT").unlink()


def _damage_table_list(db: Path, values) -> None:
    """A flipped bit in the block that holds a table's manifest entry (its JSON)."""
    for sst in db.glob("*.sst"):
        data = bytearray(sst.read_bytes())
        at = data.find(b'"fingerprint"')
        if at >= 0:
            data[at + 3] ^= 0x01
            sst.write_bytes(bytes(data))
            return
    raise AssertionError("no manifest entry found in the SST files")


@pytest.mark.parametrize("damage", [_truncate_sst, _delete_sst, _damage_manifest, _damage_current, _delete_current,
                                    _damage_table_list],
                         ids=["truncated-sst", "deleted-sst", "damaged-manifest", "damaged-current", "missing-current",
                              "damaged-table-list"])
def test_a_damaged_file_set_is_a_one_line_refusal(base, copy, damage, capsys) -> None:
    """serve, info and verify refuse it in one line naming the database (a RocksDB secondary alone
    would silently show the last state in which every file was whole: for a lost SST, no tables)."""
    damage(copy, base["values"])
    if damage in (_truncate_sst, _delete_current):  # serve opens as info does: two of them as a subprocess
        served = lutstore("serve", "--db", str(copy), "--port", "0", timeout=60)
        lines = served.stderr.strip().splitlines()
        assert served.returncode == 2 and len(lines) == 1, served.stderr + served.stdout
        assert lines[0].startswith(f"lutstore serve: error: database {copy} is damaged: "), lines[0]
        assert "Disk damage and recovery" in lines[0] and "serving" not in served.stdout
    for command in (["info"], ["verify"], ["verify", "--json"]):
        assert cli_main([*command, "--db", str(copy)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"database {copy} is damaged" in err[0], err


@pytest.mark.parametrize("damage", [_damage_current, _delete_current], ids=["damaged-current", "missing-current"])
def test_way_back_for_current_name_the_manifest_again(base, copy, damage, capsys) -> None:
    damage(copy, base["values"])
    manifests = sorted(copy.glob("MANIFEST-*"))
    assert len(manifests) == 1
    (copy / "CURRENT").write_text(manifests[0].name + "\n")  # the documented fix
    assert cli_main(["verify", "--db", str(copy)]) == 0
    assert "2 table version(s) OK" in capsys.readouterr().out


# ---- the reader's temp folder after kill -9 ---------------------------------------------------

def _reader_folders(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"{SECONDARY_PREFIX}{pid}-*"))


def test_kill_9_leaves_a_folder_that_the_next_reader_removes_but_a_live_ones_stays(base, copy) -> None:
    killed = start_server(copy)
    alive = start_server(copy)
    try:
        assert len(_reader_folders(killed.pid)) == 1 and len(_reader_folders(alive.pid)) == 1
        killed.proc.send_signal(signal.SIGKILL)
        killed.proc.wait()
        assert len(_reader_folders(killed.pid)) == 1  # nobody closed it
        with Store.open(copy, "secondary") as store:  # any reader's open (serve, info, verify) cleans up
            assert [m.name for m in store.tables()] == ["a", "t"]
        assert _reader_folders(killed.pid) == []
        assert len(_reader_folders(alive.pid)) == 1
        with grpc.insecure_channel(alive.address) as channel:  # and the live daemon still serves
            stub = pb_grpc.LutStoreStub(channel)
            assert batch_get(stub, "a", [3]) == [(3, base["values"]["a"][3])]
        assert cli_main(["info", "--db", str(copy)]) == 0
    finally:
        alive.stop()
        killed.stop()
    assert _reader_folders(alive.pid) == []  # a clean stop removes its own


# ---- a database the daemon can only read -------------------------------------------------------

def _unprivileged_prefix(db: Path) -> tuple[str, ...]:
    """A command prefix that runs the daemon's Python able to read `db` but not to write in it (its
    files are root's and read-only): as uid 65534 where that uid can do everything the child does,
    else as root with every capability dropped (no CAP_DAC_OVERRIDE: the file modes apply, as to any
    user). Skips, saying why, where neither works.

    The probe is the child's start itself: this interpreter, the same working folder (the checkout)
    and environment, importing this checkout's lutstore. A checkout inside a folder other users
    cannot enter (`mktemp -d` makes one 0700) is out of uid 65534's reach, and that user may even
    import another lutstore installed elsewhere: neither is the code under test."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv is not installed")
    package = Path(lutstore_package.__file__).resolve().parent
    probe = ("import pathlib, lutstore.cli\n"
             f"if pathlib.Path(lutstore.__file__).resolve().parent != pathlib.Path({str(package)!r}):\n"
             "    raise SystemExit(f'imports another lutstore: {lutstore.__file__}')\n"
             f"d = pathlib.Path({str(db)!r}); (d / 'CURRENT').read_bytes()\n"
             "try: open(d / 'probe', 'w')\nexcept PermissionError: print('read-only')")
    why = []
    for who, prefix in (("uid 65534", (setpriv, "--reuid=65534", "--regid=65534", "--clear-groups")),
                        ("root without capabilities", (setpriv, "--bounding-set=-all", "--inh-caps=-all"))):
        try:
            run = subprocess.run([*prefix, sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                                 timeout=60)
        except OSError as e:
            why.append(f"{who}: {e}")
            continue
        if run.returncode == 0 and run.stdout.strip() == "read-only":
            return prefix
        said = (run.stderr.strip().splitlines() or [run.stdout.strip() or f"exit {run.returncode}"])[-1]
        why.append(f"{who}: {said if run.returncode else 'can write in the read-only folder'}")
    pytest.skip(f"cannot run this checkout's daemon as a user who can read but not write {db}: {'; '.join(why)}")


def _set_modes(root: Path, read_only: bool) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(0o555 if read_only else 0o755)
        else:
            path.chmod(0o444 if read_only else 0o644)


@pytest.fixture
def read_only_db(base):
    """A read-only copy of the database in a folder every user can reach (pytest's tmp is root's, 0700)."""
    outer = Path(tempfile.mkdtemp(prefix="lutstore-test-ro-"))
    outer.chmod(0o755)
    db = outer / "db"
    shutil.copytree(base["db"], db)
    _set_modes(db, read_only=True)
    yield db
    _set_modes(db, read_only=False)
    shutil.rmtree(outer)


def test_serve_info_verify_need_read_access_only(base, read_only_db) -> None:
    db = read_only_db
    prefix = _unprivileged_prefix(db)
    before = sorted(os.listdir(db))
    with ChildServer([*prefix, sys.executable, "-m", "lutstore.cli", "serve", "--db", str(db), "--port", "0",
                      "--workers", "4"], READY, cwd=REPO) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.ready.group(2)}") as channel:
            stub = pb_grpc.LutStoreStub(channel)
            assert batch_get(stub, "t", [0, 255]) == [(0, base["values"]["t"][0]), (255, base["values"]["t"][255])]
        assert server.stop(30, strict=True) == 0
    for command in ("info", "verify"):
        done = lutstore(command, "--db", str(db), prefix=prefix)
        assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(db)) == before
    print(f"ran as: {' '.join(prefix[1:])}")
