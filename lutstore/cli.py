"""`lutstore` command line: ingest | serve | info | verify | drop.

Each subcommand parses its flags here and delegates to the module that owns
the work, so `lutstore SUBCOMMAND --help` is the reference a newcomer reads.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lutstore.paths import default_db_path


def _add_db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", type=Path, default=default_db_path(),
                   help="RocksDB directory (default: $LUTSTORE_DB or ~/.local/share/lutstore/db; now %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lutstore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="turn a MoLE checkpoint folder (train or rep form) into a table")
    p.add_argument("checkpoint", type=Path, help="HF-format MoLE checkpoint folder (config.json + weights)")
    _add_db(p)
    p.add_argument("--name", help="table name (default: the checkpoint folder's name)")
    p.add_argument("--encoding", choices=["fp32", "fp16", "bf16", "int8"], default="fp16",
                   help="row encoding (default: fp16, as the official reparameterisation)")
    p.add_argument("--zstd", action="store_true", help="zstd-compress each row")
    p.add_argument("--device", default="cpu", help="where train-form experts are computed: cpu or cuda")
    p.add_argument("--chunk-tokens", type=int, default=0,
                   help="tokens per computation chunk; bounds peak memory (default: about 64 MiB of rows)")
    p.add_argument("--keep-versions", type=int, default=0,
                   help="after ingest, drop all but the newest K versions of this table (0: keep all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nice", type=int, default=10,
                   help="lower this process's CPU priority by N so a daemon on the same host keeps its "
                        "latency (default: 10; 0 to keep it)")

    p = sub.add_parser("serve", help="serve the tables of a database over gRPC")
    _add_db(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=50051, help="port (0: pick a free one and print it)")
    p.add_argument("--cache-mb", type=float, default=1024, help="RAM budget of the hot-row LRU (MiB)")
    p.add_argument("--max-batch-rows", type=int, default=4096, help="most token ids in one BatchGet")
    p.add_argument("--max-message-mb", type=float, default=8, help="largest gRPC message sent or received (MiB)")
    p.add_argument("--max-concurrent-streams", type=int, default=64, help="most RPCs in flight per connection")
    p.add_argument("--workers", type=int, default=16, help="server threads")
    p.add_argument("--max-sessions", type=int, default=None,
                   help="most open BatchGetStream sessions (each holds a server thread while open); more are "
                        "answered RESOURCE_EXHAUSTED and clients fall back to BatchGet calls (default: workers / 2)")
    p.add_argument("--refresh-seconds", type=float, default=1.0, help="how often to look for newly ingested tables")
    p.add_argument("--max-concurrent-rpcs", type=int, default=256,
                   help="most RPCs in flight over all connections; more are answered RESOURCE_EXHAUSTED (default 256)")
    sec = p.add_argument_group("security (defaults: loopback only, plaintext, no token)")
    sec.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS (needs --tls-key)")
    sec.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    sec.add_argument("--auth-token", help="require 'authorization: Bearer TOKEN' on every RPC but health checks "
                                          "(visible in `ps`: prefer --auth-token-file)")
    sec.add_argument("--auth-token-file", type=Path, help="read the bearer token from this file")
    sec.add_argument("--allow-shared-memory", action="store_true",
                     help="answer BatchGetShared: write rows into a POSIX shared-memory segment (/dev/shm) that a "
                          "client on this host, running as this user, names (the same-host fast path; default: off)")
    ops = p.add_argument_group("operations")
    ops.add_argument("--metrics-port", type=int, default=None,
                     help="serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (0: a free port, printed; "
                          "default: off)")
    ops.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint (default: loopback)")
    ops.add_argument("--log-format", choices=["text", "json"], default="text",
                     help="text, or one JSON object per line for log shippers (default text)")

    p = sub.add_parser("info", help="list tables: shapes, sizes, encodings, versions")
    _add_db(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("verify", help="check every stored row's checksum")
    _add_db(p)
    p.add_argument("--table", help="only this table (default: all)")
    p.add_argument("--version", type=int, default=0, help="only this version (default: all live versions)")

    p = sub.add_parser("drop", help="delete one version of a table")
    _add_db(p)
    p.add_argument("table")
    p.add_argument("--version", type=int, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lutstore.errors import UserError

    try:
        if args.command in ("ingest", "serve"):
            # A process-wide malloc setting, so switched on here at the entry point (see alloc.py):
            # the server reuses the memory of sent messages, ingest that of its row chunks.
            from lutstore import alloc, logs
            if args.command == "serve":
                logs.use_format(args.log_format)   # before the first record (alloc logs one at -vv)
            alloc.keep_freed_memory()
        if args.command == "ingest":
            from lutstore import ingest
            return ingest.main(args)
        if args.command == "serve":
            from lutstore import server
            return server.main(args)
        from lutstore import admin
        return getattr(admin, args.command)(args)
    except UserError as e:
        print(f"lutstore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lutstore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
