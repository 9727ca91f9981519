"""`lutstore get TABLE TOKEN...`: look at stored rows from the shell, as `ldb get` does for RocksDB.

Reads the database directly and read-only (a RocksDB secondary, like info and
verify), so it works while `lutstore serve` runs and needs no daemon. For each
token: the checksum verdict, the stored size, min / max / mean over the row,
and the first values of layer 0, expert 0. Exit 1 if any row is missing or
fails its checksum.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from lutstore.formats import codec
from lutstore.errors import UserError
from lutstore.storage.backends import open_store
from lutstore.storage.model import TableMeta

HEAD_VALUES = 6


def _row_report(meta: TableMeta, token: int, value: bytes | None) -> dict:
    """One row's verdict and summary; never raises for a bad row (the report says what is wrong)."""
    out: dict = {"token": token}
    if value is None:
        return {**out, "checksum": "missing", "problem": "row missing"}
    out["stored_bytes"] = len(value)
    fmt = meta.row_format()
    try:
        row = codec.decode_row(fmt, value)   # checksum first, then zstd and length
    except Exception as e:  # ChecksumError, a broken zstd frame, a wrong length
        return {**out, "checksum": "bad", "problem": str(e)}
    flat = row.astype(np.float64).ravel()
    return {**out, "checksum": "ok", "min": float(flat.min()), "max": float(flat.max()), "mean": float(flat.mean()),
            "head": [float(x) for x in row[0, 0, :HEAD_VALUES]]}


def _format(report: dict) -> str:
    if report["checksum"] != "ok":
        return f"token {report['token']}: checksum {report['checksum'].upper()}: {report['problem']}"
    head = ", ".join(f"{x:.4g}" for x in report["head"])
    return (f"token {report['token']}: checksum OK, {report['stored_bytes']} B stored, "
            f"min {report['min']:.4g} max {report['max']:.4g} mean {report['mean']:.4g}, "
            f"layer 0 expert 0: [{head}, ...]")


def get(args: argparse.Namespace) -> int:
    """Print the rows of args.tokens from args.table (version args.version, 0: latest)."""
    tokens = args.tokens
    with open_store(args.db, "secondary") as store:
        meta = store.resolve(args.table, args.version)
        bad_ids = [t for t in tokens if not 0 <= t < meta.vocab_size]
        if bad_ids:
            raise UserError(f"token id {bad_ids[0]} is outside {meta.name} v{meta.version}'s vocabulary "
                            f"0..{meta.vocab_size - 1}")
        values = store.get_values(meta, tokens)
    reports = [_row_report(meta, t, v) for t, v in zip(tokens, values)]
    fmt = meta.row_format()
    encoding = meta.encoding + ("+zstd" if meta.zstd else "")
    if args.json:
        json.dump({"table": meta.name, "version": meta.version, "encoding": meta.encoding, "zstd": meta.zstd,
                   "shape": list(fmt.shape), "payload_bytes": fmt.payload_bytes, "rows": reports}, sys.stdout)
        print()
    else:
        L, N, D = fmt.shape
        print(f"{meta.name} v{meta.version}: rows of shape [layers {L}, experts {N}, hidden {D}], {encoding}, "
              f"{fmt.payload_bytes} B payload + 4 B CRC-32")
        for r in reports:
            print(_format(r))
    return 1 if any(r["checksum"] != "ok" for r in reports) else 0
