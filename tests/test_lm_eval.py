"""lm-evaluation-harness scoring a MoLE model through `inference.serve`, as the README shows it:
`lm_eval run --model local-completions` (token-id prompts, echo + logprobs, 8 prompts per request,
a local tokenizer), offline, on the tiny local tasks of tests/lm_eval_task/. What it reports
(per-choice log-likelihoods, greedy flags, acc, acc_norm, perplexity) must be what the same
model gives in-process (inference.evaluate.token_logprobs) on the same daemon's table.
"""

from __future__ import annotations

import math
import urllib.request

import numpy as np
import pytest
import torch
from conftest import start_server
from lm_eval_tasks import TASKS, expected, pairs, run_lm_eval, tiny_checkpoint

from inference import evaluate
from inference.backbone import open_remote
from inference.endpoint_process import Endpoint
from lutstore import cli

pytest.importorskip("lm_eval")
pytest.importorskip("tenacity", reason="lm-eval's API models need tenacity (pinned in the [dev] extra)")

# Summed log-likelihood of one continuation (1-3 tokens): the endpoint prefills in chunks into its
# KV cache, evaluate runs one full causal pass; per token they agree to ~1e-6 in fp32.
LL_TOL = 1e-4
BATCH = 8          # prompts per request


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    ckpt = tiny_checkpoint(root / "ckpt")
    assert cli.main(["ingest", str(ckpt), "--db", str(root / "db"), "--name", "tiny", "--encoding", "fp32",
                     "--no-progress"]) == 0
    daemon = start_server(root / "db")
    env = {"LUTSTORE_CACHE": str(root / "cache")}
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("LUTSTORE_CACHE", env["LUTSTORE_CACHE"])
            endpoint = Endpoint(daemon.address, "--max-batch", "8", "--prefill-chunk", "8", env=env)
            remote = open_remote(daemon.address, "tiny")
            try:
                yield {"root": root, "ckpt": ckpt, "endpoint": endpoint, "remote": remote}
            finally:
                remote.close()
                assert endpoint.stop() == 0, "".join(endpoint.output)
    finally:
        daemon.stop()


def in_process_score(remote):
    """ids -> (evaluate.token_logprobs, is each next token the argmax), on the daemon's table."""
    model, source = remote.backbone.model, remote.source

    def score(ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        lp = evaluate.token_logprobs(model, source, ids)
        idx = torch.tensor([ids])
        source.request(ids)
        logits = model(idx, lut_rows=source.rows(idx))[0, :-1].float()
        return lp, (logits.argmax(-1) == idx[0, 1:]).numpy()

    return score


def _ok_requests(endpoint: Endpoint) -> float:
    with urllib.request.urlopen(endpoint.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("lutserve_requests_total{") and 'status="ok"' in line)


def assert_same_scores(got, want: dict[str, dict]) -> float:
    """lm-eval's per-choice log-likelihoods within LL_TOL of the in-process ones, the greedy flags
    and acc / acc_norm equal, the perplexity within what LL_TOL allows; returns the largest difference."""
    worst = 0.0
    for task in TASKS:
        got_lls, want_lls = got.lls(task), want[task]["lls"]
        assert len(got_lls) == len(want_lls), task
        for doc, (g_row, w_row) in enumerate(zip(got_lls, want_lls)):
            assert [g for _, g in g_row] == [g for _, g in w_row], f"{task} doc {doc}: greedy flags differ"
            delta = max(abs(g - w) for (g, _), (w, _) in zip(g_row, w_row))
            worst = max(worst, delta)
            assert delta < LL_TOL, f"{task} doc {doc}: log-likelihoods {g_row} vs in-process {w_row}"
        metrics = want[task]["metrics"]
        for name, value in metrics.items():
            if name.startswith("perplexity"):
                assert got.results[task][name] == pytest.approx(value, rel=2 * LL_TOL), (task, name)
            else:
                assert got.results[task][name] == value, (task, name, got.results[task], metrics)
    return worst


def test_decisions_are_clear_of_the_bound(served) -> None:
    """The task data make the comparison mean something on this checkpoint: every argmax the
    metrics take (best choice, best length-normalised choice, greedy token) wins by far more than
    LL_TOL, some last words are greedy, and acc and acc_norm pick differently somewhere."""
    remote = served["remote"]
    want = expected(lambda s: remote.backbone.tokenizer.encode(s).ids, in_process_score(remote))
    from lm_eval_tasks import docs
    for d, row in zip(docs("mole_tiny_choice"), want["mole_tiny_choice"]["lls"]):
        ll = np.array([x for x, _ in row])
        for v in (ll, ll / np.array([len(c) for c in d["choices"]])):
            top2 = np.sort(v)[-2:]
            assert top2[1] - top2[0] > 10 * LL_TOL, d
    assert any(g for row in want["mole_tiny_lambada"]["lls"] for _, g in row)
    m = want["mole_tiny_choice"]["metrics"]
    assert m["acc,none"] != m["acc_norm,none"]


def test_lm_eval_through_inference_serve_equals_in_process(served) -> None:
    ep, remote = served["endpoint"], served["remote"]
    before = _ok_requests(ep)
    got = run_lm_eval("local-completions", {
        "model": ep.model, "base_url": ep.url + "/v1/completions", "tokenizer_backend": "huggingface",
        "tokenizer": served["ckpt"], "tokenized_requests": True, "max_length": 256,
    }, served["root"] / "out-serve", batch_size=BATCH)
    want = expected(lambda s: remote.backbone.tokenizer.encode(s).ids, in_process_score(remote))
    worst = assert_same_scores(got, want)
    print(f"max |lm-eval via inference.serve - in-process| log-likelihood: {worst:.3g}")
    # several prompts per request: lm-eval sent its loglikelihood requests BATCH at a time
    prompts = sum(len(p) for task in TASKS for p in pairs(task))
    assert _ok_requests(ep) - before == math.ceil(prompts / BATCH)
