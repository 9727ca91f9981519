"""RocksDB tables: key layout, manifest, versions, atomic ingest, drop.

One RocksDB (rocksdict, raw bytes), one column family. Keys are fixed-width
big-endian with a kind byte first, so RocksDB's order is token order and a
batch of ids maps to one sorted multi-get:

    b"a" + table_id u32 + artifact_index u16 + chunk u32  -> artifact bytes (4 MiB chunks)
    b"m" + table_id u32                                   -> TableMeta as UTF-8 JSON
    b"n"                                                  -> allocation counters (JSON)
    b"r" + table_id u32 + token_id u32                    -> stored row value (codec)

A version is visible once its manifest key exists. TableWriter writes rows,
artifacts and the manifest to SST files and ingests them all in ONE
`ingest_external_file` call, so a killed ingest leaves nothing half-visible.
The `b"n"` counters make table ids and versions never reused after a drop,
so a reader's cache keyed by table id can never see stale rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import struct
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from rocksdict import AccessType, IngestExternalFileOptions, Options, Rdict, SstFileWriter

from lutstore.codec import CRC_BYTES, Encoding, RowFormat
from lutstore.errors import UserError

log = logging.getLogger(__name__)

ARTIFACT_CHUNK_BYTES = 4 << 20
SST_ROLL_BYTES = 256 << 20  # start a new rows SST file past this size

_U32 = struct.Struct(">I")
_ROW = struct.Struct(">cII")
_ART = struct.Struct(">cIHI")
_COUNTERS_KEY = b"n"


class StoreError(UserError):
    """A database problem a user can understand and act on."""


class TableNotFound(StoreError):
    def __init__(self, name: str, existing: list[str]):
        self.name = name
        self.existing = existing
        listing = ", ".join(existing) if existing else "none"
        super().__init__(f"no table named {name!r} (tables: {listing})")


class VersionGone(StoreError):
    def __init__(self, name: str, version: int, latest: int):
        self.name = name
        self.version = version
        self.latest = latest
        super().__init__(f"table {name!r} has no live version {version} (dropped or never ingested); latest is {latest}")


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


@dataclass
class ArtifactMeta:
    name: str
    size: int
    sha256: str
    index: int
    chunks: int


@dataclass
class TableMeta:
    table_id: int
    name: str
    version: int
    vocab_size: int
    num_layers: int
    num_experts: int
    hidden_size: int
    encoding: str
    zstd: bool
    fingerprint: str
    source_form: str
    created_unix_ms: int
    stored_bytes: int
    artifacts: list[ArtifactMeta] = field(default_factory=list)
    block_size: int = 0   # nf4 only: values per block (manifests written before nf4 have none)

    def row_format(self) -> RowFormat:
        return RowFormat(self.num_layers, self.num_experts, self.hidden_size, Encoding(self.encoding), self.zstd,
                         self.block_size)

    def artifact(self, name: str) -> ArtifactMeta:
        for a in self.artifacts:
            if a.name == name:
                return a
        raise KeyError(name)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> TableMeta:
        d = json.loads(data)
        d["artifacts"] = [ArtifactMeta(**a) for a in d.get("artifacts", [])]
        return cls(**d)


def _db_exists(path: Path) -> bool:
    return (path / "CURRENT").is_file()


def _options(secondary: bool) -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(not secondary)
    if secondary:
        opts.set_max_open_files(-1)  # RocksDB requires it of secondary instances
    return opts


def _iter_prefix(db: Rdict, begin: bytes, end: bytes) -> Iterator[tuple[bytes, bytes]]:
    it = db.iter()
    it.seek(begin)
    while it.valid():
        key = it.key()
        if key >= end:
            break
        yield key, it.value()
        it.next()


class Store:
    """One lutstore database. Writers open it as primary (one process at a
    time); readers (server, info, verify) as a secondary that catches up with
    the primary on refresh()."""

    def __init__(self, path: Path, db: Rdict, mode: str, secondary_dir: str | None):
        self.path = path
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
            if not create or mode == "secondary":
                raise StoreError(f"no lutstore database at {path}; create one with `lutstore ingest`")
            path.mkdir(parents=True, exist_ok=True)
        secondary_dir = None
        try:
            if mode == "secondary":
                # The secondary's own files live outside the DB folder and die with it.
                secondary_dir = tempfile.mkdtemp(prefix="lutstore-secondary-")
                db = Rdict(str(path), _options(True), access_type=AccessType.secondary(secondary_dir))
            else:
                db = Rdict(str(path), _options(False))
        except Exception as e:  # rocksdict raises plain Exception
            if secondary_dir:
                shutil.rmtree(secondary_dir, ignore_errors=True)
            if "lock" in str(e).lower():
                raise StoreError(f"database {path} is open by another writer (an ingest or drop is running); try again when it ends") from e
            raise StoreError(f"cannot open database {path}: {e}") from e
        return cls(path, db, mode, secondary_dir)

    # ---- reading -------------------------------------------------------

    def _load_manifest(self) -> None:
        by_name: dict[str, dict[int, TableMeta]] = {}
        for _, value in _iter_prefix(self._db, b"m", b"n"):
            meta = TableMeta.from_json(value)
            by_name.setdefault(meta.name, {})[meta.version] = meta
        with self._lock:
            self._by_name = by_name

    def _counters(self) -> dict:
        raw = self._db.get(_COUNTERS_KEY)
        return json.loads(raw) if raw else {"next_table_id": 1, "versions": {}}

    def tables(self) -> list[TableMeta]:
        """All live versions, sorted by (name, version)."""
        by_name = self._by_name
        return [by_name[n][v] for n in sorted(by_name) for v in sorted(by_name[n])]

    def resolve(self, name: str, version: int = 0) -> TableMeta:
        """The live TableMeta of (name, version); version 0 is the latest."""
        versions = self._by_name.get(name)
        if not versions:
            raise TableNotFound(name, sorted(self._by_name))
        if version == 0:
            return versions[max(versions)]
        meta = versions.get(version)
        if meta is None:
            raise VersionGone(name, version, max(versions))
        return meta

    def get_values(self, meta: TableMeta, token_ids: list[int]) -> list[bytes | None]:
        """Raw stored values of token_ids in one multi-get (None where missing)."""
        tid = meta.table_id
        return self._db.get([_ROW.pack(b"r", tid, t) for t in token_ids])

    def iter_rows(self, meta: TableMeta) -> Iterator[tuple[int, bytes]]:
        """(token_id, stored value) of every row, in token order."""
        begin, end = rows_range(meta.table_id)
        for key, value in _iter_prefix(self._db, begin, end):
            yield _ROW.unpack(key)[2], value

    def iter_artifact(self, meta: TableMeta, name: str) -> Iterator[bytes]:
        """An artifact's chunks in order; KeyError if the table has no such artifact."""
        art = meta.artifact(name)
        for chunk in range(art.chunks):
            data = self._db.get(artifact_key(meta.table_id, art.index, chunk))
            if data is None:
                raise StoreError(f"artifact {name!r} of {meta.name} v{meta.version} is missing chunk {chunk}")
            yield data

    def refresh(self) -> None:
        """Secondary: see what the primary ingested or dropped since the last call."""
        if self.mode == "secondary":
            self._db.try_catch_up_with_primary()
        self._load_manifest()

    # ---- writing (primary only) ---------------------------------------

    def _require_primary(self, what: str) -> None:
        if self.mode != "primary":
            raise StoreError(f"{what} needs the database opened as primary")

    def begin_table(self, name: str, fmt: RowFormat, vocab_size: int, source_form: str) -> TableWriter:
        self._require_primary("writing a table")
        if not name or "/" in name or len(name) > 200:
            raise StoreError(f"bad table name {name!r}: use 1-200 characters, no '/'")
        if vocab_size < 1 or vocab_size >= 2**32:
            raise StoreError(f"vocab_size must be in 1..2^32-1, got {vocab_size}")
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

    def drop(self, name: str, version: int) -> None:
        """Delete one version: manifest first (invisible at once), then its rows and artifacts."""
        self._require_primary("drop")
        if version < 1:
            raise StoreError(f"give the version to drop (>= 1), got {version}")
        meta = self.resolve(name, version)
        self._db.delete(manifest_key(meta.table_id))
        for begin, end in (rows_range(meta.table_id), artifacts_range(meta.table_id)):
            self._db.delete_range(begin, end)
            self._db.compact_range(begin, end)  # give the disk space back now
        with self._lock:
            versions = self._by_name.get(name, {})
            versions.pop(version, None)
            if not versions:
                self._by_name.pop(name, None)
        log.info("dropped %s v%d (table id %d)", name, version, meta.table_id)

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


class TableWriter:
    """Collects one new table version in staging SST files; commit() makes it
    visible in one atomic ingest. Leaving the `with` block without commit()
    aborts and removes the staging files."""

    def __init__(self, store: Store, staging: Path, table_id: int, name: str, version: int,
                 fmt: RowFormat, vocab_size: int, source_form: str):
        self._store = store
        self._staging = staging
        self.table_id = table_id
        self.name = name
        self.version = version
        self.fmt = fmt
        self.vocab_size = vocab_size
        self.source_form = source_form
        self._opts = _options(False)
        self._row_files: list[Path] = []
        self._rows: SstFileWriter | None = None
        self._next_token = 0
        self._stored_bytes = 0
        self._crcs = hashlib.sha256()
        self._meta_file = staging / "meta.sst"
        self._meta_writer = SstFileWriter(options=self._opts)
        self._meta_writer.open(str(self._meta_file))
        self._artifacts: list[ArtifactMeta] = []
        self._done = False

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            self.abort()

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

    def add_rows(self, values: list[bytes]) -> None:
        """Stored values (codec.encode_rows) of the next token ids, in order."""
        if self._next_token + len(values) > self.vocab_size:
            raise StoreError(f"table {self.name!r}: more rows than vocab_size {self.vocab_size}")
        fixed = self.fmt.stored_bytes
        tid = self.table_id
        for value in values:
            if len(value) <= CRC_BYTES or (fixed is not None and len(value) != fixed):
                raise StoreError(f"row {self._next_token} is {len(value)} bytes; expected {fixed or 'more than 4'}")
            self._rows_writer()[_ROW.pack(b"r", tid, self._next_token)] = value
            self._crcs.update(value[-CRC_BYTES:])
            self._stored_bytes += len(value)
            self._next_token += 1

    def add_artifact(self, name: str, data: bytes | Path) -> None:
        """A file stored with the table (config.json, tokenizer, backbone weights)."""
        if any(a.name == name for a in self._artifacts):
            raise StoreError(f"artifact {name!r} added twice")
        index = len(self._artifacts)
        digest = hashlib.sha256()
        size = chunks = 0
        for chunk in _chunks(data):
            self._meta_writer[artifact_key(self.table_id, index, chunks)] = chunk
            digest.update(chunk)
            size += len(chunk)
            chunks += 1
        self._artifacts.append(ArtifactMeta(name, size, digest.hexdigest(), index, chunks))

    def _fingerprint(self, extra: bytes) -> str:
        h = hashlib.sha256()
        shape = {"vocab_size": self.vocab_size, "num_layers": self.fmt.num_layers, "num_experts": self.fmt.num_experts,
                 "hidden_size": self.fmt.hidden_size, "encoding": self.fmt.encoding.value, "zstd": self.fmt.zstd}
        if self.fmt.block_size:   # nf4 only, so the other encodings' fingerprints are unchanged
            shape["block_size"] = self.fmt.block_size
        h.update(json.dumps(shape, sort_keys=True).encode())
        h.update(self._crcs.digest())
        for a in self._artifacts:
            h.update(f"{a.name}\0{a.sha256}\0".encode())
        h.update(extra)
        return h.hexdigest()

    def commit(self, fingerprint_extra: bytes = b"") -> TableMeta:
        """Check all vocab_size rows were added, then ingest everything at once."""
        if self._done:
            raise StoreError("table writer already finished")
        if self._next_token != self.vocab_size:
            raise StoreError(f"table {self.name!r}: {self._next_token} rows added, vocab_size is {self.vocab_size}")
        try:
            self._rows.finish()
            meta = TableMeta(
                table_id=self.table_id, name=self.name, version=self.version, vocab_size=self.vocab_size,
                num_layers=self.fmt.num_layers, num_experts=self.fmt.num_experts, hidden_size=self.fmt.hidden_size,
                encoding=self.fmt.encoding.value, zstd=self.fmt.zstd, fingerprint=self._fingerprint(fingerprint_extra),
                source_form=self.source_form, created_unix_ms=int(time.time() * 1000),
                stored_bytes=self._stored_bytes, artifacts=list(self._artifacts), block_size=self.fmt.block_size)
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


def _chunks(data: bytes | Path) -> Iterator[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
        for off in range(0, max(len(data), 1), ARTIFACT_CHUNK_BYTES):
            yield data[off : off + ARTIFACT_CHUNK_BYTES]
        return
    with open(data, "rb") as f:
        first = True
        while True:
            chunk = f.read(ARTIFACT_CHUNK_BYTES)
            if not chunk and not first:
                return
            yield chunk  # an empty file is one empty chunk, so it still round-trips
            first = False
            if len(chunk) < ARTIFACT_CHUNK_BYTES:
                return
