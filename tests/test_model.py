"""inference/model.py against an independent, naive transcription of the MoLE
formulas (mole-format.md), and its forms/caches against each other."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from inference.model import ModelArgs, Transformer, init_weights

VOCAB = 97


def _args(**over) -> ModelArgs:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_experts=3, max_position_embeddings=64, rms_norm_eps=1e-5,
                rope_theta=500.0)
    base.update(over)
    return ModelArgs(**base)


def _train_model(args: ModelArgs, seed: int = 0) -> Transformer:
    model = Transformer(args, "train")
    init_weights(model, seed=seed, std=0.2)
    # non-trivial norm weights, so that a norm applied in the wrong place shows
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _naive_forward(sd: dict[str, torch.Tensor], args: ModelArgs, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] of one sequence, straight from the formulas, one token's experts at a time."""
    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + args.rms_norm_eps))

    def mlp(x, prefix):
        return F.gelu(x @ sd[prefix + "up_proj.weight"].T, approximate="none") @ sd[prefix + "down_proj.weight"].T

    t, hd, nh = len(ids), args.head_dim, args.num_attention_heads
    pos = torch.arange(t, dtype=torch.float64)
    inv = 1.0 / args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(pos, inv)

    def rope(x):  # x [T, H, hd], half split: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
        x1, x2 = x[..., : hd // 2].double(), x[..., hd // 2:].double()
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).float()

    embed = sd["model.embed_tokens.weight"]
    h = embed[ids]
    for l in range(args.num_hidden_layers):
        p = f"model.layers.{l}."
        a = rms(h, sd[p + "input_layernorm.weight"])
        q = rope((a @ sd[p + "self_attn.q_proj.weight"].T).view(t, nh, hd))
        k = rope((a @ sd[p + "self_attn.k_proj.weight"].T).view(t, nh, hd))
        v = (a @ sd[p + "self_attn.v_proj.weight"].T).view(t, nh, hd)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
        att = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, -1)
        h = h + att @ sd[p + "self_attn.o_proj.weight"].T
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        g = torch.softmax(x @ sd[p + "router.weight"].T, -1)
        out = h + mlp(x, p + "mlp.")
        for i in range(t):
            e = rms(embed[ids[i]], sd[p + "expert_layernorm.weight"])
            for j in range(args.num_experts):
                out[i] = out[i] + g[i, j] * mlp(e, f"{p}experts.{j}.")
        h = out
    return rms(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def test_config_round_trip_and_validation() -> None:
    args = _args(num_key_value_heads=2, eos_token_id=5)
    config = args.to_config()
    assert config["architectures"] == ["MoleForCausalLM"] and config["tie_word_embeddings"] is False
    again = ModelArgs.from_config(json.loads(json.dumps(config)))
    assert again.to_config() == config
    assert (again.num_key_value_heads, again.head_dim, again.eos_token_id) == (2, 8, 5)
    del config["num_experts"]
    with pytest.raises(ValueError, match="num_experts"):
        ModelArgs.from_config(config)
    tied = ModelArgs.from_config({**args.to_config(), "tie_word_embeddings": True})   # lm_head is the embedding
    assert tied.tie_word_embeddings is True and tied.to_config()["tie_word_embeddings"] is True


def test_train_form_matches_naive_formulas() -> None:
    args = _args()
    model = _train_model(args)
    ids = torch.tensor([3, 17, 3, 96, 0, 17, 42, 3])  # repeated ids exercise the unique+gather path
    with torch.no_grad():
        got = model(ids[None])[0]
    want = _naive_forward({k: v.detach() for k, v in model.state_dict().items()}, args, ids)
    assert torch.allclose(got, want, atol=2e-5, rtol=0), (got - want).abs().max()


def test_lut_form_equals_train_form() -> None:
    args = _args()
    train = _train_model(args, seed=3)
    lut_model = Transformer(args, "lut").eval()
    lut_model.load_official_state_dict(train.state_dict())  # experts are dropped by name
    table = train.compute_lut(torch.arange(VOCAB))
    assert table.shape == (VOCAB, 2, 3, 32) and table.dtype == torch.float32
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = train(ids)
        got = lut_model(ids, lut_rows=table[ids])

        class PerLayer:  # the on-demand interface the remote source uses
            def __init__(self):
                self.asked = []

            def layer(self, l):
                self.asked.append(l)
                return table[ids][:, :, l]

        per_layer = PerLayer()
        got_lazy = lut_model(ids, lut_rows=per_layer)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.equal(got, got_lazy) and per_layer.asked == [0, 1]
    with pytest.raises(ValueError, match="lut_rows"):
        lut_model(ids)


@pytest.mark.parametrize("form", ["train", "lut"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_kv_cached_decoding_equals_full_forward(form: str, kv_heads: int) -> None:
    args = _args(num_key_value_heads=kv_heads)
    train = _train_model(args, seed=1)
    model = train
    if form == "lut":
        model = Transformer(args, "lut").eval()
        model.load_official_state_dict(train.state_dict())
    table = train.compute_lut(torch.arange(VOCAB))
    rows = (lambda ids: table[ids]) if form == "lut" else (lambda ids: None)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, lut_rows=rows(ids))
        model.setup_caches(max_batch=4, max_seq=32)
        steps = [model(ids[:, :7], torch.arange(7), lut_rows=rows(ids[:, :7]))]   # prefill
        for i in range(7, 20):                                                  # one token at a time
            steps.append(model(ids[:, i:i + 1], torch.tensor([i]), lut_rows=rows(ids[:, i:i + 1])))
    cached = torch.cat(steps, dim=1)
    assert torch.allclose(cached, full, atol=1e-5, rtol=0), (cached - full).abs().max()


def test_left_padded_batch_matches_single_sequences() -> None:
    args = _args()
    model = _train_model(args, seed=2)
    short, long = torch.tensor([5, 9, 13]), torch.tensor([1, 2, 3, 4, 5, 6])
    pad = len(long) - len(short)
    batch = torch.stack([torch.cat([torch.zeros(pad, dtype=torch.long), short]), long])
    max_seq = 16
    key_mask = torch.ones(2, max_seq, dtype=torch.bool)
    key_mask[0, :pad] = False
    with torch.no_grad():
        model.setup_caches(2, max_seq)
        logits = model(batch, torch.arange(len(long)), key_mask=key_mask)
        step = model(torch.tensor([[7], [8]]), torch.tensor([len(long)]), key_mask=key_mask)
        alone_short = model(torch.cat([short, torch.tensor([7])])[None])[0]
        alone_long = model(torch.cat([long, torch.tensor([8])])[None])[0]
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits[0, pad:], alone_short[:-1], atol=1e-5)
    assert torch.allclose(step[0, 0], alone_short[-1], atol=1e-5)
    assert torch.allclose(logits[1], alone_long[:-1], atol=1e-5)
    assert torch.allclose(step[1, 0], alone_long[-1], atol=1e-5)


def test_loads_official_tensor_files(tmp_path: Path) -> None:
    """Official names from safetensors: train form directly; a rep-form file (moe_table,
    no experts) into the lut form; a tensor of the wrong shape is refused."""
    args = _args()
    train = _train_model(args, seed=4)
    sd = {k: v.contiguous() for k, v in train.state_dict().items()}
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(args.to_config()))

    loaded_args = ModelArgs.from_config(json.loads((tmp_path / "config.json").read_text()))
    again = Transformer(loaded_args, "train").eval()
    again.load_official_state_dict(load_file(tmp_path / "model.safetensors"))
    ids = torch.tensor([[1, 50, 2, 50]])
    with torch.no_grad():
        assert torch.equal(again(ids), train(ids))

    table = train.compute_lut(torch.arange(VOCAB))
    rep = {k: v for k, v in sd.items() if ".experts." not in k and ".expert_layernorm." not in k}
    rep["model.moe_table.weight"] = table.reshape(VOCAB, -1)
    lut_model = Transformer(loaded_args, "lut").eval()
    lut_model.load_official_state_dict(rep)
    with torch.no_grad():
        got = lut_model(ids, lut_rows=rep["model.moe_table.weight"][ids].view(1, 4, 2, 3, 32))
        assert torch.allclose(got, train(ids), atol=1e-5)

    bad = dict(sd)
    bad["model.layers.0.router.weight"] = torch.zeros(5, 32)
    with pytest.raises(ValueError, match="router"):
        Transformer(args, "train").load_official_state_dict(bad)
    with pytest.raises(ValueError, match="missing"):
        Transformer(args, "train").load_official_state_dict(rep)


def test_context_limit_is_enforced() -> None:
    model = _train_model(_args(max_position_embeddings=16))
    with pytest.raises(ValueError, match="context"):
        model.setup_caches(1, 17)
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 17, dtype=torch.long))
