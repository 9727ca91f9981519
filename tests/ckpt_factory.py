"""Tiny MoLE checkpoints in the official HF format, for tests and benchmarks.

    from ckpt_factory import make_checkpoint, reference_lut   # tests/ is on sys.path under pytest
    ckpt = make_checkpoint(tmp_path / "m", form="train")              # train form, fp32, model.safetensors
    ckpt = make_checkpoint(tmp_path / "r", form="rep", weights="bin", shards=2)   # rep form, fp16, sharded .bin
    lut = reference_lut(ckpt)                                          # float64 [V, L, N, D]

Weights are random (seeded) with the official tensor names (see
shared/docs/mole-format.md); config.json is a plain Llama config plus
`num_experts`; tokenizer.json is a real `tokenizers` WordLevel tokenizer
whose vocabulary has exactly `vocab` entries.

`reference_lut` is deliberately written here from the formulas, sharing no
code with lutstore/ingest/pipeline.py, so tests compare two independent
implementations of the reparameterisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

RMS_NORM_EPS = 1e-5
_COMMON_WORDS = ("the of and to a in is it you that he was for on are with as I his they be at one have this "
                 "from or had by hot word but what some we can out other were all there when up use your how "
                 "said an each she which do their time if will way about many then them write would like so "
                 "these her long make thing see him two has look more day could go come did number sound no "
                 "most people my over know water than call first who may down side been now find").split()


def _config(vocab: int, layers: int, experts: int, hidden: int, intermediate: int, heads: int, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["MoleForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "num_experts": experts,
        "hidden_act": "gelu",
        "attention_bias": False,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _vocabulary(vocab: int) -> list[str]:
    words = ["<unk>", "<s>", "</s>"] + [w for w in dict.fromkeys(_COMMON_WORDS)]
    words += [f"w{i}" for i in range(len(words), vocab)]
    return words[:vocab]


def _write_tokenizer(dest: Path, vocab: int) -> None:
    """A real WordLevel tokenizer (whitespace split) with exactly `vocab` ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = _vocabulary(vocab)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))
    (dest / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))


def _train_tensors(vocab: int, layers: int, experts: int, hidden: int, intermediate: int, seed: int) -> dict[str, torch.Tensor]:
    """fp32 train-form state dict; scales keep activations O(1) so fp16 tables stay out of subnormals."""
    g = torch.Generator().manual_seed(seed)

    def lin(out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=g) / in_f**0.5

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(hidden, generator=g)

    t = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm()
        t[p + "post_attention_layernorm.weight"] = norm()
        for proj in "qkvo":
            t[p + f"self_attn.{proj}_proj.weight"] = lin(hidden, hidden)
        t[p + "mlp.up_proj.weight"] = lin(intermediate, hidden)
        t[p + "mlp.down_proj.weight"] = lin(hidden, intermediate)
        t[p + "router.weight"] = lin(experts, hidden)
        t[p + "expert_layernorm.weight"] = norm()
        for j in range(experts):
            t[p + f"experts.{j}.up_proj.weight"] = lin(intermediate, hidden)
            t[p + f"experts.{j}.down_proj.weight"] = lin(hidden, intermediate)
    t["model.norm.weight"] = norm()
    t["lm_head.weight"] = lin(vocab, hidden)
    return t


def _rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in fp32."""
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(torch.float32) * x


def _expert_outputs(get, config: dict) -> np.ndarray:
    """float64 [V, L, N, D] from train-form tensors (`get(name)` returns a tensor)."""
    layers, experts, eps = config["num_hidden_layers"], config["num_experts"], config["rms_norm_eps"]
    embed = get("model.embed_tokens.weight")
    out = np.empty((embed.shape[0], layers, experts, embed.shape[1]), dtype=np.float64)
    for i in range(layers):
        p = f"model.layers.{i}."
        e = _rms_norm_fp32(embed, get(p + "expert_layernorm.weight"), eps).to(torch.float64)
        for j in range(experts):
            up = get(p + f"experts.{j}.up_proj.weight").to(torch.float64)
            down = get(p + f"experts.{j}.down_proj.weight").to(torch.float64)
            out[:, i, j, :] = (torch.nn.functional.gelu(e @ up.T, approximate="none") @ down.T).numpy()
    return out


def _save_weights(dest: Path, tensors: dict[str, torch.Tensor], weights: str, shards: int) -> None:
    names = list(tensors)
    if weights == "safetensors":
        stem, ext, single = "model", "safetensors", "model.safetensors"
    elif weights == "bin":
        stem, ext, single = "pytorch_model", "bin", "pytorch_model.bin"
    else:
        raise ValueError(f"weights must be 'safetensors' or 'bin', not {weights!r}")

    def save(part: dict[str, torch.Tensor], path: Path) -> None:
        part = {n: t.contiguous() for n, t in part.items()}
        if weights == "safetensors":
            save_file(part, str(path), metadata={"format": "pt"})
        else:
            torch.save(part, path)

    if shards <= 1:
        save(tensors, dest / single)
        return
    # Contiguous slices of the name list, as HF's size-based sharding would make.
    bounds = np.linspace(0, len(names), shards + 1).astype(int)
    weight_map: dict[str, str] = {}
    for k in range(shards):
        fname = f"{stem}-{k + 1:05d}-of-{shards:05d}.{ext}"
        part = {n: tensors[n] for n in names[bounds[k]:bounds[k + 1]]}
        save(part, dest / fname)
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dest / f"{single}.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def make_checkpoint(dest: str | Path, form: str = "train", weights: str = "safetensors", shards: int = 1,
                    vocab: int = 128, layers: int = 2, experts: int = 4, hidden: int = 32, intermediate: int = 64,
                    heads: int = 4, seed: int = 0, dtype: torch.dtype | None = None) -> Path:
    """Write an official-format MoLE checkpoint folder and return its path.

    form:    "train" (experts + expert_layernorm) or "rep" (model.moe_table.weight [V, L*N*D]).
    weights: "safetensors" or "bin" (pytorch_model.bin); shards > 1 adds the HF index json.
    dtype:   dtype of every tensor; default float32 for train form and float16
             for rep form (as the official reparameterisation script saves it).
             A rep table is always computed in fp32 first, then cast.
    """
    if form not in ("train", "rep"):
        raise ValueError(f"form must be 'train' or 'rep', not {form!r}")
    dtype = dtype or (torch.float16 if form == "rep" else torch.float32)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    config = _config(vocab, layers, experts, hidden, intermediate, heads, dtype)
    tensors = _train_tensors(vocab, layers, experts, hidden, intermediate, seed)
    if form == "rep":
        # Official conversion: experts on expert_layernorm(embed), concatenated layer-major, then dropped.
        table = torch.empty(vocab, layers, experts, hidden, dtype=torch.float32)
        embed = tensors["model.embed_tokens.weight"]
        for i in range(layers):
            p = f"model.layers.{i}."
            e = _rms_norm_fp32(embed, tensors[p + "expert_layernorm.weight"], RMS_NORM_EPS)
            for j in range(experts):
                up, down = tensors[p + f"experts.{j}.up_proj.weight"], tensors[p + f"experts.{j}.down_proj.weight"]
                table[:, i, j, :] = torch.nn.functional.gelu(e @ up.T) @ down.T
        tensors = {n: t for n, t in tensors.items() if ".experts." not in n and "expert_layernorm" not in n}
        tensors["model.moe_table.weight"] = table.reshape(vocab, layers * experts * hidden)
    tensors = {n: t.to(dtype) for n, t in tensors.items()}
    _save_weights(dest, tensors, weights, shards)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(dest, vocab)
    return dest


def update_config(ckpt_dir: str | Path, **values) -> None:
    """Set keys of a checkpoint's config.json (a variant of a factory checkpoint: GQA, rope scaling, ...)."""
    path = Path(ckpt_dir) / "config.json"
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config, indent=2))


def load_golden(name: str) -> dict[str, np.ndarray]:
    """Recorded numbers tests/golden/<name>.npz, as plain arrays."""
    with np.load(Path(__file__).parent / "golden" / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


def load_tensors(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (any weight format, sharded or not), loaded eagerly."""
    ckpt_dir = Path(ckpt_dir)
    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({n: sf.get_tensor(n) for n in sf.keys()})
    for f in sorted(ckpt_dir.glob("pytorch_model*.bin")):
        out.update(torch.load(f, weights_only=True))
    return out


def reference_lut(ckpt_dir: str | Path) -> np.ndarray:
    """The checkpoint's lookup table, float64 [V, L, N, D], computed independently of lutstore.

    Train form: expert_j(RMSNorm_fp32(embed)) with exact GELU, matmuls in float64.
    Rep form: model.moe_table.weight upcast and reshaped (layer, expert, dim).
    """
    config = json.loads((Path(ckpt_dir) / "config.json").read_text())
    tensors = load_tensors(ckpt_dir)
    L, N, D = config["num_hidden_layers"], config["num_experts"], config["hidden_size"]
    if "model.moe_table.weight" in tensors:
        table = tensors["model.moe_table.weight"].to(torch.float64).numpy()
        return table.reshape(table.shape[0], L, N, D)
    return _expert_outputs(tensors.__getitem__, config)
