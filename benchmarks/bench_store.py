"""Store benchmark: BatchGet over loopback gRPC against two ceilings, side by side.

For batches of 1..256 rows of the paper's 160M-16E row shape (L=12, N=16,
D=768: 295 KB fp16, 148 KB int8, 80 KB nf4 with blocks of 64), in fp16, int8 and
nf4 (--encodings), it measures payload GB/s, rows/s and p50/p99 latency of
  * grpc cold   `LutClient.get_raw` against a server with --cache-mb 0 (every row read from RocksDB)
  * grpc hot    the same against a server whose row LRU already holds the ids
  * shm cold/hot the same two servers through the same-host BatchGetShared path
                (`--allow-shared-memory`, `LutClient(shared_memory=True).get_payloads`)
  * multi-get   in-process RocksDB multi-get of the same rows (rocksdict, same DB): ceiling 1
  * socket      a raw loopback TCP socket moving the same number of bytes per request: ceiling 2
Requests are sequential (one in flight), so GB/s = bytes moved / time spent.
The four methods take turns in short rounds at each point, so that load
from other processes on a shared machine falls on all of them alike.

    python -m benchmarks.bench_store            # vocab 4096, ~2 s per point
    python -m benchmarks.bench_store --quick    # vocab 1024, ~0.5 s per point
    python -m benchmarks.bench_store --quick --encodings nf4 --name store-nf4-quick
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import shutil
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks import common
from benchmarks.bigtables import write_table
from lutstore.formats.codec import Encoding, RowFormat
from lutstore.storage.rocksdb import Store
from lutstore.storage.model import TableMeta

log = logging.getLogger(__name__)

SHAPE = (12, 16, 768)  # the paper's 160M-16E model: L, N, D
ENCODINGS = ("fp16", "int8", "nf4")   # nf4: blocks of nf4.DEFAULT_BLOCK_SIZE (64)
BATCHES = (1, 4, 16, 64, 256)
METHODS = ("grpc_cold", "grpc_hot", "shm_cold", "shm_hot", "multiget", "socket")
# shm_*: the same-host BatchGetShared path (serve --allow-shared-memory, LutClient(shared_memory=True))
ROUNDS = 4  # turns per method and point
_LEN = struct.Struct("<Q")


# ---- the raw socket ceiling ------------------------------------------------------

def _socket_server(port_out: mp.Queue, max_bytes: int) -> None:
    """Answer each 8-byte request N with N bytes from a preallocated buffer, until the peer closes."""
    payload = memoryview(bytes(max_bytes))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port_out.put(listener.getsockname()[1])
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            header = bytearray(_LEN.size)
            while True:
                view, got = memoryview(header), 0
                while got < _LEN.size:
                    k = conn.recv_into(view[got:])
                    if k == 0:
                        return
                    got += k
                (n,) = _LEN.unpack(header)
                conn.sendall(payload[:n])


class SocketCeiling:
    """Client side of the raw socket ceiling: request(n) receives n bytes into one buffer."""

    def __init__(self, max_bytes: int):
        ctx = mp.get_context("spawn")
        ports: mp.Queue = ctx.Queue()
        self.proc = ctx.Process(target=_socket_server, args=(ports, max_bytes), daemon=True)
        self.proc.start()
        self.sock = socket.create_connection(("127.0.0.1", ports.get(timeout=60)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = memoryview(bytearray(max_bytes))

    def request(self, nbytes: int) -> None:
        self.sock.sendall(_LEN.pack(nbytes))
        got = 0
        while got < nbytes:
            k = self.sock.recv_into(self.buffer[got:nbytes])
            if k == 0:
                raise ConnectionError("socket ceiling server went away")
            got += k

    def close(self) -> None:
        self.sock.close()
        self.proc.join(10)


# ---- building and timing -----------------------------------------------------------

def table_name(encoding: str, vocab: int) -> str:
    return f"bench-{encoding}-v{vocab}"


def ensure_tables(db: Path, vocab: int, progress: bool, encodings: tuple[str, ...] = ENCODINGS) -> dict[str, TableMeta]:
    """One table per encoding with the paper's row shape; reused when the DB already has it."""
    metas: dict[str, TableMeta] = {}
    existing: dict[str, TableMeta] = {}
    if (db / "CURRENT").exists():
        with Store.open(db, "secondary") as store:
            existing = {m.name: m for m in store.tables()}
    for enc in encodings:
        i = ENCODINGS.index(enc)    # the seed: one encoding's table is the same whichever others are built
        name = table_name(enc, vocab)
        if name in existing:
            metas[enc] = existing[name]
            continue
        fmt = RowFormat(*SHAPE, Encoding(enc))
        metas[enc] = write_table(db, name, fmt, vocab, seed=i, progress=progress)
    return metas


def time_requests(call: Callable[[list[int]], object], batches: list[list[int]], seconds: float,
                  min_requests: int) -> list[float]:
    """Latency of call(ids) for each batch in turn (cycling) until `seconds` and `min_requests` are both reached."""
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    i = 0
    while len(samples) < min_requests or time.perf_counter() < deadline:
        ids = batches[i % len(batches)]
        t0 = time.perf_counter()
        call(ids)
        samples.append(time.perf_counter() - t0)
        i += 1
    return samples


def summarise(samples: list[float], nbytes: int, rows: int) -> dict:
    return {"requests": len(samples), "gbps": nbytes * len(samples) / sum(samples) / 1e9,
            "rows_per_s": rows * len(samples) / sum(samples), **common.percentiles(samples)}


def random_batches(rng: np.random.Generator, pool: np.ndarray, size: int, count: int) -> list[list[int]]:
    """`count` batches of `size` distinct ids drawn from `pool`, each sorted (as the server answers)."""
    size = min(size, len(pool))
    return [sorted(rng.choice(pool, size=size, replace=False).tolist()) for _ in range(count)]


# ---- the benchmark -------------------------------------------------------------------

def run(db: Path, vocab: int, batches: tuple[int, ...], seconds: float, min_requests: int, hot_rows: int,
        progress: bool, encodings: tuple[str, ...] = ENCODINGS) -> dict:
    from lutstore.client import LutClient

    metas = ensure_tables(db, vocab, progress, encodings)
    rng = np.random.default_rng(0)
    all_ids = np.arange(vocab)
    hot_ids = rng.choice(vocab, size=min(hot_rows, vocab), replace=False)
    biggest = max(m.row_format().stored_bytes for m in metas.values())
    hot_cache_mb = 1.25 * len(hot_ids) * biggest * len(metas) / 2**20 + 16
    max_batch_bytes = max(batches) * biggest

    points: list[dict] = []
    store = Store.open(db, "secondary")
    socket_ceiling = SocketCeiling(max_batch_bytes)
    quiet = ("--refresh-seconds", "30", "--allow-shared-memory")
    try:
        with common.ServerProcess(db, "--cache-mb", "0", *quiet) as cold_srv, \
                common.ServerProcess(db, "--cache-mb", f"{hot_cache_mb:.0f}", *quiet) as hot_srv, \
                LutClient(cold_srv.address) as cold, LutClient(hot_srv.address) as hot, \
                LutClient(cold_srv.address, shared_memory=True) as shm_cold, \
                LutClient(hot_srv.address, shared_memory=True) as shm_hot:
            for enc, meta in metas.items():
                name, version = meta.name, meta.version
                row_bytes = meta.row_format().stored_bytes
                for ids in np.array_split(hot_ids, max(1, -(-len(hot_ids) // 256))):  # warm the hot server's LRU
                    hot.get_raw(name, ids.tolist(), version)
                for client in (cold, shm_cold, shm_hot):  # connect + cache TableInfo outside the timings
                    client.get_raw(name, [0], version)
                print(f"\n{enc}: rows of {row_bytes / 1e3:.0f} KB, vocab {vocab}, hot set {len(hot_ids)} rows", flush=True)
                print(f"{'batch':>5} | {'grpc cold':>9} {'grpc hot':>9} {'multi-get':>9} {'socket':>9} GB/s | "
                      f"{'cold/mget':>9} {'hot/mget':>9} {'cold/sock':>9} {'hot/sock':>9} | "
                      f"{'cold p50/p99 ms':>15} {'hot p50/p99 ms':>15}", flush=True)
                for b in batches:
                    nbytes = b * row_bytes
                    cold_batches = random_batches(rng, all_ids, b, 64)
                    hot_batches = random_batches(rng, hot_ids, b, 64)
                    calls = {
                        "grpc_cold": (lambda ids: cold.get_raw(name, ids, version), cold_batches),
                        "grpc_hot": (lambda ids: hot.get_raw(name, ids, version), hot_batches),
                        "shm_cold": (lambda ids: shm_cold.get_payloads(name, ids, version), cold_batches),
                        "shm_hot": (lambda ids: shm_hot.get_payloads(name, ids, version), hot_batches),
                        "multiget": (lambda ids: store.get_values(meta, ids), cold_batches),
                        "socket": (lambda ids: socket_ceiling.request(nbytes), cold_batches),
                    }
                    # Methods take turns in short rounds, so a load swing on a shared machine hits all of them.
                    samples: dict[str, list[float]] = {m: [] for m in calls}
                    for call, id_batches in calls.values():
                        call(id_batches[0])  # one untimed call: first-touch effects
                    for _ in range(ROUNDS):
                        for method, (call, id_batches) in calls.items():
                            samples[method] += time_requests(call, id_batches, seconds / ROUNDS,
                                                             -(-min_requests // ROUNDS))
                    row: dict[str, dict] = {}
                    for method in calls:
                        row[method] = summarise(samples[method], nbytes, b)
                        points.append({"encoding": enc, "batch": b, "method": method, "bytes_per_request": nbytes,
                                       **row[method]})
                    g = {m: row[m]["gbps"] for m in METHODS}
                    print(f"{b:>5} | {g['grpc_cold']:9.3f} {g['grpc_hot']:9.3f} {g['multiget']:9.3f} {g['socket']:9.3f}      | "
                          f"{g['grpc_cold'] / g['multiget']:9.2f} {g['grpc_hot'] / g['multiget']:9.2f} "
                          f"{g['grpc_cold'] / g['socket']:9.2f} {g['grpc_hot'] / g['socket']:9.2f} | "
                          f"{row['grpc_cold']['p50_ms']:7.2f}/{row['grpc_cold']['p99_ms']:<7.2f} "
                          f"{row['grpc_hot']['p50_ms']:7.2f}/{row['grpc_hot']['p99_ms']:<7.2f}", flush=True)
                    print(f"      | same-host BatchGetShared: cold {g['shm_cold']:.3f} GB/s ({g['shm_cold'] / g['multiget']:.2f}x "
                          f"multi-get), hot {g['shm_hot']:.3f} GB/s ({g['shm_hot'] / g['multiget']:.2f}x multi-get); "
                          f"p99 {row['shm_cold']['p99_ms']:.2f} / {row['shm_hot']['p99_ms']:.2f} ms", flush=True)
                    r = {m: row[m]["rows_per_s"] for m in METHODS}
                    print(f"      | rows/s: grpc cold {r['grpc_cold']:,.0f}, hot {r['grpc_hot']:,.0f}, shm cold "
                          f"{r['shm_cold']:,.0f}, hot {r['shm_hot']:,.0f}, multi-get {r['multiget']:,.0f}", flush=True)
    finally:
        socket_ceiling.close()
        store.close()
    return {"points": points, "hot_rows": len(hot_ids), "hot_cache_mb": hot_cache_mb}


def point(points: list[dict], enc: str, batch: int, method: str) -> dict:
    return next(p for p in points if p["encoding"] == enc and p["batch"] == batch and p["method"] == method)


def targets_of(points: list[dict], batches: tuple[int, ...], encodings: tuple[str, ...] = ENCODINGS) -> list[dict]:
    """The issue's goals: payload >= 0.6x multi-get and >= 0.3x socket (largest batch), one-row p99 < 1 ms."""
    big = max(batches)
    out = []
    print(flush=True)
    for enc in encodings:
        mget = point(points, enc, big, "multiget")["gbps"]
        sock = point(points, enc, big, "socket")["gbps"]
        for kind in ("cold", "hot"):
            g = point(points, enc, big, f"grpc_{kind}")["gbps"]
            out.append(common.target(f"store {enc} {kind} BatchGet/multi-get, {big} rows", g / mget, 0.6))
            out.append(common.target(f"store {enc} {kind} BatchGet/raw socket, {big} rows", g / sock, 0.3))
            g = point(points, enc, big, f"shm_{kind}")["gbps"]
            out.append(common.target(f"store {enc} {kind} same-host BatchGetShared/multi-get, {big} rows", g / mget, 0.6))
    if 1 in batches:
        for enc in [e for e in ("fp16", "nf4") if e in encodings]:
            for kind in ("cold", "hot"):
                p99 = point(points, enc, 1, f"grpc_{kind}")["p99_ms"]
                out.append(common.target(f"store {enc} {kind} p99 of one row", p99, 1.0, higher_is_better=False, unit=" ms"))
                p99 = point(points, enc, 1, f"shm_{kind}")["p99_ms"]
                out.append(common.target(f"store {enc} {kind} p99 of one row, same-host BatchGetShared", p99, 1.0,
                                         higher_is_better=False, unit=" ms"))
    return out


def plot(points: list[dict], batches: tuple[int, ...], label: str, encodings: tuple[str, ...] = ENCODINGS,
         name: str = "store") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"grpc_cold": "o-", "grpc_hot": "s-", "shm_cold": "D-", "shm_hot": "P-", "multiget": "^--", "socket": "v--"}
    paths = []
    for what, ylabel, kind in (("gbps", "payload GB/s", "throughput"), ("p99_ms", "latency ms", "latency")):
        fig, axes = plt.subplots(1, len(encodings), figsize=(5.5 * len(encodings), 4.2), sharey=True, squeeze=False)
        axes = axes[0]
        for ax, enc in zip(axes, encodings):
            for method, style in styles.items():
                if what == "p99_ms" and method in ("multiget", "socket"):
                    continue
                if what == "p99_ms":
                    for stat, ls in (("p50_ms", ":"), ("p99_ms", "-")):
                        ys = [point(points, enc, b, method)[stat] for b in batches]
                        ax.plot(batches, ys, style[0] + ls, label=f"{method} {stat[:3]}")
                else:
                    ax.plot(batches, [point(points, enc, b, method)[what] for b in batches], style, label=method)
            ax.set_xscale("log", base=2)
            if what == "p99_ms":
                ax.set_yscale("log")
            ax.set_xlabel("rows per BatchGet")
            ax.set_title(enc)
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel(ylabel)
        axes[-1].legend(fontsize=8)
        fig.suptitle(f"lutstore BatchGet, 160M-16E rows, loopback: {label}", fontsize=9)
        fig.tight_layout()
        out = common.plot_path(f"{name}_{kind}")   # store -> store_throughput.png as before
        fig.savefig(out, dpi=110)
        plt.close(fig)
        paths.append(str(out))
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = common.parser("bench_store", __doc__)
    p.add_argument("--quick", action="store_true", help="small vocab and short timings (for `make bench`)")
    p.add_argument("--vocab", type=int, default=0, help="table vocab (default 4096; 1024 with --quick)")
    p.add_argument("--seconds", type=float, default=0, help="time per measured point (default 2; 0.5 with --quick)")
    p.add_argument("--min-requests", type=int, default=10, help="fewest requests per point")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="rows per BatchGet (default %(default)s)")
    p.add_argument("--hot-rows", type=int, default=512, help="distinct ids of the hot set (server LRU sized to hold it)")
    p.add_argument("--db", type=Path, help="database to use (tables reused when present; default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary database")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--encodings", nargs="+", choices=ENCODINGS, default=list(ENCODINGS),
                   help="table encodings measured (default: %(default)s)")
    p.add_argument("--name", default="store", help="results file name (default store; plots NAME_throughput/_latency)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    vocab = args.vocab or (1024 if args.quick else 4096)
    seconds = args.seconds or (0.5 if args.quick else 2.0)
    batches = tuple(sorted(set(args.batches)))
    if vocab < max(batches):
        raise SystemExit(f"--vocab {vocab} must be at least the largest batch ({max(batches)})")
    db = args.db or Path(tempfile.mkdtemp(prefix="lutstore-bench-store-")) / "db"
    encodings = tuple(e for e in ENCODINGS if e in args.encodings)
    need = int(vocab * sum(RowFormat(*SHAPE, Encoding(e)).stored_bytes for e in encodings) * 1.1)
    if common.disk_free_bytes(db) < need:
        raise SystemExit(f"bench_store: needs ~{need / 1e9:.1f} GB free at {db}; use a smaller --vocab")
    label = common.start("bench_store")
    print(f"db {db}", flush=True)
    try:
        res = run(db, vocab, batches, seconds, args.min_requests, args.hot_rows, not args.no_progress, encodings)
    finally:
        if args.db is None and not args.keep:
            shutil.rmtree(db.parent, ignore_errors=True)
    targets = targets_of(res["points"], batches, encodings)
    plots = plot(res["points"], batches, label, encodings, args.name)
    results = {"config": {"shape_LND": SHAPE, "encodings": encodings, "vocab": vocab, "seconds_per_point": seconds, "batches": batches,
                          "quick": args.quick, "revision": common.git_revision(), **{k: res[k] for k in ("hot_rows", "hot_cache_mb")}},
               "points": res["points"], "targets": targets, "plots": plots}
    common.finish(args.name, results, plots)
    return results


if __name__ == "__main__":
    common.run("bench_store", main)
