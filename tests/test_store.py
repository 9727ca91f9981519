"""Store: the RocksDB layout, versions, atomic ingest, drop, secondary readers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from lutstore.storage import model as table_model
from lutstore.formats.codec import Encoding, RowFormat, decode_rows, encode_rows
from lutstore.errors import UserError
from lutstore.storage.rocksdb import Store
from lutstore.storage.model import StoreError, TableNotFound, VersionGone

from conftest import random_rows, write_table

FMT = RowFormat(2, 3, 8, Encoding.BF16)


def test_rows_round_trip_and_meta(db_path: Path) -> None:
    meta, rows, values = write_table(db_path, "tiny", FMT, vocab_size=50, artifacts={"config.json": b'{"a": 1}'})
    with Store.open(db_path, "secondary") as store:
        got = store.resolve("tiny")
        assert got == meta
        assert (got.version, got.vocab_size, got.row_format()) == (1, 50, FMT)
        assert got.stored_bytes == sum(len(v) for v in values)
        ids = [49, 0, 7, 7]
        fetched = store.get_values(got, ids)
        assert fetched == [values[i] for i in ids]
        assert store.get_values(got, [50]) == [None]
        np.testing.assert_array_equal(decode_rows(FMT, fetched), decode_rows(FMT, [values[i] for i in ids]))
        assert [(t, v) for t, v in store.iter_rows(got)] == list(enumerate(values))
        assert b"".join(store.iter_artifact(got, "config.json")) == b'{"a": 1}'
        with pytest.raises(KeyError):
            list(store.iter_artifact(got, "nope.bin"))


def test_versions_drop_and_no_id_reuse(db_path: Path) -> None:
    m1, _, _ = write_table(db_path, "t", FMT, vocab_size=10, seed=1)
    m2, _, v2 = write_table(db_path, "t", FMT, vocab_size=10, seed=2)
    other, _, _ = write_table(db_path, "other", FMT, vocab_size=10, seed=3)
    assert (m1.version, m2.version, other.version) == (1, 2, 1)
    assert len({m1.table_id, m2.table_id, other.table_id}) == 3
    with Store.open(db_path) as store:
        assert [(m.name, m.version) for m in store.tables()] == [("other", 1), ("t", 1), ("t", 2)]
        assert store.resolve("t").version == 2
        assert store.resolve("t", 1).table_id == m1.table_id
        store.drop("t", 1)
        with pytest.raises(VersionGone) as gone:
            store.resolve("t", 1)
        assert gone.value.latest == 2 and "latest is 2" in str(gone.value)
        assert list(store.iter_rows(m1)) == []  # rows are gone, not just hidden
        assert store.get_values(m2, [3]) == [v2[3]]
        with pytest.raises(VersionGone):
            store.drop("t", 7)
        store.drop("t", 2)
        with pytest.raises(TableNotFound) as nf:
            store.resolve("t")
        assert "other" in str(nf.value)
    # Neither the version nor the table id of a dropped table comes back.
    m3, _, _ = write_table(db_path, "t", FMT, vocab_size=10, seed=4)
    assert m3.version == 3
    assert m3.table_id > max(m1.table_id, m2.table_id, other.table_id)


def test_secondary_sees_later_ingest_and_drop(db_path: Path) -> None:
    write_table(db_path, "a", FMT, vocab_size=8)
    with Store.open(db_path, "secondary") as reader:
        with pytest.raises(TableNotFound):
            reader.resolve("b")
        meta_b, _, values_b = write_table(db_path, "b", FMT, vocab_size=8, seed=5)
        reader.refresh()
        b = reader.resolve("b")
        assert b.fingerprint == meta_b.fingerprint
        assert reader.get_values(b, [0, 7]) == [values_b[0], values_b[7]]
        with Store.open(db_path) as writer:
            writer.drop("b", 1)
        reader.refresh()
        with pytest.raises(TableNotFound):
            reader.resolve("b")


def test_abort_and_wrong_row_count_leave_nothing(db_path: Path) -> None:
    values = encode_rows(FMT, random_rows(FMT, 6))
    with Store.open(db_path, create=True) as store:
        with store.begin_table("half", FMT, 6, "rep") as w:
            w.add_rows(values[:3])  # leaves the block without commit()
        with store.begin_table("short", FMT, 6, "rep") as w:
            w.add_rows(values[:5])
            with pytest.raises(StoreError, match="5 rows added, vocab_size is 6"):
                w.commit()
        with store.begin_table("long", FMT, 6, "rep") as w:
            with pytest.raises(StoreError, match="more rows than vocab_size"):
                w.add_rows(values + values[:1])
        with store.begin_table("badlen", FMT, 6, "rep") as w:
            with pytest.raises(StoreError, match="bytes; expected"):
                w.add_rows([values[0][:-1]])
        assert store.tables() == []
        assert list((db_path / "staging").iterdir()) == []
    with Store.open(db_path, "secondary") as reader:
        assert reader.tables() == []


def test_stale_staging_removed(db_path: Path) -> None:
    write_table(db_path, "a", FMT, vocab_size=4)
    stale = db_path / "staging" / "999999-dead"
    stale.mkdir(parents=True)
    (stale / "rows-00000.sst").write_bytes(b"junk")
    write_table(db_path, "a", FMT, vocab_size=4)
    assert not stale.exists()


def test_artifacts_multi_chunk_from_path(db_path: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(table_model, "ARTIFACT_CHUNK_BYTES", 1000)
    blob = np.random.default_rng(0).bytes(4321)
    src = tmp_path / "backbone.safetensors"
    src.write_bytes(blob)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    values = encode_rows(FMT, random_rows(FMT, 3))
    with Store.open(db_path, create=True) as store:
        with store.begin_table("m", FMT, 3, "train") as w:
            w.add_rows(values)
            w.add_artifact("backbone.safetensors", src)
            w.add_artifact("empty.txt", empty)
            w.add_artifact("tokenizer.json", b"tok" * 700)
            with pytest.raises(StoreError, match="added twice"):
                w.add_artifact("empty.txt", b"")
            meta = w.commit()
        arts = {a.name: a for a in meta.artifacts}
        assert arts["backbone.safetensors"].chunks == 5 and arts["backbone.safetensors"].size == 4321
        assert arts["backbone.safetensors"].sha256 == hashlib.sha256(blob).hexdigest()
        assert b"".join(store.iter_artifact(meta, "backbone.safetensors")) == blob
        assert b"".join(store.iter_artifact(meta, "empty.txt")) == b""
        assert b"".join(store.iter_artifact(meta, "tokenizer.json")) == b"tok" * 700


def test_fingerprint_tracks_content_not_name(db_path: Path) -> None:
    a, _, _ = write_table(db_path, "a", FMT, vocab_size=8, seed=1)
    b, _, _ = write_table(db_path, "b", FMT, vocab_size=8, seed=1)
    c, _, _ = write_table(db_path, "c", FMT, vocab_size=8, seed=2)
    d, _, _ = write_table(db_path, "d", FMT, vocab_size=8, seed=1, artifacts={"config.json": b"{}"})
    assert a.fingerprint == b.fingerprint
    assert len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3


def test_missing_db_and_second_writer_are_clear_errors(tmp_path: Path, db_path: Path) -> None:
    assert issubclass(StoreError, UserError)
    for mode in ("primary", "secondary"):
        with pytest.raises(StoreError, match="no lutstore database at .*lutstore ingest"):
            Store.open(tmp_path / "nowhere", mode)
    assert not (tmp_path / "nowhere").exists()
    write_table(db_path, "a", FMT, vocab_size=4)
    with Store.open(db_path):
        with pytest.raises(StoreError, match="another writer"):
            Store.open(db_path)
        with Store.open(db_path, "secondary") as reader:  # readers are fine meanwhile
            assert reader.resolve("a").vocab_size == 4
        with Store.open(db_path, "secondary") as reader:
            with pytest.raises(StoreError, match="needs the database opened as primary"):
                reader.begin_table("x", FMT, 4, "rep")


def test_stale_reader_folders_of_both_naming_schemes_are_removed(tmp_path: Path) -> None:
    """A reader folder whose process is gone goes; so does one of the older naming scheme
    (lutstore-secondary-<random>, no owner to ask) once nothing in it has changed for a day; a live
    reader's folder and a recent old-scheme one stay."""
    import os
    import time

    from lutstore.storage.rocksdb import OLD_SCHEME_STALE_SECONDS, SECONDARY_PREFIX, _process_start, \
        remove_stale_secondaries

    live = tmp_path / f"{SECONDARY_PREFIX}{os.getpid()}-{_process_start(os.getpid())}-abc"
    dead = tmp_path / f"{SECONDARY_PREFIX}999999-1-abc"
    old_stale, old_recent = tmp_path / f"{SECONDARY_PREFIX}k2j4h5g6", tmp_path / f"{SECONDARY_PREFIX}a1b2c3d4"
    for folder in (live, dead, old_stale, old_recent):
        (folder / "own").mkdir(parents=True)
        (folder / "own" / "MANIFEST-000001").write_bytes(b"x")
    long_ago = time.time() - OLD_SCHEME_STALE_SECONDS - 60
    for path in (old_stale / "own" / "MANIFEST-000001", old_stale / "own", old_stale):
        os.utime(path, (long_ago, long_ago))
    removed = remove_stale_secondaries(str(tmp_path))
    assert sorted(removed) == sorted([str(dead), str(old_stale)])
    assert live.is_dir() and old_recent.is_dir()
