"""`make gpu-check`: every CUDA path, checked and timed on a lent GPU, in one run (< 8 minutes).

A GPU is lent to some tasks only, for minutes, so this is prepared ahead and run as one script:

  1. the card (nvidia-smi) and torch's view of it;
  2. the `cuda` tests (tests/test_cuda.py: rows, log-probs, greedy tokens and ingest bytes on cuda vs
     cpu; non_blocking vs blocking copies through many evictions) and the cuda variants of the
     staged-row and nf4 tests;
  3. the GPU's real step times on the 160M-16E shape (decode at batch 1 and 32, a 2048-token
     prefill; bf16, rows from an in-GPU table), written to benchmarks/results/gpu_step_times.json,
     where bench_decode's fixed-step mode takes its defaults from;
  4. MoLE in vLLM (tests/test_vllm.py) when a python on this host has vLLM: $LUTSTORE_VLLM_PYTHON,
     else .venv-vllm (`make install-vllm` is the CPU build: on a GPU host install vLLM's CUDA build
     and lutstore --no-deps into a venv and name its python); skipped with a line otherwise;
  5. bench_decode on the GPU, real mode, batch 1/8/32 (in-process vs lutstore cold / warm / steady
     state, and the offload baseline), then fixed-step mode with the measured step times;
     results (JSON + PNG, naming the card) under benchmarks/results/.

    python -m benchmarks.gpu_check                # everything
    python -m benchmarks.gpu_check --skip-bench   # card + tests + step times only
    python -m benchmarks.gpu_check --dry-run-on-cpu --vocab 512   # the script itself, checked on a CPU

On a GPU host whose python3 already holds a CUDA torch but cannot reach PyPI, bring the other
dependencies as wheels for its Python (pip download --only-binary=:all: --python-version 3.12 ... of
grpcio, grpcio-health-checking, grpcio-reflection, protobuf, rocksdict, zstandard, isal, redis,
hiredis at the versions pyproject.toml pins), `pip install --no-deps --target DIR` them, and run
`PYTHONPATH=DIR:. python3 -m benchmarks.gpu_check` without the venv.

Each stage has its own time limit, so one that hangs cannot take the whole lease; the exit code is
non-zero if any stage failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common

REPO = Path(__file__).resolve().parent.parent
STEP_TIMES = common.RESULTS_DIR / "gpu_step_times.json"


def stage(title: str, cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> bool:
    """Run one stage in its own process group; past its limit the whole group is interrupted (so a
    benchmark's `lutstore serve` child and temp folders go too), then killed if it lingers."""
    print(f"\n===== {title}: {' '.join(cmd)} (limit {timeout:.0f} s)", flush=True)
    started = time.monotonic()
    child = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    try:
        rc = child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"===== {title}: TIMED OUT after {timeout:.0f} s", flush=True)
        try:
            os.killpg(child.pid, signal.SIGINT)   # Python children clean up (servers, temp folders)
            child.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(child.pid, signal.SIGKILL)  # whatever still lingers in the group
        except ProcessLookupError:
            pass
        child.wait()
        return False
    print(f"===== {title}: exit {rc} in {time.monotonic() - started:.0f} s", flush=True)
    return rc == 0


def card_name(dry_run: bool = False) -> str:
    import torch

    if dry_run:
        return "CPU dry run (no GPU)"
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU host")
    return torch.cuda.get_device_name(0)


def measure_step_times(vocab: int = 8192, repeats: int = 20, device_name: str = "cuda") -> dict:
    """Real GPU step times of the 160M-16E backbone (bf16), its rows gathered from an in-GPU table."""
    import torch

    from benchmarks.bench_decode import paper_args
    from inference.lut import InProcessTable
    from inference.model import Transformer

    device = torch.device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    args = paper_args(vocab)
    model = Transformer(args, form="lut").to(device=device, dtype=torch.bfloat16).eval()
    table = InProcessTable(torch.randn(vocab, args.num_hidden_layers, args.num_experts, args.hidden_size,
                                       dtype=torch.bfloat16, device=device), device)

    def timed(batch: int, tokens: int, start: int) -> float:
        idx = torch.randint(0, vocab, (batch, tokens), device=device)
        pos = torch.arange(start, start + tokens, device=device)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(idx, pos, lut_rows=table.rows(idx))[:, -1].argmax(-1).tolist()
        sync()
        return (time.perf_counter() - t0) * 1000

    out = {}
    for batch in (1, 32):
        model.setup_caches(batch, args.max_position_embeddings)
        timed(batch, 16, 0)   # warm-up: kernels, allocator
        out[f"step_ms_b{batch}"] = sorted(timed(batch, 1, 16 + i) for i in range(repeats))[repeats // 2]
    model.setup_caches(1, args.max_position_embeddings)
    timed(1, 2048, 0)
    out["prefill_ms_2048"] = sorted(timed(1, 2048, 0) for _ in range(5))[2]
    return out


def vllm_python() -> str | None:
    """A python on this host that imports vllm (LUTSTORE_VLLM_PYTHON, else .venv-vllm), or None."""
    for candidate in (os.environ.get("LUTSTORE_VLLM_PYTHON"), str(REPO / ".venv-vllm" / "bin" / "python")):
        if candidate and Path(candidate).exists():
            probe = subprocess.run([candidate, "-c", "import vllm"], capture_output=True, timeout=120)
            if probe.returncode == 0:
                return candidate
    return None


def main(argv: list[str] | None = None) -> int:
    p = common.parser("gpu_check", __doc__)
    p.add_argument("--skip-bench", action="store_true", help="stop after the tests and the step times")
    p.add_argument("--vocab", type=int, default=8192, help="160m table rows for the benchmark (default 8192)")
    p.add_argument("--dry-run-on-cpu", action="store_true",
                   help="run every stage on the CPU (cuda tests skip, nothing is written where fixed-step mode "
                        "reads its defaults): checks the script itself before a GPU lease is spent on it")
    args = p.parse_args(argv)
    dry = args.dry_run_on_cpu
    device = "cpu" if dry else "cuda"
    ok = True if dry else stage("the card", ["nvidia-smi"], 30)
    card = card_name(dry)
    print(f"torch sees: {card}", flush=True)
    env = dict(os.environ, LUTSTORE_BENCH_MACHINE=f"GPU host ({card})")
    py = sys.executable
    ok &= stage("cuda tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"], 240, env)
    ok &= stage("cuda variants of the staged-row and nf4 tests",
                [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_layers.py", "tests/test_nf4.py",
                 "-k", "cuda"], 120, env)

    vllm_py = None if dry else vllm_python()
    if dry:
        print("\n===== MoLE in vLLM: skipped in a dry run (make test runs tests/test_vllm.py on the CPU)", flush=True)
    elif vllm_py is None:
        print("\n===== MoLE in vLLM: skipped (no vLLM on this host: set LUTSTORE_VLLM_PYTHON to a python "
              "that imports vllm)", flush=True)
    else:   # the plugin with rows from a daemon and in memory, every encoding, on the card (--enforce-eager)
        ok &= stage("MoLE in vLLM", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_vllm.py"], 300,
                    dict(env, LUTSTORE_VLLM_PYTHON=vllm_py, LUTSTORE_REQUIRE_VLLM="1"))

    print("\n===== step times of the 160M-16E backbone on this GPU", flush=True)
    times = {"card": card, **measure_step_times(args.vocab, device_name=device),
             "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if dry:
        print(json.dumps(times), "(dry run: not written)", flush=True)
    else:
        STEP_TIMES.parent.mkdir(parents=True, exist_ok=True)
        STEP_TIMES.write_text(json.dumps(times, indent=2) + "\n")
        print(json.dumps(times), f"-> {STEP_TIMES}", flush=True)
    if args.skip_bench:
        return 0 if ok else 1

    bench = [py, "-m", "benchmarks.bench_decode", "--model", "160m", "--vocab", str(args.vocab), "--device", device,
             "--batches", "1,8,32", "--steps", "32", "--repeats", "2"]
    prefix = "dryrun-" if dry else ""
    ok &= stage("decode, real mode on the GPU", bench + ["--mode", "real", "--name", f"{prefix}decode-160m-gpu-real"],
                150, env)
    fixed = ["--fixed-step-ms", f"{times['step_ms_b1']},{times['step_ms_b32']}",
             "--fixed-prefill-ms", str(times["prefill_ms_2048"])] if dry else []
    ok &= stage("decode, fixed-step with the GPU's step times",
                bench + ["--mode", "fixed", "--skip-offload", *fixed, "--name", f"{prefix}decode-160m-gpu-fixed"],
                120, env)
    print(f"\ngpu_check: {'all stages passed' if ok else 'SOME STAGES FAILED'} on {card}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    common.run("gpu_check", main)
