"""lm-evaluation-harness on two tiny local tasks, offline: run its CLI against a model, and
work out from an in-process model what it must report.

    from lm_eval_tasks import TASK_DIR, TASKS, tiny_checkpoint, run_lm_eval, expected

The tasks (tests/lm_eval_task/, tag `mole_tiny`) are written in the style of the zero-shot
benchmarks MoLE models are scored on: `mole_tiny_choice` is multiple choice (acc, acc_norm,
as ARC / PIQA / SIQA), `mole_tiny_lambada` scores a last word (perplexity, and acc: is it the
greedy continuation, as LAMBADA). Their words all exist in the WordLevel vocabulary of
tests/ckpt_factory.py; three lambada documents end on the word that `tiny_checkpoint`'s model
predicts greedily, so acc is not zero by construction.

`run_lm_eval` runs `python -m lm_eval run` with the hub switched off (HF_HUB_OFFLINE,
HF_DATASETS_OFFLINE, a private HF_HOME) and returns its results and per-document samples;
`expected` computes the same numbers from a scoring function (ids -> per-token log-probs and
whether each token is the top-1), tokenizing as lm-eval does.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ckpt_factory import make_checkpoint

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_task"
TAG = "mole_tiny"
TASKS = ("mole_tiny_choice", "mole_tiny_lambada")
# the checkpoint whose greedy predictions three lambada documents end on
CHECKPOINT = dict(form="train", vocab=128, layers=2, experts=4, hidden=32, intermediate=64, heads=4, seed=7)

Score = Callable[[list[int]], tuple[np.ndarray, np.ndarray]]   # ids -> (log p(ids[i+1] | ids[:i+1]), is it the argmax)


def tiny_checkpoint(dest: Path, **overrides) -> Path:
    """The train-form checkpoint the tasks were written for (overrides: e.g. form="rep")."""
    return make_checkpoint(dest, **{**CHECKPOINT, **overrides})


def docs(task: str) -> list[dict]:
    file = {"mole_tiny_choice": "choice.jsonl", "mole_tiny_lambada": "lambada.jsonl"}[task]
    return [json.loads(line) for line in (TASK_DIR / file).read_text().splitlines() if line.strip()]


def pairs(task: str) -> list[list[tuple[str, str]]]:
    """Each document's (context, continuation) strings, one per choice (as the YAMLs build them)."""
    if task == "mole_tiny_choice":
        return [[(d["question"], " " + c) for c in d["choices"]] for d in docs(task)]
    return [[(" ".join(d["text"].split(" ")[:-1]), " " + d["text"].split(" ")[-1])] for d in docs(task)]


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, whole ids) as lm-eval makes them: the whole string encoded once, the
    continuation being what follows the context's tokens."""
    whole = encode(context + continuation)
    return encode(context), whole


def expected(encode: Callable[[str], list[int]], score: Score) -> dict[str, dict]:
    """Per task: "lls" [doc][choice] = (summed log-likelihood, greedy) and "metrics" (lm-eval's names)."""
    out: dict[str, dict] = {}
    for task in TASKS:
        lls = []
        for doc_pairs in pairs(task):
            row = []
            for context, continuation in doc_pairs:
                ctx, whole = encode_pair(encode, context, continuation)
                lp, greedy = score(whole)
                row.append((float(np.sum(lp[len(ctx) - 1:], dtype=np.float64)), bool(np.all(greedy[len(ctx) - 1:]))))
            lls.append(row)
        out[task] = {"lls": lls, "metrics": _metrics(task, lls)}
    return out


def _metrics(task: str, lls: list[list[tuple[float, bool]]]) -> dict[str, float]:
    if task == "mole_tiny_choice":
        acc, norm = [], []
        for d, row in zip(docs(task), lls):
            ll = np.array([x for x, _ in row])
            lengths = np.array([float(len(c)) for c in d["choices"]])
            acc.append(float(np.argmax(ll) == d["label"]))
            norm.append(float(np.argmax(ll / lengths) == d["label"]))
        return {"acc,none": float(np.mean(acc)), "acc_norm,none": float(np.mean(norm))}
    ll = [row[0][0] for row in lls]
    return {"perplexity,none": math.exp(-float(np.mean(ll))), "acc,none": float(np.mean([row[0][1] for row in lls]))}


@dataclass
class LmEvalRun:
    results: dict[str, dict]             # task -> {"acc,none": ..., ...}
    samples: dict[str, list[dict]]       # task -> one sample per document, by doc_id
    output: str                          # the CLI's stdout + stderr

    def lls(self, task: str) -> list[list[tuple[float, bool]]]:
        """[doc][choice] = (log-likelihood, greedy), as lm-eval received them."""
        # filtered_resps holds one [ll, greedy] pair per choice (one for a loglikelihood task), as strings
        return [[(float(ll), str(greedy) == "True") for ll, greedy in s["filtered_resps"]] for s in self.samples[task]]


def offline_env(home: Path) -> dict[str, str]:
    """This process's environment with the Hugging Face hub switched off and a private HF_HOME."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(home), "TOKENIZERS_PARALLELISM": "false"}


def run_lm_eval(model: str, model_args: dict[str, object], out_dir: Path, batch_size: int = 8,
                tasks: str = TAG, timeout: float = 900.0) -> LmEvalRun:
    """`python -m lm_eval run --model MODEL --model_args k=v,... --tasks mole_tiny` on the local tasks."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", model,
           "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
           "--tasks", tasks, "--include_path", str(TASK_DIR), "--batch_size", str(batch_size),
           "--output_path", str(out_dir), "--log_samples"]
    proc = subprocess.run(cmd, env=offline_env(out_dir / "hf-home"), capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"lm_eval exited {proc.returncode}:\n{output[-6000:]}")
    results_files = sorted(out_dir.rglob("results_*.json"))
    assert results_files, f"lm_eval wrote no results under {out_dir}:\n{output[-3000:]}"
    results = json.loads(results_files[-1].read_text())["results"]
    samples = {}
    for task in TASKS:
        files = sorted(out_dir.rglob(f"samples_{task}_*.jsonl"))
        if files:
            rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
            samples[task] = sorted(rows, key=lambda s: s["doc_id"])
    return LmEvalRun(results, samples, output)
