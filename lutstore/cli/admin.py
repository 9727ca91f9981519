"""`lutstore info | verify | drop`: look after a database from the server host.

info and verify only read, through a RocksDB secondary, so they work while
`lutstore serve` runs; drop opens the database as its (single) writer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import asdict

from tqdm import tqdm

from lutstore.formats import codec
from lutstore.errors import UserError
from lutstore.storage.backends import open_store
from lutstore.storage.api import TableStore
from lutstore.storage.model import RowsUnreadable, StoreError, TableMeta

log = logging.getLogger(__name__)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _describe(meta: TableMeta) -> dict:
    d = asdict(meta)
    d["row_bytes"] = meta.row_format().payload_bytes
    return d


def info(args: argparse.Namespace) -> int:
    """Print every live table version: shape, encoding, sizes, fingerprint, artifacts."""
    with open_store(args.db, "secondary") as store:
        tables = store.tables()
    if args.json:
        json.dump({"db": str(args.db), "tables": [_describe(m) for m in tables]}, sys.stdout, indent=2)
        print()
        return 0
    print(f"database {args.db}: {len(tables)} table version(s)")
    for m in tables:
        fmt = m.row_format()
        print(f"{m.name} v{m.version}  [{m.vocab_size} x {m.num_layers} x {m.num_experts} x {m.hidden_size}]  "
              f"{m.encoding}{f' (block {m.block_size})' if m.block_size else ''}{'+zstd' if m.zstd else ''}  row {fmt.payload_bytes} B  stored {_size(m.stored_bytes)}  "
              f"from {m.source_form}  fingerprint {m.fingerprint[:16]}")
        for a in m.artifacts:
            print(f"    {a.name}  {_size(a.size)}  sha256 {a.sha256[:16]}")
    return 0


def verify(args: argparse.Namespace) -> int:
    """Check every stored row (checksum, length, readable on disk) and artifact (sha256); name each bad
    one, going on past damaged blocks; exit 1 if any. --json: one object on stdout for scripts."""
    with open_store(args.db, "secondary") as store:
        tables = store.tables()
        if args.table:
            tables = [m for m in tables if m.name == args.table]
            if not tables:
                store.resolve(args.table)  # raises TableNotFound, listing the tables
        if args.version:
            if not args.table:
                raise UserError("--version needs --table")
            tables = [store.resolve(args.table, args.version)]
        reports = [_verify_table(store, meta, quiet=args.json) for meta in tables]
    bad = sum(len(r["bad"]) for r in reports)
    bad_artifacts = sum(len(r["bad_artifacts"]) for r in reports)
    total = sum(m.vocab_size for m in tables)
    ok = bad == 0 and bad_artifacts == 0
    if args.json:
        json.dump({"db": str(args.db), "ok": ok, "rows": total, "bad_rows": bad, "bad_artifacts": bad_artifacts,
                   "tables": reports}, sys.stdout, indent=2)
        print()
    elif not ok:
        print(f"verify: {bad} bad row(s) and {bad_artifacts} bad artifact(s) in {len(tables)} table version(s)",
              file=sys.stderr)
    else:
        print(f"verify: {total} rows in {len(tables)} table version(s) OK")
    return 0 if ok else 1


def _verify_table(store: TableStore, meta: TableMeta, quiet: bool = False) -> dict:
    """{"table", "version", "rows", "bad": [{"token", "problem"}]} of one table version; each bad row
    is printed to stderr as it is found (unless quiet)."""
    fmt = meta.row_format()
    bad: list[dict] = []
    expected = 0
    where = f"table {meta.name!r} v{meta.version}"

    def report(token_id: int, problem: str) -> None:
        bad.append({"token": token_id, "problem": problem})
        if not quiet:
            print(f"BAD {where} token {token_id}: {problem}", file=sys.stderr)

    with tqdm(total=meta.vocab_size, desc=f"{meta.name} v{meta.version}", unit="row", file=sys.stderr,
              disable=True if quiet else None, leave=False) as bar:
        for token_id, value in store.iter_rows(meta):
            while expected < token_id:  # a gap: rows that should exist and do not
                report(expected, "row missing")
                expected += 1
            if isinstance(value, RowsUnreadable):
                report(token_id, f"unreadable on disk: {value.detail}")  # names the file: this is the host
            else:
                try:
                    codec.payload_of(fmt, value)  # checksum, then (zstd) decompression and length
                except Exception as e:  # ChecksumError, or a broken zstd frame
                    report(token_id, str(e))
            expected = token_id + 1
            bar.update(1)
    for token_id in range(expected, meta.vocab_size):
        report(token_id, "row missing")
    bad_artifacts = []
    for problem in _artifact_problems(store, meta):
        bad_artifacts.append(problem)
        if not quiet:
            print(f"BAD {where} artifact {problem['artifact']!r}: {problem['problem']}", file=sys.stderr)
    return {"table": meta.name, "version": meta.version, "rows": meta.vocab_size, "bad": bad,
            "bad_artifacts": bad_artifacts}


def _artifact_problems(store: TableStore, meta: TableMeta) -> list[dict]:
    """Each artifact read whole and checked against the size and sha256 recorded at ingest."""
    problems = []
    for art in meta.artifacts:
        digest, size = hashlib.sha256(), 0
        try:
            for chunk in store.iter_artifact(meta, art.name):
                digest.update(chunk)
                size += len(chunk)
        except StoreError as e:
            problems.append({"artifact": art.name, "problem": str(e)})
            continue
        if size != art.size or digest.hexdigest() != art.sha256:
            problems.append({"artifact": art.name, "problem": f"{size} bytes, sha256 {digest.hexdigest()[:16]}; "
                                                              f"ingested {art.size} bytes, sha256 {art.sha256[:16]}"})
    return problems


def drop(args: argparse.Namespace) -> int:
    """Delete one version of a table (servers stop serving it at their next refresh)."""
    with open_store(args.db, "primary") as store:
        meta = store.resolve(args.table, args.version)
        kept = store.drop(args.table, args.version)
        left = [m.version for m in store.tables() if m.name == args.table]
    print(f"dropped {meta.name} v{meta.version} ({_size(meta.stored_bytes)}); "
          f"live versions left: {', '.join(map(str, left)) or 'none'}")
    if kept:
        print(f"note: its {' and '.join(kept)} sit in damaged blocks and stay on disk (deleting them would make "
              f"RocksDB read the damaged blocks); no reader sees them", file=sys.stderr)
    return 0
