"""MoLE in transformers (inference.engines.hf_mole) against the project's own model and a real daemon.

The reference is inference/model.py (inference.evaluate.token_logprobs, inference.generate.generate)
on the same checkpoints; rows from lutstore come from a real `lutstore serve` over gRPC.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_factory import make_checkpoint
from conftest import start_server

transformers = pytest.importorskip("transformers")
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,  # noqa: E402
                          AutoTokenizer, LlamaConfig, LlamaForCausalLM, pipeline)

from inference.backbone import BackboneMismatch, load_checkpoint  # noqa: E402
from inference.engines.hf_mole import MoleForCausalLM, MoleModel  # noqa: E402
from inference.evaluate import token_logprobs  # noqa: E402
from inference.generate import generate  # noqa: E402
from inference.lut import InProcessTable  # noqa: E402
from lutstore import cli  # noqa: E402
from lutstore.client import LutClient  # noqa: E402
from lutstore.errors import LutError, UserError  # noqa: E402

SHAPE = dict(vocab=128, layers=2, experts=4, hidden=32, intermediate=64, heads=4)
# fp32, measured: 0.0 (the same operations in the same order as inference/model.py); the bound leaves
# room for a different SDPA kernel choice only
LOGPROB_BOUND = 1e-5
# int8 / nf4 rows: RemoteTable dequantises in torch, the downloaded table in numpy; measured <= 5e-7
DEQUANT_BOUND = 1e-5
F32 = torch.float32


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"train": make_checkpoint(root / "train", form="train", seed=7, **SHAPE),
            "rep": make_checkpoint(root / "rep", form="rep", weights="bin", shards=2, seed=7, **SHAPE),
            "other": make_checkpoint(root / "other", form="train", seed=8, **SHAPE),
            "root": root}


@pytest.fixture(scope="module")
def daemon(ckpts):
    """The seed-7 model as fp32/fp16/bf16/int8/nf4 tables, and another model, in one daemon."""
    db = ckpts["root"] / "db"
    for name, enc, src in (("m32", "fp32", "train"), ("m16", "fp16", "train"), ("mb16", "bf16", "train"),
                           ("m8", "int8", "train"),
                           ("m4", "nf4 --block-size 32", "train"), ("other", "fp16", "other")):
        assert cli.main(["ingest", str(ckpts[src]), "--db", str(db), "--name", name, "--encoding", *enc.split(),
                         "--no-progress"]) == 0
    server = start_server(db)
    with pytest.MonkeyPatch.context() as env:   # backbones fetched for the checks go to this module's cache
        env.setenv("LUTSTORE_CACHE", str(ckpts["root"] / "cache"))
        yield server.address
    server.stop()


@pytest.fixture(scope="module")
def tokenizer(ckpts):
    tok = AutoTokenizer.from_pretrained(ckpts["train"])
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, SHAPE["vocab"], n).tolist()   # no special ids


def _logprobs(model, ids: list[int]) -> np.ndarray:
    idx = torch.tensor([ids])
    with torch.no_grad():
        logits = model(idx).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, idx[0, 1:, None])[:, 0].numpy()


def _reference(ckpt: Path):
    backbone, table = load_checkpoint(ckpt)
    return backbone.model, (None if table is None else InProcessTable(table))


# -- the model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("form,weights,shards", [("train", "safetensors", 1), ("rep", "bin", 2), ("rep", "safetensors", 3)])
def test_logits_equal_inference_model(tmp_path, form, weights, shards) -> None:
    ckpt = make_checkpoint(tmp_path / "m", form=form, weights=weights, shards=shards, seed=3, **SHAPE)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=F32)
    assert type(model) is MoleForCausalLM and model.dtype == F32
    assert model.model.moe_table.weight.shape == (128, 2 * 4 * 32)
    ref_model, source = _reference(ckpt)
    ids = _ids(60, seed=1)
    want = token_logprobs(ref_model, source, ids)
    delta = np.abs(_logprobs(model, ids) - want).max()
    assert delta <= LOGPROB_BOUND, delta
    if form == "train":   # transformers' other attention implementation: the same within the bound
        eager = AutoModelForCausalLM.from_pretrained(ckpt, dtype=F32, attn_implementation="eager")
        assert np.abs(_logprobs(eager, ids) - want).max() <= LOGPROB_BOUND


def test_auto_classes_load_mole_and_never_a_plain_llama(ckpts, tmp_path) -> None:
    base = AutoModel.from_pretrained(ckpts["rep"], dtype=F32)
    assert type(base) is MoleModel
    assert type(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpts["rep"]))) is MoleForCausalLM
    assert base(torch.tensor([_ids(5, 0)])).last_hidden_state.shape == (1, 5, 32)
    with pytest.raises(UserError, match="would load this MoLE checkpoint .* as a plain Llama without its experts"):
        AutoModelForSequenceClassification.from_pretrained(ckpts["rep"])
    with pytest.raises(UserError, match="checkpoint folder .*nowhere does not exist"):
        MoleForCausalLM.from_pretrained(tmp_path / "nowhere")
    # a plain Llama checkpoint still loads as Llama
    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4)).save_pretrained(llama)
    assert type(AutoModelForCausalLM.from_pretrained(llama)) is LlamaForCausalLM
    # architectures says MoLE but the config has no experts: refused, not guessed
    broken = tmp_path / "broken"
    shutil.copytree(ckpts["rep"], broken)
    config = json.loads((broken / "config.json").read_text())
    del config["num_experts"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="has no `num_experts`: not a MoLE checkpoint"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_greedy_left_padded_batch_equals_each_alone_and_inference_generate(ckpts, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(ckpts["train"], dtype=F32)
    ref_model, _ = _reference(ckpts["train"])
    prompts = ["the water was hot so", "she said", "they would like to know how many people come to see"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()   # really padded
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        batch_logits = model(**batch).logits
    width = batch["input_ids"].shape[1]
    # a pad id outside the vocabulary (and the table) is never looked up: padded positions take a real id's row
    outside = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 10_000))
    with torch.no_grad():
        assert torch.equal(model(**outside).logits[batch["attention_mask"] == 1], batch_logits[batch["attention_mask"] == 1])
    for i, text in enumerate(prompts):
        alone = tokenizer(text, return_tensors="pt")
        n = alone["input_ids"].shape[1]
        with torch.no_grad():
            single = model.generate(**alone, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            single_logits = model(**alone).logits
        assert out[i, width:].tolist() == single[0, n:].tolist(), text
        assert torch.allclose(batch_logits[i, width - n:], single_logits[0], atol=1e-5, rtol=0), text
        want = generate(ref_model, None, [alone["input_ids"][0].tolist()], 12, eos_id=tokenizer.eos_token_id).tokens[0]
        got = single[0, n:].tolist()
        assert got[:len(want)] == want, text     # HF pads after EOS; the reference stops there


def test_sampling_beam_search_cache_and_hidden_states(ckpts, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(ckpts["rep"], dtype=F32)
    batch = tokenizer(["the water was hot so", "she said"], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(5)
    a = model.generate(**batch, do_sample=True, temperature=0.8, top_k=20, **kw)
    torch.manual_seed(5)
    b = model.generate(**batch, do_sample=True, temperature=0.8, top_k=20, **kw)
    assert torch.equal(a, b) and a.shape[0] == 2
    beams = model.generate(**batch, num_beams=3, num_return_sequences=2, do_sample=False, **kw)
    assert beams.shape[0] == 4 and beams.shape[1] > batch["input_ids"].shape[1]
    greedy = model.generate(**batch, do_sample=False, **kw)
    static = model.generate(**batch, do_sample=False, cache_implementation="static", **kw)
    assert torch.equal(greedy, static)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, batch["input_ids"].shape[1], 32)


def test_pipeline_text_generation(ckpts, tokenizer) -> None:
    generator = pipeline("text-generation", model=str(ckpts["train"]), dtype=F32)
    assert type(generator.model) is MoleForCausalLM
    text = generator("the water was hot so", max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = tokenizer("the water was hot so", return_tensors="pt")
    model = generator.model
    with torch.no_grad():
        want = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert text.split() == tokenizer.decode(want[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split()


def test_save_pretrained_round_trip_writes_the_rep_form(ckpts, tmp_path) -> None:
    model = AutoModelForCausalLM.from_pretrained(ckpts["train"], dtype=F32)
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architectures"] == ["MoleForCausalLM"] and config["model_type"] == "llama"
    assert config["num_experts"] == 4 and "lutstore" not in config
    from lutstore.checkpoint import Checkpoint
    with Checkpoint.open(tmp_path / "saved") as saved:     # what `lutstore ingest` reads: an official rep form
        assert saved.form == "rep"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.tensor([_ids(40, seed=2)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


# -- rows from lutstore ------------------------------------------------------------------------
def _in_memory_with_served_rows(ckpt: Path, addr: str, table: str) -> MoleForCausalLM:
    """The in-memory model whose table is every row of the served table, downloaded (dequantised in numpy)."""
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=F32)
    with LutClient(addr) as client:
        rows = InProcessTable.from_client(client, table, dtype=F32).table
    model.model.moe_table.weight.copy_(rows.reshape(rows.shape[0], -1))
    return model


@pytest.mark.parametrize("table,bound", [("m32", 0.0), ("m16", 0.0), ("mb16", 0.0), ("m8", DEQUANT_BOUND),
                                         ("m4", DEQUANT_BOUND)])
def test_lutstore_table_equals_in_memory_table(ckpts, daemon, tokenizer, table, bound) -> None:
    remote = AutoModelForCausalLM.from_pretrained(ckpts["train"], dtype=F32, lutstore={"addr": daemon, "table": table})
    assert remote.model.moe_table is None and remote.model.lut.info.name == table
    local = _in_memory_with_served_rows(ckpts["train"], daemon, table)
    ids = _ids(50, seed=4)
    assert np.abs(_logprobs(remote, ids) - _logprobs(local, ids)).max() <= bound
    batch = tokenizer(["the water was hot so", "she said it"], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(remote.generate(**batch, **kw), local.generate(**batch, **kw))
        assert torch.equal(remote.generate(**batch, num_beams=3, **kw), local.generate(**batch, num_beams=3, **kw))
    stats = remote.model.lut.source.stats()       # one row cache for every call
    assert stats.hits > 0 and stats.misses <= SHAPE["vocab"]
    remote.close()


def test_lutstore_from_config_saves_and_loads_backbone_only(ckpts, daemon, tmp_path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpts["train"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["lutstore"] = {"addr": daemon, "table": "m16", "cache_mb": 1}
    (folder / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=F32)
    assert model.model.moe_table is None and model.model.lut.source.capacity > 0
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["lutstore"] == {"addr": daemon, "table": "m16", "cache_mb": 1}
    # the argument wins over config.json; a literal token is used but never saved
    with_token = AutoModelForCausalLM.from_pretrained(folder, lutstore={"addr": daemon, "table": "m32", "token": "s3cret"})
    assert with_token.model.lut.info.name == "m32"
    with_token.save_pretrained(tmp_path / "saved-token")
    assert "s3cret" not in (tmp_path / "saved-token" / "config.json").read_text()
    with_token.close()
    generator = pipeline("text-generation", model=str(ckpts["train"]), model_kwargs={"lutstore": {"addr": daemon, "table": "m32"}})
    assert generator.model.model.lut.info.name == "m32" and generator("the water", max_new_tokens=3)[0]["generated_text"]
    generator.model.close()
    from safetensors import safe_open
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), framework="pt") as f:
        assert not any("moe_table" in n or "experts" in n for n in f.keys())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=F32)
    ids = _ids(30, seed=6)
    assert np.array_equal(_logprobs(model, ids), _logprobs(again, ids))
    model.close()
    again.close()


def test_folder_from_an_address_loads(ckpts, daemon, tmp_path) -> None:
    """inference.engines.folder's servable folder (config with the lutstore key, backbone, tokenizer) is
    all transformers needs: no checkpoint at hand."""
    from inference.engines.folder import write_folder
    from inference.connection import LutstoreSettings

    folder = write_folder(LutstoreSettings(addr=daemon, table="m32"), tmp_path / "served")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=F32)
    local = AutoModelForCausalLM.from_pretrained(ckpts["train"], dtype=F32)
    ids = _ids(30, seed=9)
    assert np.array_equal(_logprobs(model, ids), _logprobs(local, ids))
    assert pipeline("text-generation", model=str(folder))("the water", max_new_tokens=2)[0]["generated_text"]
    model.close()


def test_lutstore_refuses_another_models_table(ckpts, daemon) -> None:
    with pytest.raises(BackboneMismatch) as e:
        AutoModelForCausalLM.from_pretrained(ckpts["train"], lutstore={"addr": daemon, "table": "other"})
    assert "\n" not in str(e.value) and "'other'" in str(e.value)
    with pytest.raises(UserError, match="unknown key.*'tabel'"):
        AutoModelForCausalLM.from_pretrained(ckpts["train"], lutstore={"addr": daemon, "tabel": "m16"})
    with pytest.raises(UserError, match="no table 'nope'"):
        AutoModelForCausalLM.from_pretrained(ckpts["train"], lutstore={"addr": daemon, "table": "nope"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_daemon_down_is_the_clients_one_line_error(ckpts, tmp_path, serve, tokenizer) -> None:
    addr = f"127.0.0.1:{_free_port()}"
    with pytest.raises(UserError) as e:      # LutError is a UserError
        AutoModelForCausalLM.from_pretrained(ckpts["train"], lutstore={"addr": addr, "retry_seconds": 0.5})
    assert "\n" not in str(e.value) and addr in str(e.value)
    # a daemon that goes away between calls: the next forward raises the client's LutError
    db = tmp_path / "db"
    assert cli.main(["ingest", str(ckpts["train"]), "--db", str(db), "--name", "t", "--no-progress"]) == 0
    server = serve(db)
    model = AutoModelForCausalLM.from_pretrained(ckpts["train"], dtype=F32, lutstore={
        "addr": server.address, "retry_seconds": 0.5, "timeout": 5, "cache_mb": 0})
    prompt = tokenizer("the water", return_tensors="pt")
    model.generate(**prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)
    server.proc.kill()      # it dies (a graceful stop would first wait for our open session)
    server.proc.wait()
    with pytest.raises(LutError) as e:
        model.generate(**prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert "\n" not in str(e.value) and e.value.code.name == "UNAVAILABLE"
    model.close()


def test_dtype_and_device_placement(ckpts, daemon) -> None:
    ids = torch.tensor([_ids(20, seed=8)])
    for kw in ({}, {"lutstore": {"addr": daemon, "table": "m16"}}):
        model = AutoModelForCausalLM.from_pretrained(ckpts["train"], dtype=F32, **kw)
        with torch.no_grad():
            want = model(ids).logits
            model.to(torch.bfloat16)
            got = model(ids).logits
        assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() < 0.5
        if kw:
            assert model.model.lut.source.dtype == torch.float16      # rows stay as stored, mixed in fp32
        else:
            assert model.model.moe_table.weight.dtype == torch.bfloat16
        if torch.cuda.is_available():
            model.to("cuda")
            with torch.no_grad():
                on_gpu = model(ids.cuda()).logits
            assert on_gpu.device.type == "cuda" and (on_gpu.float().cpu() - want).abs().max() < 0.5
            if kw:
                assert model.model.lut.source.device.type == "cuda"
        model.close()


# -- lm-evaluation-harness ---------------------------------------------------------------------
LL_TOL = 1e-4    # summed log-likelihood of a continuation, as tests/test_lm_eval.py holds the endpoint to


def _reference_score(remote):
    """ids -> (inference.evaluate.token_logprobs, is each next token the argmax) on a daemon's table."""
    model, source = remote.backbone.model, remote.source

    def score(ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        idx = torch.tensor([ids])
        source.request(ids)
        with torch.no_grad():
            logits = model(idx, lut_rows=source.rows(idx))[0, :-1].float()
        return token_logprobs(model, source, ids), (logits.argmax(-1) == idx[0, 1:]).numpy()

    return score


def _assert_same_scores(got, want_lls: dict[str, list], want_metrics: dict[str, dict]) -> float:
    """Per choice: log-likelihoods within LL_TOL, greedy flags equal; acc / acc_norm equal, perplexity close."""
    worst = 0.0
    for task, want in want_lls.items():
        assert len(got.lls(task)) == len(want), task
        for doc, (g_row, w_row) in enumerate(zip(got.lls(task), want)):
            assert [g for _, g in g_row] == [g for _, g in w_row], (task, doc)
            worst = max(worst, max(abs(g - w) for (g, _), (w, _) in zip(g_row, w_row)))
        for name, value in want_metrics[task].items():
            if name.startswith("perplexity"):
                assert got.results[task][name] == pytest.approx(value, rel=2 * LL_TOL), (task, name)
            else:
                assert got.results[task][name] == value, (task, name)
    assert worst < LL_TOL, worst
    return worst


def test_lm_eval_hf_backend_scores_as_the_endpoint_does(tmp_path, monkeypatch) -> None:
    """lm-eval's `hf` backend given the model object (rows from lutstore), offline, on the tiny local tasks
    of tests/lm_eval_task/: the per-choice log-likelihoods, greedy flags and metrics that the same table
    gives through inference.evaluate, and (where lm-eval's API models can run: tenacity) the numbers of
    `local-completions` against inference.serve on that table."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate", reason="lm-eval's hf backend needs accelerate (pinned in the [dev] extra)")
    from lm_eval_tasks import TASK_DIR, TASKS, LmEvalRun, expected, tiny_checkpoint

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("LUTSTORE_CACHE", str(tmp_path / "cache"))
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from inference.backbone import open_remote

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    assert cli.main(["ingest", str(ckpt), "--db", str(tmp_path / "db"), "--name", "tiny", "--encoding", "fp32",
                     "--no-progress"]) == 0
    server = start_server(tmp_path / "db")
    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=F32, lutstore={"addr": server.address})
        lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(ckpt), batch_size=8)
        out = lm_eval.simple_evaluate(model=lm, tasks=["mole_tiny"], log_samples=True, bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=str(TASK_DIR)))
        got = LmEvalRun(out["results"], {t: sorted(out["samples"][t], key=lambda s: s["doc_id"]) for t in TASKS}, "")
        remote = open_remote(server.address, "tiny")
        try:
            want = expected(lambda s: remote.backbone.tokenizer.encode(s).ids, _reference_score(remote))
        finally:
            remote.close()
        worst = _assert_same_scores(got, {t: want[t]["lls"] for t in TASKS}, {t: want[t]["metrics"] for t in TASKS})
        print(f"max |lm-eval hf backend - inference.evaluate| log-likelihood: {worst:.3g}")
        model.close()
        try:
            import tenacity  # noqa: F401
        except ImportError:
            return
        from lm_eval.models.openai_completions import LocalCompletionsAPI

        from inference.endpoint_process import Endpoint

        endpoint = Endpoint(server.address, "--max-batch", "8", "--prefill-chunk", "8",
                            env={"LUTSTORE_CACHE": str(tmp_path / "cache")})
        try:   # the same run as tests/test_lm_eval.py's lm_eval CLI, in this process
            api = LocalCompletionsAPI(model=endpoint.model, base_url=endpoint.url + "/v1/completions",
                                      tokenizer_backend="huggingface", tokenizer=str(ckpt), tokenized_requests=True,
                                      max_length=256, batch_size=8)
            out = lm_eval.simple_evaluate(model=api, tasks=["mole_tiny"], log_samples=True, bootstrap_iters=0,
                                          task_manager=TaskManager(include_path=str(TASK_DIR)))
            served = LmEvalRun(out["results"], {t: sorted(out["samples"][t], key=lambda s: s["doc_id"]) for t in TASKS}, "")
        finally:
            assert endpoint.stop() == 0, "".join(endpoint.output)
        worst = _assert_same_scores(got, {t: served.lls(t) for t in TASKS},
                                    {t: {k: v for k, v in served.results[t].items() if k in want[t]["metrics"]}
                                     for t in TASKS})
        print(f"max |lm-eval hf backend - local-completions via inference.serve| log-likelihood: {worst:.3g}")
    finally:
        server.stop()
