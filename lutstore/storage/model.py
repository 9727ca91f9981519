"""The table model every backend shares: what a table version is (TableMeta, ArtifactMeta), the
store errors, the version index, the checks a new table, its name and its rows must pass, the
fingerprint, and the parts of a store and a table writer that do not depend on the backend.

Imports no backend (neither rocksdict nor redis): the daemon, ingest and the CLI read tables
through these types and lutstore.storage.api's interface.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from lutstore.errors import UserError
from lutstore.formats.codec import CRC_BYTES, Encoding, RowFormat

ARTIFACT_CHUNK_BYTES = 4 << 20


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


class DatabaseDamaged(StoreError):
    """The database's files are damaged so that it cannot be opened or its table list read."""


class RowsUnreadable(StoreError):
    """The store cannot read these rows: a block that holds them fails its checksum, or the disk
    read failed. `detail` is the backend's message (file names and offsets: for the log, not
    clients); `reason` what happened, in words safe to send to a client."""

    def __init__(self, meta: TableMeta, token_ids: list[int], detail: str, reason: str):
        self.meta = meta
        self._reason = reason
        self.token_ids = token_ids
        self.detail = detail
        super().__init__(f"{len(token_ids)} row(s) of table {meta.name!r} v{meta.version} unreadable: {detail}")

    @property
    def reason(self) -> str:
        """What happened, without file names or offsets (safe to send to a client)."""
        return self._reason


class StoreUnavailable(StoreError):
    """Part of a distributed store cannot be reached now (a node down, a failover running);
    the message names which part. The server answers UNAVAILABLE: the request may succeed later."""


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


class VersionIndex:
    """tables() and resolve() over the manifest as loaded, `_by_name` {name: {version: TableMeta}}:
    the same for every backend (each loads the manifest its own way)."""

    _by_name: dict[str, dict[int, TableMeta]]

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


class StoreBase(VersionIndex):
    """What both backends' stores share beside the version index: who may write."""

    mode: str
    _called = "database"   # what a message calls this store

    def _require_primary(self, what: str) -> None:
        if self.mode != "primary":
            raise StoreError(f"{what} needs the {self._called} opened as primary")

    def _check_drop(self, version: int) -> None:
        """A drop needs the primary and names one version."""
        self._require_primary("drop")
        if version < 1:
            raise StoreError(f"give the version to drop (>= 1), got {version}")


class TableWriterBase(ABC):
    """One new table version being written, the part every backend shares: the checks on rows and
    artifacts, the running fingerprint, the TableMeta it commits. A backend writes the rows
    (_write_rows) and the artifacts' chunks (_artifact_writer), and publishes in commit().
    Leaving the `with` block without commit() aborts."""

    # a folder for big temporary files on the store's own disk (removed with the writer), or None
    scratch_dir: Path | None = None

    def __init__(self, table_id: int, name: str, version: int, fmt: RowFormat, vocab_size: int,
                 source_form: str) -> None:
        self.table_id, self.name, self.version = table_id, name, version
        self.fmt, self.vocab_size, self.source_form = fmt, vocab_size, source_form
        self._next_token = 0                     # rows added so far
        self._stored_bytes = 0
        self._crcs = hashlib.sha256()            # of every row's CRC, in order: the fingerprint's rows part
        self._artifacts: list[ArtifactMeta] = []
        self._done = False                       # committed or aborted

    def __enter__(self) -> TableWriterBase:
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            self.abort()

    def add_rows(self, values: list[bytes]) -> None:
        """Stored values (codec.encode_rows) of the next token ids, in order."""
        check_rows(self.name, self.fmt, self._next_token, self.vocab_size, values)
        first = self._next_token
        for value in values:
            self._crcs.update(value[-CRC_BYTES:])
            self._stored_bytes += len(value)
        self._next_token += len(values)
        self._write_rows(first, values)

    def add_artifact(self, name: str, data: bytes | Path) -> None:
        """A file stored with the table (config.json, tokenizer, backbone weights)."""
        if any(a.name == name for a in self._artifacts):
            raise StoreError(f"artifact {name!r} added twice")
        index = len(self._artifacts)
        self._artifacts.append(write_artifact(name, index, data, self._artifact_writer(name, index)))

    def fingerprint(self, extra: bytes = b"") -> str:
        """The fingerprint commit() gives this version, from what was added so far."""
        return table_fingerprint(self.vocab_size, self.fmt, self._crcs.digest(), self._artifacts, extra)

    def _table_meta(self, fingerprint: str, created_unix_ms: int) -> TableMeta:
        """The manifest entry of this version as written so far."""
        fmt = self.fmt
        return TableMeta(table_id=self.table_id, name=self.name, version=self.version, vocab_size=self.vocab_size,
                         num_layers=fmt.num_layers, num_experts=fmt.num_experts, hidden_size=fmt.hidden_size,
                         encoding=fmt.encoding.value, zstd=fmt.zstd, fingerprint=fingerprint,
                         source_form=self.source_form, created_unix_ms=created_unix_ms,
                         stored_bytes=self._stored_bytes, artifacts=list(self._artifacts), block_size=fmt.block_size)

    @abstractmethod
    def _write_rows(self, first: int, values: list[bytes]) -> None:
        """Write the stored values of token ids first, first + 1, ... (checked already)."""

    @abstractmethod
    def _artifact_writer(self, name: str, index: int) -> Callable[[int, bytes], None]:
        """put(chunk number, bytes) for artifact `index`."""

    @abstractmethod
    def commit(self, fingerprint_extra: bytes = b"") -> TableMeta:
        """Check all vocab_size rows were added (check_complete), then make the version visible at once."""

    @abstractmethod
    def abort(self) -> None:
        """Forget everything written so far."""


def write_artifact(name: str, index: int, data: bytes | Path, put: Callable[[int, bytes], None]) -> ArtifactMeta:
    """Store an artifact in chunks through put(chunk number, bytes), the same way on every backend."""
    digest = hashlib.sha256()
    size = chunks = 0
    for chunk in _chunks(data):
        put(chunks, chunk)
        digest.update(chunk)
        size += len(chunk)
        chunks += 1
    return ArtifactMeta(name, size, digest.hexdigest(), index, chunks)


def check_new_table(name: str, vocab_size: int) -> None:
    """What begin_table accepts (both backends): a name check_table_name accepts, and a vocabulary
    that token ids of 32 bits can index."""
    check_table_name(name)
    if vocab_size < 1 or vocab_size >= 2**32:
        raise StoreError(f"vocab_size must be in 1..2^32-1, got {vocab_size}")


def check_rows(name: str, fmt: RowFormat, first: int, vocab_size: int, values: list[bytes]) -> None:
    """What add_rows accepts (both backends), checked before any is written: rows first.. within
    vocab_size, each a stored value of fmt (more than its CRC; exactly stored_bytes when fixed)."""
    if first + len(values) > vocab_size:
        raise StoreError(f"table {name!r}: more rows than vocab_size {vocab_size}")
    fixed = fmt.stored_bytes
    for k, value in enumerate(values):
        if len(value) <= CRC_BYTES or (fixed is not None and len(value) != fixed):
            raise StoreError(f"row {first + k} is {len(value)} bytes; expected {fixed or 'more than 4'}")


def check_complete(name: str, done: bool, rows_added: int, vocab_size: int) -> None:
    """A table writer may commit once, after exactly vocab_size rows (both backends)."""
    if done:
        raise StoreError("table writer already finished")
    if rows_added != vocab_size:
        raise StoreError(f"table {name!r}: {rows_added} rows added, vocab_size is {vocab_size}")


def is_utf8(name: str) -> bool:
    """Can a gRPC string field carry name? Not if it holds a lone surrogate (os.fsdecode's stand-in
    for a byte that is not UTF-8)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_table_name(name: str) -> None:
    """Raise StoreError unless `name` can name a table: 1-200 characters, no '/', no control
    characters (NUL, newline: they would garble `info` and the logs), and valid UTF-8 (a folder name
    with a stray byte arrives as a lone surrogate, which no gRPC string field can carry: one such
    table made every ListTables fail)."""
    if not name or "/" in name or len(name) > 200 or any(unicodedata.category(c) == "Cc" for c in name) \
            or not is_utf8(name):
        raise StoreError(f"bad table name {name!r}: use 1-200 characters of valid UTF-8, no '/' and no control "
                         f"characters (--name NAME sets it; the default is the checkpoint folder's name)")


def table_fingerprint(vocab_size: int, fmt: RowFormat, crc_digest: bytes, artifacts: list[ArtifactMeta],
                      extra: bytes = b"") -> str:
    """sha256 over the (name-independent) shape and encoding, the CRC of every row in order (crc_digest)
    and every artifact's sha256: the same on every backend (tests check they agree)."""
    h = hashlib.sha256()
    shape = {"vocab_size": vocab_size, "num_layers": fmt.num_layers, "num_experts": fmt.num_experts,
             "hidden_size": fmt.hidden_size, "encoding": fmt.encoding.value, "zstd": fmt.zstd}
    if fmt.block_size:   # nf4 only, so the other encodings' fingerprints are unchanged
        shape["block_size"] = fmt.block_size
    h.update(json.dumps(shape, sort_keys=True).encode())
    h.update(crc_digest)
    for a in artifacts:
        h.update(f"{a.name}\0{a.sha256}\0".encode())
    h.update(extra)
    return h.hexdigest()


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
