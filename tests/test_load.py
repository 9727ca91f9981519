"""Load: 16 concurrent clients hammer BatchGet for a bounded time, idle and while a
new version of the table is ingested. Zero failed requests; the daemon's RSS stays
within its cache budget plus a stated overhead. Speeds are printed, never asserted
(benchmarks/bench_load.py measures the p99 ratio)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import grpc

from lutstore.formats.codec import Encoding, RowFormat
from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

from conftest import REPO, write_table

sys.path.insert(0, str(REPO))
from benchmarks.bench_load import RssSampler, ingest_in_background, rss_bytes, run_load  # noqa: E402

CLIENTS = 16
CACHE_MB = 4
# What the daemon may hold beyond the row cache under this load: gRPC's per-connection and
# per-stream buffers, in-flight response messages, worker threads. docs/operations.md states it.
RSS_OVERHEAD_MB = 64
FMT = RowFormat(2, 4, 256, Encoding.FP16)  # 4 KiB rows
VOCAB = 2048                               # 8 MiB of rows: twice the cache, so it evicts


def _latest_version(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.LutStoreStub(channel).GetTableInfo(pb.GetTableInfoRequest(table="t"), timeout=10).version


def test_sixteen_clients_no_errors_bounded_rss_and_a_new_version_mid_load(db_path: Path, serve) -> None:
    write_table(db_path, "t", FMT, vocab_size=VOCAB, seed=1)
    server = serve(db_path, "--cache-mb", str(CACHE_MB), "--workers", "8", "--refresh-seconds", "0.2", verbose=0)
    run_load(server.address, "t", VOCAB, 1, 0.3)  # warm
    idle_rss = rss_bytes(server.proc.pid)
    sampler = RssSampler(server.proc.pid)
    sampler.start()

    idle = run_load(server.address, "t", VOCAB, CLIENTS, 2.0)

    writer = []
    timer = threading.Timer(0.3, lambda: writer.append(ingest_in_background(db_path, "t", FMT, VOCAB, 99)))
    timer.start()
    during = run_load(server.address, "t", VOCAB, CLIENTS, 3.0, seed=100)
    timer.join()
    writer[0].join(60)
    peak_rss = sampler.stop()

    i, d = idle.summary(), during.summary()
    print(f"\nidle:   {i['requests_per_s']:.0f} req/s ({idle.rows / idle.seconds:.0f} rows/s), "
          f"p50 {i['p50_ms']:.2f} ms, p99 {i['p99_ms']:.2f} ms, errors {i['errors']}")
    print(f"ingest: {d['requests_per_s']:.0f} req/s ({during.rows / during.seconds:.0f} rows/s), "
          f"p50 {d['p50_ms']:.2f} ms, p99 {d['p99_ms']:.2f} ms, errors {d['errors']}, "
          f"p99 ratio {d['p99_ms'] / i['p99_ms']:.2f}")
    print(f"server RSS: idle {idle_rss / 2**20:.1f} MiB, peak {peak_rss / 2**20:.1f} MiB "
          f"(+{(peak_rss - idle_rss) / 2**20:.1f}; cache budget {CACHE_MB} MiB + overhead {RSS_OVERHEAD_MB} MiB)")

    assert writer[0].exitcode == 0, "the background ingest failed"
    assert i["requests"] > CLIENTS and d["requests"] > CLIENTS
    assert i["errors"] == 0 and d["errors"] == 0, (i["error_codes"], d["error_codes"])
    assert peak_rss <= idle_rss + (CACHE_MB + RSS_OVERHEAD_MB) * 2**20
    # The new version was served during the load: clients asked for "latest" and it became v2.
    deadline = time.monotonic() + 10
    while _latest_version(server.address) != 2:
        assert time.monotonic() < deadline, "the new version never became visible"
        time.sleep(0.1)
    assert server.stop() == 0
