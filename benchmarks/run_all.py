"""`make bench`: run every benchmark and summarise their targets.

Runs `main([...])` of every `benchmarks/bench_*.py` module in turn (with
--quick unless --full), then collects the result files they wrote in this
run (benchmarks/results/*.json) into
  benchmarks/results/summary.json   every target and figure, with its machine
  benchmarks/results/summary.md     the same as a markdown table, plus the plots
A benchmark that fails is reported in the summary and the others still run.

    python -m benchmarks.run_all                    # quick variants (minutes), into benchmarks/results/quick/
    python -m benchmarks.run_all --full             # full sizes (the 15 GB ingest included)
    python -m benchmarks.run_all --only store concurrency
    python -m benchmarks.run_all --summary-only     # re-summarise the result files already there
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from benchmarks import common

HERE = Path(__file__).resolve().parent


def discover() -> list[str]:
    """Short names of the benchmark modules: bench_store.py -> "store"."""
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def run_one(name: str, full: bool, extra: list[str]) -> dict:
    module = importlib.import_module(f"benchmarks.bench_{name}")
    argv = ([] if full else ["--quick"]) + extra
    print(f"\n===== bench_{name} {' '.join(argv)} =====", flush=True)
    t0 = time.perf_counter()
    try:
        rc = module.main(argv)
        # main returns 0/None (or its results) when it ran; a non-zero int is its exit status (e.g. 2: bad setup)
        ok = not isinstance(rc, int) or isinstance(rc, bool) or rc == 0
        return {"benchmark": name, "ok": ok, "seconds": time.perf_counter() - t0,
                **({} if ok else {"error": f"main returned {rc}"})}
    except SystemExit as e:  # a benchmark that skips itself (e.g. short of disk) exits with a message
        ok = e.code in (None, 0)
        return {"benchmark": name, "ok": ok, "seconds": time.perf_counter() - t0,
                **({} if ok else {"error": str(e.code)})}
    except Exception as e:
        traceback.print_exc()
        return {"benchmark": name, "ok": False, "seconds": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"}


# Written by diagnostic tools (profile_rows: one figure at a time, often on a loaded machine), not by
# `make bench`: documented in PERFORMANCE.md, left out of the summary of targets.
DIAGNOSTIC_PREFIXES = ("summary", "profile_rows")


def collect(since: float) -> list[dict]:
    """Result documents written at or after `since` (this run's), summary and diagnostic files excluded."""
    docs = []
    for path in sorted(common.RESULTS_DIR.glob("*.json")):
        if path.stem.startswith(DIAGNOSTIC_PREFIXES) or path.stat().st_mtime < since:
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        doc["_file"] = path.name
        docs.append(doc)
    return docs


def _records(items: object, keys: tuple[str, ...]) -> list[dict]:
    """The well-formed entries of a result file's "targets"/"figures" list (others' files may differ)."""
    if not isinstance(items, list):
        return []
    return [x for x in items if isinstance(x, dict) and all(k in x for k in keys)]


def _fmt(value: float, unit: str) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    if value != value:
        return "n/a"
    return f"{value:.3g}{unit}" if abs(value) < 1000 else f"{value:,.0f}{unit}"


def summarise(runs: list[dict], docs: list[dict], since: float) -> tuple[dict, str]:
    rows, figures = [], []
    for doc in docs:
        label = common.machine_label(doc["machine"]) if "machine" in doc else "unknown"
        host = doc.get("machine", {}).get("host_kind", "")
        where = f"{label} ({host})" if host else label
        bench = doc.get("benchmark", doc["_file"])
        for t in _records(doc.get("targets"), ("name", "value", "goal", "met")):
            rows.append({"unit": "", "higher_is_better": True, **t, "benchmark": bench, "machine": where,
                         "file": doc["_file"]})
        for f in _records(doc.get("figures"), ("name", "value")):
            figures.append({"unit": "", **f, "benchmark": bench, "machine": where})
        if doc.get("skipped"):
            rows.append({"name": f"{doc.get('benchmark')}: skipped", "value": float("nan"), "goal": float("nan"),
                         "unit": "", "met": None, "higher_is_better": True, "benchmark": doc.get("benchmark"),
                         "machine": where, "file": doc["_file"], "note": doc["skipped"]})
    plots = sorted(p.name for p in common.RESULTS_DIR.glob("*.png") if p.stat().st_mtime >= since)
    summary = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "revision": common.git_revision(), "runs": runs,
               "targets": rows, "figures": figures, "plots": plots}

    lines = [f"# lutstore benchmarks ({summary['when']}, revision {summary['revision']})", "",
             "Every ratio compares numbers measured side by side in the same run on the machine named.", "",
             "| benchmark | target | figure | goal | met | machine |", "|---|---|---|---|---|---|"]
    for r in rows:
        goal = "" if r["goal"] != r["goal"] else f"{'>=' if r['higher_is_better'] else '<='} {_fmt(r['goal'], r['unit'])}"
        met = {True: "met", False: "**not met**", None: r.get("note", "")}[r["met"]]
        lines.append(f"| {r['benchmark']} | {r['name']} | {_fmt(r['value'], r['unit'])} | {goal} | {met} | {r['machine']} |")
    if figures:
        lines += ["", "| benchmark | figure | value | machine |", "|---|---|---|---|"]
        lines += [f"| {f['benchmark']} | {f['name']} | {_fmt(f['value'], f.get('unit', ''))} | {f['machine']} |" for f in figures]
    failed = [r for r in runs if not r["ok"]]
    if failed:
        lines += ["", "Failed benchmarks:", ""] + [f"- bench_{r['benchmark']}: {r.get('error', '')}" for r in failed]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return summary, "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="full sizes instead of --quick (long; the ingest needs ~35 GB)")
    p.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these (of: {', '.join(discover())})")
    p.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="run all but these")
    p.add_argument("--summary-only", action="store_true",
                   help="run nothing: rebuild summary.json/.md from the result files already in benchmarks/results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = discover()
    unknown = [n for n in (args.only or []) + args.skip if n not in names]
    if unknown:
        print(f"run_all: no benchmark named {', '.join(unknown)} (have: {', '.join(names)})", file=sys.stderr)
        return 2
    chosen = [n for n in (args.only or names) if n not in args.skip]
    if not args.full and not args.summary_only:
        # Quick runs must not overwrite the full results the README shows.
        common.RESULTS_DIR = common.RESULTS_DIR / "quick"
    if args.summary_only:
        since, runs = 0.0, []
    else:
        since = time.time() - 1
        print(f"benchmarks on {common.machine_label()}: {', '.join(chosen)}", flush=True)
        runs = [run_one(n, args.full, []) for n in chosen]
    summary, md = summarise(runs, collect(since), since)
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (common.RESULTS_DIR / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    (common.RESULTS_DIR / "summary.md").write_text(md)
    print("\n" + md, flush=True)
    print(f"summary: {common.RESULTS_DIR / 'summary.md'}", flush=True)
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    common.run("run_all", main)
