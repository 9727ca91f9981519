"""Bigger than RAM: a table of the paper's 410M-16E shape served from disk.

The MoLE paper's promise is a RAM+disk hybrid: the table lives on disk, hot rows
in RAM. This builds a random table of the 410M-16E shape (24 layers, hidden
1024, 16 experts, vocab 50,304: ~40 GB fp16, ~20 GB int8) with
benchmarks.bigtables.write_table, serves it with `lutstore serve` (a RAM row LRU
over RocksDB on disk; the OS page cache below it), and measures decode tok/s of

  inprocess   the same step with rows gathered from a small in-process table of
              the same row size (--inprocess-rows rows, generated directly)
  remote      rows from the daemon, the client row cache cold; the daemon's LRU and
              the OS page cache warmed by a Zipf stream first (hot tokens in RAM)
  remote+     the same with the client cache warm too

in the fixed-step mode of bench_decode (the backbone's compute replaced by a fixed
time per step: the GPU regime) and, with --mode both, with a real 410M backbone on
this CPU. Tokens are Zipf-distributed over the whole vocabulary; every timed run
decodes a fresh stream of the same law, so its tail tokens are rows no cache has
seen and really come from disk. The daemon's disk reads during each timed run
(/proc/PID/io read_bytes: page-cache hits excluded) are recorded next to tok/s.
With --shared-memory on/both the remote cases also run over the same-host
BatchGetShared path (cases *_shm).

Disk is checked right before building (free space must exceed the table plus
--margin-gb); fp16 is used when it fits, else int8 (half the bytes; the report
says so), else the benchmark is skipped with a message. The table is deleted
afterwards unless --keep.

    python -m benchmarks.bench_bigger_than_ram --quick   # vocab 4096 (not bigger than RAM: a dry run)
    python -m benchmarks.bench_bigger_than_ram           # the real thing (tens of minutes to build)

--encoding nf4 builds the table in NF4 (blocks of --block-size, default 64: ~10.6 GB for the
410M-16E shape, which fits in the RAM of a 16+ GB machine: the results say whether it is bigger
than RAM) and adds the case inprocess_nf4 (an in-process nf4 table of --inprocess-rows rows,
inference.lut.PackedTable); the targets compare with the in-process fp16 table as before.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from benchmarks import common
from benchmarks.bench_decode import (FixedStepModel, Run, decode_run, fixed_forward, real_forward, step_time_fn,
                                     warm_up)
from benchmarks.bigtables import write_table, zipf_tokens
from inference.lut import MiB, InProcessTable, RemoteTable
from inference.model import ModelArgs, Transformer, init_weights
from lutstore.client import LutClient
from lutstore.formats.codec import Encoding, RowFormat, encode_payloads
from lutstore.formats.nf4 import DEFAULT_BLOCK_SIZE

log = logging.getLogger(__name__)

SHAPE = (24, 16, 1024)
PAPER_VOCAB = 50304
GB = 1e9


def model_args(vocab: int) -> ModelArgs:
    return ModelArgs(vocab_size=vocab, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, num_experts=16, max_position_embeddings=1024, rms_norm_eps=1e-5)


def table_format(enc: str, block_size: int = DEFAULT_BLOCK_SIZE) -> RowFormat:
    return RowFormat(*SHAPE, Encoding(enc), block_size=block_size if enc == "nf4" else 0)


def choose_encoding(work: Path, vocab: int, wanted: str, margin: float,
                    block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[str | None, str]:
    """(encoding, why): fp16 when the disk has room, else int8, else None (skip); nf4 only when asked."""
    free = common.disk_free_bytes(work)
    need = {enc: vocab * table_format(enc, block_size).stored_bytes for enc in ("fp16", "int8", "nf4")}
    order = ["fp16", "int8"] if wanted == "auto" else [wanted]
    for enc in order:
        if free >= need[enc] + margin:
            why = f"{enc}: {need[enc] / GB:.1f} GB table, {free / GB:.1f} GB free"
            if enc == "int8" and wanted == "auto":
                why += f" (fp16 would need {need['fp16'] / GB:.1f} GB + {margin / GB:.0f} GB margin: written as int8 instead)"
            return enc, why
    return None, (f"skipped: {work} has {free / GB:.1f} GB free; the table needs "
                  + " or ".join(f"{need[e] / GB:.1f} GB ({e})" for e in order) + f" + {margin / GB:.0f} GB margin")


def disk_read_bytes(pid: int) -> int | None:
    """Bytes a process has caused to be read from storage (/proc/PID/io read_bytes): page-cache
    hits do not count, so this is what the daemon really read from disk."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def page_cache_bytes() -> int:
    """The OS page cache ("Cached" in /proc/meminfo)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) * 1024
    return 0


def random_fp16_table(rows: int, seed: int = 0, chunk: int = 64) -> torch.Tensor:
    """[rows, *SHAPE] fp16 normals, filled chunk by chunk (a float32 temporary of the whole
    table would be 2x its size again)."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.empty((rows, *SHAPE), dtype=torch.float16)
    for s in range(0, rows, chunk):
        n = min(chunk, rows - s)
        table[s:s + n] = torch.randn((n, *SHAPE), generator=gen)
    return table


def main(argv: list[str] | None = None) -> int:
    p = common.parser("bench_bigger_than_ram", __doc__)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/lutstore-bigger-than-ram"),
                   help="where the table is built (default /tmp/lutstore-bigger-than-ram)")
    p.add_argument("--vocab", type=int, default=PAPER_VOCAB, help=f"rows of the table (default {PAPER_VOCAB})")
    p.add_argument("--encoding", choices=("auto", "fp16", "int8", "nf4"), default="auto",
                   help="auto: fp16 when the disk has room, else int8 (default auto); nf4 only when asked")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help=f"nf4: values per block (default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--margin-gb", type=float, default=8.0, help="disk space to leave free beyond the table (default 8)")
    p.add_argument("--mode", choices=("fixed", "real", "both"), default="fixed",
                   help="fixed-step backbone (default), the real 410M backbone on this CPU, or both")
    p.add_argument("--fixed-step-ms", type=float, default=2.0, help="fixed-step mode: ms per decode step (default 2)")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8], help="default 1,8")
    p.add_argument("--steps", type=int, default=64, help="decode steps measured (default 64)")
    p.add_argument("--warm-tokens", type=int, default=8192, help="Zipf tokens that warm the caches (default 8192)")
    p.add_argument("--server-cache-mb", type=float, default=4096, help="daemon RAM LRU (MiB, default 4096)")
    p.add_argument("--cache-mb", type=float, default=2048, help="client row cache (MiB, default 2048)")
    p.add_argument("--inprocess-rows", type=int, default=2048, help="rows of the in-process comparison table (default 2048)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each case, interleaved; the best counts (default 3)")
    p.add_argument("--shared-memory", choices=("off", "on", "both"), default="off",
                   help="remote cases over the gRPC stream (off), the same-host shared-memory path (on), or both "
                        "(cases *_shm added); the daemon gets --allow-shared-memory unless off (default off)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in real mode (default 1: the machine is shared; fixed mode always uses 1)")
    p.add_argument("--daemon-hot-control", action="store_true",
                   help="add the case remote_daemon_hot: the run's own rows read once beforehand (client cache "
                        "cold, every row in the daemon's LRU), i.e. the same remote path with no disk: the "
                        "difference to `remote` is what being bigger than RAM costs")
    p.add_argument("--name", default="bigger_than_ram", help="results file name (default bigger_than_ram)")
    p.add_argument("--keep", action="store_true", help="keep the built table (reused by the next run)")
    p.add_argument("--quick", action="store_true", help="vocab 4096, 16 steps, batch 1 (a dry run: fits in RAM)")
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.steps, args.batches = min(args.vocab, 4096), min(args.steps, 16), [1]
        args.warm_tokens, args.repeats, args.inprocess_rows = min(args.warm_tokens, 2048), 2, min(args.inprocess_rows, 512)
    common.start("bigger-than-RAM benchmark")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    built_here = False
    pattern = f"db-{args.vocab}-{args.encoding}" if args.encoding != "auto" else f"db-{args.vocab}-*"
    existing = sorted(args.work_dir.glob(pattern))
    if existing:
        db, enc = existing[0], existing[0].name.rsplit("-", 1)[1]
        why = f"{enc}: reusing {db}"
    else:
        enc, why = choose_encoding(args.work_dir, args.vocab, args.encoding, args.margin_gb * GB, args.block_size)
        print(why, flush=True)
        if enc is None:
            common.write_results(args.name, {"skipped": why})
            return 0
        db = args.work_dir / f"db-{args.vocab}-{enc}"
        started = time.perf_counter()
        try:
            write_table(db, "mole-410m", table_format(enc, args.block_size), args.vocab)
        except BaseException:
            shutil.rmtree(db, ignore_errors=True)
            raise
        built_here = True
        print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
    fmt = table_format(enc, args.block_size)
    table_bytes = args.vocab * fmt.stored_bytes
    print(f"table: {table_bytes / GB:.1f} GB ({enc}) on disk; RAM {ram / GB:.1f} GB -> "
          f"{'bigger' if table_bytes > ram else 'NOT bigger'} than RAM", flush=True)

    results: dict = {"encoding": enc, "why": why, "vocab": args.vocab, "table_bytes": table_bytes, "ram_bytes": ram,
                     "bigger_than_ram": table_bytes > ram, "row_bytes": fmt.stored_bytes, "modes": {}}
    if table_bytes <= ram:
        results["note"] = (f"the {enc} table ({table_bytes / GB:.1f} GB) fits in this machine's RAM ({ram / GB:.1f} GB): "
                           "what is measured is a table served from disk through the page cache, not bigger than RAM")
    targets = []
    try:
        results["client_memory_after_build"] = common.memory_status(os.getpid())
        serve_flags = ["--allow-shared-memory"] if args.shared_memory != "off" else []
        with common.ServerProcess(db, "--cache-mb", str(args.server_cache_mb), *serve_flags, timeout=300) as server:
            # the in-process comparison: rows of the same shape, fp16 (the paper's table precision)
            fp16_rows = random_fp16_table(args.inprocess_rows)
            inproc = InProcessTable(fp16_rows)
            inproc_nf4 = nf4_table(fp16_rows, fmt) if enc == "nf4" else None
            perm = np.random.default_rng(1234).permutation(args.vocab)
            rng = np.random.default_rng(0)
            read_before = disk_read_bytes(server.pid)
            with LutClient(server.address) as client:    # warm the daemon's LRU and the page cache
                warm = RemoteTable(client, "mole-410m", cache_bytes=0)
                for s in tqdm(range(0, args.warm_tokens, 32), desc="warm daemon + page cache", dynamic_ncols=True):
                    ids = torch.from_numpy(zipf_tokens(args.vocab, 32, rng, permutation=perm))[None]
                    warm.request(ids)
                    warm.gather(ids)
                warm.close()
            results["warm_disk_read_bytes"] = _delta(disk_read_bytes(server.pid), read_before)
            results["page_cache_bytes_after_warm"] = page_cache_bytes()
            modes = ["fixed", "real"] if args.mode == "both" else [args.mode]
            for mode in modes:
                results["modes"][mode] = measure_mode(mode, args, server, inproc, perm, rng, inproc_nf4)
                for b, r in results["modes"][mode].items():
                    for case in cases_for(args.shared_memory):
                        what = "client warm too" if case.startswith("remote_client_warm") else "daemon+OS warm, client cold"
                        via = ", shared memory" if case.endswith("_shm") else ""
                        targets.append(common.target(f"410m {mode} b{b} from disk ({what}{via}) vs in-process",
                                                     r[case]["tok_s"] / r["inprocess"]["tok_s"], 0.8))
                        if inproc_nf4 is not None:
                            targets.append(common.target(f"410m nf4 {mode} b{b} from disk ({what}{via}) vs in-process nf4",
                                                         r[case]["tok_s"] / r["inprocess_nf4"]["tok_s"], 0.8))
            rss = common.peak_rss_bytes(server.pid)
            results["server_peak_rss_bytes"] = rss
    finally:
        if built_here and not args.keep:
            shutil.rmtree(db, ignore_errors=True)
            print(f"removed {db} (pass --keep to keep it)", flush=True)
    results["page_cache_bytes_at_end"] = page_cache_bytes()
    results["client_memory_at_end"] = common.memory_status(os.getpid())
    results["table_kept"] = args.keep or not built_here
    common.finish(args.name, {"config": {k: str(v) for k, v in vars(args).items()}, **results, "targets": targets})
    return 0


def nf4_table(rows: torch.Tensor, fmt: RowFormat) -> InProcessTable:
    """The in-process nf4 comparison: the same random rows encoded as the daemon stores them."""
    from inference.lut import PackedTable
    packed = encode_payloads(fmt, rows.numpy())
    return PackedTable(torch.from_numpy(np.ascontiguousarray(packed)).view(len(rows), fmt.num_layers, fmt.nf4_layer_bytes), fmt)


def cases_for(shared_memory: str) -> tuple[str, ...]:
    """The remote cases measured: over the gRPC stream, shared memory (BatchGetShared), or both."""
    base = ("remote", "remote_client_warm")
    if shared_memory == "on":
        return tuple(c + "_shm" for c in base)
    return base + (tuple(c + "_shm" for c in base) if shared_memory == "both" else ())


def measure_mode(mode: str, args, server, inproc: InProcessTable, perm: np.ndarray, rng,
                 inproc_nf4: InProcessTable | None = None) -> dict:
    margs = model_args(args.vocab)
    if mode == "fixed":
        fixed = FixedStepModel(margs.num_hidden_layers, margs.num_experts,
                               step_time_fn(args.fixed_step_ms, args.fixed_step_ms, 25.0))
        fwd = lambda rows: fixed_forward(fixed, rows)   # noqa: E731
    else:
        torch.set_num_threads(args.threads)
        model = Transformer(margs, "lut").eval()
        init_weights(model)
        model.setup_caches(max(args.batches), 16 + args.steps + 1)
        fwd = lambda rows: real_forward(model, rows, 16 + args.steps + 1)   # noqa: E731
    remote_cases = cases_for(args.shared_memory) + (("remote_daemon_hot",) if args.daemon_hot_control else ())
    out: dict = {}
    for b in args.batches:
        def workload() -> tuple[np.ndarray, np.ndarray]:
            # A fresh prompt and stream (same Zipf law) for every run: a stream replayed by a later
            # run would find its tail rows already in the daemon's LRU, and nothing would come from disk.
            return (zipf_tokens(args.vocab, b * 16, rng, permutation=perm).reshape(b, 16),
                    zipf_tokens(args.vocab, b * args.steps, rng, permutation=perm).reshape(b, args.steps))

        ceilings = {"inprocess": inproc, **({"inprocess_nf4": inproc_nf4} if inproc_nf4 is not None else {})}
        runs: dict[str, list[Run]] = {c: [] for c in (*ceilings, *remote_cases)}
        prompt, stream = workload()
        decode_run(fwd(inproc.rows), None, prompt[:, :4] % len(inproc.table), stream[:, :2] % len(inproc.table))  # untimed first call
        for _ in tqdm(range(args.repeats), desc=f"410m {mode} batch {b}", dynamic_ncols=True, leave=False):
            prompt, stream = workload()      # in-process: the same law folded onto its rows (a gather costs the same)
            for c, table in ceilings.items():
                runs[c].append(decode_run(fwd(table.rows), None, prompt % table.vocab_size, stream % table.vocab_size))
            for case in remote_cases:
                with LutClient(server.address, shared_memory=case.endswith("_shm")) as client:
                    src = RemoteTable(client, "mole-410m", cache_bytes=int(args.cache_mb * MiB))
                    if case.startswith("remote_client_warm"):
                        warm_up(src, zipf_tokens(args.vocab, args.warm_tokens, rng, permutation=perm), 32)
                    prompt, stream = workload()
                    if case == "remote_daemon_hot":     # the control: this run's rows into the daemon's LRU first
                        preload = RemoteTable(client, "mole-410m", cache_bytes=0)
                        warm_up(preload, np.concatenate([prompt.ravel(), stream.ravel()]), 32)
                        preload.close()
                    read_before = disk_read_bytes(server.pid)
                    run = decode_run(fwd(src.rows), src, prompt, stream)
                    run.disk_read_bytes = _delta(disk_read_bytes(server.pid), read_before)   # timed part only
                    runs[case].append(run)
                    src.close()
        res = {}
        for c, rs in runs.items():
            res[c] = {**vars(max(rs, key=lambda r: r.tok_s)), "median_tok_s": float(np.median([r.tok_s for r in rs])),
                      "all_tok_s": [r.tok_s for r in rs]}
            if c not in ceilings:
                res[c]["all_disk_read_bytes"] = [r.disk_read_bytes for r in rs]
        out[b] = res
        base, base_median = res["inprocess"]["tok_s"], res["inprocess"]["median_tok_s"]
        print(f"  410m {mode} batch {b} (best of {args.repeats}; median ratio in brackets): " + " | ".join(
            f"{c} {r['tok_s']:.1f} tok/s ({r['tok_s'] / base:.2f}x [{r['median_tok_s'] / base_median:.2f}x]"
            + (f", client hit {100 * r['hit_rate']:.0f}%" if r.get("hit_rate") is not None else "")
            + (f", {np.median(r['all_disk_read_bytes']) / 1e6:.0f} MB from disk per run (median)"
               if r.get("all_disk_read_bytes") and None not in r["all_disk_read_bytes"] else "") + ")"
            for c, r in res.items()), flush=True)
    return out


def _delta(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


if __name__ == "__main__":
    common.run("bench_bigger_than_ram", main)
