"""Runs MoLE models through vLLM's offline engine (vllm.LLM), one case after another in one process.

Run with .venv-vllm's python by tests/test_vllm.py (not collected by pytest):

    python tests/vllm_offline.py CASES.json

CASES.json: [{"name", "model", "lutstore": {...} | null, "prompts": [[ids]], "max_tokens"}]. One line per case on
stdout, "vllm_offline: " + JSON: {"name", "start_s", "prompt_logprobs": [[...]], "tokens": [[...]]} or
{"name", "error": "<the exception's message>"}. vLLM runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so after the first case a start takes seconds, not a minute.
"""

from __future__ import annotations

import gc
import json
import sys
import time

MARK = "vllm_offline: "   # vLLM logs to stdout too: result lines carry this prefix

def run_case(case: dict) -> dict:
    from vllm import LLM, SamplingParams

    overrides = {"lutstore": case["lutstore"]} if case.get("lutstore") else None
    started = time.monotonic()
    try:
        llm = LLM(model=case["model"], enforce_eager=True, dtype="float32", max_model_len=256, seed=0,
                  hf_overrides=overrides)
    except Exception as e:   # a start refused: the test checks the reason
        return {"name": case["name"], "error": str(e)}
    start_s = time.monotonic() - started
    try:
        params = SamplingParams(max_tokens=case["max_tokens"], temperature=0, prompt_logprobs=0, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in case["prompts"]], params, use_tqdm=False)
        logprobs = [[None] + [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:])]
                    for o, p in zip(outputs, case["prompts"])]
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        return {"name": case["name"], "start_s": round(start_s, 1), "prompt_logprobs": logprobs, "tokens": tokens}
    finally:
        del llm
        gc.collect()


def main() -> None:
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    for case in cases:
        print(MARK + json.dumps(run_case(case)), flush=True)


if __name__ == "__main__":
    main()
