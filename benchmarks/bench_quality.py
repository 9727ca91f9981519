"""Quality benchmark: held-out perplexity of the demo model with fp32, fp16 and int8 tables.

The demo checkpoint (./demo-data/model, trained by `make demo`) is ingested three
times into a fresh database, once per encoding, served by a real `lutstore serve`
on loopback, and scored with inference.evaluate on the held-out plays
(demo-data/model/heldout.txt, works never seen in training) in context-length
windows. The train form computing its experts in-process is the reference.
Bytes per token = one stored row (payload + 4-byte checksum): what a decoded
token costs on the wire and in a cache.

    python -m benchmarks.bench_quality            # every held-out token
    python -m benchmarks.bench_quality --quick    # the first 8192
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from benchmarks import common
from inference import evaluate
from lutstore import cli
from lutstore.client import LutClient

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
ENCODINGS = ("fp32", "fp16", "int8")


def score(argv: list[str]) -> dict:
    """inference.evaluate's result for these arguments (its JSON line, as a dict)."""
    return evaluate.run(evaluate.build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    p = common.parser("bench_quality", __doc__)
    p.add_argument("--model", type=Path, default=REPO / "demo-data" / "model",
                   help="train- or rep-form checkpoint folder with heldout.txt (default: the demo model)")
    p.add_argument("--text", type=Path, default=None, help="held-out text (default: MODEL/heldout.txt)")
    p.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (0: all)")
    p.add_argument("--quick", action="store_true", help="score the first 8192 tokens")
    args = p.parse_args(argv)
    text = args.text or args.model / "heldout.txt"
    if not (args.model / "config.json").is_file() or not text.is_file():
        print(f"bench_quality: error: no model with held-out text at {args.model}; run `make demo` first",
              file=sys.stderr)
        return 2
    max_tokens = 8192 if args.quick and not args.max_tokens else args.max_tokens
    common.start("quality benchmark")
    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    try:
        db = work / "db"
        for enc in tqdm(ENCODINGS, desc="ingest", dynamic_ncols=True):
            if cli.main(["ingest", str(args.model), "--db", str(db), "--name", f"demo-{enc}", "--encoding", enc,
                         "--no-progress"]) != 0:
                raise RuntimeError(f"lutstore ingest --encoding {enc} failed")
        common_args = ["--text-file", str(text), "--windows"] + (["--max-tokens", str(max_tokens)] if max_tokens else [])
        results: dict = {"reference_train_form": score(["--checkpoint", str(args.model), *common_args])}
        with common.ServerProcess(db) as server, LutClient(server.address) as client:
            for enc in tqdm(ENCODINGS, desc="evaluate", dynamic_ncols=True):
                name = f"demo-{enc}"
                info = client.info(name)
                r = score(["--lut-addr", server.address, "--table", name, *common_args])
                r["bytes_per_token"] = int(info.row_bytes) + 4
                hidden = int(info.hidden_size)
                results[enc] = r
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref = results["reference_train_form"]["ppl"]
    print(f"{'table':<22}{'tokens':>8}{'ppl':>10}{'vs fp16':>10}{'bytes/token':>13}{'vs fp16':>9}")
    for name, r in results.items():
        bpt = r.get("bytes_per_token")
        print(f"{name:<22}{r['tokens']:>8}{r['ppl']:>10.3f}{r['ppl'] / results['fp16']['ppl']:>10.4f}"
              + (f"{bpt:>13,}{bpt / results['fp16']['bytes_per_token']:>9.3f}" if bpt else ""))
    ppl_delta = results["int8"]["ppl"] / results["fp16"]["ppl"] - 1
    byte_ratio = results["int8"]["bytes_per_token"] / results["fp16"]["bytes_per_token"]
    targets = [
        common.target("int8 perplexity vs fp16 (relative change)", 100 * abs(ppl_delta), 0.5, higher_is_better=False, unit="%"),
        # "half the bytes": int8 values are half of fp16's; the per-vector fp32 scales add 2/D on top
        common.target("int8 bytes per token vs fp16 (half, plus one fp32 scale per D values and the CRCs)", byte_ratio,
                      0.5 + 2.0 / hidden + 0.005, higher_is_better=False),
        common.target("fp32 table perplexity vs train form (relative change)", 100 * abs(results["fp32"]["ppl"] / ref - 1),
                      0.01, higher_is_better=False, unit="%"),
    ]
    common.finish("quality", {"model": str(args.model), "text": str(text), "max_tokens": max_tokens,
                              "results": results, "targets": targets})
    return 0


if __name__ == "__main__":
    common.run("bench_quality", main)
