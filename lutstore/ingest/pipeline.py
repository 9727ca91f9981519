"""`lutstore ingest`: a MoLE checkpoint folder -> one new, immutable table version.

Order of work, so that bad input never touches the database:
  1. open and validate the checkpoint (lutstore.ingest.checkpoint), the encoding,
     the device and the free disk space;
  2. open the DB as primary and stream rows in vocab chunks:
       train form: e_l = expert_layernorm_l(embed[chunk]) (RMSNorm, fp32),
                   row[l, j] = down_j(gelu_erf(up_j(e_l)))   (fp32, on --device)
       rep form:   moe_table[chunk] upcast to fp32, reshaped [chunk, L, N, D]
     encoded with lutstore.formats.codec and appended to a TableWriter (staging SSTs);
  3. add the artifacts (config.json, backbone.safetensors, tokenizer files)
     and commit: one atomic RocksDB ingest makes the version visible.
Any failure (including a full disk or a kill) before the commit leaves the
database as it was.

Test hook: LUTSTORE_INGEST_SKIP_SPACE_CHECK=1 skips the free-space estimate,
so tests can drive a real ENOSPC on a tiny filesystem.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import zstandard

from lutstore.storage.backends import backend_for, open_store
from lutstore.ingest.checkpoint import TOKENIZER_FILES, Checkpoint
from lutstore.ingest.reparam import RepRows, TrainRows
from lutstore.formats.codec import CRC_BYTES, ENCODINGS, Encoding, RowFormat, encode_rows
from lutstore.errors import UserError
from lutstore.interrupts import Terminated, deferred, finished
from lutstore.storage.api import TableStore
from lutstore.storage.model import TableMeta, TableWriterBase, check_table_name

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 64 << 20      # fp32 rows computed per chunk when --chunk-tokens is 0
KEY_OVERHEAD_BYTES = 32             # per-row key + SST index overhead, for the space estimate
SPACE_MARGIN_BYTES = 4 << 20        # RocksDB's own files (WAL, manifest, options, log)
SKIP_SPACE_CHECK_ENV = "LUTSTORE_INGEST_SKIP_SPACE_CHECK"
# An artifact naming what a version was made from (the checkpoint files' sha256 and how they were
# encoded): the same record as the latest version's means "already holds this checkpoint", decided
# before any row is computed. Versions ingested before it existed are compared by fingerprint.
SOURCE_ARTIFACT = "lutstore-source.json"
HASH_CHUNK_BYTES = 8 << 20


class AlreadyIngested(UserError):
    """The latest version of the table already holds this very checkpoint (same fingerprint); nothing was added."""

    def __init__(self, meta: TableMeta):
        self.meta = meta
        super().__init__(f"table {meta.name!r} v{meta.version} already holds this checkpoint as "
                         f"{meta.encoding}{'+zstd' if meta.zstd else ''} (same fingerprint {meta.fingerprint[:16]}); "
                         f"nothing added (--force adds a new version anyway)")


# ---- validation --------------------------------------------------------------

def _tokenizer_files(ckpt: Checkpoint, allowed: bool, tokenizer_dir: Path | None) -> list[Path]:
    """The tokenizer files stored with the table: the checkpoint's, or with tokenizer_dir those of
    that folder (the official reparameterisation writes none: they are the train checkpoint's or
    the base model's). generation_config.json stays the checkpoint's when it has one."""
    if tokenizer_dir is not None:
        if not tokenizer_dir.is_dir():
            raise UserError(f"--tokenizer {tokenizer_dir}: no such folder")
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise UserError(f"--tokenizer {tokenizer_dir} has no tokenizer.json: give the folder of the model's "
                            f"tokenizer files (the train checkpoint or the base model)")
        own = [f for f in ckpt.tokenizer_files() if f.name == "generation_config.json"]
        theirs = [tokenizer_dir / n for n in TOKENIZER_FILES
                  if (tokenizer_dir / n).is_file() and not (own and n == "generation_config.json")]
        return own + theirs
    # Refused up front: without tokenizer.json, `generate` fails only later, far from the cause,
    # after a possibly long ingest. Rows-only tables are legitimate (evaluate --token-ids, clients),
    # so the flag lets them through.
    if not allowed and not (ckpt.path / "tokenizer.json").is_file():
        raise UserError(f"{ckpt.path} has no tokenizer.json, so `generate` could not encode text with this table; "
                        f"pass --tokenizer DIR to take the tokenizer files from another folder (the train "
                        f"checkpoint or the base model), or --allow-no-tokenizer to ingest the rows and "
                        f"backbone only")
    return ckpt.tokenizer_files()


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown --device {name!r}: use cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def _row_format(ckpt: Checkpoint, encoding: str, zstd: bool, block_size: int | None = None) -> RowFormat:
    try:
        enc = Encoding(encoding)
    except ValueError:
        raise UserError(f"unknown encoding {encoding!r}: use one of {', '.join(e.value for e in Encoding)}") from None
    spec = ENCODINGS[enc]
    if block_size is not None and spec.check_block_size is None:
        blocked = ", ".join(e.value for e, s in ENCODINGS.items() if s.check_block_size is not None)
        raise UserError(f"--block-size applies to --encoding {blocked} only, not {enc.value}")
    if zstd and not spec.compressible:
        raise UserError(f"--zstd does not apply to --encoding {enc.value}: {enc.value} codes are near-incompressible "
                        "(zstd saved 0.1-2.5%); drop --zstd")
    c = ckpt.config
    try:
        return RowFormat(c.num_layers, c.num_experts, c.hidden_size, enc, zstd, block_size or 0)
    except ValueError as e:   # a block size that does not divide hidden_size
        raise UserError(f"--block-size: {e}") from None


def _chunk_tokens(fmt: RowFormat, vocab: int, chunk_tokens: int) -> int:
    if chunk_tokens < 0:
        raise UserError(f"--chunk-tokens must be >= 0 (0: automatic), got {chunk_tokens}")
    if chunk_tokens == 0:
        chunk_tokens = max(1, DEFAULT_CHUNK_BYTES // (4 * fmt.values))
    return min(chunk_tokens, vocab)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _estimate_bytes(ckpt: Checkpoint, fmt: RowFormat, backbone: list[str], tokenizer: list[Path]) -> int:
    """Upper bound of the disk this ingest needs: rows (zstd counted as uncompressed), the
    backbone twice (the temporary file and its SST copy), the other artifacts and a margin."""
    rows = int(ckpt.config.vocab_size * (fmt.payload_bytes + CRC_BYTES + KEY_OVERHEAD_BYTES) * 1.02)
    others = sum(p.stat().st_size for p in tokenizer) + (ckpt.path / "config.json").stat().st_size
    return rows + 2 * ckpt.weight_bytes(backbone) + others + SPACE_MARGIN_BYTES


def _check_space(db_path: Path, need: int) -> None:
    if os.environ.get(SKIP_SPACE_CHECK_ENV) == "1":
        return
    where = _existing_ancestor(db_path)
    free = shutil.disk_usage(where).free
    if free < need:
        raise UserError(f"not enough disk space for this ingest at {where}: about {_mb(need)} MB needed, "
                        f"{_mb(free)} MB free; free some space or use --encoding nf4/int8/fp16")


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(e)  # rocksdict reports RocksDB IO errors as plain exceptions
    return any(s in text for s in ("No space left", "Disk quota exceeded", "File too large"))


# ---- artifacts --------------------------------------------------------------

def _write_backbone(ckpt: Checkpoint, names: list[str], dest: Path) -> None:
    """backbone.safetensors: the non-expert tensors, each in its stored dtype."""
    from safetensors.torch import save_file

    tensors = {}
    for n in names:
        t = ckpt.tensor(n).contiguous()
        # .bin tensors may be views sharing one storage; safetensors refuses shared memory.
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        tensors[n] = t
    save_file(tensors, str(dest), metadata={"format": "pt"})


# ---- the ingest -------------------------------------------------------------

def ingest_checkpoint(ckpt_dir: str | Path, db_path: str | Path, name: str | None = None, encoding: str = "fp16",
                      zstd: bool = False, device: str = "cpu", chunk_tokens: int = 0, progress: bool = True,
                      keep_versions: int = 0, force: bool = False, allow_no_tokenizer: bool = False,
                      say: Callable[[str], None] | None = None, block_size: int | None = None,
                      tokenizer_dir: str | Path | None = None) -> TableMeta:
    """Ingest one checkpoint as a new version of table `name` (default: the folder's name).

    tokenizer_dir: take the tokenizer files from this folder (it must hold tokenizer.json) instead
    of the checkpoint's.

    Raises UserError (nothing written) for bad input or too little disk space, and AlreadyIngested
    when the latest version already has this checkpoint's fingerprint (unless force).
    say(line) reports versions dropped by keep_versions (default: logged at info level).
    Returns the committed version's TableMeta.
    """
    say = say or log.info
    local = backend_for(db_path).local   # a folder on this host (not a URL)
    ckpt_dir, db_path = Path(ckpt_dir), (Path(db_path) if local else db_path)
    if keep_versions < 0:
        raise UserError(f"--keep-versions must be >= 0, got {keep_versions}")
    name = name or ckpt_dir.resolve().name
    check_table_name(name)   # before any work (the store checks it again)
    ckpt = Checkpoint.open(ckpt_dir)
    try:
        tokenizer = _tokenizer_files(ckpt, allow_no_tokenizer, None if tokenizer_dir is None else Path(tokenizer_dir))
        fmt = _row_format(ckpt, encoding, zstd, block_size)
    except UserError:
        ckpt.close()
        raise
    dev = _device(device)
    vocab = ckpt.config.vocab_size
    chunk = _chunk_tokens(fmt, vocab, chunk_tokens)
    backbone = ckpt.backbone_names()
    need = _estimate_bytes(ckpt, fmt, backbone, tokenizer)
    if local:  # a cluster's memory is its operator's to size (docs/operations.md)
        _check_space(db_path, need)
    compute = TrainRows(ckpt, dev) if ckpt.form == "train" else RepRows(ckpt)

    started = time.monotonic()
    meta = duplicate = None
    try:
        source = _source_record(ckpt, fmt, tokenizer, progress)
        with open_store(db_path, "primary", create=True) as store:
            duplicate = None if force else _made_from(store, name, source)
            if duplicate is None:
                with store.begin_table(name, fmt, vocab, ckpt.form) as writer:
                    _write_rows(writer, compute, fmt, vocab, chunk, progress)
                    _add_artifacts(writer, ckpt, backbone, tokenizer)
                    duplicate = None if force else _same_as_latest(store, name, writer)
                    if duplicate is None:
                        writer.add_artifact(SOURCE_ARTIFACT, source)
                        with deferred():  # a SIGTERM / Ctrl-C now waits for the commit to finish or fail
                            meta = writer.commit()
                            # Done: a signal from here on cannot undo it, so the ingest finishes (its
                            # --keep-versions drops, its report) and exits 0, saying so.
                            finished(f"lutstore ingest: {meta.name} v{meta.version} was already committed; finishing")
                    # else: leaving the block aborts the writer and removes its staging files
            _keep_newest(store, name, keep_versions, say)
    except (KeyboardInterrupt, Terminated) as e:
        e.ingest_note = (f"{meta.name} v{meta.version} had been added" if meta is not None else
                         "the ingest was aborted: nothing was added and its staging files were removed")
        raise
    except UserError:
        raise
    except Exception as e:
        if _is_disk_full(e):
            raise UserError(f"disk full while writing to {db_path} (about {_mb(need)} MB needed); "
                            f"the ingest was aborted and nothing was added") from None
        raise
    finally:
        ckpt.close()
    if duplicate is not None:
        raise AlreadyIngested(duplicate)
    seconds = time.monotonic() - started
    log.info("ingested %s v%d: %d rows, %d bytes in %.2fs (%.1f MB/s)", meta.name, meta.version, vocab,
             meta.stored_bytes, seconds, meta.stored_bytes / 1e6 / max(seconds, 1e-9))
    return meta


def _write_rows(writer: TableWriterBase, compute: TrainRows | RepRows, fmt: RowFormat, vocab: int, chunk: int, progress: bool) -> None:
    from tqdm import tqdm

    compressor = zstandard.ZstdCompressor(level=3) if fmt.zstd else None
    written = 0
    t0 = time.monotonic()
    with tqdm(total=vocab, unit="rows", disable=not progress, desc="ingest", dynamic_ncols=True) as bar:
        for start in range(0, vocab, chunk):
            stop = min(start + chunk, vocab)
            rows = compute(start, stop)
            try:
                values = encode_rows(fmt, rows, compressor)
            except ValueError as e:  # non-finite values, or out of fp16 range
                raise UserError(f"cannot encode rows {start}..{stop - 1} as {fmt.encoding.value}: {e}") from None
            writer.add_rows(values)
            written += sum(len(v) for v in values)
            bar.update(stop - start)
            bar.set_postfix_str(f"{_mb(written / max(time.monotonic() - t0, 1e-9))} MB/s", refresh=False)


def _add_artifacts(writer: TableWriterBase, ckpt: Checkpoint, backbone: list[str], tokenizer: list[Path]) -> None:
    writer.add_artifact("config.json", (ckpt.path / "config.json").read_bytes())
    # The temporary backbone file lives in the writer's scratch folder where it has one (the
    # store's disk; what a killed ingest leaves there is removed by the next ingest), else in the
    # system's temp folder. The pid prefix marks it ours.
    tmp = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-backbone-", dir=writer.scratch_dir))
    try:
        path = tmp / "backbone.safetensors"
        _write_backbone(ckpt, backbone, path)
        writer.add_artifact("backbone.safetensors", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for f in tokenizer:
        writer.add_artifact(f.name, f.read_bytes())


def _source_record(ckpt: Checkpoint, fmt: RowFormat, tokenizer: list[Path], progress: bool) -> bytes:
    """SOURCE_ARTIFACT's bytes: the sha256 of every file the ingest reads (config, weights, weight
    index, tokenizer files) and the row format they are encoded to; canonical JSON, so two ingests
    of the same files in the same format give the same bytes. Reading the files costs a fraction of
    computing the rows (a 15 GB checkpoint: seconds, not minutes)."""
    from tqdm import tqdm

    files = [ckpt.path / "config.json", *ckpt.weight_files()]
    files += [ckpt.path / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
              if (ckpt.path / n).is_file()]
    # tokenizer files by their artifact name: the same files give the same record wherever they were read
    keyed = [(str(f.relative_to(ckpt.path)), f) for f in files] + [(f.name, f) for f in tokenizer]
    digests: dict[str, str] = {}
    with tqdm(total=sum(f.stat().st_size for _, f in keyed), unit="B", unit_scale=True, disable=not progress,
              desc="checksum", dynamic_ncols=True) as bar:
        for key, f in keyed:
            digest = hashlib.sha256()
            with open(f, "rb") as stream:
                while chunk := stream.read(HASH_CHUNK_BYTES):
                    digest.update(chunk)
                    bar.update(len(chunk))
            digests[key] = digest.hexdigest()
    record = {"files_sha256": digests, "form": ckpt.form, "encoding": fmt.encoding.value, "zstd": fmt.zstd,
              "block_size": fmt.block_size}
    return json.dumps(record, sort_keys=True, indent=1).encode()


def _made_from(store: TableStore, name: str, source: bytes) -> TableMeta | None:
    """The latest live version of `name` if it records this very source (SOURCE_ARTIFACT)."""
    latest = [m for m in store.tables() if m.name == name]
    if not latest:
        return None
    try:
        recorded = latest[-1].artifact(SOURCE_ARTIFACT)
    except KeyError:   # ingested before versions recorded their source: _same_as_latest decides
        return None
    return latest[-1] if recorded.sha256 == hashlib.sha256(source).hexdigest() else None


def _same_as_latest(store: TableStore, name: str, writer: TableWriterBase) -> TableMeta | None:
    """The latest live version of `name` if it has the fingerprint this writer would commit (the
    writer holds no SOURCE_ARTIFACT yet, so this matches versions ingested before there was one)."""
    latest = [m for m in store.tables() if m.name == name]
    if not latest:
        return None
    # Same fingerprint function commit() uses (shape, encoding, every row's CRC, every artifact's sha256).
    return latest[-1] if latest[-1].fingerprint == writer.fingerprint() else None


def _keep_newest(store: TableStore, name: str, keep: int, say: Callable[[str], None]) -> list[int]:
    """Drop all but the newest `keep` versions of `name`, naming each; the versions dropped."""
    if keep <= 0:
        return []
    versions = sorted(m.version for m in store.tables() if m.name == name)
    dropped = []
    for v in versions[:-keep]:
        meta = store.resolve(name, v)
        with deferred():  # a drop is manifest first, then rows: not cut in between
            store.drop(name, v)
        dropped.append(v)
        say(f"dropped {name} v{v} ({meta.stored_bytes / 1e6:.1f} MB, --keep-versions {keep})")
    return dropped


def main(args: argparse.Namespace) -> int:
    """Entry point of `lutstore ingest` (flags parsed in lutstore.cli)."""
    if args.nice:
        # Ingest is a batch job; a daemon serving on the same host keeps its latency.
        os.nice(args.nice)
    started = time.monotonic()
    later: list[str] = []   # what --keep-versions dropped, printed after the "ingested" line
    try:
        meta = ingest_checkpoint(args.checkpoint, args.db, name=args.name, encoding=args.encoding, zstd=args.zstd,
                                 device=args.device, chunk_tokens=args.chunk_tokens, progress=not args.no_progress,
                                 keep_versions=args.keep_versions, force=args.force,
                                 allow_no_tokenizer=args.allow_no_tokenizer, say=later.append,
                                 block_size=args.block_size, tokenizer_dir=args.tokenizer)
    except AlreadyIngested as e:   # not a failure: the table already is what was asked for
        print(e, *later, sep="\n", flush=True)
        return 0
    seconds = time.monotonic() - started
    block = f" block {meta.block_size}" if meta.block_size else ""
    print(f"ingested {meta.name} v{meta.version} ({meta.source_form} form, {meta.encoding}{block}{'+zstd' if meta.zstd else ''}): "
          f"{meta.vocab_size} rows, {meta.stored_bytes} bytes in {seconds:.2f}s "
          f"({meta.stored_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s) into {args.db}", flush=True)
    for line in later:
        print(line, flush=True)
    return 0
