"""Ingest benchmark: MB/s and peak RSS of the real `lutstore ingest` of a rep-form checkpoint.

It writes a rep-form checkpoint of the paper's 160M-16E shape (12 layers,
hidden 768, intermediate 3072, 12 heads, 16 experts; vocab 50,304 makes the
table 15 GB in fp16) chunk by chunk with random fp16 values, then runs
`python -m lutstore.cli ingest` on it as a subprocess and records
  * MB/s: stored row bytes / wall time of the whole command (open, rows, artifacts, commit)
  * peak RSS of the ingest process (VmHWM, and wait4's ru_maxrss for that child alone)
The checkpoint was just written, so much of it may be read from the page cache.

    python -m benchmarks.bench_ingest                  # the full 15 GB table (~35 GB of disk at peak)
    python -m benchmarks.bench_ingest --vocab 8192     # same row shape, smaller table
    python -m benchmarks.bench_ingest --quick          # vocab 4096 (1.2 GB table)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import common
from benchmarks.bigtables import ModelShape, write_rep_checkpoint
from lutstore.formats.codec import CRC_BYTES, Encoding, RowFormat
from lutstore.storage.rocksdb import Store

REPO = Path(__file__).resolve().parent.parent
MARGIN_BYTES = 1 << 30


def need_bytes(shape: ModelShape, fmt: RowFormat) -> int:
    """Disk at peak: the checkpoint, the rows (staging SSTs are moved into the DB, not copied),
    the backbone twice (temporary file + its SST copy) and a margin."""
    rows = shape.vocab_size * (fmt.payload_bytes + CRC_BYTES + 32)
    backbone = shape.checkpoint_bytes() - 2 * shape.table_shape[0] * shape.table_shape[1]
    return shape.checkpoint_bytes() + rows + 2 * backbone + MARGIN_BYTES


class RssWatcher(threading.Thread):
    """Polls a process's memory until it exits: peak RSS (VmHWM) and, separately, the peaks of its
    anonymous memory (heap, arrays) and of its mapped file pages (the mmap'd checkpoint: page cache)."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = self.peak_anon = self.peak_file = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            mem = common.memory_status(self.pid)
            if not mem:
                return
            self.peak = max(self.peak, mem.get("VmHWM", 0))
            self.peak_anon = max(self.peak_anon, mem.get("RssAnon", 0))
            self.peak_file = max(self.peak_file, mem.get("RssFile", 0))
            self.done.wait(self.interval)


def run_ingest(ckpt: Path, db: Path, encoding: str, progress: bool) -> dict:
    """`lutstore ingest` as a subprocess; returns wall seconds, peak RSS and its last output line."""
    cmd = [sys.executable, "-m", "lutstore.cli", "-v", "ingest", str(ckpt), "--db", str(db), "--name", "bench-ingest",
           "--encoding", encoding, "--allow-no-tokenizer", *([] if progress else ["--no-progress"])]  # rows only
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)  # stderr (progress bar) passes through
    watcher = RssWatcher(proc.pid)
    watcher.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not every child's
    seconds = time.perf_counter() - t0
    watcher.done.set()
    watcher.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"lutstore ingest failed ({proc.returncode}): {out.strip()}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_bytes": max(watcher.peak, usage.ru_maxrss * 1024),
            "peak_rss_polled_bytes": watcher.peak, "ru_maxrss_bytes": usage.ru_maxrss * 1024,
            "peak_rss_anon_bytes": watcher.peak_anon, "peak_rss_file_bytes": watcher.peak_file,
            "output": out.strip().splitlines()[-1] if out.strip() else ""}


def build_parser() -> argparse.ArgumentParser:
    p = common.parser("bench_ingest", __doc__)
    p.add_argument("--quick", action="store_true", help="vocab 4096 instead of 50,304 (for `make bench`)")
    p.add_argument("--vocab", type=int, default=0, help="table vocab (default 50304, the paper's; 4096 with --quick)")
    p.add_argument("--encoding", choices=[e.value for e in Encoding], default="fp16", help="row encoding (default fp16)")
    p.add_argument("--workdir", type=Path, help="where the checkpoint and DB go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and DB afterwards")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    vocab = args.vocab or (4096 if args.quick else 50304)
    shape = ModelShape(vocab_size=vocab)
    fmt = RowFormat(shape.num_layers, shape.num_experts, shape.hidden_size, Encoding(args.encoding))
    base = args.workdir or Path(tempfile.gettempdir())
    need, free = need_bytes(shape, fmt), common.disk_free_bytes(base)
    common.start("bench_ingest")
    print(f"vocab {vocab}, checkpoint {shape.checkpoint_bytes() / 1e9:.2f} GB, "
          f"needs ~{need / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free at {base}", flush=True)
    if free < need:
        print(f"bench_ingest: SKIPPED: not enough disk at {base} (~{need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB "
              f"free); try --vocab 8192 or --workdir on a bigger disk", flush=True)
        results = {"skipped": f"not enough disk: {need} bytes needed, {free} free", "targets": []}
        common.write_results("ingest", results)
        return results
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lutstore-bench-ingest-", dir=base))
    try:
        t0 = time.perf_counter()
        ckpt = write_rep_checkpoint(work / "mole-160m-16e-rep", shape, progress=not args.no_progress)
        os.sync()  # the checkpoint's writeback must not run during (and be billed to) the ingest
        write_s = time.perf_counter() - t0
        ckpt_bytes = (ckpt / "model.safetensors").stat().st_size
        print(f"checkpoint written: {ckpt_bytes / 1e9:.2f} GB in {write_s:.1f}s ({ckpt_bytes / 1e6 / write_s:.0f} MB/s)",
              flush=True)
        run = run_ingest(ckpt, work / "db", args.encoding, not args.no_progress)
        with Store.open(work / "db", "secondary") as store:
            meta = store.resolve("bench-ingest")
        if meta.vocab_size != vocab or meta.stored_bytes != vocab * fmt.stored_bytes:
            raise RuntimeError(f"ingested table has {meta.vocab_size} rows / {meta.stored_bytes} bytes; "
                               f"expected {vocab} / {vocab * fmt.stored_bytes}")
        db_bytes = sum(f.stat().st_size for f in (work / "db").rglob("*") if f.is_file())
    finally:
        if args.keep:
            print(f"kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    mbps = meta.stored_bytes / 1e6 / run["seconds"]
    # the checkpoint's table is fp16: what an encoding ingests per second, whatever it stores (nf4: 0.27x)
    input_bytes = vocab * fmt.values * 2
    input_mbps = input_bytes / 1e6 / run["seconds"]
    input_mb_per_cpu_s = input_bytes / 1e6 / max(run["cpu_seconds"], 1e-9)
    rss_gb = run["peak_rss_bytes"] / 1e9
    print(f"ingest: {meta.stored_bytes / 1e9:.2f} GB of rows in {run['seconds']:.1f}s = {mbps:.0f} MB/s "
          f"({mbps / (ckpt_bytes / 1e6 / write_s):.2f}x the checkpoint's own write rate); peak RSS {rss_gb:.2f} GB "
          f"(peaks: anonymous {run['peak_rss_anon_bytes'] / 1e9:.2f} GB, mapped file pages "
          f"{run['peak_rss_file_bytes'] / 1e9:.2f} GB); "
          f"DB {db_bytes / 1e9:.2f} GB", flush=True)
    print(f"  fp16 input: {input_bytes / 1e9:.2f} GB in {run['seconds']:.1f}s = {input_mbps:.0f} MB/s; "
          f"{run['cpu_seconds']:.1f} CPU-s = {input_mb_per_cpu_s:.0f} MB per CPU-second", flush=True)
    print(f"  lutstore said: {run['output']}", flush=True)
    suffix = "" if vocab == 50304 else f" (vocab {vocab})"
    targets = [common.target(f"ingest MB/s of fp16 input, 160M-16E rep {args.encoding}{suffix}", input_mbps, 200,
                             unit=" MB/s"),
               common.target(f"ingest peak RSS, 160M-16E rep {args.encoding}{suffix}", rss_gb, 3.0,
                             higher_is_better=False, unit=" GB")]
    results = {"config": {"vocab": vocab, "encoding": args.encoding, "shape": shape.__dict__, "quick": args.quick,
                          "revision": common.git_revision()},
               "checkpoint_bytes": ckpt_bytes, "checkpoint_write_seconds": write_s, "stored_bytes": meta.stored_bytes,
               "db_bytes": db_bytes, "ingest_seconds": run["seconds"], "ingest_mb_per_s": mbps,
               "input_bytes": input_bytes, "input_mb_per_s": input_mbps, "ingest_cpu_seconds": run["cpu_seconds"],
               "input_mb_per_cpu_second": input_mb_per_cpu_s,
               "peak_rss_bytes": run["peak_rss_bytes"], "peak_rss_polled_bytes": run["peak_rss_polled_bytes"],
               "ru_maxrss_bytes": run["ru_maxrss_bytes"], "peak_rss_anon_bytes": run["peak_rss_anon_bytes"],
               "peak_rss_file_bytes": run["peak_rss_file_bytes"], "lutstore_output": run["output"], "targets": targets,
               "figures": [{"name": f"ingest peak anonymous RSS (excludes mmap'd checkpoint pages){suffix}",
                            "value": run["peak_rss_anon_bytes"] / 1e9, "unit": " GB"},
                           {"name": f"ingest MB/s stored ({args.encoding}){suffix}", "value": mbps, "unit": " MB/s"},
                           {"name": f"ingest MB of fp16 input per CPU-second ({args.encoding}){suffix}",
                            "value": input_mb_per_cpu_s, "unit": " MB/s"}]}
    own = re.search(r"in ([\d.]+)s \(([\d.]+) MB/s\)", run["output"])
    if own:  # lutstore's own timing: from after its imports to the commit
        results["figures"].append({"name": f"ingest MB/s as lutstore reports it (no interpreter start/exit){suffix}",
                                   "value": float(own.group(2)), "unit": " MB/s"})
    common.finish("ingest", results)
    return results


if __name__ == "__main__":
    common.run("bench_ingest", main)
