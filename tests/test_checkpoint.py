"""lutstore.ingest.checkpoint: form detection, lazy access and validation of bad checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ckpt_factory import load_tensors, make_checkpoint, reference_lut

from lutstore.ingest.checkpoint import EMBED, TABLE, Checkpoint
from lutstore.errors import UserError


@pytest.mark.parametrize("form", ["train", "rep"])
@pytest.mark.parametrize("weights,shards", [("safetensors", 1), ("bin", 1), ("safetensors", 3), ("bin", 2)])
def test_open_detects_form_and_reads_tensors(tmp_path, form, weights, shards):
    path = make_checkpoint(tmp_path / "m", form=form, weights=weights, shards=shards, vocab=64)
    everything = load_tensors(path)
    with Checkpoint.open(path) as ckpt:
        assert ckpt.form == form
        assert ckpt.config.vocab_size == 64 and ckpt.config.num_experts == 4 and ckpt.config.num_layers == 2
        assert sorted(ckpt.names()) == sorted(everything)
        for name, t in everything.items():
            assert ckpt.shape(name) == tuple(t.shape)
            assert torch.equal(ckpt.tensor(name), t)
        big = TABLE if form == "rep" else EMBED
        assert torch.equal(ckpt.rows(big, 10, 17), everything[big][10:17])
        backbone = ckpt.backbone_names()
        assert TABLE not in backbone and not any(".experts." in n or "expert_layernorm" in n for n in backbone)
        assert "lm_head.weight" in backbone and "model.layers.1.router.weight" in backbone
        assert {p.name for p in ckpt.tokenizer_files()} >= {"tokenizer.json", "tokenizer_config.json"}


def test_rep_table_matches_train_reference(tmp_path):
    """The factory's rep form is the reparameterisation of its train form (same seed)."""
    train = reference_lut(make_checkpoint(tmp_path / "t", form="train", vocab=64))
    rep = reference_lut(make_checkpoint(tmp_path / "r", form="rep", vocab=64, dtype=torch.float32))
    scale = np.abs(train).max(axis=-1, keepdims=True)
    assert np.all(np.abs(rep - train) <= 4e-6 * scale)


def _expect_error(path, *fragments):
    with pytest.raises(UserError) as e:
        Checkpoint.open(path)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_missing_folder(tmp_path):
    _expect_error(tmp_path / "nope", "does not exist")


def test_not_mole_no_config(tmp_path):
    path = make_checkpoint(tmp_path / "m", vocab=64)
    (path / "config.json").unlink()
    _expect_error(path, "not a MoLE checkpoint", "config.json")


def test_not_mole_no_num_experts(tmp_path):
    path = make_checkpoint(tmp_path / "m", vocab=64)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["num_experts"]
    (path / "config.json").write_text(json.dumps(cfg))
    _expect_error(path, "not a MoLE checkpoint", "num_experts")


def test_not_mole_plain_llama_weights(tmp_path):
    path = make_checkpoint(tmp_path / "m", vocab=64)
    tensors = {n: t for n, t in load_tensors(path).items() if ".experts." not in n}
    from safetensors.torch import save_file
    save_file(tensors, str(path / "model.safetensors"))
    _expect_error(path, "not a MoLE checkpoint", "moe_table")


def test_no_weights(tmp_path):
    path = make_checkpoint(tmp_path / "m", vocab=64)
    (path / "model.safetensors").unlink()
    _expect_error(path, "no weights")


def test_bad_config_json(tmp_path):
    path = make_checkpoint(tmp_path / "m", vocab=64)
    (path / "config.json").write_text("{not json")
    _expect_error(path, "cannot read config")


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_truncated_weight_file(tmp_path, weights):
    path = make_checkpoint(tmp_path / "m", weights=weights, vocab=64)
    f = path / ("model.safetensors" if weights == "safetensors" else "pytorch_model.bin")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) * 2 // 3])
    _expect_error(path, "truncated or corrupt", f.name)


def test_missing_shard(tmp_path):
    path = make_checkpoint(tmp_path / "m", shards=2, vocab=64)
    (path / "model-00002-of-00002.safetensors").unlink()
    _expect_error(path, "missing", "model-00002-of-00002.safetensors")


def test_embedding_vs_config_vocab(tmp_path):
    path = make_checkpoint(tmp_path / "m", vocab=64)
    cfg = json.loads((path / "config.json").read_text())
    cfg["vocab_size"] = 65
    (path / "config.json").write_text(json.dumps(cfg))
    _expect_error(path, EMBED, "[64, 32]", "[65, 32]")


def test_table_width_mismatch(tmp_path):
    path = make_checkpoint(tmp_path / "m", form="rep", vocab=64)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_experts"] = 3
    cfg_path = path / "config.json"
    cfg_path.write_text(json.dumps(cfg))
    # router is [4, D] and would fail first; rebuild it to isolate the table check.
    tensors = load_tensors(path)
    for i in range(2):
        tensors[f"model.layers.{i}.router.weight"] = tensors[f"model.layers.{i}.router.weight"][:3].clone()
    from safetensors.torch import save_file
    save_file(tensors, str(path / "model.safetensors"))
    _expect_error(path, TABLE, "[64, 256]", "[64, 192]")


def test_expert_shape_mismatch(tmp_path):
    path = make_checkpoint(tmp_path / "m", weights="bin", vocab=64)
    tensors = load_tensors(path)
    tensors["model.layers.1.experts.2.up_proj.weight"] = torch.zeros(63, 32)
    torch.save(tensors, path / "pytorch_model.bin")
    _expect_error(path, "model.layers.1.experts.2.up_proj.weight", "[63, 32]", "[64, 32]")


def test_missing_expert(tmp_path):
    path = make_checkpoint(tmp_path / "m", vocab=64)
    tensors = load_tensors(path)
    del tensors["model.layers.1.experts.3.down_proj.weight"]
    from safetensors.torch import save_file
    save_file(tensors, str(path / "model.safetensors"))
    _expect_error(path, "missing tensor model.layers.1.experts.3.down_proj.weight")


def test_checkpoint_folder_is_a_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    _expect_error(f, "not a folder")


def test_attention_shape_mismatch_and_head_counts(tmp_path):
    """The backbone's attention weights are checked too: such a table was ingested, and only
    `generate` found that its backbone does not fit its config."""
    from safetensors.torch import save_file
    path = make_checkpoint(tmp_path / "m", vocab=64)
    tensors = load_tensors(path)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(31, 32)
    save_file(tensors, str(path / "model.safetensors"))
    _expect_error(path, "model.layers.1.self_attn.k_proj.weight", "[31, 32]", "[32, 32]")

    gqa = make_checkpoint(tmp_path / "gqa", vocab=64)          # 4 heads sharing 2 key/value heads: fine
    tensors = load_tensors(gqa)
    for i in range(2):
        for proj in ("k_proj", "v_proj"):
            tensors[f"model.layers.{i}.self_attn.{proj}.weight"] = torch.zeros(16, 32)
    save_file(tensors, str(gqa / "model.safetensors"))
    cfg = json.loads((gqa / "config.json").read_text())
    (gqa / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 2}))
    Checkpoint.open(gqa).close()
    (gqa / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 3}))
    _expect_error(gqa, "multiple of num_key_value_heads 3")
    del cfg["num_attention_heads"]
    (gqa / "config.json").write_text(json.dumps(cfg))
    _expect_error(gqa, "`num_attention_heads` must be a positive integer")
