"""Concurrency benchmark: aggregate rows/s and latency with 1, 4, 16 clients on one daemon.

Each client is its own process with its own LutClient (its own channel), so
the clients compete only for the daemon, as separate inference processes
would. Clients ask for Zipf-distributed token ids (natural text's frequency
law) from one table of the paper's 160M-16E row shape, one request in flight
each, for a fixed window that starts when every client is connected and warm.

    python -m benchmarks.bench_concurrency            # vocab 4096, 5 s per point
    python -m benchmarks.bench_concurrency --quick    # vocab 1024, 2 s per point
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from benchmarks.bigtables import write_table, zipf_tokens
from lutstore.formats.codec import Encoding, RowFormat

SHAPE = (12, 16, 768)
CLIENTS = (1, 4, 16)
BATCHES = (1, 16)


def _client(address: str, table: str, vocab: int, batch: int, seed: int, ready: mp.Queue, start: mp.Event,
            window: tuple, results: mp.Queue) -> None:
    """One client process: warm up, wait for the common start, then request until the window ends."""
    from lutstore.client import LutClient

    rng = np.random.default_rng(seed)
    permutation = np.random.default_rng(1234).permutation(vocab)  # same hot ids in every client
    try:
        with LutClient(address) as client:
            version = client.info(table).version
            client.get_raw(table, [0], version)
            ready.put(seed)
            start.wait()
            t_start, t_end = window[0], window[1]
            while time.time() < t_start:
                time.sleep(0.001)
            latencies: list[float] = []
            rows = 0
            ids = zipf_tokens(vocab, 4096 * batch, rng, permutation=permutation).reshape(-1, batch)
            i = 0
            while time.time() < t_end:
                batch_ids = ids[i % len(ids)].tolist()
                t0 = time.perf_counter()
                got = client.get_raw(table, batch_ids, version)
                latencies.append(time.perf_counter() - t0)
                rows += len(got)  # distinct ids: what actually travelled
                i += 1
            results.put({"seed": seed, "latencies": latencies, "rows": rows, "finished": time.time()})
    except Exception as e:  # report, never hang the parent
        ready.put(seed)
        results.put({"seed": seed, "error": f"{type(e).__name__}: {e}"})


def measure(address: str, table: str, vocab: int, clients: int, batch: int, seconds: float) -> dict:
    ctx = mp.get_context("spawn")  # grpc must not be forked after use
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    window = ctx.Array("d", 2)  # start and end (time.time()), set once every client is ready
    procs = [ctx.Process(target=_client, args=(address, table, vocab, batch, seed, ready, start, window, results),
                         daemon=True) for seed in range(clients)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        t_start = time.time() + 0.2
        window[0], window[1] = t_start, t_start + seconds
        start.set()
        outs = [results.get(timeout=seconds + 120) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    errors = [o["error"] for o in outs if "error" in o]
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]}")
    latencies = [x for o in outs for x in o["latencies"]]
    elapsed = max(o["finished"] for o in outs) - t_start
    rows = sum(o["rows"] for o in outs)
    return {"clients": clients, "batch": batch, "requests": len(latencies), "rows": rows, "seconds": elapsed,
            "rows_per_s": rows / elapsed, "requests_per_s": len(latencies) / elapsed, **common.percentiles(latencies)}


def plot(points: list[dict], batches: tuple[int, ...], label: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for b in batches:
        pts = [p for p in points if p["batch"] == b]
        xs = [p["clients"] for p in pts]
        ax1.plot(xs, [p["rows_per_s"] for p in pts], "o-", label=f"{b} rows/request")
        ax2.plot(xs, [p["p50_ms"] for p in pts], "o:", label=f"p50, {b} rows/request")
        ax2.plot(xs, [p["p99_ms"] for p in pts], "s-", label=f"p99, {b} rows/request")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent client processes")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("aggregate rows/s (295 KB fp16 rows)")
    ax2.set_ylabel("latency per request, ms")
    ax2.set_yscale("log")
    fig.suptitle(f"lutstore: concurrent clients on one daemon: {label}", fontsize=9)
    fig.tight_layout()
    out = common.plot_path("concurrency")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return str(out)


def build_parser() -> argparse.ArgumentParser:
    p = common.parser("bench_concurrency", __doc__)
    p.add_argument("--quick", action="store_true", help="small vocab and short windows (for `make bench`)")
    p.add_argument("--vocab", type=int, default=0, help="table vocab (default 4096; 1024 with --quick)")
    p.add_argument("--seconds", type=float, default=0, help="measured window per point (default 5; 2 with --quick)")
    p.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS), help="client counts (default %(default)s)")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="rows per request (default %(default)s)")
    p.add_argument("--cache-mb", type=float, default=1024, help="the daemon's row LRU (default %(default)s)")
    p.add_argument("--workers", type=int, default=16, help="the daemon's --workers (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    vocab = args.vocab or (1024 if args.quick else 4096)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    clients, batches = tuple(sorted(set(args.clients))), tuple(sorted(set(args.batches)))
    fmt = RowFormat(*SHAPE, Encoding.FP16)
    tmp = Path(tempfile.mkdtemp(prefix="lutstore-bench-conc-"))
    if common.disk_free_bytes(tmp) < vocab * fmt.stored_bytes * 1.1:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"bench_concurrency: not enough disk for a {vocab}-row table at {tmp}; use a smaller --vocab")
    label = common.start("bench_concurrency")
    points: list[dict] = []
    try:
        db = tmp / "db"
        meta = write_table(db, "bench-conc", fmt, vocab, progress=not args.no_progress)
        with common.ServerProcess(db, "--cache-mb", str(args.cache_mb), "--workers", str(args.workers),
                                  "--refresh-seconds", "30") as server:
            print(f"{'clients':>7} {'rows/req':>8} | {'rows/s':>8} {'GB/s':>6} {'req/s':>8} | {'p50 ms':>7} {'p99 ms':>7} | "
                  f"{'rows/s vs 1 client':>18}", flush=True)
            for b in batches:
                base = None
                for n in clients:
                    pt = measure(server.address, meta.name, vocab, n, b, seconds)
                    points.append(pt)
                    base = base or pt["rows_per_s"]
                    print(f"{n:>7} {b:>8} | {pt['rows_per_s']:8.0f} {pt['rows_per_s'] * fmt.stored_bytes / 1e9:6.3f} "
                          f"{pt['requests_per_s']:8.0f} | {pt['p50_ms']:7.2f} {pt['p99_ms']:7.2f} | "
                          f"{pt['rows_per_s'] / base:17.2f}x", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures = []
    for b in batches:
        pts = {p["clients"]: p for p in points if p["batch"] == b}
        hi = pts[max(clients)]
        figures.append({"name": f"concurrency: {max(clients)} clients x {b} rows/request, aggregate rows/s",
                        "value": hi["rows_per_s"], "unit": " rows/s"})
        figures.append({"name": f"concurrency: {max(clients)} clients x {b} rows/request, p99",
                        "value": hi["p99_ms"], "unit": " ms"})
        if min(clients) != max(clients):
            figures.append({"name": f"concurrency: rows/s {max(clients)} vs {min(clients)} client(s), {b} rows/request",
                            "value": hi["rows_per_s"] / pts[min(clients)]["rows_per_s"], "unit": "x"})
    plot_file = plot(points, batches, label)
    results = {"config": {"shape_LND": SHAPE, "encoding": "fp16", "vocab": vocab, "seconds": seconds,
                          "cache_mb": args.cache_mb, "workers": args.workers, "zipf_exponent": 1.1,
                          "quick": args.quick, "revision": common.git_revision()},
               "points": points, "figures": figures, "targets": [], "plots": [plot_file]}
    common.finish("concurrency", results, [plot_file])
    return results


if __name__ == "__main__":
    common.run("bench_concurrency", main)
