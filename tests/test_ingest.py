"""`lutstore ingest` end to end: real CLI subprocesses, a real `lutstore serve`,
every served row checked against the independent reference LUT of ckpt_factory.

Error bounds, per value, with m = max|ref| of its (token, layer, expert) vector:
  fp32 from a rep checkpoint      |got - ref| <= 1e-6 * m        (a copy: exact)
  fp32 from a train checkpoint    |got - ref| <= 4e-6 * m        (fp32 compute vs float64 reference)
  fp16                            <= 2^-11 |ref| + 2^-24 + 2*C   (codec.py bound + compute error C)
  bf16                            <= 2^-8 |ref| + 2*C
  int8                            <= (0.5/127 + 1e-6) * m + 2*C   (1e-6: fp32 rounding of x/scale at ties)
where C = 4e-6 * m for train checkpoints and 0 for rep checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from ckpt_factory import load_tensors, make_checkpoint, reference_lut
from conftest import REPO, start_server
from safetensors.torch import load as load_safetensors

from lutstore.formats import nf4
from lutstore.formats.codec import check, decode_rows
from lutstore.storage.rocksdb import Store
from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

# ---- helpers ------------------------------------------------------------------

def lutstore_cli(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    # a bound for an ingest that hangs, not a speed: with both cores busy the int8 + zstd one took over 180 s
    return subprocess.run([sys.executable, "-m", "lutstore.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def ingest(ckpt: Path, db: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return lutstore_cli("ingest", str(ckpt), "--db", str(db), "--no-progress", *flags, env=env)


def ingest_ok(ckpt: Path, db: Path, *flags: str) -> str:
    r = ingest(ckpt, db, *flags)
    assert r.returncode == 0, r.stderr
    return r.stdout


def table_list(db: Path) -> list[tuple]:
    """Every live (name, version, table id, fingerprint), read straight from the DB."""
    if not (db / "CURRENT").exists():
        return []
    with Store.open(db, "secondary") as store:
        return [(m.name, m.version, m.table_id, m.fingerprint) for m in store.tables()]


def verify_all_rows(db: Path) -> int:
    """Every stored row of every live table passes its checksum, and each table has vocab_size rows."""
    with Store.open(db, "secondary") as store:
        total = 0
        for meta in store.tables():
            ids = []
            for token, value in store.iter_rows(meta):
                check(value)
                ids.append(token)
            assert ids == list(range(meta.vocab_size)), f"{meta.name} v{meta.version} rows incomplete"
            total += len(ids)
    r = lutstore_cli("verify", "--db", str(db))
    assert r.returncode == 0, r.stderr
    return total


class Rpc:
    """Plain generated-stub calls, so these tests depend on nothing but the wire contract."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pb_grpc.LutStoreStub(self.channel)

    def info(self, table: str, version: int = 0) -> pb.TableInfo:
        return self.stub.GetTableInfo(pb.GetTableInfoRequest(table=table, version=version), timeout=10)

    def rows(self, table: str, ids: list[int], version: int = 0) -> np.ndarray:
        info = self.info(table, version)
        from lutstore.formats.codec import Encoding, RowFormat
        enc = {pb.ENCODING_FP32: "fp32", pb.ENCODING_FP16: "fp16", pb.ENCODING_BF16: "bf16", pb.ENCODING_INT8: "int8",
               pb.ENCODING_NF4: "nf4"}
        fmt = RowFormat(info.num_layers, info.num_experts, info.hidden_size, Encoding(enc[info.encoding]),
                        info.compression == pb.COMPRESSION_ZSTD, info.block_size)
        got: dict[int, bytes] = {}
        for start in range(0, len(ids), 1024):
            req = pb.BatchGetRequest(table=table, version=info.version, token_ids=ids[start:start + 1024])
            for msg in self.stub.BatchGet(req, timeout=30):
                assert msg.version == info.version
                got.update({r.token_id: r.data for r in msg.rows})
        return decode_rows(fmt, [got[t] for t in ids])

    def artifact(self, table: str, name: str, version: int = 0) -> bytes:
        parts = self.stub.GetArtifact(pb.GetArtifactRequest(table=table, version=version, name=name), timeout=30)
        return b"".join(p.data for p in parts)

    def close(self) -> None:
        self.channel.close()


def assert_within_bounds(got: np.ndarray, ref: np.ndarray, encoding: str, form: str, block: int = 0) -> None:
    if encoding == "nf4":   # per block of `block` values: half the widest code gap of the block's absmax
        blocks = lambda a: a.reshape(*a.shape[:-1], -1, block)
        m = np.abs(blocks(ref)).max(axis=-1, keepdims=True)
        c = 4e-6 * m if form == "train" else 0.0
        err = np.abs(blocks(got).astype(np.float64) - blocks(ref))
        assert np.all(err <= nf4.ERROR_BOUND * m + 2 * c), f"nf4/{form}: error {err.max():.3g}"
        return
    m = np.abs(ref).max(axis=-1, keepdims=True)
    c = 4e-6 * m if form == "train" else 0.0
    bound = {
        "fp32": (4e-6 if form == "train" else 1e-6) * m,
        "fp16": 2.0**-11 * np.abs(ref) + 2.0**-24 + 2 * c,
        "bf16": 2.0**-8 * np.abs(ref) + 2 * c,
        "int8": (0.5 / 127 + 1e-6) * m + 2 * c,
    }[encoding]
    err = np.abs(got.astype(np.float64) - ref)
    bound = np.broadcast_to(bound, err.shape)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"{encoding}/{form}: error {err[worst]:.3g} > bound {bound[worst]:.3g} (vector max {m[worst[:3]][0]:.3g}) at {worst}"


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if value:
                return value
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# ---- every form x weight format x encoding, served and checked --------------

# (table name, form, weights, shards, checkpoint dtype, ingest flags)
CASES = [
    ("train-st-fp32", "train", "safetensors", 1, torch.float32, ["--encoding", "fp32"]),
    ("train-bin-fp32", "train", "bin", 1, torch.float32, ["--encoding", "fp32", "--chunk-tokens", "7"]),
    ("rep-st-fp32", "rep", "safetensors", 1, torch.float32, ["--encoding", "fp32"]),
    ("rep-bin-fp32", "rep", "bin", 1, torch.float32, ["--encoding", "fp32", "--chunk-tokens", "50"]),
    ("train-st3-fp16", "train", "safetensors", 3, torch.float32, ["--encoding", "fp16"]),
    ("rep-bin2-fp16", "rep", "bin", 2, torch.float16, ["--encoding", "fp16"]),
    ("train-bin2-bf16", "train", "bin", 2, torch.float32, ["--encoding", "bf16"]),
    ("rep-st2-int8", "rep", "safetensors", 2, torch.float16, ["--encoding", "int8"]),
    ("train-st-int8-zstd", "train", "safetensors", 1, torch.float32, ["--encoding", "int8", "--zstd"]),
    ("rep-st-fp16-zstd", "rep", "safetensors", 1, torch.float16, ["--encoding", "fp16", "--zstd"]),
    ("rep-st-nf4", "rep", "safetensors", 1, torch.float16, ["--encoding", "nf4", "--block-size", "32"]),
    ("train-bin-nf4-b8", "train", "bin", 1, torch.float32, ["--encoding", "nf4", "--block-size", "8",
                                                            "--chunk-tokens", "7"]),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """All CASES ingested by the CLI into one DB, served by one real server."""
    root = tmp_path_factory.mktemp("ingest")
    db = root / "db"
    ckpts = {}
    for i, (name, form, weights, shards, dtype, flags) in enumerate(CASES):
        ckpts[name] = make_checkpoint(root / name, form=form, weights=weights, shards=shards, dtype=dtype,
                                      vocab=96 + 8 * i, seed=i)
        out = ingest_ok(ckpts[name], db, "--name", name, *flags)
        assert f"ingested {name} v1" in out
    server = start_server(db)
    rpc = Rpc(server.address)
    yield db, ckpts, rpc
    rpc.close()
    server.stop()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_served_rows_match_reference(served, case):
    db, ckpts, rpc = served
    name, form, _, _, _, flags = case
    encoding = flags[flags.index("--encoding") + 1]
    ref = reference_lut(ckpts[name])
    info = rpc.info(name)
    assert (info.vocab_size, info.num_layers, info.num_experts, info.hidden_size) == ref.shape
    assert info.source_form == form and info.version == 1
    assert info.compression == (pb.COMPRESSION_ZSTD if "--zstd" in flags else pb.COMPRESSION_NONE)
    got = rpc.rows(name, list(range(info.vocab_size)))
    assert info.block_size == (int(flags[flags.index("--block-size") + 1]) if encoding == "nf4" else 0)
    assert_within_bounds(got, ref, encoding, form, info.block_size)


@pytest.mark.parametrize("case", CASES[:6], ids=[c[0] for c in CASES[:6]])
def test_artifacts_round_trip(served, case):
    db, ckpts, rpc = served
    name, ckpt = case[0], ckpts[case[0]]
    info = rpc.info(name)
    by_name = {a.name: a for a in info.artifacts}
    assert set(by_name) == {"config.json", "backbone.safetensors", "tokenizer.json", "tokenizer_config.json",
                            "special_tokens_map.json", "lutstore-source.json"}
    for fname in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        data = rpc.artifact(name, fname)
        assert data == (ckpt / fname).read_bytes()
        assert hashlib.sha256(data).hexdigest() == by_name[fname].sha256
    backbone = load_safetensors(rpc.artifact(name, "backbone.safetensors"))
    expected = {n: t for n, t in load_tensors(ckpt).items()
                if ".experts." not in n and "expert_layernorm" not in n and n != "model.moe_table.weight"}
    assert set(backbone) == set(expected)
    for n, t in expected.items():
        assert backbone[n].dtype == t.dtype and torch.equal(backbone[n], t), n


# ---- bad input leaves the database untouched ---------------------------------

def _bad_checkpoints(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (checkpoint path, a fragment the error must contain)."""
    out = {"missing dir": (root / "does-not-exist", "does not exist")}
    p = make_checkpoint(root / "noconfig", vocab=64)
    (p / "config.json").unlink()
    out["not MoLE"] = (p, "not a MoLE checkpoint")
    p = make_checkpoint(root / "truncated", weights="bin", vocab=64)
    data = (p / "pytorch_model.bin").read_bytes()
    (p / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    out["truncated"] = (p, "truncated or corrupt")
    p = make_checkpoint(root / "shapes", form="rep", vocab=64)
    cfg = json.loads((p / "config.json").read_text())
    cfg["hidden_size"] = 16
    (p / "config.json").write_text(json.dumps(cfg))
    out["shape mismatch"] = (p, "has shape")
    return out


def test_bad_checkpoints_fail_cleanly_and_change_nothing(tmp_path):
    db = tmp_path / "db"
    ingest_ok(make_checkpoint(tmp_path / "good", vocab=64), db, "--name", "m")
    before = table_list(db)
    for what, (ckpt, fragment) in _bad_checkpoints(tmp_path).items():
        r = ingest(ckpt, db, "--name", "m")
        assert r.returncode != 0, what
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lutstore ingest: error:"), (what, r.stderr)
        assert fragment in lines[0], (what, lines[0])
        assert table_list(db) == before, what
    # Bad input never creates a database either.
    r = ingest(tmp_path / "noconfig", tmp_path / "fresh-db")
    assert r.returncode != 0 and not (tmp_path / "fresh-db").exists()


def test_same_checkpoint_again_is_decided_before_computing_rows_and_old_tables_still_match(tmp_path):
    """A version records its source (the checkpoint files' sha256 and the encoding): the same files again
    are refused before any row is computed (no "ingest" progress bar), changed files are ingested. A
    version from before that record (rebuilt here without it) is still matched, by fingerprint."""
    from lutstore.ingest import SOURCE_ARTIFACT

    db, ckpt = tmp_path / "db", make_checkpoint(tmp_path / "m", vocab=64)
    ingest_ok(ckpt, db, "--name", "m")
    again = lutstore_cli("ingest", str(ckpt), "--db", str(db), "--name", "m")   # with its progress bars
    assert again.returncode == 0 and "already holds this checkpoint" in again.stdout, again.stderr
    assert "ingest:" not in again.stderr and "checksum" in again.stderr, again.stderr
    with Store.open(db, "primary") as store:
        [v1] = store.tables()
        record = json.loads(b"".join(store.iter_artifact(v1, SOURCE_ARTIFACT)))
        assert record["encoding"] == "fp16" and set(record["files_sha256"]) >= {"config.json", "tokenizer.json"}
        # What an older lutstore wrote: the same rows and artifacts, no source record.
        with store.begin_table("m", v1.row_format(), v1.vocab_size, v1.source_form) as writer:
            writer.add_rows(store.get_values(v1, list(range(v1.vocab_size))))
            for a in v1.artifacts:
                if a.name != SOURCE_ARTIFACT:
                    writer.add_artifact(a.name, b"".join(store.iter_artifact(v1, a.name)))
            old = writer.commit()
        assert old.version == 2 and SOURCE_ARTIFACT not in {a.name for a in old.artifacts}
    again = lutstore_cli("ingest", str(ckpt), "--db", str(db), "--name", "m")   # with its progress bars
    assert again.returncode == 0 and "already holds this checkpoint" in again.stdout and "m' v2" in again.stdout
    assert "ingest:" in again.stderr, again.stderr   # no record to compare: computed, then matched
    # One byte of a tokenizer file changed is another checkpoint: a new version.
    tok = ckpt / "tokenizer_config.json"
    tok.write_text(tok.read_text() + " ")
    assert "ingested m v3" in ingest_ok(ckpt, db, "--name", "m")


def test_bad_flags(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", vocab=64)
    for flags, fragment in ((["--device", "tpu"], "--device"), (["--chunk-tokens", "-1"], "--chunk-tokens"),
                            (["--keep-versions", "-2"], "--keep-versions"),
                            # nf4: the default block (64) does not divide hidden_size 32; nor does 12; odd; zstd
                            (["--encoding", "nf4"], "block size 64 must be a positive even number that divides "
                                                    "hidden_size 32"),
                            (["--encoding", "nf4", "--block-size", "12"], "divides hidden_size 32"),
                            (["--encoding", "nf4", "--block-size", "-2"], "--block-size"),
                            (["--encoding", "nf4", "--block-size", "16", "--zstd"], "--zstd does not apply"),
                            (["--block-size", "16"], "--block-size applies to --encoding nf4 only")):
        r = ingest(ckpt, tmp_path / "db", *flags)
        assert r.returncode != 0 and fragment in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "db").exists()


def _official_rep_folder(dest: Path, vocab: int) -> Path:
    """What the official reparameterize.py writes: config.json, generation_config.json and the
    weights (moe_table in fp16), no tokenizer files."""
    rep = make_checkpoint(dest, form="rep", vocab=vocab)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (rep / f).unlink()
    (rep / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                            "transformers_version": "4.38.2"}))
    return rep


def test_tokenizer_from_another_folder(tmp_path):
    """--tokenizer DIR: the table gets DIR's tokenizer files (and keeps the checkpoint's generation_config.json),
    a client's backbone encodes text with it, and the source record names them; a DIR without tokenizer.json,
    or no DIR, is refused in one line before anything is written."""
    from inference.backbone import open_remote

    train = make_checkpoint(tmp_path / "train", vocab=64)
    rep = _official_rep_folder(tmp_path / "rep", vocab=64)
    db = tmp_path / "db"
    r = ingest(rep, db)
    assert r.returncode != 0 and "no tokenizer.json" in r.stderr and "--tokenizer DIR" in r.stderr, r.stderr
    for folder, fragment in ((tmp_path / "nowhere", "no such folder"), (rep, "has no tokenizer.json")):
        r = ingest(rep, db, "--tokenizer", str(folder))
        assert r.returncode != 0 and fragment in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not db.exists()

    assert "ingested rep v1" in ingest_ok(rep, db, "--tokenizer", str(train))
    server = start_server(db)
    try:
        rpc = Rpc(server.address)
        artifacts = {a.name for a in rpc.info("rep").artifacts}
        assert artifacts == {"config.json", "backbone.safetensors", "tokenizer.json", "tokenizer_config.json",
                             "special_tokens_map.json", "generation_config.json", "lutstore-source.json"}
        for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            assert rpc.artifact("rep", fname) == (train / fname).read_bytes(), fname
        assert rpc.artifact("rep", "generation_config.json") == (rep / "generation_config.json").read_bytes()
        record = json.loads(rpc.artifact("rep", "lutstore-source.json"))
        assert record["files_sha256"]["tokenizer.json"] == hashlib.sha256((train / "tokenizer.json").read_bytes()).hexdigest()
        rpc.close()
        remote = open_remote(server.address, "rep", cache_mb=1)
        try:
            assert remote.backbone.tokenizer.encode("the of and").ids == [3, 4, 5]
        finally:
            remote.close()
    finally:
        server.stop()
    # the same files again are the same source: nothing added
    assert "already holds this checkpoint" in ingest_ok(rep, db, "--tokenizer", str(train))


# ---- versions while a server runs ---------------------------------------------

def test_new_version_appears_while_serving_and_pinned_version_keeps_serving(tmp_path):
    db = tmp_path / "db"
    v1 = make_checkpoint(tmp_path / "v1", vocab=80, seed=1)
    v2 = make_checkpoint(tmp_path / "v2", form="rep", vocab=80, seed=2, dtype=torch.float32)
    ingest_ok(v1, db, "--name", "m", "--encoding", "fp32")
    server = start_server(db)
    rpc = Rpc(server.address)
    try:
        ids = list(range(80))
        assert_within_bounds(rpc.rows("m", ids), reference_lut(v1), "fp32", "train")
        ingest_ok(v2, db, "--name", "m", "--encoding", "fp32")
        wait_for(lambda: rpc.info("m").version == 2, what="v2 visible to the running server")
        assert_within_bounds(rpc.rows("m", ids), reference_lut(v2), "fp32", "rep")
        assert_within_bounds(rpc.rows("m", ids, version=1), reference_lut(v1), "fp32", "train")
        assert list(rpc.info("m").live_versions) == [1, 2]
        # A third version with --keep-versions 2 drops v1; pinned readers of v1 are told it is gone.
        ingest_ok(v1, db, "--name", "m", "--encoding", "fp32", "--keep-versions", "2")
        assert [v for n, v, *_ in table_list(db)] == [2, 3]

        def v1_gone():
            try:
                rpc.info("m", 1)
            except grpc.RpcError as e:
                return e.code() == grpc.StatusCode.FAILED_PRECONDITION
            return False
        wait_for(v1_gone, what="v1 dropped")
        assert_within_bounds(rpc.rows("m", ids, version=2), reference_lut(v2), "fp32", "rep")
    finally:
        rpc.close()
        server.stop()


# ---- a killed ingest leaves nothing half-visible --------------------------------

def test_kill_9_midway_leaves_previous_version(tmp_path):
    db = tmp_path / "db"
    vocab = 24576
    ckpt = make_checkpoint(tmp_path / "big", vocab=vocab, hidden=16, intermediate=32, seed=3)
    ingest_ok(ckpt, db, "--name", "big", "--encoding", "fp32")
    before = table_list(db)
    server = start_server(db)
    rpc = Rpc(server.address)
    ref = reference_lut(ckpt)
    sample = list(range(0, vocab, 97)) + [vocab - 1]
    try:
        assert_within_bounds(rpc.rows("big", sample), ref[sample], "fp32", "train")
        # Tiny chunks make the second ingest slow; kill it once its progress bar moves (--force: the same
        # checkpoint again would otherwise be refused before computing any row).
        proc = subprocess.Popen([sys.executable, "-m", "lutstore.cli", "ingest", str(ckpt), "--db", str(db),
                                 "--name", "big", "--encoding", "fp32", "--chunk-tokens", "2", "--force"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        err = bytearray()
        threading.Thread(target=lambda: [err.extend(b) for b in iter(lambda: proc.stderr.read1(4096), b"")],
                         daemon=True).start()
        progress = re.compile(rb"\| *([1-9]\d*)/%d " % vocab)

        def moving():
            assert proc.poll() is None, f"ingest ended before it could be killed: {err.decode(errors='replace')}"
            m = progress.findall(bytes(err))
            return m and int(m[-1]) < vocab
        wait_for(moving, timeout=60, what="ingest progress")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        staging = db / "staging"
        assert staging.is_dir() and any(staging.iterdir()), "the killed ingest should have left staging files"

        assert table_list(db) == before
        time.sleep(0.5)  # a few server refreshes
        info = rpc.info("big")
        assert info.version == 1 and list(info.live_versions) == [1]
        assert_within_bounds(rpc.rows("big", sample), ref[sample], "fp32", "train")
        assert verify_all_rows(db) == vocab

        out = ingest_ok(ckpt, db, "--name", "big", "--encoding", "fp16")
        assert "ingested big v2" in out
        assert not any(staging.iterdir()), "stale staging files are removed by the next ingest"
        wait_for(lambda: rpc.info("big").version == 2, what="v2 after the killed ingest")
        assert_within_bounds(rpc.rows("big", sample), ref[sample], "fp16", "train")
    finally:
        rpc.close()
        server.stop()


# ---- disk full -------------------------------------------------------------------

def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-r", "-m", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"],
                       capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare + tmpfs mount (user namespaces)")
def test_disk_full_on_a_small_filesystem(tmp_path):
    """A real 8 MB tmpfs, private to a mount namespace: the space check refuses up front;
    with the check skipped, the real ENOSPC mid-write aborts cleanly. Nothing becomes visible."""
    small = make_checkpoint(tmp_path / "small", vocab=64, hidden=16, intermediate=32)
    big = make_checkpoint(tmp_path / "big", vocab=16384, hidden=32, seed=1)  # ~17 MB of fp32 rows
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    py = sys.executable
    script = f"""
set -u
cd {REPO}
mount -t tmpfs -o size=8m tmpfs {mnt} || exit 99
{py} -m lutstore.cli ingest {small} --db {mnt}/db --name t --no-progress >{out}/1.out 2>{out}/1.err; echo $? >{out}/1.rc
{py} -m lutstore.cli ingest {big} --db {mnt}/db --name t --encoding fp32 --no-progress 2>{out}/2.err; echo $? >{out}/2.rc
LUTSTORE_INGEST_SKIP_SPACE_CHECK=1 {py} -m lutstore.cli ingest {big} --db {mnt}/db --name t --encoding fp32 --no-progress 2>{out}/3.err; echo $? >{out}/3.rc
{py} -c "from lutstore.storage.rocksdb import Store; s = Store.open('{mnt}/db', 'secondary'); print([(m.name, m.version, m.vocab_size) for m in s.tables()])" >{out}/tables 2>&1
ls -A {mnt}/db/staging >{out}/staging
{py} -m lutstore.cli ingest {small} --db {mnt}/db --name t --no-progress --force >{out}/4.out 2>{out}/4.err; echo $? >{out}/4.rc
"""
    r = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr

    def result(n: str) -> tuple[int, str]:
        return int((out / f"{n}.rc").read_text()), (out / f"{n}.err").read_text().strip()

    rc, err = result("1")
    assert rc == 0, err
    rc, err = result("2")
    assert rc != 0 and len(err.splitlines()) == 1 and "not enough disk space" in err, err
    rc, err = result("3")
    assert rc != 0 and len(err.splitlines()) == 1 and "disk full" in err and "nothing was added" in err, err
    assert (out / "tables").read_text().strip() == "[('t', 1, 64)]"
    assert (out / "staging").read_text().strip() == "", "aborted ingest left staging files"
    rc, err = result("4")
    assert rc == 0 and "ingested t v2" in (out / "4.out").read_text(), err
