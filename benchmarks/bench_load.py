"""Load benchmark: 16 concurrent clients hammering BatchGet, idle and while a new
version of the table is ingested.

Serving systems are known for latency spikes when a new model version loads.
Here clients ask for the latest version (version 0), so after the ingest they
move to the new version's rows, which all start cold. The benchmark records
throughput, p50/p99, errors and the daemon's peak RSS for both phases, and the
ratio p99(during ingest) / p99(idle) against a goal of <= 2.

Clients are threads of this process, each with its own channel (its own TCP
connection); the ingest is a separate process, as `lutstore ingest` would be.

    python -m benchmarks.bench_load            # vocab 8192 x 16 KiB rows, 16 clients, 5 s per phase
    python -m benchmarks.bench_load --quick    # smaller table, 2 s per phase
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from benchmarks import common
from benchmarks.bigtables import write_table, zipf_tokens
from lutstore.formats.codec import Encoding, RowFormat
from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

INGEST_NICE = 10


@dataclass
class LoadResult:
    """Every request of a load run: when it started (monotonic s), how long it took, its status."""

    starts: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0

    def summary(self, start: float | None = None, end: float | None = None) -> dict:
        """Stats of the requests that started in [start, end) (default: all)."""
        pick = [i for i, t in enumerate(self.starts) if (start is None or t >= start) and (end is None or t < end)]
        lat = [self.latencies[i] for i in pick]
        errors = [self.codes[i] for i in pick if self.codes[i] != "OK"]
        span = (end - start) if start is not None and end is not None else self.seconds
        return {"requests": len(pick), "errors": len(errors), "error_codes": sorted(set(errors)),
                "requests_per_s": len(pick) / span if span > 0 else 0.0, **common.percentiles(lat)}


def run_load(address: str, table: str, vocab: int, clients: int, seconds: float, batch: int = 16,
             seed: int = 0, max_receive: int = 64 << 20) -> LoadResult:
    """`clients` threads, each with its own connection, each one BatchGet in flight (Zipf ids,
    version 0 = latest), for `seconds`. Never raises for a failed call: it is recorded."""
    result = LoadResult()
    lock = threading.Lock()
    permutation = np.random.default_rng(1234).permutation(vocab)  # same hot ids for every client
    stop_at = [0.0]
    # The barrier's action sets the end time before any thread is released: a client that
    # passed the barrier first used to read 0.0 and stop at once (a load of 0 requests).
    start_line = threading.Barrier(clients + 1, action=lambda: stop_at.__setitem__(0, time.monotonic() + seconds))

    def client(i: int) -> None:
        rng = np.random.default_rng(seed + i)
        ids = zipf_tokens(vocab, 2048 * batch, rng, permutation=permutation).reshape(-1, batch)
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", max_receive)]
        starts, lats, codes, rows = [], [], [], 0
        with grpc.insecure_channel(address, options=options) as channel:
            stub = pb_grpc.LutStoreStub(channel)
            list(stub.BatchGet(pb.BatchGetRequest(table=table, token_ids=[0]), timeout=30))  # connected and warm
            start_line.wait()
            n = 0
            while True:
                t0 = time.monotonic()
                if t0 >= stop_at[0]:
                    break
                req = pb.BatchGetRequest(table=table, token_ids=ids[n % len(ids)].tolist())
                n += 1
                try:
                    got = list(stub.BatchGet(req, timeout=30))
                    codes.append("OK")
                    rows += sum(len(m.rows) for m in got)
                except grpc.RpcError as e:
                    codes.append(e.code().name)
                starts.append(t0)
                lats.append(time.monotonic() - t0)
        with lock:
            result.starts += starts
            result.latencies += lats
            result.codes += codes
            result.rows += rows

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start_line.wait()
    began = stop_at[0] - seconds
    for t in threads:
        t.join()
    result.seconds = time.monotonic() - began
    return result


def rss_bytes(pid: int) -> int:
    """Current resident set (VmRSS) of a live process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler(threading.Thread):
    """Samples a process's RSS every `interval` s; `.peak` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self.stopped.wait(self.interval)

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        return self.peak


def _niced_write_table(*args, **kwargs) -> None:
    os.nice(INGEST_NICE)  # as `lutstore ingest` does by default (--nice 10)
    write_table(*args, **kwargs)


def ingest_in_background(db: Path, name: str, fmt: RowFormat, vocab: int, seed: int) -> mp.Process:
    """A new version of `name`, written by another process (the atomic SST ingest of `lutstore ingest`)."""
    proc = mp.get_context("spawn").Process(target=_niced_write_table, args=(db, name, fmt, vocab, seed),
                                           kwargs={"progress": False}, daemon=True)
    proc.start()
    return proc


def measure(db: Path, fmt: RowFormat, vocab: int, clients: int, seconds: float, cache_mb: float) -> dict:
    with common.ServerProcess(db, "--cache-mb", str(cache_mb), "--workers", str(clients),
                              "--refresh-seconds", "0.5") as server:
        run_load(server.address, "t", vocab, 1, 0.5)  # warm the interpreter paths
        idle_rss = rss_bytes(server.pid)
        sampler = RssSampler(server.pid)
        sampler.start()
        idle = run_load(server.address, "t", vocab, clients, seconds)
        # Second phase: the ingest starts a moment in and runs while the load goes on.
        writer: list[mp.Process] = []
        timer = threading.Timer(0.2 * seconds, lambda: writer.append(ingest_in_background(db, "t", fmt, vocab, 99)))
        timer.start()
        during = run_load(server.address, "t", vocab, clients, seconds, seed=100)
        timer.join()
        writer[0].join(120)
        peak_rss = sampler.stop()
        assert writer[0].exitcode == 0, "the background ingest failed"
    idle_s, during_s = idle.summary(), during.summary()
    return {
        "clients": clients, "seconds_per_phase": seconds, "vocab": vocab, "row_bytes": fmt.payload_bytes,
        "cache_mb": cache_mb, "idle": idle_s, "during_ingest": during_s,
        "idle_rows_per_s": idle.rows / idle.seconds, "during_rows_per_s": during.rows / during.seconds,
        "p99_ratio": during_s["p99_ms"] / idle_s["p99_ms"],
        "server_idle_rss_mib": idle_rss / 2**20, "server_peak_rss_mib": peak_rss / 2**20,
        "rss_over_idle_minus_cache_mib": (peak_rss - idle_rss) / 2**20 - cache_mb,
    }


def build_parser() -> argparse.ArgumentParser:
    p = common.parser("bench_load", __doc__)
    p.add_argument("--quick", action="store_true", help="a smaller table and 2 s phases")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--seconds", type=float, default=0, help="seconds per phase (default 5, quick 2)")
    p.add_argument("--cache-mb", type=float, default=64, help="the daemon's row cache (default 64 MiB)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    common.start("bench_load")
    fmt = RowFormat(2, 8, 512, Encoding.FP16)   # 16 KiB rows
    vocab = 2048 if args.quick else 8192        # 32 / 128 MiB: larger than the cache, so it evicts
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        write_table(tmp / "db", "t", fmt, vocab, seed=1, progress=False)
        result = measure(tmp / "db", fmt, vocab, args.clients, seconds, args.cache_mb)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for phase in ("idle", "during_ingest"):
        s = result[phase]
        print(f"{phase:>14}: {s['requests_per_s']:.0f} req/s, p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms, "
              f"{s['errors']} errors", flush=True)
    print(f"server RSS: idle {result['server_idle_rss_mib']:.0f} MiB, peak {result['server_peak_rss_mib']:.0f} MiB "
          f"(cache budget {args.cache_mb:g} MiB)", flush=True)
    result["targets"] = [
        common.target("p99 during ingest / idle p99", result["p99_ratio"], 2.0, higher_is_better=False),
        common.target("failed requests", result["idle"]["errors"] + result["during_ingest"]["errors"], 0,
                      higher_is_better=False, unit=""),
    ]
    common.finish("load", result)
    return result


if __name__ == "__main__":
    common.run("bench_load", main)
