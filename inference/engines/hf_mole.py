"""MoLE (Mixture of Lookup Experts) as a transformers model: MoleForCausalLM on transformers' own Llama pieces.

    import inference.engines.hf_mole                     # registers MoLE with the Auto classes (see register)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("./mole-160m", dtype=torch.float32)          # table in memory
    model = AutoModelForCausalLM.from_pretrained("./mole-160m",
                                                 lutstore={"addr": "127.0.0.1:50051", "table": "mole"})

The model is a Llama decoder (LlamaAttention, LlamaRotaryEmbedding, LlamaRMSNorm, the Cache
classes and the mask utilities of transformers) whose MLP and experts are down(GELU_erf(up(x)))
without a gate, and whose layers add the token's lookup rows mixed by the router:

    h = h + self_attn(input_layernorm(h))
    x = post_attention_layernorm(h)
    h = h + mlp(x) + sum_n softmax_fp32(router(x))_n * LUT[token][l, n]

LUT[token] [L, N, D] comes from one of two places, chosen when the model is built:
  - in memory: `model.moe_table` (an embedding [V, L*N*D], the official rep form's tensor name):
    a rep-form checkpoint's table, or computed at load from a train-form checkpoint's experts.
    It is a weight like the others: `.to()` moves and casts it, save_pretrained writes it (a
    rep-form checkpoint).
  - a lutstore daemon: the `lutstore` settings (inference.connection.LutstoreSettings keys: addr,
    table, version, cache_mb, retry_seconds, timeout, tls_ca, token_file, shared_memory) given
    to from_pretrained or found in config.json. The checkpoint's experts / moe_table are then not
    loaded (a backbone-only folder is enough). One RemoteTable per model, shared by every call;
    its row cache lives on the device of the model's embedding and follows `.to(device)` (a new,
    empty cache there at the next forward). Rows stay in the table's stored precision and are
    mixed in fp32, whatever the model's dtype.

Each forward asks for the rows of its input ids before it computes anything, and layer l
waits only for layer l's rows (RemoteTable.rows(idx).layer(l)).
"""

from __future__ import annotations

import contextvars
import logging
import os
import weakref
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, LlamaConfig, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from inference.connection import LutstoreSettings, OpenTable, open_table
from inference.lut import InProcessTable
from inference.model import ROPE_SCALINGS
from lutstore.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["MoleConfig", "MolePreTrainedModel", "MoleModel", "MoleForCausalLM", "register"]

ARCHITECTURE = "MoleForCausalLM"
TABLE_KEY = "model.moe_table.weight"
_EXPERT_WEIGHTS = (r"\.experts\.\d+\.", r"\.expert_layernorm\.")
# set while from_pretrained builds a model whose table is computed after loading: no random init of it
_TABLE_FILLED_LATER: contextvars.ContextVar[bool] = contextvars.ContextVar("mole_table_filled_later", default=False)


class MoleConfig(LlamaConfig):
    """A Llama config plus MoLE's `num_experts` and, optionally, `lutstore` (where the rows come from).

    model_type stays "llama" (what official checkpoints say), so a saved folder is an official
    one. As in the official code, `hidden_act` and `attention_bias` are ignored: the MLP and the
    experts are down(GELU_erf(up(x))) and no projection has a bias. `rope_scaling` linear and dynamic
    run on transformers' own rotary code (as the official code does); other kinds are refused."""

    num_experts: int | None = None
    lutstore: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.attention_bias = False
        self.mlp_bias = False
        rope = self.rope_parameters
        if isinstance(rope, dict) and "type" in rope:   # transformers 4.38's key (official configs) -> rope_type
            rope.setdefault("rope_type", rope["type"])
            del rope["type"]

    def to_dict(self) -> dict[str, Any]:
        return _without_empty_lutstore(super().to_dict())

    def to_diff_dict(self) -> dict[str, Any]:
        return _without_empty_lutstore(super().to_diff_dict())


def _without_empty_lutstore(values: dict[str, Any]) -> dict[str, Any]:
    """A saved config has a `lutstore` key only when the rows come from a daemon (an official config has none)."""
    if values.get("lutstore", 0) is None:
        del values["lutstore"]
    return values


def _mole_config(config: PreTrainedConfig) -> MoleConfig:
    """A MoleConfig from any config of an official checkpoint (AutoConfig gives a LlamaConfig)."""
    if isinstance(config, MoleConfig):
        return config
    values = config.to_dict()
    values.pop("model_type", None)
    values.pop("transformers_version", None)
    mole = MoleConfig(**values)
    mole._name_or_path = getattr(config, "_name_or_path", "")
    mole._attn_implementation_internal = getattr(config, "_attn_implementation_internal", None)
    return mole


def _check_mole_config(config: MoleConfig) -> None:
    if not isinstance(config.num_experts, int) or config.num_experts < 1:
        raise UserError(f"config of {config._name_or_path or 'this model'} has no `num_experts`: not a MoLE "
                        f"checkpoint (a plain Llama loads with LlamaForCausalLM)")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type not in ("default", *ROPE_SCALINGS):
        raise UserError(f"config's rope scaling {rope_type!r} is not supported: MoLE (transformers 4.38's Llama) "
                        f"knows only {' and '.join(ROPE_SCALINGS)}")


class MoleMLP(nn.Module):
    """down(GELU_erf(up(x))): the dense MLP and every expert (no gate)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class MoleTable(nn.Embedding):
    """The in-memory lookup table [V, L*N*D] (the official `model.moe_table`), frozen."""

    def __init__(self, config: MoleConfig) -> None:
        L, N, D = config.num_hidden_layers, config.num_experts, config.hidden_size
        super().__init__(config.vocab_size, L * N * D)
        self.weight.requires_grad_(False)
        self.row_shape = (L, N, D)

    def source(self) -> InProcessTable:
        return InProcessTable(self.weight.view(self.num_embeddings, *self.row_shape))


class MoleDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MoleConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = MoleMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool | None = False, position_embeddings: tuple[Tensor, Tensor] | None = None,
                lut_rows: Any = None, **kwargs) -> Tensor:
        """lut_rows: LayerRows of the forward's ids; .layer(l) [B, T, N, D] is asked for only after
        attention, MLP and router, so a fetch of this layer's rows overlaps all of them."""
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
        h = hidden_states + attn
        x = self.post_attention_layernorm(h)
        gates = torch.softmax(self.router(x).float(), dim=-1)                        # [B, T, N] fp32
        h = h + self.mlp(x)
        rows = lut_rows.layer(self.layer_idx).to(gates.device, torch.float32)   # no-op unless the table sits elsewhere
        mixed = torch.matmul(gates.unsqueeze(-2), rows).squeeze(-2)
        return h + mixed.to(h.dtype)


class MolePreTrainedModel(PreTrainedModel):
    config_class = MoleConfig
    config: MoleConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoleDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = True
    _can_compile_fullgraph = False      # a lutstore fetch cannot sit inside a compiled graph
    _can_record_outputs = {"hidden_states": MoleDecoderLayer, "attentions": LlamaAttention}
    # the train form's experts become the table (or are not needed: lutstore); a lutstore model has no moe_table
    _keys_to_ignore_on_load_unexpected = [*_EXPERT_WEIGHTS, r"moe_table\."]
    _keys_to_ignore_on_load_missing = [r"moe_table\."]   # a train-form checkpoint: computed after loading

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, MoleTable) and _TABLE_FILLED_LATER.get():
            return
        super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args,
                        config: PreTrainedConfig | str | os.PathLike | None = None,
                        lutstore: Mapping[str, Any] | LutstoreSettings | None = None, **kwargs):
        """transformers' from_pretrained of an official train- or rep-form MoLE checkpoint.

        lutstore: settings of a lutstore daemon (a mapping of LutstoreSettings keys, or the object):
        rows come from there and the checkpoint's table / experts are not loaded. Without it, the
        config's `lutstore` key if any, else the table in memory (rep form: its moe_table; train form:
        computed from the experts at load)."""
        hub = {k: kwargs[k] for k in ("cache_dir", "force_download", "local_files_only", "proxies", "revision",
                                      "subfolder", "token") if k in kwargs}
        folder = _local_folder(pretrained_model_name_or_path, hub)
        kwargs.pop("subfolder", None)   # folder is the subfolder already
        if not isinstance(config, PreTrainedConfig):
            explicit = {k: kwargs[k] for k in ("dtype", "torch_dtype", "quantization_config") if kwargs.get(k) is not None}
            config, kwargs = MoleConfig.from_pretrained(config or folder, return_unused_kwargs=True, **kwargs)
            kwargs.update(explicit)     # a dtype absorbed into the config must still reach the weights
            kwargs.update({k: v for k, v in hub.items() if k not in kwargs})
        config = _mole_config(config)
        _check_mole_config(config)
        settings = None
        if isinstance(lutstore, LutstoreSettings):
            settings = lutstore
        elif lutstore is not None:
            settings = LutstoreSettings.from_mapping(lutstore, "lutstore")
        elif config.lutstore is not None:
            settings = LutstoreSettings.from_mapping(config.lutstore, "the lutstore key of config.json")
        if settings is not None:
            config.lutstore = settings.to_mapping()   # what save_pretrained writes: never a literal token
        form = _checkpoint_form(folder)
        if settings is None and form not in ("train", "rep"):
            raise UserError(f"{folder} has neither the experts (train form) nor model.moe_table (rep form); "
                            f"give lutstore={{\"addr\": \"HOST:PORT\", \"table\": \"NAME\"}} to take the rows "
                            f"from a lutstore daemon")
        marker = _TABLE_FILLED_LATER.set(settings is None and form == "train")
        try:
            model = super().from_pretrained(folder, *model_args, config=config, **kwargs)
        finally:
            _TABLE_FILLED_LATER.reset(marker)
        head = model.get_output_embeddings()
        if config.tie_word_embeddings and head is not None and head.weight is not model.get_input_embeddings().weight:
            # transformers then keeps both; the official code would overwrite the embedding with lm_head
            raise UserError(f"{folder}: tie_word_embeddings=true, yet lm_head.weight differs from "
                            f"model.embed_tokens.weight; set tie_word_embeddings to false in config.json, "
                            f"or remove lm_head.weight")
        base = model.base_model
        if settings is not None:
            base.attach_lutstore(settings, folder)
        elif form == "train":
            base.fill_table_from_experts(folder)
        return model


def _local_folder(name: str | os.PathLike, hub: dict[str, Any]) -> Path:
    """The checkpoint's folder on this machine (a Hub id is downloaded into the HF cache first)."""
    path = Path(name)
    if path.is_dir():
        return path / hub["subfolder"] if hub.get("subfolder") else path
    if path.exists() or path.is_absolute() or str(name).startswith((".", "~")) or str(name).count("/") > 1:
        raise UserError(f"checkpoint folder {name} does not exist (or is not a folder)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name), revision=hub.get("revision"), cache_dir=hub.get("cache_dir"),
                                  token=hub.get("token"), local_files_only=hub.get("local_files_only", False)))


def _checkpoint_form(folder: Path) -> str:
    """"train" (experts), "rep" (moe_table) or "backbone" (neither), from the weight files' tensor names."""
    from lutstore.checkpoint import TABLE, TRAIN_MARKER, Checkpoint

    try:
        names = Checkpoint._index_tensors(folder)
    except UserError:
        return "backbone"
    return "train" if TRAIN_MARKER in names else "rep" if TABLE in names else "backbone"


class MoleModel(MolePreTrainedModel):
    """The decoder (official prefix `model.`): embeddings, layers, final norm, and the row source."""

    def __init__(self, config: MoleConfig) -> None:
        super().__init__(config)
        _check_mole_config(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(MoleDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.moe_table = MoleTable(config) if config.lutstore is None else None
        self.lut: OpenTable | None = None          # the lutstore table (attach_lutstore)
        self._closed = False
        self.gradient_checkpointing = False
        self.post_init()

    # -- where rows come from -------------------------------------------------------------
    def attach_lutstore(self, settings: LutstoreSettings, checkpoint: str | os.PathLike | None = None) -> None:
        """Take the rows from the daemon's table: open it (one line on any failure: UserError / LutError),
        check its shape against the config and, given the checkpoint folder this model was loaded from,
        that the checkpoint's backbone is the table's (BackboneMismatch otherwise)."""
        from inference.engines.tables import backbone_matches_table

        opened = open_table(settings, self.embed_tokens.weight.device, prog=type(self).__name__)
        try:
            info, c = opened.info, self.config
            want = (c.vocab_size, c.num_hidden_layers, c.num_experts, c.hidden_size)
            got = (int(info.vocab_size), int(info.num_layers), int(info.num_experts), int(info.hidden_size))
            if got != want:
                raise UserError(f"table {info.name!r} v{info.version} at {settings.addr} has V={got[0]} L={got[1]} "
                                f"N={got[2]} D={got[3]}, but this model's config has V={want[0]} L={want[1]} "
                                f"N={want[2]} D={want[3]}")
            if checkpoint is not None:
                backbone_matches_table(checkpoint, opened.client, info)
        except BaseException:
            opened.close()
            raise
        if self.lut is not None:
            self.lut.close()
        self.lut, self._closed = opened, False
        weakref.finalize(self, opened.close)

    @torch.no_grad()
    def fill_table_from_experts(self, folder: Path) -> None:
        """The in-memory table computed from a train-form checkpoint's experts (bounded memory)."""
        from inference.engines.tables import table_from_checkpoint

        weight = self.moe_table.weight   # allocated by the loader, never written: its pages were never touched
        table = table_from_checkpoint(folder, weight.device, weight.dtype)
        self.moe_table.weight = nn.Parameter(table.view(self.config.vocab_size, -1), requires_grad=False)

    def close(self) -> None:
        """Release the lutstore table (its connection and row cache); the model cannot run after this."""
        if self.lut is not None:
            self.lut.close()
            self._closed = True

    def lut_rows(self, ids: Tensor):
        """LayerRows of ids [B, T]: the fetch of rows not cached starts now."""
        if self.moe_table is not None:
            return self.moe_table.source().rows(ids)
        if self.lut is None or self._closed:
            raise UserError("this MoLE model has no table (or close() released it): load it with "
                            "from_pretrained(..., lutstore={...}) or call attach_lutstore")
        source, device = self.lut.source, self.embed_tokens.weight.device
        if source.device != device:   # the model moved: the row cache follows it (empty there)
            from inference.lut import RemoteTable

            old = source
            source = RemoteTable(self.lut.client, old.name, old.version, device, cache_bytes=old.stats().cache_budget)
            old.close()
            self.lut.source = source
        return source.rows(ids)

    # -- forward ------------------------------------------------------------------------
    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: Tensor | None = None, use_cache: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        if input_ids is None:
            raise ValueError("MoLE looks each token's expert rows up by its id: pass input_ids "
                             "(inputs_embeds alone cannot be used)")
        ids = _lookup_ids(input_ids, attention_mask)
        lut_rows = self.lut_rows(ids)                     # asked for before anything is computed
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)
        causal_mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                         past_key_values=past_key_values, position_ids=position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=causal_mask, position_embeddings=position_embeddings,
                                  position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                  lut_rows=lut_rows, **kwargs)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


def _lookup_ids(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """input_ids with each padded position (attention_mask 0) given a real id of the batch: its row
    and embedding are never seen by a real position, and a pad id need not be in the table (nor cost
    a fetch)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return input_ids
    padded = attention_mask[:, -input_ids.shape[1]:] == 0
    if not bool(padded.any()):
        return input_ids
    real = input_ids[~padded]
    if real.numel() == 0:
        return input_ids
    return input_ids.masked_fill(padded, int(real[0]))


class MoleForCausalLM(MolePreTrainedModel, GenerationMixin):
    # tie_word_embeddings=true (as the official code): lm_head is the embedding
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: MoleConfig) -> None:
        super().__init__(config)
        self.model = MoleModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def close(self) -> None:
        self.model.close()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                                      position_ids=position_ids, past_key_values=past_key_values,
                                                      inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)


# -- the Auto classes ----------------------------------------------------------------------
def _auto_entry(auto_name: str, target: type[PreTrainedModel] | None) -> type:
    """A stand-in named like the official architecture, so that transformers' choice by
    config.architectures picks it for a MoLE checkpoint: it loads `target`, or (target None:
    an Auto class MoLE has no head for) refuses in one line."""

    def refuse() -> None:
        raise UserError(f"{auto_name} would load this MoLE checkpoint ({ARCHITECTURE}) as a plain Llama without "
                        f"its experts; use AutoModelForCausalLM (MoleForCausalLM) or AutoModel (MoleModel)")

    def from_pretrained(cls, *args, **kwargs):
        if target is None:
            refuse()
        kwargs.pop("trust_remote_code", None)
        return target.from_pretrained(*args, **kwargs)

    def from_config(cls, config, **kwargs):
        if target is None:
            refuse()
        kwargs.pop("trust_remote_code", None)
        return target._from_config(_mole_config(config), **kwargs)

    return type(ARCHITECTURE, (), {"__module__": __name__, "__doc__": f"{auto_name} -> {target}",
                                   "from_pretrained": classmethod(from_pretrained),
                                   "_from_config": classmethod(from_config)})


_registered = False


def register() -> None:
    """Make the Auto classes load MoLE checkpoints (config: model_type "llama", architectures
    ["MoleForCausalLM"]) as MoLE, never as a plain Llama that would ignore the experts.

    For LlamaConfig each Auto class gets the pair (its Llama class, a MoLE entry): transformers
    picks by config.architectures, so plain Llama checkpoints load as before and MoLE ones load
    MoleForCausalLM (AutoModelForCausalLM, pipeline) or MoleModel (AutoModel); Auto classes
    MoLE has no head for (sequence classification, ...) refuse in one line. MoleConfig maps to
    the MoLE classes directly. Called when this module is imported; idempotent."""
    global _registered
    if _registered:
        return
    from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForQuestionAnswering,
                              AutoModelForSequenceClassification, AutoModelForTokenClassification)

    targets = {AutoModel: MoleModel, AutoModelForCausalLM: MoleForCausalLM}
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForQuestionAnswering,
                 AutoModelForTokenClassification):
        mapping = auto._model_mapping
        if LlamaConfig not in mapping:
            continue
        llama = mapping[LlamaConfig]
        if isinstance(llama, (list, tuple)):
            llama = llama[0]
        target = targets.get(auto)
        mapping.register(LlamaConfig, (llama, _auto_entry(auto.__name__, target)), exist_ok=True)
        if target is not None:
            mapping.register(MoleConfig, target, exist_ok=True)
    _registered = True


register()
