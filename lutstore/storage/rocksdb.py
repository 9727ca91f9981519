"""RocksDB tables: key layout, manifest, versions, atomic ingest, drop.

One RocksDB (rocksdict, raw bytes), one column family. Keys are fixed-width
big-endian with a kind byte first, so RocksDB's order is token order and a
batch of ids maps to one sorted multi-get:

    b"a" + table_id u32 + artifact_index u16 + chunk u32  -> artifact bytes (4 MiB chunks)
    b"m" + table_id u32                                   -> TableMeta as UTF-8 JSON
    b"n"                                                  -> allocation counters (JSON)
    b"r" + table_id u32 + token_id u32                    -> stored row value (codec)

Readers (serve, info, verify) open the database as a RocksDB secondary that
needs read access only: its own files, and a folder of links to the
database's files, live in a `lutstore-secondary-<pid>-<start>-*` temp folder
(stale ones, whose process is gone, are removed at the next open). A damaged
file set (a missing or truncated SST, a damaged MANIFEST or CURRENT) is a
one-line refusal at open; a damaged block is `RowsUnreadable` for exactly the
rows in it, and `iter_rows` walks past it.

A version is visible once its manifest key exists. TableWriter writes rows,
artifacts and the manifest to SST files and ingests them all in ONE
`ingest_external_file` call, so a killed ingest leaves nothing half-visible.
The `b"n"` counters make table ids and versions never reused after a drop,
so a reader's cache keyed by table id can never see stale rows.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Literal

from rocksdict import AccessType, IngestExternalFileOptions, Options, Rdict, SstFileWriter

from lutstore.formats.codec import RowFormat
from lutstore.storage.model import (ArtifactMeta, DatabaseDamaged, RowsUnreadable, StoreBase, StoreError,
                                    TableMeta, TableNotFound, TableWriterBase, VersionGone, check_complete,
                                    check_new_table)

__all__ = ["Store", "TableWriter", "SECONDARY_PREFIX", "remove_stale_secondaries", "row_key", "rows_range",
           "artifact_key", "artifacts_range", "manifest_key",
           # the table model, for code that imported it from here
           "ArtifactMeta", "DatabaseDamaged", "RowsUnreadable", "StoreError", "TableMeta", "TableNotFound",
           "VersionGone"]

log = logging.getLogger(__name__)

SST_ROLL_BYTES = 256 << 20  # start a new rows SST file past this size

_U32 = struct.Struct(">I")
_ROW = struct.Struct(">cII")
_ART = struct.Struct(">cIHI")
_COUNTERS_KEY = b"n"


def _is_damage(e: BaseException) -> bool:
    """A rocksdict exception that means damaged or unreadable data (rocksdict raises plain Exception
    with RocksDB's status text: "Corruption: block checksum mismatch: ... in FILE offset N size M",
    "IO error: ...")."""
    text = str(e)
    return text.startswith(("Corruption", "IO error")) or "Corruption:" in text


def _damage_kind(detail: str) -> str:
    if "checksum mismatch" in detail:
        return "its block on disk fails RocksDB's checksum"
    if "IO error" in detail:
        return "the disk read failed"
    return "RocksDB reports its block corrupt"


def row_key(table_id: int, token_id: int) -> bytes:
    return _ROW.pack(b"r", table_id, token_id)


def rows_range(table_id: int) -> tuple[bytes, bytes]:
    """[begin, end) of one table's row keys."""
    return b"r" + _U32.pack(table_id), b"r" + _U32.pack(table_id + 1)


def artifact_key(table_id: int, index: int, chunk: int) -> bytes:
    return _ART.pack(b"a", table_id, index, chunk)


def artifacts_range(table_id: int) -> tuple[bytes, bytes]:
    return b"a" + _U32.pack(table_id), b"a" + _U32.pack(table_id + 1)


def manifest_key(table_id: int) -> bytes:
    return b"m" + _U32.pack(table_id)


def _db_exists(path: Path) -> bool:
    return (path / "CURRENT").is_file()


def _options(secondary: bool) -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(not secondary)
    if secondary:
        opts.set_max_open_files(-1)  # RocksDB requires it of secondary instances
    return opts


def _iter_prefix(db: Rdict, begin: bytes, end: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Keys in [begin, end) in order; raises the iterator's error (rocksdict's iterator just turns
    invalid at a damaged block: without the status check a damaged block looks like the end)."""
    it = db.iter()
    it.seek(begin)
    while it.valid():  # never it.next() on an invalid iterator: rocksdict crashes the process
        key = it.key()
        if key >= end:
            return
        yield key, it.value()
        it.next()
    it.status()


# ---- the secondary's own folder --------------------------------------------------

SECONDARY_PREFIX = "lutstore-secondary-"
_SECONDARY_NAME = re.compile(re.escape(SECONDARY_PREFIX) + r"(\d+)-(\d+)-")
# Older versions named the folder lutstore-secondary-<random> (mkdtemp), with no owner to ask: such
# a folder untouched for this long belongs to no running reader (a live one's files change as it
# catches up with the database).
OLD_SCHEME_STALE_SECONDS = 24 * 3600
# Files a reader must not share with the database: RocksDB's lock and info log, rocksdict's
# config (rocksdict writes it at every open, even read-only) and ingest staging.
_NOT_LINKED = ("LOCK", "LOG", "rocksdict-config.json", "staging")


def _process_start(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 where /proc is not there), so a pid
    that was reused by another process is not taken for the one that made the folder."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def _alive(pid: int, start: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    return start == 0 or _process_start(pid) in (0, start)


def remove_stale_secondaries(root: str | None = None) -> list[str]:
    """Remove the secondary folders of readers that died without closing (kill -9); a live
    reader's folder is kept. Returns the removed paths."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(SECONDARY_PREFIX):
            continue
        path = os.path.join(root, name)
        match = _SECONDARY_NAME.match(name)
        if match and _alive(int(match.group(1)), int(match.group(2))):
            continue
        if not match and not _untouched_for(path, OLD_SCHEME_STALE_SECONDS):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                log.info("removed stale reader folder %s", path)
                removed.append(path)
    return removed


def _untouched_for(path: str, seconds: float) -> bool:
    """Nothing in the folder (to two levels) was modified in the last `seconds`."""
    newest = 0.0
    try:
        for top, dirs, files in os.walk(path):
            for name in [top, *(os.path.join(top, f) for f in files)]:
                newest = max(newest, os.lstat(name).st_mtime)
            if top.count(os.sep) - path.count(os.sep) >= 1:
                dirs.clear()
    except OSError:
        return False
    return time.time() - newest > seconds


def _link_db_files(db: Path, links: Path) -> None:
    """Mirror the database folder's files into `links` as symlinks, so that a reader opens the
    database through a folder it can write (rocksdict writes rocksdict-config.json into the folder
    it opens; RocksDB read-only instances their info LOG) while the database needs read access only."""
    want = {n for n in os.listdir(db) if not n.startswith(_NOT_LINKED)}
    have = {n for n in os.listdir(links) if os.path.islink(links / n)}
    for name in want - have:
        try:
            os.symlink(db / name, links / name)
        except FileExistsError:
            pass
    for name in have - want:  # deleted by the writer (compaction, a new MANIFEST)
        try:
            os.unlink(links / name)
        except FileNotFoundError:
            pass


def _damaged(path: Path, what: str) -> DatabaseDamaged:
    what = " ".join(what.split())  # RocksDB's messages run over lines: keep the refusal one line
    return DatabaseDamaged(f"database {path} is damaged: {what}; nothing is served from it "
                           f"(see 'Disk damage and recovery' in docs/operations.md)")


def _check_db_files(path: Path) -> None:
    """Refuse a folder whose CURRENT is gone while the rest of a database is there (RocksDB
    would take it for no database at all)."""
    if (path / "CURRENT").is_file():
        return
    if any(n.startswith("MANIFEST-") or n.endswith(".sst") for n in os.listdir(path)):
        raise _damaged(path, "its CURRENT file is missing (it names the MANIFEST file in use)")


def _check_whole(path: Path, links: Path, own: Path, attempts: int = 3) -> None:
    """Refuse a database whose file set is damaged (an SST missing or truncated, a damaged
    MANIFEST or CURRENT). A secondary alone would not say: it silently shows the last state in
    which every file was whole, possibly an empty database. A read-only open checks every file
    the MANIFEST names; it is retried, as a writer may replace files while we look."""
    opts = Options(raw_mode=True)
    opts.set_max_open_files(-1)  # open (footer + index) every SST now
    opts.set_db_log_dir(str(own))  # its info LOG in our folder, not the database's
    error = None
    for attempt in range(attempts):
        try:
            Rdict(str(links), opts, access_type=AccessType.read_only()).close()
            return
        except Exception as e:  # rocksdict raises plain Exception
            error = e
            # A file gone may be a writer's compaction or new MANIFEST racing us; damage stays damaged.
            if "No such file" not in str(e) or attempt == attempts - 1:
                break
            time.sleep(0.1 * (attempt + 1))
            _link_db_files(path, links)
    text = str(error).replace(str(links), str(path))
    if _is_damage(error) or "No such file" in text:
        raise _damaged(path, text) from error
    raise StoreError(f"cannot open database {path}: {text}") from error


class Store(StoreBase):
    """One lutstore database. Writers open it as primary (one process at a
    time); readers (server, info, verify) as a secondary that catches up with
    the primary on refresh()."""

    def __init__(self, path: Path, db: Rdict, mode: str, secondary_dir: str | None):
        self.path = path
        self._links = Path(secondary_dir) / "db" if secondary_dir else None
        self.mode = mode
        self._db = db
        self._secondary_dir = secondary_dir
        self._lock = threading.Lock()  # guards manifest swaps and id allocation
        self._by_name: dict[str, dict[int, TableMeta]] = {}
        self._reserved_ids: set[int] = set()
        self._load_manifest()

    @classmethod
    def open(cls, path: str | Path, mode: Literal["primary", "secondary"] = "primary", create: bool = False) -> Store:
        path = Path(path)
        if mode not in ("primary", "secondary"):
            raise ValueError(f"mode must be 'primary' or 'secondary', not {mode!r}")
        if not _db_exists(path):
            if path.is_dir():
                _check_db_files(path)
            if not create or mode == "secondary":
                raise StoreError(f"no lutstore database at {path}; create one with `lutstore ingest`")
            path.mkdir(parents=True, exist_ok=True)
        if mode == "secondary":
            return cls._open_reader(path)
        try:
            db = Rdict(str(path), _options(False))
        except Exception as e:  # rocksdict raises plain Exception
            if "lock" in str(e).lower():
                raise StoreError(f"database {path} is open by another writer (an ingest or drop is running); try again when it ends") from e
            if _is_damage(e):
                raise _damaged(path, str(e)) from e
            raise StoreError(f"cannot open database {path}: {e}") from e
        return cls(path, db, mode, None)

    @classmethod
    def _open_reader(cls, path: Path) -> Store:
        """A secondary that needs read access to the database only. Its own files (RocksDB's
        secondary folder, and links to the database's files) live in a temp folder named after
        this process, removed at close, or at a later reader's open if this process is killed."""
        remove_stale_secondaries()
        path = path.resolve()
        secondary_dir = tempfile.mkdtemp(prefix=f"{SECONDARY_PREFIX}{os.getpid()}-{_process_start(os.getpid())}-")
        links = Path(secondary_dir) / "db"
        own = Path(secondary_dir) / "own"
        try:
            links.mkdir()
            own.mkdir()
            _link_db_files(path, links)
            _check_whole(path, links, own)
            db = Rdict(str(links), _options(True), access_type=AccessType.secondary(str(own)))
        except StoreError:
            shutil.rmtree(secondary_dir, ignore_errors=True)
            raise
        except Exception as e:  # rocksdict raises plain Exception
            shutil.rmtree(secondary_dir, ignore_errors=True)
            text = str(e).replace(str(links), str(path))
            if _is_damage(e):
                raise _damaged(path, text) from e
            raise StoreError(f"cannot open database {path}: {text}") from e
        try:
            return cls(path, db, "secondary", secondary_dir)
        except BaseException:
            db.close()
            shutil.rmtree(secondary_dir, ignore_errors=True)
            raise

    # ---- reading -------------------------------------------------------

    def _detail(self, e: BaseException) -> str:
        """RocksDB's message with the database's own path (a reader sees it through its links)."""
        text = " ".join(str(e).split())
        return text.replace(str(self._links), str(self.path)) if self._links else text

    def _load_manifest(self) -> None:
        by_name: dict[str, dict[int, TableMeta]] = {}
        try:
            for _, value in _iter_prefix(self._db, b"m", b"n"):
                meta = TableMeta.from_json(value)
                by_name.setdefault(meta.name, {})[meta.version] = meta
        except Exception as e:
            if not _is_damage(e):
                raise
            raise _damaged(self.path, f"its table list cannot be read ({self._detail(e)})") from e
        with self._lock:
            self._by_name = by_name

    def _counters(self) -> dict:
        raw = self._db.get(_COUNTERS_KEY)
        return json.loads(raw) if raw else {"next_table_id": 1, "versions": {}}

    def get_values(self, meta: TableMeta, token_ids: list[int]) -> list[bytes | None]:
        """Raw stored values of token_ids in one multi-get (None where missing). RowsUnreadable
        names exactly the ids RocksDB cannot read (damaged blocks): a multi-get fails as a whole,
        so the ids are then read one by one."""
        tid = meta.table_id
        try:
            return self._db.get([_ROW.pack(b"r", tid, t) for t in token_ids])
        except Exception as e:  # rocksdict raises plain Exception
            if not _is_damage(e):
                raise
            detail = self._detail(e)
        values: list[bytes | None] = []
        bad: list[int] = []
        for t in token_ids:
            try:
                values.append(self._db.get(_ROW.pack(b"r", tid, t)))
            except Exception as e:
                if not _is_damage(e):
                    raise
                bad.append(t)
                detail = self._detail(e)
        if bad:
            raise RowsUnreadable(meta, bad, detail, _damage_kind(detail))
        return values  # the failure did not repeat (a transient read error)

    def iter_rows(self, meta: TableMeta) -> Iterator[tuple[int, bytes | RowsUnreadable]]:
        """(token_id, stored value) of every row present, in token order; a row RocksDB cannot
        read comes as (token_id, RowsUnreadable) and the walk goes on past its block (an iterator
        stops at a damaged block, so the rows after it are read again from a fresh seek)."""
        tid = meta.table_id
        _, end = rows_range(tid)
        next_id = 0
        while next_id < meta.vocab_size:
            it = self._db.iter()
            it.seek(row_key(tid, next_id))
            while it.valid():  # never it.next() on an invalid iterator: rocksdict crashes the process
                key = it.key()
                if key >= end:
                    return
                next_id = _ROW.unpack(key)[2] + 1
                yield next_id - 1, it.value()
                it.next()
            try:
                it.status()
                return  # the end of the database
            except Exception as e:
                if not _is_damage(e):
                    raise
            del it
            # The iterator stopped at an unreadable block: probe the rows after the last good one
            # until one reads, then seek from there again (each round moves at least one row on).
            while next_id < meta.vocab_size:
                try:
                    value = self._db.get(row_key(tid, next_id))
                except Exception as e:
                    if not _is_damage(e):
                        raise
                    detail = self._detail(e)
                    yield next_id, RowsUnreadable(meta, [next_id], detail, _damage_kind(detail))
                    next_id += 1
                    continue
                next_id += 1
                if value is not None:
                    yield next_id - 1, value
                    break

    def iter_artifact(self, meta: TableMeta, name: str) -> Iterator[bytes]:
        """An artifact's chunks in order; KeyError if the table has no such artifact."""
        art = meta.artifact(name)
        for chunk in range(art.chunks):
            try:
                data = self._db.get(artifact_key(meta.table_id, art.index, chunk))
            except Exception as e:
                if not _is_damage(e):
                    raise
                detail = self._detail(e)
                log.error("artifact %r of %s v%d, chunk %d: %s", name, meta.name, meta.version, chunk, detail)
                raise StoreError(f"artifact {name!r} of {meta.name} v{meta.version} is damaged on disk (chunk {chunk}: "
                                 f"{_damage_kind(detail)}); run `lutstore verify` on the server") from None
            if data is None:
                raise StoreError(f"artifact {name!r} of {meta.name} v{meta.version} is missing chunk {chunk}")
            yield data

    def refresh(self) -> None:
        """Secondary: see what the primary ingested or dropped since the last call."""
        if self.mode == "secondary":
            _link_db_files(self.path, self._links)  # files the writer added since (new SSTs, MANIFEST, WAL)
            self._db.try_catch_up_with_primary()
        self._load_manifest()

    # ---- writing (primary only) ---------------------------------------

    def begin_table(self, name: str, fmt: RowFormat, vocab_size: int, source_form: str) -> TableWriter:
        self._require_primary("writing a table")
        check_new_table(name, vocab_size)
        with self._lock:
            counters = self._counters()
            live_ids = [m.table_id for vs in self._by_name.values() for m in vs.values()]
            table_id = max([counters["next_table_id"] - 1, *live_ids, *self._reserved_ids]) + 1
            live_versions = list(self._by_name.get(name, {}))
            version = max([counters["versions"].get(name, 0), *live_versions]) + 1
            self._reserved_ids.add(table_id)
        staging_root = self.path / "staging"
        staging_root.mkdir(exist_ok=True)
        self._remove_stale_staging(staging_root)
        staging = staging_root / f"{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
        return TableWriter(self, staging, table_id, name, version, fmt, vocab_size, source_form)

    @staticmethod
    def _remove_stale_staging(root: Path) -> None:
        # We hold the primary LOCK, so another process's staging dir is a leftover.
        mine = f"{os.getpid()}-"
        for d in root.iterdir():
            if not d.name.startswith(mine):
                log.info("removing stale staging dir %s", d)
                shutil.rmtree(d, ignore_errors=True)

    def _ingest(self, files: list[Path], meta: TableMeta) -> None:
        # Staging lives inside the DB folder (same filesystem), so RocksDB can
        # link the files in instead of copying them: half the ingest time.
        opts = IngestExternalFileOptions()
        opts.set_move_files(True)
        self._db.ingest_external_file([str(f) for f in files], opts)
        with self._lock:
            self._by_name.setdefault(meta.name, {})[meta.version] = meta
            self._reserved_ids.discard(meta.table_id)

    def drop(self, name: str, version: int) -> list[str]:
        """Delete one version: manifest first (invisible at once), then its rows and artifacts.
        Returns what had to stay on disk ("rows", "artifacts"): a key range with a damaged block
        is left in place, because deleting it makes RocksDB compact, that is read, the damaged
        block, and a failed compaction stops every later write. Its table id is never reused, so
        nothing reads those keys again."""
        self._check_drop(version)
        meta = self.resolve(name, version)
        kept = []
        ranges = {"rows": rows_range(meta.table_id), "artifacts": artifacts_range(meta.table_id)}
        damaged = {what: self._unreadable(begin, end) for what, (begin, end) in ranges.items()}
        self._db.delete(manifest_key(meta.table_id))
        for what in ("artifacts", "rows"):
            begin, end = ranges[what]
            if damaged[what]:
                log.warning("dropping %s v%d: its %s stay on disk (%s)", name, version, what, damaged[what])
                kept.append(what)
                continue
            self._db.delete_range(begin, end)
            # Each kind's deletes in a file of their own, so the compaction below reads this version's
            # files only (one file spanning "a".."r" would make it rewrite every table in between).
            self._db.flush()
            self._db.compact_range(begin, end)  # give the disk space back now
        self._db.flush()
        with self._lock:
            versions = self._by_name.get(name, {})
            versions.pop(version, None)
            if not versions:
                self._by_name.pop(name, None)
        log.info("dropped %s v%d (table id %d)", name, version, meta.table_id)
        return kept

    def _unreadable(self, begin: bytes, end: bytes) -> str | None:
        """RocksDB's message if a block in [begin, end) cannot be read, else None (reads the range,
        as the compaction after a delete would)."""
        try:
            for _ in _iter_prefix(self._db, begin, end):
                pass
        except Exception as e:
            if not _is_damage(e):
                raise
            return self._detail(e)
        return None

    def close(self) -> None:
        try:
            self._db.close()
        finally:
            if self._secondary_dir:
                shutil.rmtree(self._secondary_dir, ignore_errors=True)
                self._secondary_dir = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TableWriter(TableWriterBase):
    """Collects one new table version in staging SST files; commit() makes it
    visible in one atomic ingest. Leaving the `with` block without commit()
    aborts and removes the staging files."""

    def __init__(self, store: Store, staging: Path, table_id: int, name: str, version: int,
                 fmt: RowFormat, vocab_size: int, source_form: str):
        super().__init__(table_id, name, version, fmt, vocab_size, source_form)
        self._store = store
        self._staging = self.scratch_dir = staging
        self._opts = _options(False)
        self._row_files: list[Path] = []
        self._rows: SstFileWriter | None = None
        self._meta_file = staging / "meta.sst"
        self._meta_writer = SstFileWriter(options=self._opts)
        self._meta_writer.open(str(self._meta_file))

    def _rows_writer(self) -> SstFileWriter:
        if self._rows is not None and self._rows.file_size() >= SST_ROLL_BYTES:
            self._rows.finish()
            self._rows = None
        if self._rows is None:
            path = self._staging / f"rows-{len(self._row_files):05d}.sst"
            self._rows = SstFileWriter(options=self._opts)
            self._rows.open(str(path))
            self._row_files.append(path)
        return self._rows

    def _write_rows(self, first: int, values: list[bytes]) -> None:
        tid = self.table_id
        for token, value in enumerate(values, first):
            self._rows_writer()[_ROW.pack(b"r", tid, token)] = value

    def _artifact_writer(self, name: str, index: int) -> Callable[[int, bytes], None]:
        def put(chunk: int, data: bytes) -> None:
            self._meta_writer[artifact_key(self.table_id, index, chunk)] = data
        return put

    def commit(self, fingerprint_extra: bytes = b"") -> TableMeta:
        """Check all vocab_size rows were added, then ingest everything at once."""
        check_complete(self.name, self._done, self._next_token, self.vocab_size)
        try:
            self._rows.finish()
            meta = self._table_meta(self.fingerprint(fingerprint_extra), int(time.time() * 1000))
            counters = self._store._counters()
            counters["next_table_id"] = max(counters["next_table_id"], self.table_id + 1)
            counters["versions"][self.name] = max(counters["versions"].get(self.name, 0), self.version)
            self._meta_writer[manifest_key(self.table_id)] = meta.to_json()
            self._meta_writer[_COUNTERS_KEY] = json.dumps(counters, sort_keys=True).encode()
            self._meta_writer.finish()
            self._store._ingest([*self._row_files, self._meta_file], meta)
        except BaseException:
            self.abort()
            raise
        self._done = True
        shutil.rmtree(self._staging, ignore_errors=True)
        log.info("committed %s v%d (table id %d, %d rows, %d bytes)", meta.name, meta.version, meta.table_id,
                 meta.vocab_size, meta.stored_bytes)
        return meta

    def abort(self) -> None:
        """Forget everything written so far."""
        self._done = True
        self._store._reserved_ids.discard(self.table_id)
        shutil.rmtree(self._staging, ignore_errors=True)
