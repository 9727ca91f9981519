"""Decode benchmark: TTFT and decode tok/s of a MoLE model whose LUT rows come from

  (a) in-process   the whole table as one tensor: the ceiling
  (b) lutstore     a real `lutstore serve` on loopback through inference.lut.RemoteTable,
                   with a cold (empty) and a warm client row cache; with --shared-memory the
                   rows come through the same-host BatchGetShared fast path instead of (on) or
                   as well as (both: cases *_shm) the gRPC stream
  (c) offload      the train form, its expert weights kept in a host buffer and copied to
                   the device every step (the MoE-with-offloading baseline). On a CPU-only
                   machine "the device" is the model's own parameters, so this measures one
                   host-to-host copy of every expert weight (fp16 -> fp32) per step plus
                   computing the experts of the step's tokens
  (d) backbone     no experts at all (rows of zeros): the dense floor

at batch 1, 8 and 32, in two modes:

  real        the backbone really computes on this CPU
  fixed-step  the backbone's compute is replaced by a fixed time per step (default 2 ms at
              batch 1, 4 ms at batch 32, linear between; a prompt's prefill takes
              --fixed-prefill-ms per 2048 tokens): the GPU regime, where the fetch is
              everything. Rows are still really fetched, cached, gathered and mixed.

Tokens are teacher-forced from Zipf-distributed streams (benchmarks.bigtables.zipf_tokens):
each step's token becomes known when the previous step ends, exactly when a sampled token
would, so nothing is fetched ahead of time.

"Cold" is an empty client cache. "Warm" is what an operator means by it: the cache already
holds what this workload needs, because the same decode workload (same prompt, same token
stream) ran once before on the same RemoteTable, untimed, with a cache big enough to keep it.
"Warm-zipf" (the older definition, kept for comparison) fills the cache with --warm-tokens
tokens of a different Zipf stream of the same law, so the stream's tail is still unseen.

Models: `demo` (the trained demo checkpoint in ./demo-data, served from its DB; run
`make demo` first) and `160m` (the paper's 160M-16E shape: 12 layers, hidden 768, 16
experts; random weights, a random fp16 table built into --work-dir; --vocab shrinks it
on machines short of RAM or disk: 50,304 rows are 15 GB).

    python -m benchmarks.bench_decode --quick                    # demo + small 160m, fixed-step only
    python -m benchmarks.bench_decode --model 160m --vocab 16384  # the full run

NF4 (--encoding nf4, --block-size B): the 160m table is served in nf4 and the lutstore cases
(RemoteTable: rows packed in its cache, each layer dequantised when gathered) are compared, in
the same run, with two ceilings: "inprocess" is the same model's fp16 table in memory (what a
user of the official code runs; here the nf4 table's values held as fp16) and "inprocess_nf4"
is the nf4 table in memory (inference.lut.PackedTable: like with like). Every case records
vs_inprocess (fp16) and vs_inprocess_nf4.

--device cuda puts the model, the tables and the RemoteTable on the GPU (torch.cuda.synchronize()
before each timer is read; the offload baseline copies its expert weights host -> device).
The fixed-step defaults come from benchmarks/results/gpu_step_times.json when it exists (keys
step_ms_b1, step_ms_b32, prefill_ms_2048, card: measured on a GPU), else 2,4 ms / 25 ms.

    python -m benchmarks.bench_decode --model 160m --encoding nf4 --mode fixed --vocab 8192
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from benchmarks import common
from benchmarks.bigtables import write_table, zipf_tokens
from inference.generation import DEFAULT_PREFILL_CHUNK, announce_chunks, chunk_bounds
from inference.lut import MiB, InProcessTable, LutSource, RemoteTable
from inference.model import ModelArgs, Transformer, init_weights
from lutstore.client import LutClient
from lutstore.formats.codec import Encoding, RowFormat
from lutstore.errors import UserError
from lutstore.formats.nf4 import DEFAULT_BLOCK_SIZE

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "demo-data"
PAPER_VOCAB = 50304
BASE_CASES = ("inprocess", "remote_cold", "remote_warm", "remote_warm_zipf", "offload", "backbone")
REMOTE_CASES = ("remote_cold", "remote_warm", "remote_warm_zipf")
NF4_CEILING = "inprocess_nf4"       # nf4 runs only: the nf4 table in memory (PackedTable)
GPU_STEP_TIMES = common.RESULTS_DIR / "gpu_step_times.json"
DEFAULT_STEP_MS, DEFAULT_PREFILL_MS = (2.0, 4.0), 25.0
WARM_DEFINITION = ("remote_warm: the same decode workload (same prompt and token stream) ran once before, untimed, "
                   "on the same client cache (big enough to keep it); remote_warm_zipf: the cache was filled with "
                   "--warm-tokens tokens of a different Zipf stream of the same law; remote_cold: empty cache")


def cases_for(shared_memory: str, encoding: str = "fp16") -> tuple[str, ...]:
    """The cases measured: with --shared-memory both, every lutstore case once more over shared memory;
    with nf4, the nf4 in-process ceiling next to the fp16 one."""
    base = BASE_CASES if encoding != "nf4" else BASE_CASES[:1] + (NF4_CEILING,) + BASE_CASES[1:]
    if shared_memory != "both":
        return base
    return base + tuple(c + "_shm" for c in REMOTE_CASES)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What runs before a timer is read: on a GPU, wait for the queued kernels and copies."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def resolve_device(name: str) -> torch.device:
    """--device as a torch device; a one-line UserError when CUDA is asked for and absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available to torch on this machine (use --device cpu)")
    return torch.device(name)


def step_time_defaults(path: Path = GPU_STEP_TIMES) -> tuple[tuple[float, float], float, str | None]:
    """Fixed-step defaults: ((ms b1, ms b32), prefill ms per 2048 tokens, card) from a GPU's
    measured step times (path) when that file exists, else the built-in 2,4 / 25 ms (card None)."""
    if not path.is_file():
        return DEFAULT_STEP_MS, DEFAULT_PREFILL_MS, None
    try:
        doc = json.loads(path.read_text())
        return ((float(doc["step_ms_b1"]), float(doc["step_ms_b32"])), float(doc["prefill_ms_2048"]),
                str(doc.get("card", "unknown card")))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: unreadable GPU step times ({e}); fix or remove it") from e


# ---- what runs a step ----------------------------------------------------------------

class ZeroRows:
    """LayerRows of zeros: the model without experts (the dense floor)."""

    def __init__(self, args: ModelArgs, device: torch.device = torch.device("cpu")) -> None:
        self.n, self.d, self.device = args.num_experts, args.hidden_size, device
        self._zeros: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, idx: torch.Tensor) -> ZeroRows:
        self._shape = (idx.shape[0], idx.shape[1])
        return self

    def layer(self, l: int) -> torch.Tensor:
        if self._shape not in self._zeros:
            self._zeros[self._shape] = torch.zeros(*self._shape, self.n, self.d, device=self.device)
        return self._zeros[self._shape]


class FixedStepModel:
    """Stands in for the backbone: each forward takes a fixed time, spent in per-layer slices
    (sleeping, so the GIL is free as while a GPU computes). Layer l's rows are asked for at
    the end of its slice (after its attention/MLP/router), mixed with random gates, and a
    fetch that blocks delays every later layer: the GPU would wait for it too."""

    def __init__(self, num_layers: int, num_experts: int, step_ms: Callable[[int, int], float],
                 device: torch.device = torch.device("cpu")) -> None:
        self.num_layers, self.num_experts, self.step_ms = num_layers, num_experts, step_ms
        self.device = device

    def __call__(self, idx: torch.Tensor, lut_rows) -> None:
        b, t = idx.shape
        slice_s = self.step_ms(b, t) / 1000 / self.num_layers
        gates = torch.full((b, t, 1, self.num_experts), 1.0 / self.num_experts, device=self.device)
        deadline = time.perf_counter()
        for l in range(self.num_layers):
            deadline += slice_s
            wait = deadline - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            if lut_rows is not None:
                rows = lut_rows[:, :, l] if isinstance(lut_rows, torch.Tensor) else lut_rows.layer(l)
                torch.matmul(gates, rows.float())
                deadline = max(deadline, time.perf_counter())   # a blocked fetch stalls the rest


def step_time_fn(ms_b1: float, ms_b32: float, prefill_ms_2048: float) -> Callable[[int, int], float]:
    """Per-forward time: decode steps linear in batch between the two given points; a prefill of
    T tokens takes prefill_ms_2048 * B*T/2048, never less than one step."""
    def step_ms(b: int, t: int) -> float:
        decode = ms_b1 + (ms_b32 - ms_b1) * (b - 1) / 31
        return decode if t == 1 else max(decode, prefill_ms_2048 * b * t / 2048)
    return step_ms


@dataclass
class Setup:
    """One model and its table: everything each case needs."""

    name: str
    args: ModelArgs
    lut_model: Transformer          # lut form, the backbone's real weights
    server: common.ServerProcess
    table: str
    inprocess: InProcessTable
    vocab: int
    make_train_model: Callable[[], Transformer]   # (c): built on demand (big)
    row_bytes: int
    inprocess_nf4: InProcessTable | None = None   # nf4 runs: the nf4 table in memory (PackedTable)


class OffloadedExperts:
    """(c): expert weights live in host buffers (fp16) and are copied into the model's
    expert parameters before every step."""

    def __init__(self, model: Transformer) -> None:
        self.pairs = []
        for layer in model.model.layers:
            for p in list(layer.experts.parameters()) + list(layer.expert_layernorm.parameters()):
                # the host copy lives in (pinned) host memory: on a GPU every load is a real H2D copy
                host = p.detach().to("cpu", torch.float16).clone()
                if p.device.type == "cuda":
                    host = host.pin_memory()
                self.pairs.append((p, host))
        self.bytes_per_step = sum(h.numel() * h.element_size() for _, h in self.pairs)

    def load(self) -> None:
        with torch.no_grad():
            for p, host in self.pairs:
                p.copy_(host, non_blocking=True)


# ---- measuring one case ----------------------------------------------------------------

@dataclass
class Run:
    ttft_ms: float
    tok_s: float
    hit_rate: float | None = None
    misses: int | None = None


def decode_run(forward: Callable[[torch.Tensor, int], None], source: LutSource | None, prompt: np.ndarray,
               stream: np.ndarray, before_step: Callable[[], None] | None = None,
               prefill_chunk: int = DEFAULT_PREFILL_CHUNK, sync: Callable[[], None] = lambda: None) -> Run:
    """Prefill prompt [B, P] in chunks of prefill_chunk tokens (0: one forward), as
    inference.generate does: every chunk's ids announced in chunk order first, then one forward
    per chunk. Then decode stream [B, S] one column at a time; each column's ids are announced
    (source.request) right when the previous step ends, as sampled tokens are. before_step runs
    once before the prefill (its chunks are one step of the offload baseline) and before each
    decode step. sync runs before every timer is read (on a GPU: the queued work done)."""
    b, p = prompt.shape
    prompt_t = torch.from_numpy(prompt)
    sync()
    started = time.perf_counter()
    announce_chunks(source, prompt_t, prefill_chunk)
    if before_step:
        before_step()
    for s, e in chunk_bounds(p, prefill_chunk):
        forward(prompt_t[:, s:e], s)
    sync()
    first = time.perf_counter()
    before = source.stats() if source is not None else None
    for s in range(stream.shape[1]):
        col = stream[:, s:s + 1]
        if source is not None:
            source.request(col)
        if before_step:
            before_step()
        forward(torch.from_numpy(col), p + s)
    sync()
    done = time.perf_counter()
    run = Run(1000 * (first - started), b * stream.shape[1] / (done - first))
    if source is not None:
        after = source.stats()
        hits, misses = after.hits - before.hits, after.misses - before.misses
        run.hit_rate, run.misses = hits / max(1, hits + misses), misses
    return run


def real_forward(model: Transformer, rows: Callable[[torch.Tensor], object] | None, max_seq: int):
    """forward(idx, start) on the real backbone with the KV cache; the next token is picked
    (argmax) so the step's compute is complete when it returns."""
    def forward(idx: torch.Tensor, start: int) -> None:
        b, t = idx.shape
        model.setup_caches(max(model.max_batch, b), max_seq)
        pos = torch.arange(start, start + t, device=model.lm_head.weight.device)
        with torch.no_grad():
            # the rows are asked for with the host's ids (as inference.generate does); the model gets its device's
            logits = model(idx.to(pos.device), pos, lut_rows=None if rows is None else rows(idx))
            logits[:, -1].argmax(-1).tolist()
    return forward


def fixed_forward(fixed: FixedStepModel, rows: Callable[[torch.Tensor], object] | None):
    # One torch thread: on a GPU the host does no math, and on a shared 2-core machine an
    # intra-op pool waking up around each sleep added 3-5 ms per step to every case.
    torch.set_num_threads(1)

    def forward(idx: torch.Tensor, start: int) -> None:
        fixed(idx, None if rows is None else rows(idx))
    return forward


def warm_up(source: RemoteTable, tokens: np.ndarray, batch: int) -> None:
    """Fill the client cache with the rows of a Zipf stream, a step's worth of ids at a time."""
    for s in range(0, len(tokens), batch):
        ids = torch.from_numpy(tokens[s:s + batch])[None]
        source.request(ids)
        source.gather(ids)


# ---- the setups ------------------------------------------------------------------------------

def serve_flags(args: argparse.Namespace) -> list[str]:
    # The benchmark's daemon is on loopback, same host: the shared-memory path may be on.
    return ["--allow-shared-memory"] if args.shared_memory != "off" else []


def ceilings(client: LutClient, table: str, args: argparse.Namespace) -> tuple[InProcessTable, InProcessTable | None]:
    """The in-process tables the lutstore cases are compared with: fp16 (fp32 for an int8 table, as
    before); for nf4 the same rows held as fp16 (the official code's table) and the nf4 table itself."""
    dtype = torch.float32 if args.encoding == "int8" else torch.float16
    fp = InProcessTable.from_client(client, table, device=args.device, dtype=dtype)
    nf4 = InProcessTable.from_client(client, table, device=args.device) if args.encoding == "nf4" else None
    return fp, nf4


def demo_setup(args: argparse.Namespace, work: Path) -> Setup:
    from inference.backbone import load_checkpoint
    from lutstore.ingest.checkpoint import Checkpoint

    model_dir, db = DEMO_DIR / "model", DEMO_DIR / "db"
    stamp = DEMO_DIR / "ingested.json"
    if not (model_dir / "config.json").is_file() or not stamp.is_file():
        raise UserError(f"no demo model in {DEMO_DIR}; run `make demo` first (or use --model 160m)")
    tables = json.loads(stamp.read_text())["tables"]
    if args.encoding not in tables:
        raise UserError(f"the demo DB has no {args.encoding} table (it has {', '.join(sorted(tables))}); "
                        f"use --model 160m for {args.encoding}")
    table = tables[args.encoding]
    backbone, _ = load_checkpoint(model_dir)
    lut_model = Transformer(backbone.args, "lut").eval()
    with Checkpoint.open(model_dir) as ckpt:
        lut_model.load_official_state_dict({n: ckpt.tensor(n).float() for n in ckpt.names()})
    lut_model.to(args.device)
    server = common.ServerProcess(db, "--cache-mb", str(args.server_cache_mb), *serve_flags(args))
    with LutClient(server.address, timeout=600) as client:
        inproc, inproc_nf4 = ceilings(client, table, args)
        info = client.info(table)
        row_bytes = info.row_bytes

    def train_model() -> Transformer:
        return load_checkpoint(model_dir)[0].model.to(args.device)

    return Setup("demo", backbone.args, lut_model, server, table, inproc, backbone.args.vocab_size, train_model,
                 row_bytes, inproc_nf4)


def paper_args(vocab: int) -> ModelArgs:
    return ModelArgs(vocab_size=vocab, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, num_experts=16, max_position_embeddings=2048 + 256,
                     rms_norm_eps=1e-5)


def paper_setup(args: argparse.Namespace, work: Path) -> Setup:
    vocab = args.vocab
    margs = paper_args(vocab)
    enc = Encoding(args.encoding)
    fmt = RowFormat(12, 16, 768, enc, block_size=args.block_size if enc is Encoding.NF4 else 0)
    need = vocab * fmt.stored_bytes
    free = common.disk_free_bytes(work)
    if free < 1.3 * need:
        raise UserError(f"the 160m table needs {need / 1e9:.1f} GB on disk, {work} has {free / 1e9:.1f} GB free; "
                        f"pass a smaller --vocab")
    db = work / (f"db-160m-{vocab}-{args.encoding}" + (f"-b{fmt.block_size}" if enc is Encoding.NF4 else ""))
    if not db.is_dir():
        write_table(db, "mole-160m", fmt, vocab)
    lut_model = Transformer(margs, "lut").eval()
    init_weights(lut_model, seed=0)
    lut_model.to(args.device)
    server = common.ServerProcess(db, "--cache-mb", str(args.server_cache_mb), *serve_flags(args))
    with LutClient(server.address, timeout=600) as client:
        print(f"downloading the {vocab}-row table for the in-process ceiling(s)", flush=True)
        inproc, inproc_nf4 = ceilings(client, "mole-160m", args)
        row_bytes = client.info("mole-160m").row_bytes

    def train_model() -> Transformer:
        m = Transformer(margs, "train").eval()
        init_weights(m, seed=0)
        return m.to(args.device)

    return Setup("160m", margs, lut_model, server, "mole-160m", inproc, vocab, train_model, row_bytes, inproc_nf4)


# ---- one model, every case ---------------------------------------------------------------

class CaseRunner:
    """What every case of one model and mode needs: the forward of the mode, remote tables made and
    closed per run, and the (big, built on demand) offload baseline."""

    def __init__(self, setup: Setup, args: argparse.Namespace, mode: str) -> None:
        self.setup, self.args, self.mode = setup, args, mode
        margs = setup.args
        context = margs.max_position_embeddings
        self.prompt_len = min(args.prompt_len, context - args.steps - 1)
        self.ttft_len = min(args.ttft_prompt, context - 2)
        self.perm = np.random.default_rng(1234).permutation(setup.vocab)   # one Zipf law (hot ids) for all streams
        self.fixed = FixedStepModel(margs.num_hidden_layers, margs.num_experts,
                                    step_time_fn(args.fixed_step_ms[0], args.fixed_step_ms[1], args.fixed_prefill_ms),
                                    args.device)
        self.sync = synchronizer(args.device)
        self.max_seq = max(self.prompt_len + args.steps + 1, self.ttft_len + 2)
        setup.lut_model.setup_caches(max(args.batches), self.max_seq)
        self.zero = ZeroRows(margs, args.device)
        self.chunk = args.prefill_chunk      # every case prefills the same way, so they compare fairly
        self.train_model: Transformer | None = None
        self.offload: OffloadedExperts | None = None

    def forward_for(self, rows, model: Transformer | None = None):
        if self.mode == "fixed":
            return fixed_forward(self.fixed, rows)
        torch.set_num_threads(self.args.threads)
        return real_forward(model or self.setup.lut_model, rows, self.max_seq)

    def zipf(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return zipf_tokens(self.setup.vocab, n, rng, permutation=self.perm)

    def inprocess(self, prompt: np.ndarray, stream: np.ndarray, table: InProcessTable | None = None) -> Run:
        table = table or self.setup.inprocess
        return decode_run(self.forward_for(table.rows), None, prompt, stream, prefill_chunk=self.chunk, sync=self.sync)

    def remote(self, case: str, prompt: np.ndarray, stream: np.ndarray, warm_tokens: np.ndarray, warm_batch: int) -> Run:
        """One run of a remote_* case on a fresh client and RemoteTable (warmed as the case says)."""
        shm = case.endswith("_shm") or self.args.shared_memory == "on"
        with LutClient(self.setup.server.address, shared_memory=shm) as client, \
                RemoteTable(client, self.setup.table, device=self.args.device, cache_bytes=int(self.args.cache_mb * MiB)) as src:
            kind = case.removesuffix("_shm")
            if kind == "remote_warm":        # the same workload once before, untimed
                decode_run(self.forward_for(src.rows), src, prompt, stream, prefill_chunk=self.chunk, sync=self.sync)
            elif kind == "remote_warm_zipf":
                warm_up(src, warm_tokens, warm_batch)
            return decode_run(self.forward_for(src.rows), src, prompt, stream, prefill_chunk=self.chunk, sync=self.sync)

    def backbone(self, prompt: np.ndarray, stream: np.ndarray) -> Run:
        return decode_run(self.forward_for(self.zero), None, prompt, stream, prefill_chunk=self.chunk, sync=self.sync)

    def offloaded(self, prompt: np.ndarray, stream: np.ndarray) -> Run | None:
        """The offload baseline, fewer steps (it is slow by design); None when left out."""
        args = self.args
        if args.skip_offload or (self.mode == "real" and args.quick):
            return None
        if self.train_model is None:
            self.train_model = self.setup.make_train_model()
            self.offload = OffloadedExperts(self.train_model)
            if self.mode == "real":
                self.train_model.setup_caches(max(args.batches), self.max_seq)
        steps = min(args.steps, args.offload_steps)
        # fixed-step: the experts' compute is inside the fixed step (as on a GPU); the per-step
        # weight copy is what remains on top of it
        fwd = fixed_forward(self.fixed, self.zero) if self.mode == "fixed" \
            else real_forward(self.train_model, None, self.max_seq)
        return decode_run(fwd, None, prompt, stream[:, :steps], before_step=self.offload.load, prefill_chunk=self.chunk,
                          sync=self.sync)

    def run(self, case: str, prompt: np.ndarray, stream: np.ndarray, warm_tokens: np.ndarray,
            warm_batch: int) -> Run | None:
        if case == "inprocess":
            return self.inprocess(prompt, stream)
        if case == NF4_CEILING:
            return self.inprocess(prompt, stream, self.setup.inprocess_nf4)
        if case.startswith("remote_"):
            return self.remote(case, prompt, stream, warm_tokens, warm_batch)
        if case == "backbone":
            return self.backbone(prompt, stream)
        return self.offloaded(prompt, stream)


def measure_batch(runner: CaseRunner, b: int, rng_seed: int) -> dict:
    """Every case at batch b: interleaved, repeated; the best run of each counts (the machine is
    shared: the best is the least disturbed), the median is kept too."""
    args, setup = runner.args, runner.setup
    rng = np.random.default_rng(rng_seed + b)
    prompt = runner.zipf(b * runner.prompt_len, rng).reshape(b, runner.prompt_len)
    stream = runner.zipf(b * args.steps, rng).reshape(b, args.steps)
    warm_stream = runner.zipf(args.warm_tokens, rng)
    runner.inprocess(prompt[:, :4], stream[:, :2])   # untimed: first-call costs
    if setup.inprocess_nf4 is not None:
        runner.inprocess(prompt[:, :4], stream[:, :2], setup.inprocess_nf4)
    cases = cases_for(args.shared_memory, args.encoding)
    runs: dict[str, list[Run]] = {}
    bar = tqdm(total=args.repeats * len(cases), desc=f"{setup.name} {runner.mode} batch {b}", leave=False,
               dynamic_ncols=True)
    for _ in range(args.repeats):
        for case in cases:
            bar.set_postfix_str(case)
            bar.update()
            run = runner.run(case, prompt, stream, warm_stream, max(b, 32))
            if run is not None:
                runs.setdefault(case, []).append(run)
    bar.close()
    res: dict = {}
    for case, rs in runs.items():
        best = max(rs, key=lambda r: r.tok_s)
        res[case] = {**vars(best), "median_tok_s": float(np.median([r.tok_s for r in rs])),
                     "all_tok_s": [r.tok_s for r in rs]}
    base = res["inprocess"]["tok_s"]
    for case in res:
        res[case]["vs_inprocess"] = res[case]["tok_s"] / base
        if NF4_CEILING in res:
            res[case]["vs_inprocess_nf4"] = res[case]["tok_s"] / res[NF4_CEILING]["tok_s"]
    print(f"  {setup.name} {runner.mode} batch {b:>2}: " + " | ".join(
        f"{c} {r['tok_s']:.1f} tok/s ({r['vs_inprocess']:.2f}x"
        + (f", hit {100 * r['hit_rate']:.0f}%" if r.get("hit_rate") is not None else "") + ")"
        for c, r in res.items()), flush=True)
    return res


def measure_ttft(runner: CaseRunner, rng_seed: int) -> dict:
    """TTFT of a long prompt at batch 1: in-process vs remote cold / warm, interleaved; the fastest counts."""
    args, setup = runner.args, runner.setup
    rng = np.random.default_rng(rng_seed + 999)
    prompt = runner.zipf(runner.ttft_len, rng)[None]
    one = prompt[:, -1:]
    remote_cases = [c for c in cases_for(args.shared_memory) if c.startswith("remote_")]
    ceilings = ["inprocess"] + ([NF4_CEILING] if setup.inprocess_nf4 is not None else [])
    ttft: dict = {"prompt_tokens": runner.ttft_len, **{c + "_ms": [] for c in ceilings + remote_cases}}
    warm_tokens = runner.zipf(args.warm_tokens, rng)
    for _ in range(args.repeats):
        ttft["inprocess_ms"].append(runner.inprocess(prompt, one).ttft_ms)
        if setup.inprocess_nf4 is not None:
            ttft[NF4_CEILING + "_ms"].append(runner.inprocess(prompt, one, setup.inprocess_nf4).ttft_ms)
        for case in remote_cases:
            ttft[case + "_ms"].append(runner.remote(case, prompt, one, warm_tokens, 32).ttft_ms)
    for k in (*ceilings, *remote_cases):
        ttft["all_" + k + "_ms"], ttft[k + "_ms"] = ttft[k + "_ms"], min(ttft[k + "_ms"])
    nf4_note = f"in-process nf4 {ttft[NF4_CEILING + '_ms']:.1f} ms | " if NF4_CEILING + "_ms" in ttft else ""
    print(f"  {setup.name} {runner.mode} TTFT ({runner.ttft_len} tokens): in-process {ttft['inprocess_ms']:.1f} ms | "
          + nf4_note
          + " | ".join(f"{c} {ttft[c + '_ms']:.1f} ms ({ttft[c + '_ms'] / ttft['inprocess_ms']:.2f}x)"
                       for c in remote_cases), flush=True)
    return ttft


def measure(setup: Setup, args: argparse.Namespace, mode: str, rng_seed: int = 0) -> dict:
    """Every case at every batch, then the TTFT, of one model in one mode."""
    runner = CaseRunner(setup, args, mode)
    out: dict = {"mode": mode, "prompt_len": runner.prompt_len, "steps": args.steps,
                 "prefill_chunk": args.prefill_chunk, "warm_definition": WARM_DEFINITION,
                 "shared_memory": args.shared_memory, "encoding": args.encoding, "device": str(args.device),
                 "batches": {}}
    for b in args.batches:
        out["batches"][b] = measure_batch(runner, b, rng_seed)
    if runner.offload is not None:
        out["offload_bytes_per_step"] = runner.offload.bytes_per_step
    out["ttft"] = measure_ttft(runner, rng_seed)
    del runner
    gc.collect()
    return out


# ---- targets, plot, CLI --------------------------------------------------------------------

def remote_variants(res: dict) -> list[tuple[str, str]]:
    """(key suffix, label) of each lutstore path a batch's results hold: gRPC, and shared memory when run."""
    return [(suffix, " (shm)" if suffix else "") for suffix in ("", "_shm") if "remote_warm" + suffix in res]


def report_nf4_targets(name: str, result: dict) -> list[dict]:
    """Issue 14's targets for an nf4 table: lutstore nf4 vs the in-process fp16 table (cold >= 0.95x in
    fixed-step mode, the steady state warm-zipf >= 0.95x, TTFT 2048 cold <= 1.2x) and vs the in-process
    nf4 table (warm >= 0.95x, cold >= 0.8x)."""
    targets, mode = [], result["mode"]
    for b, res in result["batches"].items():
        tag = f"{name} nf4 {mode} b{b}"
        for suffix, via in remote_variants(res):
            cold, warm, zipf = (res[c + suffix] for c in ("remote_cold", "remote_warm", "remote_warm_zipf"))
            targets.append(common.target(f"{tag} cold{via} tok/s vs in-process fp16", cold["vs_inprocess"],
                                         0.95 if mode == "fixed" else 0.8))
            targets.append(common.target(f"{tag} warm-zipf{via} tok/s vs in-process fp16", zipf["vs_inprocess"], 0.95))
            targets.append(common.target(f"{tag} warm{via} tok/s vs in-process nf4", warm["vs_inprocess_nf4"], 0.95))
            targets.append(common.target(f"{tag} cold{via} tok/s vs in-process nf4", cold["vs_inprocess_nf4"], 0.8))
    t = result["ttft"]
    for ceiling, label in (("inprocess", "fp16"), (NF4_CEILING, "nf4")):
        targets.append(common.target(f"{name} nf4 {mode} TTFT {t['prompt_tokens']} tokens (cold) vs in-process {label}",
                                     t["remote_cold_ms"] / t[ceiling + "_ms"], 1.2, higher_is_better=False))
    return targets


def report_targets(name: str, result: dict) -> list[dict]:
    if result.get("encoding") == "nf4":
        return report_nf4_targets(name, result)
    targets = []
    for b, res in result["batches"].items():
        tag = f"{name} {result['mode']} b{b}"
        for suffix, via in remote_variants(res):
            targets.append(common.target(f"{tag} warm{via} tok/s vs in-process", res["remote_warm" + suffix]["vs_inprocess"], 0.95))
            targets.append(common.target(f"{tag} cold{via} tok/s vs in-process", res["remote_cold" + suffix]["vs_inprocess"], 0.8))
        if name == "160m" and "offload" in res:
            targets.append(common.target(f"{tag} warm tok/s vs offload", res["remote_warm"]["tok_s"] / res["offload"]["tok_s"], 10))
    t = result["ttft"]
    targets.append(common.target(f"{name} {result['mode']} TTFT {t['prompt_tokens']} tokens (cold) vs in-process",
                                 t["remote_cold_ms"] / t["inprocess_ms"], 1.2, higher_is_better=False))
    targets.append(common.target(f"{name} {result['mode']} TTFT {t['prompt_tokens']} tokens (warm) vs in-process",
                                 t["remote_warm_ms"] / t["inprocess_ms"], 1.2, higher_is_better=False))
    return targets


def plot(results: dict, label: str, name: str = "decode") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, mode, r) for m, modes in results.items() for mode, r in modes.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 2, 4), squeeze=False)
    for ax, (m, mode, r) in zip(axes[0], panels):
        batches = list(r["batches"])
        cases = [c for c in cases_for(r.get("shared_memory", "off"), r.get("encoding", "fp16"))]
        width = 0.8 / len(cases)
        for i, case in enumerate(cases):
            ys = [r["batches"][b].get(case, {}).get("tok_s", 0) for b in batches]
            label = "inprocess (fp16)" if case == "inprocess" and NF4_CEILING in cases else case
            ax.bar(np.arange(len(batches)) + (i - (len(cases) - 1) / 2) * width, ys, width, label=label)
        ax.set_xticks(np.arange(len(batches)), [f"batch {b}" for b in batches])
        ax.set_yscale("log")
        ax.set_ylabel("decode tok/s")
        ax.set_title(f"{m}, {mode}" + (f", {r['encoding']}" if r.get("encoding", "fp16") != "fp16" else ""))
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars stay visible
    fig.suptitle(f"MoLE decode tok/s — {label}", fontsize=9)
    fig.tight_layout()
    out = common.plot_path(name)  # one plot per results file (NAME.json -> NAME.png)
    fig.savefig(out, dpi=110)
    return out


def two_floats(text: str) -> tuple[float, float]:
    parts = [float(x) for x in text.split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError("give MS or MS_B1,MS_B32 (positive)")
    return parts[0], parts[1]


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (0: the whole prompt in one forward)")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = common.parser("bench_decode", __doc__)
    p.add_argument("--model", choices=("demo", "160m", "both"), default="both", help="which model(s) (default both)")
    p.add_argument("--mode", choices=("real", "fixed", "both"), default="both", help="backbone compute: real CPU, fixed time, or both")
    p.add_argument("--vocab", type=int, default=PAPER_VOCAB,
                   help=f"vocabulary of the 160m table (default {PAPER_VOCAB}: 15 GB fp16; smaller on machines short of RAM/disk)")
    p.add_argument("--encoding", choices=("fp16", "int8", "nf4"), default="fp16",
                   help="table encoding (default fp16); nf4 adds the in-process nf4 ceiling to the fp16 one")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help=f"nf4: values per block (default {DEFAULT_BLOCK_SIZE}; must divide the hidden size)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the model, the in-process tables and RemoteTable's cache live (default cpu)")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32], help="batch sizes (default 1,8,32)")
    p.add_argument("--steps", type=int, default=64, help="decode steps measured per case (default 64)")
    p.add_argument("--offload-steps", type=int, default=4, help="decode steps of the (slow) offload baseline (default 4)")
    p.add_argument("--skip-offload", action="store_true", help="leave out the offload baseline")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens before the measured decode (default 16)")
    p.add_argument("--ttft-prompt", type=int, default=2048, help="prompt tokens of the TTFT case (default 2048; cut to the context)")
    p.add_argument("--warm-tokens", type=int, default=8192,
                   help="Zipf tokens that warm the client cache in the warm-zipf case (default 8192)")
    p.add_argument("--shared-memory", choices=("off", "on", "both"), default="off",
                   help="lutstore cases over the same-host shared-memory path: off (gRPC stream), on (shared "
                        "memory), both (every lutstore case both ways, *_shm); the daemon gets "
                        "--allow-shared-memory unless off (default off)")
    p.add_argument("--cache-mb", type=float, default=4096, help="client row cache budget, MiB (default 4096)")
    p.add_argument("--server-cache-mb", type=float, default=1024, help="server row LRU budget, MiB (default 1024)")
    p.add_argument("--fixed-step-ms", type=two_floats, default=None,
                   help="fixed-step mode: ms per decode step at batch 1 and batch 32, 'MS1,MS32' (default: "
                        "results/gpu_step_times.json's when present, else 2,4)")
    p.add_argument("--fixed-prefill-ms", type=float, default=None,
                   help="fixed-step mode: ms to prefill 2048 tokens at batch 1, scaled by tokens (default: "
                        "results/gpu_step_times.json's when present, else 25)")
    p.add_argument("--prefill-chunk", type=non_negative_int, default=DEFAULT_PREFILL_CHUNK,
                   help="prompt tokens per prefill forward in every case; each chunk computes while the next "
                        f"chunk's rows arrive (0: the whole prompt in one forward; default {DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--repeats", type=int, default=3, help="runs of each case, interleaved; the best counts (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--work-dir", type=Path, default=None, help="where the 160m table is built (default: a temp dir, removed)")
    p.add_argument("--quick", action="store_true", help="vocab 2048 for 160m, 16 steps, batches 1,8, no offload in real mode")
    p.add_argument("--name", default="decode", help="results file name (default decode)")
    return p


def resolve_args(args: argparse.Namespace) -> dict:
    """The parsed flags made ready for measure(): the device checked, the fixed-step times taken from
    the flags, else a GPU's step-time file, else the built-in defaults. Returns where they came from.
    UserError for a device this machine lacks or a bad step-time file."""
    args.device = resolve_device(args.device)
    step_ms, prefill_ms, card = step_time_defaults()
    step_source = {"step_ms": "flag" if args.fixed_step_ms else (str(GPU_STEP_TIMES) if card else "built-in default"),
                   "prefill_ms": "flag" if args.fixed_prefill_ms else (str(GPU_STEP_TIMES) if card else "built-in default"),
                   "card": card}
    args.fixed_step_ms = args.fixed_step_ms or step_ms
    args.fixed_prefill_ms = args.fixed_prefill_ms if args.fixed_prefill_ms is not None else prefill_ms
    return step_source


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        step_source = resolve_args(args)
    except UserError as e:
        print(f"bench_decode: error: {e}", file=sys.stderr)
        return 2
    if args.quick:
        args.vocab = min(args.vocab, 2048)
        args.steps = min(args.steps, 16)
        args.warm_tokens = min(args.warm_tokens, 2048)
        args.ttft_prompt = min(args.ttft_prompt, 512)
        args.offload_steps = min(args.offload_steps, 2)
        args.repeats = min(args.repeats, 2)
        if args.batches == [1, 8, 32]:
            args.batches = [1, 8]
    args.threads = args.threads or torch.get_num_threads()
    label = common.start("decode benchmark")
    models = ["demo", "160m"] if args.model == "both" else [args.model]
    modes = ["real", "fixed"] if args.mode == "both" else [args.mode]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-decode-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    targets: list[dict] = []
    try:
        for m in models:
            setup = demo_setup(args, work) if m == "demo" else paper_setup(args, work)
            try:
                print(f"{m}: vocab {setup.vocab}, row {setup.row_bytes / 1e3:.0f} KB ({args.encoding}), on {args.device}, "
                      f"{setup.args.num_hidden_layers} layers", flush=True)
                results[m] = {}
                for mode in modes:
                    results[m][mode] = measure(setup, args, mode)
                    targets += report_targets(m, results[m][mode])
            finally:
                setup.server.stop()
                del setup
                gc.collect()
    except UserError as e:
        print(f"bench_decode: error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    common.finish(args.name, {"config": common.config_of(args), "fixed_step_times_from": step_source,
                              "results": results, "targets": targets},
                  [plot(results, label, args.name)])
    return 0


if __name__ == "__main__":
    common.run("bench_decode", main)
