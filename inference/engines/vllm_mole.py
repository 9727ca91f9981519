"""MoLE (Mixture of Lookup Experts) for vLLM, built from vLLM's own layers.

A Llama-like decoder (vLLM's attention and paged KV cache, RMSNorm, rotary embedding,
tensor-parallel linear layers, vocabulary-parallel embedding and head) whose layers add,
next to a gate-less MLP down(gelu_erf(up(x))), the mix of N looked-up expert outputs:

    h = h + self_attn(input_layernorm(h))
    x = post_attention_layernorm(h)
    g = softmax(router(x))                            # fp32, over all N experts
    h = h + mlp(x) + sum_n g_n * LUT[token][l, n]

The table LUT [V, L, N, D] comes from
  - a lutstore daemon, when the model config has a `lutstore` key ({"addr": "HOST:PORT",
    "table": "NAME", ...}: inference.connection.LutstoreSettings' fields), given in
    config.json or with `--hf-overrides '{"lutstore": {...}}'`. The checkpoint's experts or
    moe_table are then not loaded (a backbone-only folder is enough), and its backbone must
    equal the table's (refused at start otherwise);
  - memory otherwise: the rep form's model.moe_table.weight, or computed at load from the
    train form's experts (inference.engines.tables).

The rows of a step are requested when forward() sees the step's token ids, and layer l
waits only for its own rows (inference.engines.step_rows). The model is not torch.compiled
(no @support_torch_compile): a gRPC fetch cannot be traced, nor captured in a CUDA graph,
so on a GPU a lutstore table needs --enforce-eager (checked at start).

Tensor parallelism: the backbone is split as vLLM's Llama is; every rank holds the full
hidden state after each row-parallel layer's all-reduce, so every rank mixes whole rows
and opens its own RemoteTable (its own session and row cache) fetching whole rows.
Pipeline parallelism is not supported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from inference.engines.step_rows import StepRows
from lutstore.errors import UserError
from inference.engines.tables import TABLE_TENSOR, BackboneReference, is_table_only, table_from_checkpoint, table_from_rep_tensor

# Under vLLM's "vllm" logger, so these lines come out in its format next to its own.
log = logging.getLogger("vllm.lutstore")


def _refuse(e: Exception) -> ValueError:
    """A start refused: one line in the log, and the same line as the error vLLM reports."""
    line = f"lutstore: {e}"
    log.error("%s", line)
    return ValueError(line)


def _check_rope(config, max_model_len: int) -> None:
    """Rope scaling the official code (transformers 4.38's Llama) has: linear, and dynamic NTK only up
    to max_position_embeddings tokens (past it the official base grows with each sequence's length,
    while vLLM's is one fixed base, and its cache of angles ends at max_position_embeddings)."""
    rope = getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "dynamic"):
        raise _refuse(UserError(f"rope scaling {kind!r} is not supported: MoLE (transformers 4.38's Llama) "
                                f"knows only linear and dynamic"))
    limit = getattr(config, "max_position_embeddings", 2048)
    if kind == "dynamic" and max_model_len > limit:
        raise _refuse(UserError(f"dynamic rope scaling runs here only up to max_position_embeddings: start "
                                f"vLLM with --max-model-len {limit} (or less), not {max_model_len}"))


class MoleMLP(nn.Module):
    """down(gelu_erf(up(x))), no gate; up split by columns, down by rows across TP ranks."""

    def __init__(self, hidden_size: int, intermediate_size: int, quant_config, prefix: str) -> None:
        super().__init__()
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, bias=False,
                                            quant_config=quant_config, prefix=f"{prefix}.up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")

    def forward(self, x: Tensor) -> Tensor:
        x, _ = self.up_proj(x)
        x, _ = self.down_proj(F.gelu(x))   # exact (erf) GELU, as the official model
        return x


class MoleAttention(nn.Module):
    """Llama attention: fused q/k/v (split by heads across ranks), half-split rotary, no biases."""

    def __init__(self, config, cache_config, quant_config, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if heads % tp or (kv_heads % tp if kv_heads >= tp else tp % kv_heads):
            raise ValueError(f"{heads} attention heads ({kv_heads} key/value heads) cannot be split over "
                             f"tensor-parallel size {tp}")
        self.head_dim = config.hidden_size // heads
        self.num_heads, self.num_kv_heads = heads // tp, max(1, kv_heads // tp)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, heads, kv_heads, bias=False,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(heads * self.head_dim, config.hidden_size, bias=False,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(self.head_dim, max_position=getattr(config, "max_position_embeddings", 2048),
                                   is_neox_style=True, rope_parameters=getattr(config, "rope_parameters", None))
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, positions: Tensor, x: Tensor) -> Tensor:
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class MoleDecoderLayer(nn.Module):
    def __init__(self, config, cache_config, quant_config, prefix: str) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps=eps)
        self.self_attn = MoleAttention(config, cache_config, quant_config, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(d, eps=eps)
        self.mlp = MoleMLP(d, config.intermediate_size, quant_config, f"{prefix}.mlp")
        # N x D: small, so every rank keeps all of it (the gates need every expert's logit)
        self.router = ReplicatedLinear(d, config.num_experts, bias=False, prefix=f"{prefix}.router")

    def forward(self, positions: Tensor, h: Tensor, rows: Callable[[], Tensor]) -> Tensor:
        """rows() -> [T, N, D], called last so that the layer's row fetch overlaps attention and MLP."""
        h = h + self.self_attn(positions, self.input_layernorm(h))
        x = self.post_attention_layernorm(h)
        logits, _ = self.router(x)
        gates = torch.softmax(logits.float(), dim=-1)                              # [T, N] fp32
        h = h + self.mlp(x)
        mixed = torch.bmm(gates.unsqueeze(1), rows().float()).squeeze(1)           # [T, D] fp32
        return h + mixed.to(h.dtype)


class MoleModel(nn.Module):
    """The `model.` prefix of the official tensor names."""

    def __init__(self, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=vllm_config.quant_config)
        self.layers = nn.ModuleList(
            MoleDecoderLayer(config, vllm_config.cache_config, vllm_config.quant_config, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class MoleForCausalLM(nn.Module):
    """vLLM's model class for `architectures: ["MoleForCausalLM"]` (registered by inference.engines.vllm_plugin)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config, self.vllm_config = config, vllm_config
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError("MoleForCausalLM does not support pipeline parallelism (use tensor parallelism)")
        _check_rope(config, vllm_config.model_config.max_model_len)
        self.model = MoleModel(vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        if self.tied:   # as the official code: lm_head is the embedding
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        # vLLM unties a tied config itself when the checkpoint holds lm_head.weight: then it must equal the embedding
        self.untied_by_checkpoint = bool(getattr(vllm_config.model_config, "word_embeddings_untied_by_checkpoint", False))
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.device = torch.device(vllm_config.device_config.device)
        self.checkpoint = vllm_config.model_config.model
        self.lutstore = None          # inference.connection.OpenTable when rows come from a daemon
        self.table = None             # inference.lut.LutSource
        settings = getattr(config, "lutstore", None)
        if settings:
            try:
                self._open_lutstore(settings)
            except UserError as e:   # LutError included: a bad setting, no daemon, no such table, wrong shape
                raise _refuse(e) from None

    # -- the table -------------------------------------------------------------------------
    def _open_lutstore(self, values) -> None:
        from inference.backbone import BackboneMismatch
        from inference.connection import LutstoreSettings, open_table

        settings = LutstoreSettings.from_mapping(values, where="the model config's \"lutstore\" key")
        if self.device.type == "cuda":
            from vllm.config import CUDAGraphMode

            mode = self.vllm_config.compilation_config.cudagraph_mode
            if not self.vllm_config.model_config.enforce_eager and mode not in (None, CUDAGraphMode.NONE):
                raise UserError("MoleForCausalLM with a lutstore table fetches rows inside the forward, which a "
                                "CUDA graph cannot capture: start vLLM with --enforce-eager")
        opened = open_table(settings, self.device, prog="vllm")
        info, c = opened.info, self.config
        want = (c.vocab_size, c.num_hidden_layers, c.num_experts, c.hidden_size)
        have = (int(info.vocab_size), int(info.num_layers), int(info.num_experts), int(info.hidden_size))
        if want != have:
            opened.close()
            raise BackboneMismatch(f"checkpoint {self.checkpoint} (V={want[0]} L={want[1]} N={want[2]} D={want[3]}) "
                                   f"does not fit table {info.name!r} v{info.version} at {settings.addr} "
                                   f"(V={have[0]} L={have[1]} N={have[2]} D={have[3]})")
        self.lutstore, self.table = opened, opened.source
        log.info("MoLE rows from lutstore table %s v%d at %s (%s, cache %g MiB)", info.name, info.version,
                 settings.addr, opened.source.fmt.encoding.value, settings.cache_mb)

    def _checkpoint_folder(self) -> Path:
        path = Path(self.checkpoint)
        if path.is_dir():
            return path
        from huggingface_hub import snapshot_download   # a hub id vLLM has already downloaded

        return Path(snapshot_download(self.checkpoint, revision=self.vllm_config.model_config.revision,
                                      local_files_only=True))

    # -- vLLM's model interface ----------------------------------------------------------------
    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: Tensor | None, positions: Tensor, intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: Tensor | None = None) -> Tensor:
        if input_ids is None:
            raise ValueError("MoleForCausalLM needs token ids (its expert rows are looked up by id), not embeddings")
        rows = StepRows(self.table, input_ids)          # the step's fetch starts here
        h = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        for l, layer in enumerate(self.model.layers):
            h = layer(positions, h, partial(rows.layer, l))
        return self.model.norm(h)

    def compute_logits(self, hidden_states: Tensor) -> Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # -- weights ---------------------------------------------------------------------------------
    def is_unused_checkpoint_weight(self, name: str) -> bool:
        """Lets vLLM skip a shard that holds only table tensors (the table is read by tables.py)."""
        return is_table_only(name) and (self.lutstore is not None or name != TABLE_TENSOR)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """Official tensor names: q/k/v go into qkv_proj; experts, expert_layernorm and moe_table make the
        in-memory table (or, with lutstore, are skipped and the backbone is compared with the table's)."""
        stacked = ((".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"))
        params = dict(self.named_parameters())
        reference = None
        if self.lutstore is not None:
            try:
                reference = BackboneReference.of_table(self.lutstore.client, self.lutstore.info, self.checkpoint)
            except UserError as e:
                raise _refuse(e) from None
        rep_table = head = embed = None
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if is_table_only(name):
                if name == TABLE_TENSOR and self.lutstore is None:
                    rep_table = tensor
                continue
            if reference is not None:
                try:
                    reference.check(name, tensor)
                except UserError as e:   # BackboneMismatch: another model's backbone
                    raise _refuse(e) from None
            if (self.tied or self.untied_by_checkpoint) and name in ("lm_head.weight", "model.embed_tokens.weight"):
                if name == "lm_head.weight":
                    head = tensor.clone()
                else:
                    embed = tensor.clone()                # whole, before the loader shards it
                if self.tied and name == "lm_head.weight":   # lm_head is the embedding: only checked against it
                    continue
            for param_name, shard_name, shard_id in stacked:
                if shard_name in name:
                    target = name.replace(shard_name, param_name)
                    params[target].weight_loader(params[target], tensor, shard_id)
                    break
            else:
                target = name
                if target not in params:
                    raise ValueError(f"checkpoint {self.checkpoint} has tensor {name}, which a MoLE model does not have")
                param = params[target]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        if head is not None and embed is not None and not torch.equal(head, embed):
            raise _refuse(UserError("tie_word_embeddings=true, yet lm_head.weight differs from "
                                    "model.embed_tokens.weight; set tie_word_embeddings to false in config.json, "
                                    "or remove lm_head.weight"))
        if reference is not None:
            try:
                reference.finish()
            except UserError as e:
                raise _refuse(e) from None
        else:
            self._build_in_memory_table(rep_table)
        return loaded

    def _build_in_memory_table(self, rep_table: Tensor | None) -> None:
        from inference.lut import InProcessTable

        c, dtype = self.config, self.vllm_config.model_config.dtype
        if rep_table is not None:
            table = table_from_rep_tensor(rep_table, c.num_hidden_layers, c.num_experts, c.hidden_size, self.device, dtype)
        else:
            table = table_from_checkpoint(self._checkpoint_folder(), self.device, dtype)
        self.table = InProcessTable(table, self.device)
        log.info("MoLE rows from the in-memory table [%s] (%.1f MB)", ", ".join(map(str, table.shape)),
                 table.numel() * table.element_size() / 1e6)
