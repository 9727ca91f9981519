"""Where the row path's time goes: the BatchGet hot path against its ceilings, side by side.

One table of the paper's 160M-16E row shape (12 x 16 x 768; 295 KB fp16),
requests of `--batch` distinct random ids, one in flight, each figure
measured for about `--seconds`:

  multiget       in-process RocksDB multi-get of the same rows (ceiling 1)
  socket         a raw loopback TCP socket moving the same bytes per request (ceiling 2)
  get_raw cold   LutClient.get_raw against a server with --cache-mb 0 (every row from RocksDB)
  get_raw hot    the same against a server whose LRU holds every row
  get_payloads   hot server, rows as one uint8 [n, payload_bytes] array (what a model on a device wants)
  get_rows       hot server, decoded to float32 [n, L, N, D]
  shm get_raw    hot server, through the same-host BatchGetShared path (/dev/shm, no socket)
  shm payloads   hot server, get_payloads through BatchGetShared
  single row     one-row get_raw latency p50 / p99, hot server

    python -m benchmarks.profile_rows                 # fp16, batches of 64
    python -m benchmarks.profile_rows --encoding int8 --serve-flag=--max-message-mb=16
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks import common
from benchmarks.bigtables import write_table
from lutstore import alloc
from lutstore.client import LutClient
from lutstore.formats.codec import Encoding, RowFormat
from lutstore.storage.rocksdb import Store

SHAPE = (12, 16, 768)


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds spent by this process and by a server process between start() and stop().
    On a shared, loaded machine wall-clock GB/s swings 2x from run to run; CPU per byte does not."""

    def __init__(self, server_pid: int | None = None):
        self.server_pid = server_pid

    def start(self) -> None:
        self._client = time.process_time()
        self._server = process_cpu_seconds(self.server_pid) if self.server_pid else 0.0

    def stop(self) -> tuple[float, float]:
        client = time.process_time() - self._client
        server = process_cpu_seconds(self.server_pid) - self._server if self.server_pid else 0.0
        return client, server


def timed(fn: Callable[[np.ndarray], object], batches: list[np.ndarray], seconds: float,
          meter: CpuMeter | None = None) -> list[float]:
    """Per-call seconds of fn over batches (cycled) for about `seconds`, after one warm-up call;
    the meter (if any) ends up holding the CPU seconds of the timed calls in .cpu."""
    fn(batches[0])
    meter = meter or CpuMeter()
    meter.start()
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline or len(samples) < 5:
        ids = batches[i % len(batches)]
        t0 = time.perf_counter()
        fn(ids)
        samples.append(time.perf_counter() - t0)
        i += 1
    meter.cpu = meter.stop()
    return samples


def gbps(samples: list[float], bytes_per_call: int) -> float:
    return bytes_per_call * len(samples) / sum(samples) / 1e9


class LoopbackSocket:
    """A sender thread that answers each 8-byte request N with N bytes; the receiver reads into one buffer."""

    def __init__(self, max_bytes: int):
        self.payload = memoryview(bytes(max_bytes))
        listener = socket.create_server(("127.0.0.1", 0))
        self.conn = socket.create_connection(listener.getsockname())
        self.peer, _ = listener.accept()
        listener.close()
        for s in (self.conn, self.peer):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray(max_bytes)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            header = self.peer.recv(8, socket.MSG_WAITALL)
            if len(header) < 8:
                return
            self.peer.sendall(self.payload[: int.from_bytes(header, "little")])

    def fetch(self, n: int) -> None:
        self.conn.sendall(n.to_bytes(8, "little"))
        view, got = memoryview(self.buffer), 0
        while got < n:
            got += self.conn.recv_into(view[got:n])

    def close(self) -> None:
        self.conn.close()
        self.peer.close()


def main() -> None:
    parser = common.parser("profile_rows", __doc__)
    parser.add_argument("--encoding", choices=[e.value for e in Encoding], default="fp16")
    parser.add_argument("--vocab", type=int, default=512, help="rows in the table (default 512: 151 MB fp16)")
    parser.add_argument("--batch", type=int, default=64, help="distinct ids per request")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per figure")
    parser.add_argument("--db", type=Path, help="reuse/keep this database (default: a temporary one)")
    parser.add_argument("--serve-flag", action="append", default=[], help="extra `lutstore serve` flag (repeatable)")
    parser.add_argument("--only", default="", help="comma-separated subset of figures to run")
    args = parser.parse_args()
    alloc.keep_freed_memory()   # as every entry point does (lutstore/alloc.py)

    fmt = RowFormat(*SHAPE, Encoding(args.encoding))
    row_bytes = fmt.stored_bytes
    call_bytes = row_bytes * args.batch
    tmp = None
    db = args.db
    if db is None:
        tmp = Path(tempfile.mkdtemp(prefix="lutstore-profile-"))
        db = tmp / "db"
    name = f"profile-{args.encoding}"
    with Store.open(db, "primary", create=True) as store:
        have = [m for m in store.tables() if m.name == name and m.vocab_size == args.vocab]
    meta = have[-1] if have else write_table(db, name, fmt, args.vocab, progress=False)
    version = meta.version

    rng = np.random.default_rng(0)
    batches = [np.sort(rng.choice(args.vocab, args.batch, replace=False)) for _ in range(32)]
    singles = [np.array([t]) for t in rng.integers(0, args.vocab, 256)]
    only = set(filter(None, args.only.split(",")))
    want = lambda key: not only or key in only  # noqa: E731
    results: dict[str, dict] = {}

    meter = CpuMeter()

    def report(key: str, samples: list[float], nbytes: int) -> None:
        gb = nbytes * len(samples) / 1e9
        client_cpu, server_cpu = meter.cpu
        stats = {"gbps": gbps(samples, nbytes), **common.percentiles(samples), "calls": len(samples),
                 "client_cpu_s_per_gb": client_cpu / gb, "server_cpu_s_per_gb": server_cpu / gb}
        results[key] = stats
        print(f"  {key:<14} {stats['gbps']:6.3f} GB/s   p50 {stats['p50_ms']:7.3f} ms   p99 {stats['p99_ms']:7.3f} ms"
              f"   CPU s/GB: client {stats['client_cpu_s_per_gb']:5.2f}  server {stats['server_cpu_s_per_gb']:5.2f}",
              flush=True)

    print(f"{common.machine_label()}; {args.encoding} rows of {row_bytes} B, batches of {args.batch} "
          f"({call_bytes / 1e6:.1f} MB per call)", flush=True)
    try:
        if want("multiget"):
            with Store.open(db, "secondary") as store:
                report("multiget", timed(lambda ids: store.get_values(meta, ids.tolist()), batches, args.seconds, meter),
                       call_bytes)
        if want("socket"):
            sock = LoopbackSocket(call_bytes)
            report("socket", timed(lambda ids: sock.fetch(call_bytes), batches, args.seconds, meter), call_bytes)
            sock.close()
        flags = ["--workers", "4", *args.serve_flag]
        if want("cold"):
            with common.ServerProcess(db, "--cache-mb", "0", *flags) as server, LutClient(server.address) as client:
                meter.server_pid = server.pid
                report("get_raw cold", timed(lambda ids: client.get_raw(name, ids, version), batches, args.seconds, meter),
                       call_bytes)
        with common.ServerProcess(db, "--cache-mb", str(2 * args.vocab * row_bytes / 2**20 + 16),
                                  "--allow-shared-memory", *flags) as server, \
                LutClient(server.address) as client, LutClient(server.address, shared_memory=True) as shm_client:
            meter.server_pid = server.pid
            for start in range(0, args.vocab, args.batch):  # warm the server's LRU with every row
                client.get_raw(name, range(start, min(args.vocab, start + args.batch)), version)
            if want("hot"):
                report("get_raw hot", timed(lambda ids: client.get_raw(name, ids, version), batches, args.seconds, meter),
                       call_bytes)
            if want("payloads") and hasattr(client, "get_payloads"):
                report("get_payloads", timed(lambda ids: client.get_payloads(name, ids, version), batches,
                                             args.seconds, meter), call_bytes)
            if want("rows"):
                report("get_rows", timed(lambda ids: client.get_rows(name, ids, version), batches, args.seconds, meter),
                       call_bytes)
            if want("shm"):
                report("shm get_raw", timed(lambda ids: shm_client.get_raw(name, ids, version), batches,
                                            args.seconds, meter), call_bytes)
                report("shm payloads", timed(lambda ids: shm_client.get_payloads(name, ids, version), batches,
                                             args.seconds, meter), call_bytes)
                report("shm single", timed(lambda ids: shm_client.get_raw(name, ids, version), singles,
                                           args.seconds, meter), row_bytes)
            if want("single"):
                report("single row", timed(lambda ids: client.get_raw(name, ids, version), singles, args.seconds, meter),
                       row_bytes)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    print("targets:")
    targets = []
    for key in ("get_raw cold", "get_raw hot"):
        if key in results and "multiget" in results:
            targets.append(common.target(f"{key} / multiget", results[key]["gbps"] / results["multiget"]["gbps"], 0.6))
        if key in results and "socket" in results:
            targets.append(common.target(f"{key} / socket", results[key]["gbps"] / results["socket"]["gbps"], 0.3))
    if "single row" in results:
        targets.append(common.target("single row p99", results["single row"]["p99_ms"], 1.0, False, " ms"))
    out = common.write_results(f"profile_rows_{args.encoding}_b{args.batch}",
                               {"encoding": args.encoding, "batch": args.batch, "row_bytes": row_bytes,
                                "serve_flags": args.serve_flag, "revision": common.git_revision(),
                                "figures": results, "targets": targets})
    print(f"wrote {out}")


if __name__ == "__main__":
    common.run("profile_rows", main)
