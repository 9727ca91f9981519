"""`lutstore info | verify | drop`: look after a database from the server host.

info and verify only read, through a RocksDB secondary, so they work while
`lutstore serve` runs; drop opens the database as its (single) writer.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

from tqdm import tqdm

from lutstore import codec
from lutstore.errors import UserError
from lutstore.backend import open_store
from lutstore.store import Store, TableMeta

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
              f"{m.encoding}{'+zstd' if m.zstd else ''}  row {fmt.payload_bytes} B  stored {_size(m.stored_bytes)}  "
              f"from {m.source_form}  fingerprint {m.fingerprint[:16]}")
        for a in m.artifacts:
            print(f"    {a.name}  {_size(a.size)}  sha256 {a.sha256[:16]}")
    return 0


def verify(args: argparse.Namespace) -> int:
    """Check every stored row's checksum and length; name each bad row; exit 1 if any."""
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
        bad = 0
        for meta in tables:
            bad += _verify_table(store, meta)
    total = sum(m.vocab_size for m in tables)
    if bad:
        print(f"verify: {bad} bad row(s) in {len(tables)} table version(s)", file=sys.stderr)
        return 1
    print(f"verify: {total} rows in {len(tables)} table version(s) OK")
    return 0


def _verify_table(store: Store, meta: TableMeta) -> int:
    fmt = meta.row_format()
    bad = 0
    expected = 0
    where = f"table {meta.name!r} v{meta.version}"
    with tqdm(total=meta.vocab_size, desc=f"{meta.name} v{meta.version}", unit="row", file=sys.stderr,
              disable=None, leave=False) as bar:
        for token_id, value in store.iter_rows(meta):
            while expected < token_id:  # a gap: rows that should exist and do not
                print(f"BAD {where} token {expected}: row missing", file=sys.stderr)
                bad += 1
                expected += 1
            try:
                codec.payload_of(fmt, value)  # checksum, then (zstd) decompression and length
            except Exception as e:  # ChecksumError, or a broken zstd frame
                print(f"BAD {where} token {token_id}: {e}", file=sys.stderr)
                bad += 1
            expected = token_id + 1
            bar.update(1)
    for token_id in range(expected, meta.vocab_size):
        print(f"BAD {where} token {token_id}: row missing", file=sys.stderr)
        bad += 1
    return bad


def drop(args: argparse.Namespace) -> int:
    """Delete one version of a table (servers stop serving it at their next refresh)."""
    with open_store(args.db, "primary") as store:
        meta = store.resolve(args.table, args.version)
        store.drop(args.table, args.version)
        left = [m.version for m in store.tables() if m.name == args.table]
    print(f"dropped {meta.name} v{meta.version} ({_size(meta.stored_bytes)}); "
          f"live versions left: {', '.join(map(str, left)) or 'none'}")
    return 0
