"""Shared pieces of the benchmarks: the machine's name, timing stats, result files, plots."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

from lutstore import alloc
from lutstore.errors import UserError
from testing.daemon import Daemon

# $LUTSTORE_BENCH_RESULTS sends result files and plots elsewhere (the tests' smoke runs: never into the repo)
RESULTS_DIR = Path(os.environ.get("LUTSTORE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> dict[str, Any]:
    """What ran the benchmark: every result file and plot names it."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "host_kind": os.environ.get("LUTSTORE_BENCH_MACHINE", "dev machine (no accelerator)"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def machine_label(info: dict[str, Any] | None = None) -> str:
    info = info or machine()
    gpu = f", {info['gpu']}" if info.get("gpu") else ""
    return f"{info['cores']}-core {info['cpu']}, {info['ram_gib']} GiB RAM{gpu}"


def percentiles(samples_s: list[float]) -> dict[str, float]:
    """p50/p99/mean in milliseconds."""
    xs = sorted(samples_s)
    if not xs:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan")}
    p99 = xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]
    return {"p50_ms": 1e3 * statistics.median(xs), "p99_ms": 1e3 * p99, "mean_ms": 1e3 * statistics.fmean(xs)}


def disk_free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def write_results(name: str, results: dict[str, Any]) -> Path:
    """Write benchmarks/results/NAME.json with the machine and a timestamp."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{name}.json"
    doc = {"benchmark": name, "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), **results}
    out.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    return out


def target(name: str, value: float, goal: float, higher_is_better: bool = True, unit: str = "x") -> dict[str, Any]:
    met = value >= goal if higher_is_better else value <= goal
    sign = ">=" if higher_is_better else "<="
    print(f"  target {name}: {value:.3g}{unit} (goal {sign} {goal:g}{unit}) -> {'MET' if met else 'NOT MET'}", flush=True)
    return {"name": name, "value": value, "goal": goal, "higher_is_better": higher_is_better, "unit": unit, "met": met}


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class ServerProcess(Daemon):
    """A running `lutstore serve` subprocess on a free loopback port (testing.daemon.Daemon)."""


def peak_rss_bytes(pid: int) -> int | None:
    """Peak resident set (VmHWM) of a live process, from /proc; None when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_status(pid: int) -> dict[str, int] | None:
    """VmHWM (peak RSS), VmRSS, RssAnon and RssFile of a live process in bytes, from /proc; None when gone.
    RssFile counts mmap'd file pages (e.g. a safetensors checkpoint being read): page cache, reclaimable."""
    keys = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        key = line.split(":", 1)[0]
        if key in keys:
            out[key] = int(line.split()[1]) * 1024
    return out


def plot_path(name: str) -> Path:
    """benchmarks/results/NAME.png (the folder created)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return RESULTS_DIR / f"{name}.png"


# ---- the head and tail every benchmark shares ------------------------------------------------

def parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The argparse parser of benchmarks/MODULE.py: its docstring is the --help text."""
    return argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def start(title: str) -> str:
    """A benchmark's entry point begins here: warnings-only logging, the process-wide malloc setting
    that the lutstore CLI and inference entry points make too (lutstore/alloc.py: received rows reuse
    freed memory), and "TITLE on MACHINE" printed; returns the machine label."""
    logging.basicConfig(level=logging.WARNING)
    alloc.keep_freed_memory()
    label = machine_label()
    print(f"{title} on {label}", flush=True)
    return label


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags as JSON-friendly values (paths, torch devices and the like as strings)."""
    plain = (int, float, str, bool, list, tuple, dict, type(None))
    return {k: (v if isinstance(v, plain) else str(v)) for k, v in vars(args).items()}


def finish(name: str, results: dict[str, Any], plots: list[Path] | tuple[Path, ...] = ()) -> Path:
    """A benchmark's tail: results/NAME.json (with the git revision) written, its path and plots printed."""
    results.setdefault("git", git_revision())
    path = write_results(name, results)
    print(f"results: {path}" + (f"; plots: {', '.join(str(p) for p in plots)}" if plots else ""), flush=True)
    return path


def run(name: str, main: Callable[[], Any]) -> NoReturn:
    """A benchmark's `__main__`: exit with main()'s status (0 unless it returns a non-zero int; some
    return their results); a UserError (a store, a daemon, a flag) or a Ctrl-C is one line on stderr
    and exit 1, not a traceback."""
    try:
        code = main()
    except UserError as e:
        print(f"{name}: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
