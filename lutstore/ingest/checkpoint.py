"""Read official-format MoLE checkpoints (HF folders) lazily and validate them.

A checkpoint folder holds config.json (a Llama config plus `num_experts`),
weights as model.safetensors / pytorch_model.bin, possibly sharded with an
`*.index.json` whose `weight_map` names each tensor's file, and tokenizer
files. Tensors are opened by name only when asked for: safetensors through
`safe_open` (row slices of the table read only those rows), `.bin` through
`torch.load(mmap=True, weights_only=True)` (pages fault in on use). So a
15 GB `moe_table` is never held in RAM at once.

`Checkpoint.open(path)` validates everything ingest relies on (config keys,
every tensor's presence and shape) and raises `UserError` with one line
naming the problem.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lutstore.errors import UserError
from lutstore.interrupts import raise_if_signalled

log = logging.getLogger(__name__)

TABLE = "model.moe_table.weight"
EMBED = "model.embed_tokens.weight"
TRAIN_MARKER = "model.layers.0.experts.0.up_proj.weight"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
_EXPERT_ONLY = re.compile(r"^model\.layers\.\d+\.(experts\.\d+\.|expert_layernorm\.)")


@dataclass(frozen=True)
class MoleConfig:
    """The shape-defining keys of a MoLE config.json."""

    vocab_size: int
    num_layers: int
    num_experts: int
    hidden_size: int
    intermediate_size: int
    rms_norm_eps: float
    raw: dict = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, cfg: dict, where: Path) -> MoleConfig:
        if "num_experts" not in cfg:
            raise UserError(f"not a MoLE checkpoint: {where} has no `num_experts`")
        keys = {"vocab_size": "vocab_size", "num_layers": "num_hidden_layers", "num_experts": "num_experts",
                "hidden_size": "hidden_size", "intermediate_size": "intermediate_size"}
        values = {}
        for attr, key in keys.items():
            v = cfg.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise UserError(f"{where}: `{key}` must be a positive integer, got {v!r}")
            values[attr] = v
        eps = cfg.get("rms_norm_eps", 1e-6)
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise UserError(f"{where}: `rms_norm_eps` must be a positive number, got {eps!r}")
        return cls(rms_norm_eps=float(eps), raw=cfg, **values)


def _load_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} is not a JSON object")
    return data


def _itemsize(dtype: str) -> int:
    """Bytes per element of a torch ("float16") or safetensors ("F16") dtype name."""
    digits = re.findall(r"\d+", dtype)
    return max(1, int(digits[-1]) // 8) if digits else 1


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _WeightFile:
    """One weight file, opened lazily; maps tensor names to (shape, dtype) and loads them."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = None  # safe_open handle or dict of mmap'd tensors
        self._layout: tuple[int, dict] | None = None  # safetensors: (data start, header)

    def _open(self):
        if self._handle is not None:
            return self._handle
        try:
            if self.path.suffix == ".safetensors":
                from safetensors import safe_open
                self._handle = safe_open(str(self.path), framework="pt")
            else:
                self._handle = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
                if not isinstance(self._handle, dict):
                    raise UserError(f"weight file {self.path} does not hold a state dict")
        except UserError:
            raise
        except Exception as e:  # safetensors/torch raise assorted types for damaged files
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"weight file {self.path} is truncated or corrupt ({msg})") from None
        return self._handle

    def names(self) -> list[str]:
        h = self._open()
        return list(h.keys())

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        h = self._open()
        if isinstance(h, dict):
            t = h[name]
            return tuple(t.shape), str(t.dtype).removeprefix("torch.")
        sl = h.get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()

    def tensor(self, name: str) -> torch.Tensor:
        h = self._open()
        return h[name] if isinstance(h, dict) else h.get_tensor(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor without reading the rest."""
        h = self._open()
        if isinstance(h, dict):
            return h[name][start:stop]
        return self._pread_rows(name, start, stop)

    def _pread_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        # Plain reads, not the memory map: mapped pages of a 15 GB table would
        # count in our RSS as the ingest walks it; read buffers are freed per chunk.
        if self._layout is None:
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                self._layout = (8 + header_len, json.loads(f.read(header_len)))
        data_start, header = self._layout
        entry = header[name]
        shape, dtype = entry["shape"], _SAFETENSORS_DTYPES[entry["dtype"]]
        row_bytes = math.prod(shape[1:]) * _itemsize(str(dtype).removeprefix("torch."))
        offset = data_start + entry["data_offsets"][0] + start * row_bytes
        buf = bytearray((stop - start) * row_bytes)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(offset)
            if f.readinto(buf) != len(buf):
                raise UserError(f"weight file {self.path} is truncated (tensor {name})")
        return torch.frombuffer(buf, dtype=dtype).reshape(stop - start, *shape[1:])

    def close(self) -> None:
        self._handle = None


class Checkpoint:
    """A validated MoLE checkpoint folder with lazy tensor access by name."""

    def __init__(self, path: Path, config: MoleConfig, files: dict[str, _WeightFile]):
        self.path = path
        self.config = config
        self._file_of = files  # tensor name -> weight file
        self.form = "train" if TRAIN_MARKER in files else "rep" if TABLE in files else ""

    # ---- opening -------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Open and validate; raises UserError naming the first problem found."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"checkpoint folder {path} does not exist")
        if not path.is_dir():
            raise UserError(f"checkpoint {path} is not a folder (expected an HF folder with config.json)")
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise UserError(f"not a MoLE checkpoint: {path} has no config.json")
        config = MoleConfig.from_dict(_load_json(cfg_path, "config"), cfg_path)
        ckpt = cls(path, config, cls._index_tensors(path))
        if not ckpt.form:
            raise UserError(f"not a MoLE checkpoint: {path} has neither expert weights "
                            f"({TRAIN_MARKER}) nor a reparameterised table ({TABLE})")
        ckpt._validate_shapes()
        log.info("checkpoint %s: %s form, V=%d L=%d N=%d D=%d", path, ckpt.form, config.vocab_size,
                 config.num_layers, config.num_experts, config.hidden_size)
        return ckpt

    @staticmethod
    def _index_tensors(path: Path) -> dict[str, _WeightFile]:
        """Tensor name -> weight file, from an index json when present, else from the files themselves."""
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = path / index_name
            if index_path.is_file():
                weight_map = _load_json(index_path, "weight index").get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise UserError(f"weight index {index_path} has no `weight_map`")
                files: dict[str, _WeightFile] = {}
                for fname in sorted(set(weight_map.values())):
                    if not (path / fname).is_file():
                        raise UserError(f"weight shard {path / fname} named by {index_name} is missing")
                    files[fname] = _WeightFile(path / fname)
                return {name: files[fname] for name, fname in weight_map.items()}
        candidates = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not candidates:
            raise UserError(f"not a MoLE checkpoint: {path} has no weights (*.safetensors or pytorch_model*.bin)")
        out: dict[str, _WeightFile] = {}
        for f in candidates:
            wf = _WeightFile(f)
            out.update({name: wf for name in wf.names()})
        return out

    def _attention_widths(self) -> tuple[int, int]:
        """Output widths of q_proj and of k_proj / v_proj, from the config's head counts (checked
        here, so that a table whose backbone the client cannot build is never ingested)."""
        raw, where, D = self.config.raw, self.path / "config.json", self.config.hidden_size
        heads = raw.get("num_attention_heads")
        kv = raw.get("num_key_value_heads") or heads
        for key, v in (("num_attention_heads", heads), ("num_key_value_heads", kv)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise UserError(f"{where}: `{key}` must be a positive integer, got {v!r}")
        if D % heads or heads % kv:
            raise UserError(f"{where}: hidden_size {D} must be a multiple of num_attention_heads {heads}, "
                            f"and num_attention_heads a multiple of num_key_value_heads {kv}")
        return D, kv * (D // heads)

    def _validate_shapes(self) -> None:
        c = self.config
        V, L, N, D, I = c.vocab_size, c.num_layers, c.num_experts, c.hidden_size, c.intermediate_size
        expected: dict[str, tuple[int, ...]] = {EMBED: (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
        if c.raw.get("tie_word_embeddings") and "lm_head.weight" not in self._file_of:
            del expected["lm_head.weight"]   # tied: lm_head is the embedding (what HF saves)
        Q, KV = self._attention_widths()
        for i in range(L):
            p = f"model.layers.{i}."
            expected |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                         p + "mlp.up_proj.weight": (I, D), p + "mlp.down_proj.weight": (D, I),
                         p + "router.weight": (N, D),
                         p + "self_attn.q_proj.weight": (Q, D), p + "self_attn.k_proj.weight": (KV, D),
                         p + "self_attn.v_proj.weight": (KV, D), p + "self_attn.o_proj.weight": (D, Q)}
            if self.form == "train":
                expected[p + "expert_layernorm.weight"] = (D,)
                for j in range(N):
                    expected |= {p + f"experts.{j}.up_proj.weight": (I, D), p + f"experts.{j}.down_proj.weight": (D, I)}
        if self.form == "rep":
            expected[TABLE] = (V, L * N * D)
        missing = [n for n in expected if n not in self._file_of]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UserError(f"checkpoint {self.path} is missing tensor {missing[0]}{more}")
        for name, want in expected.items():
            got = self.shape(name)
            if got != want:
                hint = " (= vocab_size x num_hidden_layers*num_experts*hidden_size)" if name == TABLE else ""
                raise UserError(f"checkpoint {self.path}: tensor {name} has shape {list(got)}, "
                                f"config.json implies {list(want)}{hint}")
        # Shape-level checks cannot see a short data section in a .bin; touch every file's handle at least.
        for wf in set(self._file_of.values()):
            wf.names()

    # ---- access --------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file_of[name].shape_dtype(name)[0]

    def dtype(self, name: str) -> str:
        """Stored dtype as a short string: float32, float16, bfloat16, F32, F16, BF16 ..."""
        return self._file_of[name].shape_dtype(name)[1]

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor as stored (lazy for .bin: backed by the mmap)."""
        if name not in self._file_of:
            raise KeyError(name)
        try:
            return self._file_of[name].tensor(name)
        except Exception as e:
            raise_if_signalled()   # a SIGTERM inside the read can surface as the reader's own error
            raise UserError(f"cannot read tensor {name} from {self._file_of[name].path}: {e}") from None

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor (embedding, moe_table) as stored, reading only those rows."""
        try:
            return self._file_of[name].rows(name, start, stop)
        except Exception as e:
            raise_if_signalled()
            raise UserError(f"cannot read {name} rows {start}..{stop} from {self._file_of[name].path}: {e}") from None

    def backbone_names(self) -> list[str]:
        """Every tensor except the experts, expert_layernorm and moe_table (what the client runs)."""
        return [n for n in self._file_of if n != TABLE and not _EXPERT_ONLY.match(n)]

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

    def weight_files(self) -> list[Path]:
        return sorted({wf.path for wf in self._file_of.values()})

    def weight_bytes(self, names: list[str]) -> int:
        """Bytes the named tensors occupy as stored (for disk-space estimates; reads no data)."""
        return sum(math.prod(self.shape(n)) * _itemsize(self.dtype(n)) for n in names)

    def close(self) -> None:
        for wf in set(self._file_of.values()):
            wf.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
