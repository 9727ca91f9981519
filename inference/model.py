"""The MoLE transformer (Mixture of Lookup Experts), in one readable file.

A Llama-like decoder whose layers add, next to the dense MLP, a mix of N
experts that see only the token's own embedding:

    h = h + self_attn(input_layernorm(h))
    x = post_attention_layernorm(h)
    g = softmax(router(x))                                  # fp32, all N experts
    h = h + mlp(x) + sum_j g_j * expert_j(expert_layernorm(embed(token)))

Two forms share every weight but the experts:
  - "train": the experts are modules and are computed (once per distinct
    token id in the batch). `compute_lut` evaluates them for any token ids:
    the reparameterisation that becomes the lookup table.
  - "lut": the experts are gone; the caller supplies each token's row
    LUT[token] of shape [L, N, D] (per call, or per layer on demand).

Module names equal the official HF checkpoints' tensor names, so a
checkpoint's state_dict loads directly.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lutstore.errors import UserError

log = logging.getLogger(__name__)

FORMS = ("train", "lut")
ROPE_SCALINGS = ("linear", "dynamic")   # what transformers 4.38's Llama (the official MoLE code) knows


def rope_scaling_of(config: dict[str, Any]) -> dict[str, Any] | None:
    """{"type": "linear"|"dynamic", "factor": f} from a config's `rope_scaling` (transformers 4.38:
    `type`; later: `rope_type`) or `rope_parameters` (transformers 5), None for plain rotary.
    Any other kind is refused: running it as plain rotary would give other logits."""
    value = config.get("rope_scaling") or config.get("rope_parameters")
    if not value:
        return None
    if not isinstance(value, dict):
        raise UserError(f"config's rope_scaling must be an object like {{\"type\": \"linear\", \"factor\": 2.0}}, not {value!r}")
    kind = value.get("type", value.get("rope_type", "default"))
    if kind == "default":
        return None
    factor = value.get("factor")
    if kind not in ROPE_SCALINGS:
        raise UserError(f"config's rope scaling {kind!r} is not supported: MoLE (transformers 4.38's Llama) "
                        f"knows only {' and '.join(ROPE_SCALINGS)}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
        raise UserError(f"config's rope scaling {kind!r} needs a numeric factor >= 1, not {factor!r}")
    return {"type": kind, "factor": float(factor)}


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None   # {"type": "linear"|"dynamic", "factor": f}; None: plain rotary
    tie_word_embeddings: bool = False            # lm_head is embed_tokens (the checkpoint may omit lm_head.weight)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other config keys, kept for to_config()

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.rope_scaling = rope_scaling_of({"rope_scaling": self.rope_scaling})

    @property
    def context_length(self) -> int:
        """Longest sequence the model runs: max_position_embeddings, times the rope scaling factor
        if any (what scaling is for, and how vLLM sizes such a model's context)."""
        if self.rope_scaling is None:
            return self.max_position_embeddings
        return int(self.max_position_embeddings * self.rope_scaling["factor"])

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelArgs:
        """Build from an official MoLE config.json (a Llama config plus `num_experts`)."""
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_experts") if k not in config]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}; is this a MoLE checkpoint?")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        eos = config.get("eos_token_id")
        args = {k: config[k] for k in known if k in config and config[k] is not None}
        args["rope_scaling"] = rope_scaling_of(config)
        rope_parameters = config.get("rope_parameters")   # a config saved by transformers 5 keeps the base here
        if isinstance(rope_parameters, dict) and "rope_theta" not in config and "rope_theta" in rope_parameters:
            args["rope_theta"] = rope_parameters["rope_theta"]
        if isinstance(eos, list):  # HF allows a list of stop ids; keep the first
            args["eos_token_id"] = eos[0] if eos else None
        extra = {k: v for k, v in config.items() if k not in known and k != "rope_parameters"}
        return cls(**args, extra=extra)

    def to_config(self) -> dict[str, Any]:
        """An official-format config.json dict."""
        config: dict[str, Any] = {
            "architectures": ["MoleForCausalLM"], "model_type": "llama", "hidden_act": "gelu",
            "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "float32",
        }
        config.update(self.extra)
        config.update({k: v for k, v in asdict(self).items() if k != "extra" and v is not None})
        return config


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalised in fp32, scaled in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Rotary:
    """Llama rotary embeddings (half-split), kept in fp32 outside the state_dict so that
    casting the model to fp16/bf16 does not round the angles.

    Scaling as transformers 4.38's Llama (what the official MoLE code runs), with the same
    fp32 operations:
      - linear: each position is divided by the factor;
      - dynamic (NTK): a sequence longer than max_pos tokens (its largest position + 1) gets
        the base theta * (factor * len / max_pos - (factor - 1)) ** (hd / (hd - 2)) for the
        tokens of that forward; shorter ones keep theta. The length is each row's own (the
        official code takes the batch's longest, the same for a batch of one or of rows
        sharing positions), so a row's logits never depend on the rows batched with it.
    """

    def __init__(self, head_dim: int, max_pos: int, theta: float, scaling: dict[str, Any] | None = None,
                 context: int | None = None) -> None:
        self.head_dim, self.max_pos, self.theta = head_dim, max_pos, theta
        self.kind = scaling["type"] if scaling else "default"
        self.factor = scaling["factor"] if scaling else 1.0
        self.context = context or max_pos    # positions 0..context-1 can be asked for
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        positions = torch.arange(self.context, dtype=torch.int64).float()
        if self.kind == "linear":
            positions = positions / self.factor
        self._tables = {torch.device("cpu"): self._cos_sin(torch.outer(positions, inv_freq))}

    @staticmethod
    def _cos_sin(angles: Tensor) -> tuple[Tensor, Tensor]:
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    def tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin [context, hd] of the unscaled base (dynamic: what sequences up to max_pos use)."""
        if device not in self._tables:
            cos, sin = self._tables[torch.device("cpu")]
            self._tables[device] = (cos.to(device), sin.to(device))
        return self._tables[device]

    def at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [*positions.shape, hd] fp32 for positions [T] (every row at them) or [B, T] (per row)."""
        cos, sin = self.tables(positions.device)
        if self.kind != "dynamic":
            return cos[positions], sin[positions]
        length = positions.max(dim=-1).values + 1                     # [] or [B]
        if not bool((length > self.max_pos).any()):
            return cos[positions], sin[positions]
        # the official expression, on int64 lengths: fp32 throughout
        base = self.theta * ((self.factor * length / self.max_pos) - (self.factor - 1)) ** (self.head_dim / (self.head_dim - 2))
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=positions.device).float() / self.head_dim
        scaled = 1.0 / (base[..., None] ** exponents)                 # [(B,) hd/2]
        plain = 1.0 / (self.theta ** exponents)
        inv_freq = torch.where((length > self.max_pos)[..., None], scaled, plain)
        return self._cos_sin(positions.float()[..., None] * inv_freq[..., None, :])


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, hd]; cos/sin [T, hd] fp32."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


class KVCache(nn.Module):
    """Static key/value cache [B, H_kv, S, hd]; written at input_pos, read whole."""

    def __init__(self, max_batch: int, max_seq: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (max_batch, heads, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        b = k.shape[0]
        self.k_cache[:b, :, input_pos] = k
        self.v_cache[:b, :, input_pos] = v
        return self.k_cache[:b], self.v_cache[:b]

    def update_slots(self, slots: SlotBatch, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Slot mode (continuous batching): row i of k/v [B, H, T, hd] is written into cache row
        slots.index[i] at its own positions[i] [T]; returns keys/values [B, H, span, hd] of those slots."""
        rows = slots.index[:, None]
        self.k_cache[rows, :, positions] = k.transpose(1, 2)   # advanced indices first: [B, T, H, hd]
        self.v_cache[rows, :, positions] = v.transpose(1, 2)
        if slots.contiguous:                                    # slots 0..B-1: a view, no copy
            b = k.shape[0]
            return self.k_cache[:b, :, :slots.span], self.v_cache[:b, :, :slots.span]
        return (self.k_cache[:, :, :slots.span].index_select(0, slots.index),   # copies only the keys in use
                self.v_cache[:, :, :slots.span].index_select(0, slots.index))


@dataclass
class SlotBatch:
    """Which KV-cache rows a slot-mode forward uses, and how many keys (positions 0..span-1) it reads."""
    index: Tensor          # [B] cache row of each batch row
    span: int              # 1 + the largest position in the batch
    contiguous: bool       # index == 0..B-1


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        d, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None,
                slots: SlotBatch | None = None) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if slots is not None:
            k, v = self.kv_cache.update_slots(slots, input_pos, k, v)
        elif input_pos is not None and self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """down(GELU_erf(up(x))): the dense MLP and every expert (no gate)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


@runtime_checkable
class LayerRows(Protocol):
    """Supplies the LUT rows of one layer when that layer runs, so fetching or
    copying later layers' rows can overlap the compute of earlier ones."""

    def layer(self, l: int) -> Tensor:  # [B, T, N, D]
        ...


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, form: str) -> None:
        super().__init__()
        d = args.hidden_size
        self.input_layernorm = RMSNorm(d, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(d, args.rms_norm_eps)
        self.mlp = MLP(d, args.intermediate_size)
        self.router = nn.Linear(d, args.num_experts, bias=False)
        if form == "train":
            self.expert_layernorm = RMSNorm(d, args.rms_norm_eps)
            self.experts = nn.ModuleList(MLP(d, args.intermediate_size) for _ in range(args.num_experts))

    def expert_outputs(self, embeds: Tensor) -> Tensor:
        """Train form: every expert on expert_layernorm(embeds) [U, D] -> [U, N, D]."""
        e = self.expert_layernorm(embeds)
        return torch.stack([expert(e) for expert in self.experts], dim=-2)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None,
                rows: Callable[[], Tensor], slots: SlotBatch | None = None) -> Tensor:
        """rows() -> [B, T, N, D]: each position's N expert outputs for this layer. It is
        called only after attention, MLP and router, so a row fetch overlaps all of them."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, input_pos, slots)
        x = self.post_attention_layernorm(h)
        gates = torch.softmax(self.router(x).float(), dim=-1)            # [B, T, N] fp32
        h = h + self.mlp(x)
        mixed = torch.matmul(gates.unsqueeze(-2), rows().float()).squeeze(-2)  # [B, T, D]
        return h + mixed.to(h.dtype)


class MoleModel(nn.Module):
    """The `model.` prefix of the official names."""

    def __init__(self, args: ModelArgs, form: str) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, form) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, form: str = "lut") -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, not {form!r}")
        self.args, self.form = args, form
        self.model = MoleModel(args, form)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:   # one Parameter: .to() and load_state_dict keep it shared
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(args.head_dim, args.max_position_embeddings, args.rope_theta, args.rope_scaling,
                             args.context_length)
        self.max_batch = self.max_seq = 0

    # -- caches -------------------------------------------------------------------------
    def setup_caches(self, max_batch: int, max_seq: int) -> None:
        """Allocate the static KV cache; afterwards forward(..., input_pos=...) decodes incrementally."""
        if max_seq > self.args.context_length:
            raise ValueError(f"max_seq {max_seq} exceeds the model's context of {self.args.context_length} tokens")
        if max_batch == self.max_batch and max_seq == self.max_seq:
            return
        weight = self.lm_head.weight
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(max_batch, max_seq, self.args.num_key_value_heads,
                                               self.args.head_dim, weight.dtype, weight.device)
        self.max_batch, self.max_seq = max_batch, max_seq

    # -- forward ------------------------------------------------------------------------
    def forward(self, idx: Tensor, input_pos: Tensor | None = None, lut_rows: Tensor | LayerRows | None = None,
                key_mask: Tensor | None = None, slots: Tensor | None = None) -> Tensor:
        """Logits [B, T, V] for token ids idx [B, T].

        input_pos [T]: positions of idx, to decode with the KV cache (setup_caches
        first); None: positions 0..T-1, no cache (a full causal pass).
        lut_rows (lut form): [B, T, L, N, D] rows of idx, or a LayerRows giving
        layer l's [B, T, N, D] on demand.
        key_mask [B, S] bool (with the cache: S = max_seq; else S = T): False
        marks positions no query may attend to (left padding of a batch).
        slots [B] (continuous batching): row i lives in KV-cache row slots[i] and input_pos
        is [B, T], each row's own positions, so rows at different positions share one
        forward; a row attends to its slot's keys 0..its position (key_mask unused).
        """
        b, t = idx.shape
        if self.form == "lut" and lut_rows is None:
            raise ValueError("the lut form needs lut_rows (the LUT rows of idx)")
        if slots is not None:
            if self.model.layers[0].self_attn.kv_cache is None:
                raise RuntimeError("call setup_caches() before decoding with slots")
            if input_pos is None or input_pos.shape != idx.shape:
                raise ValueError("slots need input_pos [B, T]: each row's own positions")
            span = int(input_pos.max()) + 1
            if span > self.max_seq:
                raise ValueError(f"position {span - 1} is beyond the cache's max_seq {self.max_seq}")
            cos, sin = (c[:, None] for c in self.rotary.at(input_pos))              # [B, 1, T, hd]
            keys = torch.arange(span, device=idx.device)
            mask = (keys[None, None, :] <= input_pos[:, :, None])[:, None]          # [B, 1, T, span]
            slot_list = slots.tolist()
            slots = SlotBatch(slots, span, slot_list == list(range(b)))
        elif input_pos is None:
            if t > self.rotary.context:
                raise ValueError(f"{t} tokens exceed the model's context of {self.rotary.context}")
            cos, sin = self.rotary.at(torch.arange(t, device=idx.device))
            mask = None if key_mask is None else self._mask(torch.arange(t, device=idx.device), t, key_mask)
        else:
            if self.model.layers[0].self_attn.kv_cache is None:
                raise RuntimeError("call setup_caches() before decoding with input_pos")
            if b > self.max_batch:
                raise ValueError(f"batch {b} exceeds the cache's max_batch {self.max_batch}")
            cos, sin = self.rotary.at(input_pos)
            mask = self._mask(input_pos, self.max_seq, key_mask)

        h = self.model.embed_tokens(idx)
        if self.form == "train":
            distinct, inverse = torch.unique(idx, return_inverse=True)
            distinct_embeds = self.model.embed_tokens(distinct)
        for l, layer in enumerate(self.model.layers):
            if self.form == "train":
                rows = partial(lambda layer: layer.expert_outputs(distinct_embeds)[inverse], layer)  # once per distinct token
            elif isinstance(lut_rows, Tensor):
                rows = partial(lambda l: lut_rows[:, :, l], l)
            else:
                rows = partial(lut_rows.layer, l)
            h = layer(h, cos, sin, mask, input_pos, rows, slots)
        return self.lm_head(self.model.norm(h))

    @staticmethod
    def _mask(input_pos: Tensor, seq: int, key_mask: Tensor | None) -> Tensor:
        """[B|1, 1, T, S] bool: causal, minus masked keys; a query always sees itself
        (so a padding query never has an empty softmax)."""
        keys = torch.arange(seq, device=input_pos.device)
        allowed = keys[None, :] <= input_pos[:, None]                    # [T, S]
        if key_mask is not None:
            allowed = allowed[None] & key_mask[:, None, :seq]           # [B, T, S]
            allowed = allowed | (keys[None, :] == input_pos[:, None])[None]
        else:
            allowed = allowed[None]
        return allowed[:, None]

    # -- the reparameterisation ------------------------------------------------------------
    @torch.no_grad()
    def compute_lut(self, token_ids: Tensor) -> Tensor:
        """Train form: LUT rows of token_ids [n] -> float32 [n, L, N, D]."""
        if self.form != "train":
            raise ValueError("compute_lut needs the train form (the experts)")
        embeds = self.model.embed_tokens(token_ids.to(self.lm_head.weight.device))
        rows = [layer.expert_outputs(embeds).float() for layer in self.model.layers]
        return torch.stack(rows, dim=1)

    # -- weights --------------------------------------------------------------------------
    def load_official_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Load official tensors (train or rep form) by name, strictly: names this form
        does not use (experts in lut form, moe_table, rotary inv_freq) are dropped,
        anything else missing or unexpected is an error."""
        def unused(name: str) -> bool:
            if name.endswith("rotary_emb.inv_freq") or name == "model.moe_table.weight":
                return True
            return self.form == "lut" and (".experts." in name or ".expert_layernorm." in name)

        state = {k: v for k, v in tensors.items() if not unused(k)}
        tied = self.args.tie_word_embeddings
        if tied and "lm_head.weight" in state:
            # the official loader would let lm_head.weight overwrite the shared tensor, embeddings included
            head, embed = state.pop("lm_head.weight"), state.get("model.embed_tokens.weight")
            if embed is not None and not torch.equal(head, embed):
                raise ValueError("tie_word_embeddings=true, yet lm_head.weight differs from model.embed_tokens.weight; "
                                 "set tie_word_embeddings to false in config.json, or remove lm_head.weight")
        own = self.state_dict()
        wrong = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
        if wrong:
            raise ValueError("checkpoint tensors do not fit the config: " + "; ".join(wrong[:5]))
        result = self.load_state_dict(state, strict=False)
        if tied and "lm_head.weight" in result.missing_keys:   # loaded as model.embed_tokens.weight
            result.missing_keys.remove("lm_head.weight")
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"checkpoint does not match a {self.form}-form MoLE model: "
                             f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def init_weights(model: Transformer, seed: int = 0, std: float = 0.02) -> None:
    """A deterministic small random init (tests, the trainer's start); norms stay at one."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            continue
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    log.debug("initialised %d parameters (std %.3g)", num_params(model), std)

