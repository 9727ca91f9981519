"""`lutstore` command line: ingest | serve | info | verify | get | drop.

Each subcommand parses its flags here and delegates to the module that owns
the work, so `lutstore SUBCOMMAND --help` is the reference a newcomer reads.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import textwrap
from pathlib import Path

from lutstore.formats.codec import ENCODINGS, Encoding
from lutstore.help_format import HelpFormatter, add_verbose
from lutstore.paths import default_db_path


def _daemon_default(field: str):
    """The default of a serve flag: its DaemonConfig field's."""
    from lutstore.daemon.config import DaemonConfig
    return DaemonConfig.default(field)


def _add_db(p: argparse.ArgumentParser) -> None:
    # A str, not a Path: Path() folds "redis-cluster://h:p" into "redis-cluster:/h:p" (see lutstore.cli.dbpath).
    p.add_argument("--db", default=str(default_db_path()),
                   help="RocksDB directory, or redis-cluster://HOST:PORT[,HOST:PORT...][?OPTIONS] for a Valkey / "
                        "Redis Cluster (docs/operations.md; default: $LUTSTORE_DB or ~/.local/share/lutstore/db; "
                        "now %(default)s)")


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lutstore")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        from lutstore import __version__
        return __version__


DESCRIPTION = """\
Store and serve the lookup tables of Mixture-of-Lookup-Experts models.

    lutstore ingest path/to/checkpoint --name mole   # a table, into --db
    lutstore serve                                   # gRPC on 127.0.0.1:50051
    python -m inference.generate --lut-addr 127.0.0.1:50051 --prompt "The water"

`lutstore COMMAND --help` lists a command's options and their defaults."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lutstore", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"lutstore {_version()}")
    add_verbose(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=textwrap.fill(description or help, 79),
                           formatter_class=HelpFormatter)
        add_verbose(p, dest="sub_verbose")   # `lutstore serve -v` as well as `lutstore -v serve`
        return p

    p = command("ingest", "turn a MoLE checkpoint folder (train or rep form) into a table")
    p.add_argument("checkpoint", type=Path, help="HF-format MoLE checkpoint folder (config.json + weights)")
    _add_db(p)
    p.add_argument("--name", help="table name (default: the checkpoint folder's name)")
    p.add_argument("--encoding", choices=[e.value for e in ENCODINGS], default=Encoding.FP16.value,
                   help="row encoding (default: fp16, as the official reparameterisation)"
                        + "".join(f"; {e.value}: {spec.about}" for e, spec in ENCODINGS.items() if spec.about))
    p.add_argument("--block-size", type=int, default=None,
                   help="nf4 only: values per block, each with its own scale; must be even and divide "
                        "hidden_size (default: 64, as QLoRA)")
    p.add_argument("--zstd", action="store_true",
                   help="zstd-compress each row (not with nf4: its codes do not compress)")
    p.add_argument("--device", default="cpu", help="where train-form experts are computed: cpu or cuda")
    p.add_argument("--chunk-tokens", type=int, default=0,
                   help="tokens per computation chunk; bounds peak memory (default: about 64 MiB of rows)")
    p.add_argument("--keep-versions", type=int, default=0,
                   help="after ingest, drop all but the newest K versions of this table, naming each one "
                        "dropped (default: 0, keep all)")
    p.add_argument("--force", action="store_true",
                   help="add a new version even when the latest one already holds this very checkpoint "
                        "(same fingerprint); without it such an ingest adds nothing")
    p.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="take the tokenizer files (tokenizer.json, tokenizer_config.json, ...) from DIR instead "
                        "of the checkpoint; DIR must hold tokenizer.json. For a rep folder the official "
                        "reparameterize.py wrote: DIR is the train checkpoint or the base model's folder")
    p.add_argument("--allow-no-tokenizer", action="store_true",
                   help="ingest a checkpoint that has no tokenizer.json (rows and backbone only: evaluate "
                        "--token-ids and the clients work, generate cannot encode text)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nice", type=int, default=10,
                   help="lower this process's CPU priority by N so a daemon on the same host keeps its "
                        "latency (default: 10; 0 to keep it)")

    p = command("serve", "serve the tables of a database over gRPC")
    _add_db(p)
    p.add_argument("--host", default=_daemon_default("host"),
                   help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=_daemon_default("port"), help="port (0: pick a free one and print it)")
    p.add_argument("--cache-mb", type=float, default=_daemon_default("cache_mb"),
                   help="RAM budget of the hot-row LRU (MiB)")
    p.add_argument("--max-batch-rows", type=int, default=_daemon_default("max_batch_rows"),
                   help="most token ids in one BatchGet")
    p.add_argument("--max-message-mb", type=float, default=_daemon_default("max_message_mb"),
                   help="largest gRPC message sent (MiB); a request is read up to the smaller of this and what "
                        "--max-batch-rows ids need (5 bytes an id + 64 KiB)")
    p.add_argument("--max-concurrent-streams", type=int, default=_daemon_default("max_concurrent_streams"),
                   help="most RPCs in flight per connection")
    p.add_argument("--workers", type=int, default=_daemon_default("workers"), help="server threads")
    p.add_argument("--max-sessions", type=int, default=_daemon_default("max_sessions"),
                   help="most open BatchGetStream sessions (each holds a server thread while open); more are "
                        "answered RESOURCE_EXHAUSTED and clients fall back to BatchGet calls (default: workers / 2)")
    p.add_argument("--refresh-seconds", type=float, default=_daemon_default("refresh_seconds"),
                   help="how often to look for newly ingested tables")
    p.add_argument("--max-concurrent-rpcs", type=int, default=_daemon_default("max_concurrent_rpcs"),
                   help="most RPCs in flight over all connections; more are answered RESOURCE_EXHAUSTED")
    sec = p.add_argument_group("security (defaults: loopback only, plaintext, no token)")
    sec.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS (needs --tls-key)")
    sec.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    sec.add_argument("--auth-token", help="require 'authorization: Bearer TOKEN' on every RPC but health checks "
                                          "(visible in `ps`: prefer --auth-token-file)")
    sec.add_argument("--auth-token-file", type=Path, help="read the bearer token from this file")
    sec.add_argument("--allow-shared-memory", action="store_true",
                     help="answer BatchGetShared: write rows into a shared-memory segment that a client on this "
                          "host hands over as a file descriptor on a Unix socket (the same-host fast path; loopback "
                          "--host only; default: off)")
    p.add_argument("--max-response-mb", type=float, default=_daemon_default("max_response_mb"),
                   help="response bytes being built or sent at once, all calls together (bounds the daemon's memory "
                        "beyond the cache; calls past it wait their turn)")
    p.add_argument("--stalled-send-seconds", type=float, default=_daemon_default("stalled_send_seconds"),
                   help="cancel a streaming call whose reader has taken no message for this long (frees its thread)")
    ops = p.add_argument_group("operations")
    ops.add_argument("--metrics-port", type=int, default=_daemon_default("metrics_port"),
                     help="serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (0: a free port, printed; "
                          "default: off)")
    ops.add_argument("--metrics-host", default=_daemon_default("metrics_host"),
                     help="address of the metrics endpoint (loopback)")
    ops.add_argument("--log-format", choices=["text", "json"], default=_daemon_default("log_format"),
                     help="text, or one JSON object per line for log shippers")

    p = command("info", "list tables: shapes, sizes, encodings, versions")
    _add_db(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("verify", "check every stored row and artifact (checksum, readable on disk); exit 1 if any is bad")
    _add_db(p)
    p.add_argument("--table", help="only this table (default: all)")
    p.add_argument("--version", type=int, default=0, help="only this version (default: all live versions)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object on stdout: {ok, rows, bad_rows, bad_artifacts, tables: [{table, version, rows, "
                        "bad: [{token, problem}], bad_artifacts: [{artifact, problem}]}]} (exit status as without it)")

    p = command("get", "print stored rows of a table: shape, encoding, checksum verdict, a few values",
                "Print rows of a table straight from the database (read-only; works while `lutstore serve` "
                "runs): shape and encoding, then for each token its checksum verdict, stored size, min / max / "
                "mean and the first values of layer 0, expert 0. Exit 1 if a row is missing or corrupt.")
    _add_db(p)
    p.add_argument("table", help="table name (`lutstore info` lists them)")
    p.add_argument("tokens", type=int, nargs="+", metavar="TOKEN", help="token ids to print")
    p.add_argument("--version", type=int, default=0, help="table version (default: 0, the latest)")
    p.add_argument("--json", action="store_true", help="one JSON object: shape, encoding, and each row's summary")

    p = command("drop", "delete one version of a table",
                "Delete one version of a table: invisible at once, its disk space given back. Servers stop "
                "serving it at their next refresh; clients pinned to it are told it is gone.")
    _add_db(p)
    p.add_argument("table", help="table name (`lutstore info` lists its live versions)")
    p.add_argument("--version", type=int, required=True, help="the version to delete (>= 1; required, so that "
                                                              "a bare `drop TABLE` never deletes the latest by accident)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from lutstore import interrupts

    args = build_parser().parse_args(argv)
    verbose = args.verbose + getattr(args, "sub_verbose", 0)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # serve has its own graceful SIGTERM handling; the others clean up on the way out (argv None: this
    # is the process's own command line, so a finished ingest also stays finished while Python exits)
    with contextlib.nullcontext() if args.command == "serve" else interrupts.sigterm_raises(until_exit=argv is None):
        return interrupts.quiet_on_closed_pipe(lambda: _run(args))   # `lutstore info | head`


def _run(args: argparse.Namespace) -> int:
    from lutstore import interrupts
    from lutstore.errors import UserError

    try:
        from lutstore.cli.dbpath import check_db
        args.db = check_db(args.db, create=args.command == "ingest")
        if args.command in ("ingest", "serve"):
            # A process-wide malloc setting, so switched on here at the entry point (see alloc.py):
            # the server reuses the memory of sent messages, ingest that of its row chunks.
            from lutstore import alloc
            from lutstore.daemon import logs
            if args.command == "serve":
                logs.use_format(args.log_format)   # before the first record (alloc logs one at -vv)
            alloc.keep_freed_memory()
        if args.command == "ingest":
            from lutstore.ingest import pipeline as ingest
            return ingest.main(args)
        if args.command == "serve":
            from lutstore.daemon import run
            return run.main(args)
        if args.command == "get":
            from lutstore.cli.rowview import get
            return get(args)
        from lutstore.cli.admin import drop, info, verify
        return {"info": info, "verify": verify, "drop": drop}[args.command](args)
    except UserError as e:
        print(f"lutstore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"lutstore {args.command}: interrupted{_note(e)}", file=sys.stderr)
        return interrupts.EXIT_SIGINT
    except interrupts.Terminated as e:
        print(f"lutstore {args.command}: terminated (SIGTERM){_note(e)}", file=sys.stderr)
        return interrupts.EXIT_SIGTERM


def _note(e: BaseException) -> str:
    """What an interrupted command left behind, where it said (an ingest does)."""
    note = getattr(e, "ingest_note", None)
    return f"; {note}" if note else ""


if __name__ == "__main__":
    sys.exit(main())
