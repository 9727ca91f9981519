"""Serving benchmark: many users on one continuously batched engine (inference.engine).

N users (1, 4, 16, 32) each send a request, wait for its last token, think for an
exponential time (mean 1/RATE: Poisson arrivals per user at RATE requests/s; 0 = no
think time), and send the next, for --duration seconds. Prompts are Zipf-distributed
token streams of 16..--max-prompt tokens, completions 8..--max-tokens tokens (greedy,
no EOS), so requests leave the batch at different steps. Measured per case: aggregate
tok/s (generated tokens / wall time), TTFT p50/p99 (submit -> first token) and
inter-token latency p50/p99 (between a request's consecutive tokens).

Cases, each on the same engine settings (--max-batch slots, --prefill-chunk):
  lutstore     rows from a real `lutstore serve` on loopback through ONE shared RemoteTable
  in-process   the whole table as one tensor (the ceiling)
  static       lutstore, but static batching: requests join only when the batch is empty

Models: `demo` (the trained demo checkpoint in ./demo-data, `make demo` first; the backbone
really computes on this machine) and `160m` (the paper's 160M-16E shape, random fp16 table
of --vocab rows) in fixed-step mode: the backbone's compute is a fixed time per forward
(benchmarks.bench_decode.FixedStepModel: 2 ms at batch 1, 4 ms at batch 32, the GPU regime)
while rows are really fetched, cached and gathered; its "logits" draw the next token from
a Zipf law, so the row cache sees natural-text-like reuse.

The engine is driven in-process (no HTTP): this measures batching and the row source, not
JSON and sockets; tests/test_serve.py covers the HTTP layer.

    python -m benchmarks.bench_serve --quick      # minutes: 6 s per case, one rate, small 160m vocab
    python -m benchmarks.bench_serve              # the full run (quiet machine)
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from benchmarks import common
from benchmarks.bench_decode import FixedStepModel, demo_setup, paper_setup, step_time_fn
from benchmarks.bigtables import zipf_tokens
from inference.engine import Engine, FailedEvent, FinishedEvent, Sequence, TokenEvent
from inference.lut import MiB, RemoteTable
from inference.model import ModelArgs
from inference.sampling import SamplingConfig
from lutstore.client import LutClient
from lutstore.errors import UserError

USERS = (1, 4, 16, 32)
CASES = ("lutstore", "in-process", "static")


class FixedStepLM(nn.Module):
    """The engine's model in fixed-step mode: FixedStepModel's time per forward, real row
    gathers, and a next token drawn from a Zipf law (Gumbel-max on its log-probs)."""

    def __init__(self, args: ModelArgs, step_ms, seed: int = 0) -> None:
        super().__init__()
        self.args = args
        self.lm_head = nn.Linear(1, 1, bias=False)      # only its device is read
        self.fixed = FixedStepModel(args.num_hidden_layers, args.num_experts, step_ms)
        ranks = torch.arange(1, args.vocab_size + 1, dtype=torch.float64)
        logp = (ranks ** -1.1 / (ranks ** -1.1).sum()).log().float()
        self.logp = logp[torch.randperm(args.vocab_size, generator=torch.Generator().manual_seed(seed))]
        self.gen = torch.Generator().manual_seed(seed)

    def setup_caches(self, max_batch: int, max_seq: int) -> None:
        pass

    def forward(self, idx, input_pos=None, lut_rows=None, key_mask=None, slots=None):
        self.fixed(idx, lut_rows)
        b, t = idx.shape
        logits = torch.zeros(b, t, self.args.vocab_size)
        u = torch.rand(b, self.args.vocab_size, generator=self.gen).clamp_min(1e-20)
        logits[:, -1] = self.logp - torch.log(-torch.log(u))
        return logits


def run_load(engine: Engine, users: int, rate: float, duration: float, vocab: int, max_prompt: int,
             max_tokens: int, seed: int) -> dict:
    """Closed-loop users with Poisson think times; returns the case's measurements."""
    perm = np.random.default_rng(seed).permutation(vocab)
    records: list[dict] = []
    lock = threading.Lock()
    start = time.perf_counter()
    stop_at = start + duration

    def user(i: int) -> None:
        rng = np.random.default_rng(seed * 1000 + i)
        while True:
            if rate > 0:
                time.sleep(rng.exponential(1 / rate))
            if time.perf_counter() >= stop_at:
                return
            prompt = zipf_tokens(vocab, int(rng.integers(16, max_prompt + 1)), rng, permutation=perm).tolist()
            rec = {"tokens": [], "error": None}
            done = threading.Event()

            def emit(ev, rec=rec, done=done) -> None:
                if isinstance(ev, TokenEvent):
                    rec["tokens"].append(ev.at)
                elif isinstance(ev, (FinishedEvent, FailedEvent)):
                    rec["end"] = time.perf_counter()
                    rec["error"] = str(ev.error) if isinstance(ev, FailedEvent) else None
                    done.set()

            seq = engine.submit(Sequence(prompt, int(rng.integers(8, max_tokens + 1)), emit, SamplingConfig(0.0)))
            rec["submitted"] = seq.submitted_at
            done.wait()
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in records) - start if records else float("nan")
    tokens = sum(len(r["tokens"]) for r in records)
    ttft = [r["tokens"][0] - r["submitted"] for r in records if r["tokens"]]
    itl = [b - a for r in records for a, b in zip(r["tokens"], r["tokens"][1:])]
    t, i = common.percentiles(ttft), common.percentiles(itl)
    return {"requests": len(records), "errors": sum(1 for r in records if r["error"]), "tokens": tokens,
            "wall_s": wall, "tok_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50_ms": t["p50_ms"], "ttft_p99_ms": t["p99_ms"], "itl_p50_ms": i["p50_ms"], "itl_p99_ms": i["p99_ms"]}


def measure_model(name: str, args: argparse.Namespace, work: Path) -> dict:
    setup_args = SimpleNamespace(encoding="fp16", block_size=0, device=torch.device("cpu"),
                                 server_cache_mb=args.server_cache_mb, shared_memory="off", vocab=args.vocab)
    setup = demo_setup(setup_args, work) if name == "demo" else paper_setup(setup_args, work)
    mode = "real" if name == "demo" else "fixed"
    try:
        if mode == "real":
            model = setup.lut_model
        else:
            model = FixedStepLM(setup.args, step_time_fn(2.0, 4.0, 20.0))
        context = min(setup.args.max_position_embeddings, args.max_prompt + args.max_tokens + 1)
        client = LutClient(setup.server.address, timeout=60)
        remote = RemoteTable(client, setup.table, 0, "cpu", cache_bytes=int(args.lut_cache_mb * MiB))
        sources = {"lutstore": remote, "in-process": setup.inprocess, "static": remote}
        out: dict = {"mode": mode, "vocab": setup.vocab, "context": context, "rates": {}}
        # warm the shared row cache (an operator's steady state), untimed
        warm = Engine(model, remote, args.max_batch, context, args.prefill_chunk).start()
        run_load(warm, 8, 0.0, args.duration / 2, setup.vocab, args.max_prompt, args.max_tokens, seed=99)
        warm.stop()
        for rate in args.rates:
            per_rate: dict = {}
            for users in args.users:
                per_rate[users] = {}
                for case in CASES:
                    engine = Engine(model, sources[case], args.max_batch, context, args.prefill_chunk,
                                    static=case == "static").start()
                    try:
                        r = run_load(engine, users, rate, args.duration, setup.vocab, args.max_prompt,
                                     args.max_tokens, seed=users)
                    finally:
                        engine.stop()
                    per_rate[users][case] = r
                    print(f"  {name} {mode} rate {rate:g}/s/user, {users:2d} users, {case:10s}: "
                          f"{r['tok_s']:7.1f} tok/s  TTFT p50/p99 {r['ttft_p50_ms']:6.1f}/{r['ttft_p99_ms']:6.1f} ms  "
                          f"ITL p50/p99 {r['itl_p50_ms']:5.1f}/{r['itl_p99_ms']:5.1f} ms  "
                          f"({r['requests']} requests, {r['errors']} errors)", flush=True)
            out["rates"][str(rate)] = per_rate
        s = remote.stats()
        out["row_cache"] = {"hits": s.hits, "misses": s.misses, "hit_rate": s.hit_rate}
        remote.close()
        client.close()
        return out
    finally:
        setup.server.stop()


def targets(name: str, result: dict) -> list[dict]:
    out = []
    for rate, per in result["rates"].items():
        most = per.get(32) or per[max(per)]
        tag = f"{name} rate {rate}"
        out.append(common.target(f"{tag}: lutstore / in-process tok/s at {max(per)} users",
                                 most["lutstore"]["tok_s"] / max(most["in-process"]["tok_s"], 1e-9), 0.9))
        out.append(common.target(f"{tag}: continuous / static tok/s at {max(per)} users",
                                 most["lutstore"]["tok_s"] / max(most["static"]["tok_s"], 1e-9), 2.0))
        if 16 in per and 1 in per:
            out.append(common.target(f"{tag}: p99 ITL 16 users / 1 user",
                                     per[16]["lutstore"]["itl_p99_ms"] / max(per[1]["lutstore"]["itl_p99_ms"], 1e-9),
                                     2.0, higher_is_better=False))
    return out


def plot(results: dict, label: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, rate, per) for m, r in results.items() for rate, per in r["rates"].items()]
    fig, axes = plt.subplots(len(panels), 3, figsize=(15, 3.6 * len(panels)), squeeze=False)
    for row, (m, rate, per) in zip(axes, panels):
        users = sorted(per, key=int)
        for case in CASES:
            row[0].plot(users, [per[u][case]["tok_s"] for u in users], "o-", label=case)
            row[1].plot(users, [per[u][case]["ttft_p99_ms"] for u in users], "o-", label=case)
            row[2].plot(users, [per[u][case]["itl_p99_ms"] for u in users], "o-", label=case)
        for ax, what in zip(row, ("aggregate tok/s", "TTFT p99 (ms)", "inter-token p99 (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks([int(u) for u in users], [str(u) for u in users])
            ax.set_xlabel("concurrent users")
            ax.set_ylabel(what)
            ax.set_title(f"{m} ({results[m]['mode']}), {rate} req/s per user" if float(rate) else
                         f"{m} ({results[m]['mode']}), back-to-back")
        row[0].legend(fontsize=8)
    fig.suptitle(f"MoLE serving, continuous batching - {label}", fontsize=9)
    fig.tight_layout()
    out = common.plot_path("serve")
    fig.savefig(out, dpi=100)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = common.parser("bench_serve", __doc__)
    p.add_argument("--model", choices=("demo", "160m", "both"), default="both")
    p.add_argument("--users", default="1,4,16,32", help="concurrent users, comma separated (default 1,4,16,32)")
    p.add_argument("--rates", default="0,2", help="requests/s per user (Poisson; 0 = back-to-back), comma separated")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per case (default 30)")
    p.add_argument("--max-prompt", type=int, default=128, help="longest prompt (tokens; shortest 16)")
    p.add_argument("--max-tokens", type=int, default=128, help="longest completion (tokens; shortest 8)")
    p.add_argument("--max-batch", type=int, default=32, help="engine slots (default 32)")
    p.add_argument("--prefill-chunk", type=int, default=64)
    p.add_argument("--vocab", type=int, default=16384, help="rows of the 160m table (default 16384)")
    p.add_argument("--lut-cache-mb", type=float, default=1024, help="client row cache (default 1024)")
    p.add_argument("--server-cache-mb", type=float, default=256)
    p.add_argument("--work-dir", type=Path, default=Path(__file__).resolve().parent / "work")
    p.add_argument("--quick", action="store_true",
                   help="6 s per case, back-to-back only, prompts/completions <= 48, 160m vocab 2048; "
                        "results under benchmarks/results/quick/")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.duration, args.rates, args.max_prompt, args.max_tokens, args.vocab = 6.0, "0", 48, 48, 2048
        if common.RESULTS_DIR.name != "quick":      # run_all --quick has already pointed it there
            common.RESULTS_DIR = common.RESULTS_DIR / "quick"
    try:
        args.users = [int(u) for u in args.users.split(",")]
        args.rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        print("bench_serve: error: --users and --rates are comma-separated numbers", file=sys.stderr)
        return 2
    args.work_dir.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    label = common.start("serving benchmark")
    models = ("demo", "160m") if args.model == "both" else (args.model,)
    results, all_targets = {}, []
    try:
        for m in models:
            print(f"== {m}", flush=True)
            results[m] = measure_model(m, args, args.work_dir)
            all_targets += targets(m, results[m])
    except UserError as e:
        print(f"bench_serve: error: {e}", file=sys.stderr)
        return 2
    common.finish("serve", {"config": common.config_of(args), "results": results, "targets": all_targets},
                  [plot(results, label)])
    return 0


if __name__ == "__main__":
    common.run("bench_serve", main)
