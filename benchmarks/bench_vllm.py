"""MoLE in vLLM: vLLM + lutstore vs vLLM + in-memory table vs `inference.serve`, one load, one run.

Setups, each an OpenAI-compatible server driven by the same HTTP client with the same prompts
(token ids). The servers of one dtype run side by side (started together, each load sent to each
in turn, so a ratio compares measurements taken seconds apart on a machine whose other load
drifts); the two dtypes run one after the other:
  vllm-lutstore-DTYPE  vLLM with the lutstore plugin, rows from a `lutstore serve` daemon
  vllm-memory-DTYPE    vLLM with the plugin, the rep-form checkpoint's table in memory (the ceiling)
  serve-fp32           `python -m inference.serve` on the same daemon (its default dtype)
DTYPE is fp32 (--dtype float32 with VLLM_CPU_NUM_OF_RESERVED_CPU=0: the model gets every core)
and bf16 (--dtype bfloat16 with vLLM's CPU defaults: one core kept for its scheduler).

The model: the paper's 160M-16E shape (12 layers, 16 experts, hidden 768, random fp16
weights, a WordLevel tokenizer of --vocab words, no EOS so every request runs to max_tokens),
its table ingested fp16 into the daemon. Each setup gets, after one warm-up request:
  cold    1, 8 and 32 concurrent streams, each load's prompts drawn from a Zipf law over a
          slice of the vocabulary no earlier load used, so their rows are not yet cached
  steady  the same concurrencies on the last slice, after another stream of that Zipf law
          (--fill-requests requests, untimed) filled the row caches. A random-weights model's
          greedy continuations are spread over the whole vocabulary (a trained model's follow
          its text's Zipf law), so the fill also sends every id once (prompts only, untimed):
          the caches then hold what a long-running server's would (--cache-mb holds them all)
Every stream sends its requests back to back (--requests-per-stream), --prompt-len prompt
tokens and --max-tokens completion tokens, greedy, streamed. Measured per load: tok/s
(completion tokens / wall time), TTFT p50/p99 (send -> first streamed token), inter-token
latency p50/p99 (gaps between a request's streamed chunks). The load average is recorded at
every setup's start, since this machine may be shared.

Targets: vLLM + lutstore >= 0.9x vLLM + in-memory tok/s in steady state at every concurrency
and dtype. Figures: inference.serve's tok/s and TTFT against vLLM + lutstore in fp32 and bf16.

    python -m benchmarks.bench_vllm --quick     # minutes: fp32 only, vocabulary 1024, small loads
    python -m benchmarks.bench_vllm             # the full run (~15 min on a quiet 2-core machine)

Needs vLLM's environment (`make install-vllm`, or $LUTSTORE_VLLM_PYTHON); without it the
benchmark writes a result that says it was skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks import common
from benchmarks.bigtables import ModelShape, write_rep_checkpoint, zipf_tokens
from inference.endpoint_process import Endpoint
from lutstore.child_server import ChildServerError
from lutstore.errors import UserError
from testing.vllm_server import PYTHON_ENV, VllmServer, vllm_python

TABLE = "mole-160m"
CONCURRENCY = (1, 8, 32)
PROFILES = {   # dtype -> (vLLM --dtype, extra environment)
    "fp32": ("float32", {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
    "bf16": ("bfloat16", {}),
}
TOY = ModelShape(vocab_size=256, num_layers=2, num_experts=4, hidden_size=128, intermediate_size=256, num_heads=2)


# -- the model --------------------------------------------------------------------------------
def write_word_tokenizer(folder: Path, vocab: int) -> None:
    """A WordLevel tokenizer of `vocab` words w0..w{vocab-1}: every id decodes to one word, so a
    streamed chunk is one token; no special tokens, so nothing stops a request early."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def build_model(work: Path, shape: ModelShape, progress: bool) -> tuple[Path, Path]:
    """The rep-form checkpoint (fp16, random) and a RocksDB holding its table; reused when present."""
    name = f"{shape.vocab_size}v-{shape.num_layers}l-{shape.num_experts}e-{shape.hidden_size}d"
    ckpt, db = work / f"vllm-ckpt-{name}", work / f"vllm-db-{name}"
    if not (ckpt / "tokenizer.json").exists():
        shutil.rmtree(ckpt, ignore_errors=True)
        write_rep_checkpoint(ckpt, shape, progress=progress)
        config = json.loads((ckpt / "config.json").read_text())
        config.update(bos_token_id=None, eos_token_id=None)     # no EOS: every request runs to max_tokens
        (ckpt / "config.json").write_text(json.dumps(config, indent=2))
        write_word_tokenizer(ckpt, shape.vocab_size)
    if not db.is_dir():
        from lutstore import cli

        print(f"ingesting {ckpt.name} into {db.name}", flush=True)
        if cli.main(["ingest", str(ckpt), "--db", str(db), "--name", TABLE, "--encoding", "fp16",
                     *([] if progress else ["--no-progress"])]) != 0:
            shutil.rmtree(db, ignore_errors=True)
            raise UserError(f"ingesting {ckpt} failed")
    return ckpt, db


def vllm_version() -> str:
    """The vLLM distribution in the environment the servers run in (vllm-cpu on a CPU host)."""
    import subprocess

    code = ("import importlib.metadata as m\nfor d in ('vllm-cpu', 'vllm'):\n    try:\n        print(d, m.version(d)); break\n"
            "    except m.PackageNotFoundError:\n        pass")
    try:
        out = subprocess.run([str(vllm_python()), "-c", code], capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# -- the load ------------------------------------------------------------------------------------
@dataclass
class Load:
    """One measured load: `streams` concurrent streams, each sending its prompts back to back."""
    name: str
    streams: int
    prompts: list[list[list[int]]]          # [stream][request] -> token ids


def make_loads(vocab: int, args: argparse.Namespace) -> tuple[list[Load], list[Load], list[Load]]:
    """(cold loads, the fills, steady loads). Each cold load draws from a vocabulary slice of its
    own; the Zipf fill and the steady loads share the last slice (one Zipf law: the same hot ids);
    the sweep holds every id of the vocabulary once."""
    slices = np.array_split(np.random.default_rng(0).permutation(vocab), len(args.concurrency) + 1)

    def load(name: str, streams: int, per_stream: int, ids: np.ndarray, seed: int) -> Load:
        rng = np.random.default_rng(seed)
        perm = np.random.default_rng(1234).permutation(ids)          # the slice's hot ids, shared by its loads
        return Load(name, streams, [[zipf_tokens(len(ids), args.prompt_len, rng, permutation=perm).tolist()
                                     for _ in range(per_stream)] for _ in range(streams)])

    cold = [load(f"cold-{c}", c, args.requests_per_stream[i], slices[i], 10 + i)
            for i, c in enumerate(args.concurrency)]
    fill = load("fill", args.fill_streams, -(-args.fill_requests // args.fill_streams), slices[-1], 99)
    every = np.random.default_rng(98).permutation(vocab).tolist()
    chunks = [every[i:i + args.prompt_len] for i in range(0, vocab, args.prompt_len)]
    sweep = Load("sweep", args.fill_streams, [chunks[i::args.fill_streams] for i in range(args.fill_streams)])
    steady = [load(f"steady-{c}", c, args.requests_per_stream[i], slices[-1], 20 + i)
              for i, c in enumerate(args.concurrency)]
    return cold, [fill, sweep], steady


@dataclass
class Record:
    sent: float = 0.0
    chunks: list[float] = field(default_factory=list)   # arrival time of every chunk carrying text
    tokens: int = 0
    error: str | None = None


async def stream_request(session, url: str, body: dict, rec: Record) -> None:
    """POST a streamed completion; note when each chunk with text arrives and the usage's token count."""
    rec.sent = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    rec.error = str(obj["error"])[:200]
                    return
                if any(c.get("text") for c in obj.get("choices") or ()):
                    rec.chunks.append(time.perf_counter())
                if obj.get("usage"):
                    rec.tokens = obj["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - a failed request is counted, the load goes on
        rec.error = f"{type(e).__name__}: {e}"


async def run_load_async(url: str, model: str, load: Load, max_tokens: int, vllm: bool, bar) -> list[Record]:
    import aiohttp

    records: list[Record] = []
    extra = {"ignore_eos": True} if vllm else {}

    async def stream(prompts: list[list[int]]) -> None:
        for prompt in prompts:
            rec = Record()
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, **extra}
            await stream_request(session, url, body, rec)
            records.append(rec)
            bar.update(1)

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(stream(p) for p in load.prompts))
    return records


def measure(url: str, model: str, load: Load, max_tokens: int, vllm: bool, label: str) -> dict:
    total = sum(len(p) for p in load.prompts)
    with tqdm(total=total, unit="req", desc=f"{label} {load.name}", leave=False, dynamic_ncols=True,
              file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        start = time.perf_counter()
        records = asyncio.run(run_load_async(url, model, load, max_tokens, vllm, bar))
        wall = time.perf_counter() - start
    ok = [r for r in records if r.error is None]
    tokens = sum(r.tokens or len(r.chunks) for r in ok)
    ttft = [r.chunks[0] - r.sent for r in ok if r.chunks]
    itl = [b - a for r in ok for a, b in zip(r.chunks, r.chunks[1:])]
    t, i = common.percentiles(ttft), common.percentiles(itl)
    errors = [r.error for r in records if r.error is not None]
    return {"streams": load.streams, "requests": len(records), "errors": len(errors),
            "first_error": errors[0] if errors else None, "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall if wall > 0 else 0.0, "ttft_p50_ms": t["p50_ms"], "ttft_p99_ms": t["p99_ms"],
            "itl_p50_ms": i["p50_ms"], "itl_p99_ms": i["p99_ms"]}


# -- the setups ------------------------------------------------------------------------------------
@dataclass
class Setup:
    name: str            # e.g. vllm-lutstore-fp32
    kind: str            # vllm | serve
    dtype: str           # fp32 | bf16
    table: str           # lutstore | memory


def setups(args: argparse.Namespace) -> list[Setup]:
    out = []
    for dtype in args.dtypes:
        out += [Setup(f"vllm-memory-{dtype}", "vllm", dtype, "memory"), Setup(f"vllm-lutstore-{dtype}", "vllm", dtype, "lutstore")]
        if dtype == "fp32":
            out.append(Setup("serve-fp32", "serve", "fp32", "lutstore"))
    return [s for s in out if not args.only or s.name in args.only]


def start_server(setup: Setup, ckpt: Path, daemon_addr: str, args: argparse.Namespace, work: Path):
    """The running server and the model name it serves."""
    context = str(args.context)
    if setup.kind == "serve":
        env = {"LUTSTORE_CACHE": str(work / "lutstore-cache")}
        ep = Endpoint(daemon_addr, "--table", TABLE, "--model-name", "mole", "--max-batch", str(max(args.concurrency)),
                      "--context", context, "--lut-cache-mb", str(args.cache_mb), "--dtype", "float32", env=env,
                      timeout=600)
        return ep, ep.url
    vllm_dtype, env = PROFILES[setup.dtype]
    lut = {"addr": daemon_addr, "table": TABLE, "cache_mb": args.cache_mb} if setup.table == "lutstore" else None
    server = VllmServer(ckpt, "--dtype", vllm_dtype, "--max-model-len", context,
                        "--max-num-seqs", str(max(args.concurrency)), model="mole", lutstore=lut,
                        env={**env, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)})
    return server, server.url


def report(name: str, phase: str, r: dict) -> None:
    print(f"  {name:20s} {phase:6s} {r['streams']:2d} streams: {r['tok_s']:7.1f} tok/s  "
          f"TTFT p50/p99 {r['ttft_p50_ms']:7.1f}/{r['ttft_p99_ms']:7.1f} ms  "
          f"ITL p50/p99 {r['itl_p50_ms']:6.1f}/{r['itl_p99_ms']:6.1f} ms  "
          f"({r['requests']} requests, {r['errors']} errors)", flush=True)
    if r["errors"]:
        print(f"    first error: {r['first_error']}", flush=True)


def run_profile(group: list[Setup], ckpt: Path, daemon_addr: str, loads: tuple, args: argparse.Namespace,
                work: Path, results: dict, failed: dict) -> None:
    """Start a profile's servers together, then run every load on each of them in turn, so that each
    ratio compares measurements taken seconds apart (this machine's other load drifts by the minute).
    A server that does not start is recorded in `failed`; the others still run."""
    cold, (fill, sweep), steady = loads
    running: list[tuple[Setup, object, str]] = []
    try:
        for setup in group:
            out = {"kind": setup.kind, "dtype": setup.dtype, "table": setup.table,
                   "load_average_at_start": list(os.getloadavg())}
            t0 = time.perf_counter()
            try:
                server, url = start_server(setup, ckpt, daemon_addr, args, work)
            except ChildServerError as e:
                print(f"  {setup.name}: did not start: {str(e).splitlines()[0]}", flush=True)
                failed[setup.name] = str(e)[-4000:]
                continue
            running.append((setup, server, url))
            out["start_s"] = time.perf_counter() - t0
            results[setup.name] = out
            print(f"  {setup.name}: serving after {out['start_s']:.0f} s", flush=True)
        for setup, server, url in list(running):
            warm = measure(url + "/v1/completions", "mole", Load("warm-up", 1, [[fill.prompts[0][0][:8]]]), 4,
                           setup.kind == "vllm", setup.name)
            if warm["errors"]:
                print(f"  {setup.name}: its warm-up request failed: {warm['first_error']}", flush=True)
                failed[setup.name] = f"warm-up request failed: {warm['first_error']}"
                results.pop(setup.name, None)
                running.remove((setup, server, url))
                server.stop()
        for phase, group_loads in (("cold", cold), ("steady", steady)):
            if phase == "steady":   # fill the row caches, untimed
                for setup, _, url in running:
                    measure(url + "/v1/completions", "mole", fill, args.max_tokens, setup.kind == "vllm", setup.name)
                    measure(url + "/v1/completions", "mole", sweep, 1, setup.kind == "vllm", setup.name)
            for load in group_loads:
                for setup, _, url in running:
                    r = measure(url + "/v1/completions", "mole", load, args.max_tokens, setup.kind == "vllm",
                                setup.name)
                    results[setup.name].setdefault(phase, {})[str(load.streams)] = r
                    report(setup.name, phase, r)
    finally:
        for setup, server, _ in running:
            code = server.stop()
            if setup.name in results:
                results[setup.name].update(exit_code=code, load_average_at_end=list(os.getloadavg()))


# -- targets, figures, plot --------------------------------------------------------------------------
def targets_and_figures(results: dict, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    targets, figures = [], []
    users = [str(c) for c in args.concurrency]
    for dtype in args.dtypes:
        lut, mem = results.get(f"vllm-lutstore-{dtype}"), results.get(f"vllm-memory-{dtype}")
        if lut and mem:
            for u in users:
                ratio = lut["steady"][u]["tok_s"] / max(mem["steady"][u]["tok_s"], 1e-9)
                targets.append(common.target(f"vLLM {dtype}: lutstore / in-memory tok/s, steady, {u} streams", ratio, 0.9))
        serve = results.get("serve-fp32")
        if lut and serve:
            for u in users:
                for what, key in (("tok/s", "tok_s"), ("TTFT p50", "ttft_p50_ms")):
                    value = serve["steady"][u][key] / max(lut["steady"][u][key], 1e-9)
                    figures.append({"name": f"inference.serve fp32 / vLLM+lutstore {dtype} {what}, steady, {u} streams",
                                    "value": value, "unit": "x"})
                    print(f"  figure: {figures[-1]['name']}: {value:.2f}x", flush=True)
    return targets, figures


def plot(results: dict, label: str, args: argparse.Namespace) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    users = [str(c) for c in args.concurrency]
    for n, (name, r) in enumerate(results.items()):
        color = f"C{n}"     # one color per setup: steady solid, cold dashed
        for phase, style in (("steady", "o-"), ("cold", "x--")):
            axes[0].plot(users, [r[phase][u]["tok_s"] for u in users], style, color=color, label=f"{name} {phase}")
            axes[1].plot(users, [r[phase][u]["ttft_p50_ms"] for u in users], style, color=color)
            axes[2].plot(users, [r[phase][u]["itl_p99_ms"] for u in users], style, color=color)
    for ax, what in zip(axes, ("aggregate tok/s", "TTFT p50 (ms)", "inter-token latency p99 (ms)")):
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(what)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"MoLE 160M-16E shape (vocab {args.vocab}): vLLM + lutstore / in-memory, inference.serve - {label}",
                 fontsize=9)
    fig.tight_layout()
    out = common.plot_path(args.name)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def markdown(doc: dict) -> str:
    """Two markdown tables from a result document: tok/s (steady, cold in brackets) with the ratios
    the targets and figures name, then TTFT and inter-token latency in steady state."""
    results = doc["results"]
    names = list(results)
    users = list(next(iter(results.values()))["steady"])
    head = ["streams"] + [f"{n} tok/s" for n in names]
    ratios = []
    for dtype in ("fp32", "bf16"):
        if f"vllm-lutstore-{dtype}" in results and f"vllm-memory-{dtype}" in results:
            ratios.append((f"lutstore / in-memory {dtype}", f"vllm-lutstore-{dtype}", f"vllm-memory-{dtype}"))
    for dtype in ("fp32", "bf16"):
        if "serve-fp32" in results and f"vllm-lutstore-{dtype}" in results:
            ratios.append((f"serve / vLLM+lutstore {dtype}", "serve-fp32", f"vllm-lutstore-{dtype}"))
    head += [r[0] for r in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for u in users:
        row = [u] + [f"{results[n]['steady'][u]['tok_s']:.1f} ({results[n]['cold'][u]['tok_s']:.1f})" for n in names]
        row += [f"{results[a]['steady'][u]['tok_s'] / max(results[b]['steady'][u]['tok_s'], 1e-9):.2f}x"
                for _, a, b in ratios]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| streams | " + " | ".join(f"{n} TTFT p50 / ITL p50 / ITL p99 (ms)" for n in names) + " |",
              "|" + "---|" * (len(names) + 1)]
    for u in users:
        cells = [f"{results[n]['steady'][u]['ttft_p50_ms']:.0f} / {results[n]['steady'][u]['itl_p50_ms']:.0f} / "
                 f"{results[n]['steady'][u]['itl_p99_ms']:.0f}" for n in names]
        lines.append(f"| {u} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- the CLI ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = common.parser("bench_vllm", __doc__)
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary = table rows (default 4096: 1.2 GB fp16)")
    p.add_argument("--dtypes", default="fp32,bf16", help="vLLM profiles, comma separated: fp32, bf16 (default both)")
    p.add_argument("--concurrency", default="1,8,32", help="concurrent streams per load (default 1,8,32)")
    p.add_argument("--requests-per-stream", default="4,2,2",
                   help="requests each stream sends, per concurrency (default 4,2,2)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--max-tokens", type=int, default=64, help="completion tokens (default 64)")
    p.add_argument("--fill-streams", type=int, default=8, help="streams of the untimed fill (default 8)")
    p.add_argument("--fill-requests", type=int, default=32, help="requests of the untimed fill (default 32)")
    p.add_argument("--context", type=int, default=256, help="max model length of every server (default 256)")
    p.add_argument("--cache-mb", type=float, default=1536,
                   help="row cache of the lutstore clients, MiB (default 1536: every row of the 4096-row table)")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (default 1)")
    p.add_argument("--only", default="", help="run only these setups, comma separated (e.g. vllm-lutstore-fp32,serve-fp32)")
    p.add_argument("--toy", action="store_true", help="a 2-layer toy shape instead of 160M-16E (for the tests' smoke run)")
    p.add_argument("--name", default="vllm", help="result file name (default vllm: results/vllm.json and .png)")
    p.add_argument("--work-dir", type=Path, default=Path(__file__).resolve().parent / "work")
    p.add_argument("--markdown", type=Path, metavar="RESULT_JSON",
                   help="run nothing: print the tables of a result file (as the README shows them)")
    p.add_argument("--quick", action="store_true",
                   help="fp32 only, vocabulary 1024, 32+32 tokens, one request per stream (two at 1 stream); "
                        "results under benchmarks/results/quick/")
    return p


QUICK = dict(vocab=1024, dtypes="fp32", requests_per_stream="2,1,1", prompt_len=32, max_tokens=32, fill_requests=16)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.markdown:
        try:
            print(markdown(json.loads(args.markdown.read_text())), end="")
        except (OSError, ValueError, KeyError) as e:
            print(f"bench_vllm: error: {args.markdown} is not a bench_vllm result file ({type(e).__name__}: {e})",
                  file=sys.stderr)
            return 2
        return 0
    if args.quick:      # smaller defaults; flags given explicitly still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
        if common.RESULTS_DIR.name != "quick":      # run_all --quick has already pointed it there
            common.RESULTS_DIR = common.RESULTS_DIR / "quick"
    try:
        args.dtypes = [d for d in args.dtypes.split(",") if d]
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
        args.requests_per_stream = [int(c) for c in args.requests_per_stream.split(",")]
    except ValueError:
        print("bench_vllm: error: --concurrency and --requests-per-stream are comma-separated numbers", file=sys.stderr)
        return 2
    args.only = [o for o in args.only.split(",") if o]
    bad = [d for d in args.dtypes if d not in PROFILES]
    if bad or not args.dtypes:
        print(f"bench_vllm: error: --dtypes takes {', '.join(PROFILES)}, not {','.join(bad) or 'nothing'}",
              file=sys.stderr)
        return 2
    if len(args.requests_per_stream) != len(args.concurrency) or min(args.concurrency + args.requests_per_stream) < 1:
        print("bench_vllm: error: --requests-per-stream needs one number >= 1 per --concurrency value", file=sys.stderr)
        return 2
    if args.prompt_len + args.max_tokens > args.context:
        print(f"bench_vllm: error: --prompt-len + --max-tokens exceeds --context {args.context}", file=sys.stderr)
        return 2
    known = [s.name for s in setups(argparse.Namespace(dtypes=args.dtypes, only=[]))]
    if [o for o in args.only if o not in known] or (args.only and not setups(args)):
        print(f"bench_vllm: error: --only takes setups of {', '.join(known)}", file=sys.stderr)
        return 2
    label = common.start("vLLM benchmark")
    if vllm_python() is None:
        why = f"no vLLM environment: run `make install-vllm` (or set ${PYTHON_ENV})"
        print(f"bench_vllm: skipped: {why}", flush=True)
        common.finish(args.name, {"skipped": why, "config": common.config_of(args)})
        return 0
    shape = TOY if args.toy else ModelShape(vocab_size=args.vocab)
    if args.toy:
        args.vocab = shape.vocab_size
    args.work_dir.mkdir(parents=True, exist_ok=True)
    progress = sys.stderr.isatty()
    try:
        ckpt, db = build_model(args.work_dir, shape, progress)
    except UserError as e:
        print(f"bench_vllm: error: {e}", file=sys.stderr)
        return 2
    loads = make_loads(shape.vocab_size, args)
    results: dict = {}
    failed: dict[str, str] = {}         # setup -> the end of its server's output
    load_start = list(os.getloadavg())
    with common.ServerProcess(db) as daemon:
        for dtype in args.dtypes:
            group = [s for s in setups(args) if s.dtype == dtype]
            if group:
                print(f"== {dtype}: {', '.join(s.name for s in group)}", flush=True)
                run_profile(group, ckpt, daemon.address, loads, args, args.work_dir, results, failed)
    targets, figures = targets_and_figures(results, args)
    shape_doc = {"vocab": shape.vocab_size, "layers": shape.num_layers, "experts": shape.num_experts,
                 "hidden": shape.hidden_size, "intermediate": shape.intermediate_size, "heads": shape.num_heads,
                 "table_encoding": "fp16", "checkpoint": "rep form, fp16, random"}
    common.finish(args.name, {"config": common.config_of(args), "shape": shape_doc, "vllm": vllm_version(),
                              "load_average": {"start": load_start, "end": list(os.getloadavg())},
                              "results": results, "failed": failed, "targets": targets, "figures": figures},
                  [plot(results, label, args)] if results else [])
    if results:
        print(markdown({"results": results}), end="", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
