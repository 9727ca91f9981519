"""Big inputs for the benchmarks, built quickly and in bounded memory.

    write_rep_checkpoint(dir, vocab=50304)          # rep-form HF folder, fp16, streamed to disk
    write_table(db, "t", RowFormat(12, 16, 768), 4096)   # random rows straight through Store.begin_table
    zipf_tokens(vocab, n, rng)                      # token ids with a Zipf-like frequency law

Random values come from one pool of normal floats read at a random offset
per chunk: generating 7.4B fresh normals would dominate a 15 GB build, and
the store treats rows as opaque bytes (fp16 noise does not compress anyway;
see shared/docs/measurements.md), so reuse changes no measured figure.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lutstore.formats.codec import RowFormat, encode_rows
from lutstore.storage.rocksdb import Store
from lutstore.storage.model import TableMeta

log = logging.getLogger(__name__)

POOL_VALUES = 8 << 20  # 8M floats: 32 MiB float32 / 16 MiB fp16
WRITE_CHUNK_BYTES = 64 << 20


class RandomPool:
    """Normal random values; `take(n)` returns a view of n of them starting at a random offset."""

    def __init__(self, dtype: np.dtype | str = np.float16, seed: int = 0, size: int = POOL_VALUES, scale: float = 1.0):
        self.rng = np.random.default_rng(seed)
        base = (self.rng.standard_normal(size, dtype=np.float32) * scale).astype(dtype)
        self.size = size
        self._doubled = np.concatenate([base, base])  # any window of `size` values is one contiguous view

    def take(self, n: int) -> np.ndarray:
        if n > self.size:
            reps = -(-n // self.size)
            return np.concatenate([self.take(self.size) for _ in range(reps)])[:n]
        start = int(self.rng.integers(0, self.size))
        return self._doubled[start : start + n]


# ---- tables written directly through the Store -----------------------------

def write_table(db: Path, name: str, fmt: RowFormat, vocab_size: int, seed: int = 0, chunk_rows: int = 64,
                progress: bool = True) -> TableMeta:
    """A table of random rows (any shape/encoding) via Store.begin_table, in chunks of rows."""
    pool = RandomPool(np.float32, seed)
    with Store.open(db, "primary", create=True) as store:
        with store.begin_table(name, fmt, vocab_size, source_form="rep") as writer:
            with tqdm(total=vocab_size, unit="rows", desc=f"build {name}", disable=not progress, dynamic_ncols=True) as bar:
                for start in range(0, vocab_size, chunk_rows):
                    n = min(chunk_rows, vocab_size - start)
                    rows = pool.take(n * fmt.values).reshape(n, *fmt.shape)
                    writer.add_rows(encode_rows(fmt, rows))
                    bar.update(n)
            return writer.commit()


# ---- rep-form checkpoints written as a stream ----------------------------------

@dataclass(frozen=True)
class ModelShape:
    vocab_size: int = 50304
    num_layers: int = 12
    num_experts: int = 16
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_heads: int = 12

    @property
    def table_shape(self) -> tuple[int, int]:
        return (self.vocab_size, self.num_layers * self.num_experts * self.hidden_size)

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor of the official rep form, the table last."""
        V, D, I, N = self.vocab_size, self.hidden_size, self.intermediate_size, self.num_experts
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (V, D))]
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            out += [(p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,))]
            out += [(p + f"self_attn.{x}_proj.weight", (D, D)) for x in "qkvo"]
            out += [(p + "mlp.up_proj.weight", (I, D)), (p + "mlp.down_proj.weight", (D, I)),
                    (p + "router.weight", (N, D))]
        out += [("model.norm.weight", (D,)), ("lm_head.weight", (V, D)), ("model.moe_table.weight", self.table_shape)]
        return out

    def checkpoint_bytes(self) -> int:
        return 2 * sum(math.prod(s) for _, s in self.tensors())

    def config(self) -> dict:
        return {
            "architectures": ["MoleForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads, "num_experts": self.num_experts, "hidden_act": "gelu",
            "attention_bias": False, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
            "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float16",
        }


def write_rep_checkpoint(folder: Path, shape: ModelShape, seed: int = 0, progress: bool = True) -> Path:
    """An HF rep-form folder (config.json + model.safetensors, all fp16) written chunk by chunk,
    so memory stays at a few tens of MB whatever the table size. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    tensors = shape.tensors()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in tensors:
        nbytes = 2 * math.prod(dims)
        header[name] = {"dtype": "F16", "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    pool = RandomPool(np.float16, seed, scale=0.02)
    chunk_values = WRITE_CHUNK_BYTES // 2
    with open(folder / "model.safetensors", "wb") as f, \
            tqdm(total=offset, unit="B", unit_scale=True, desc="write checkpoint", disable=not progress,
                 dynamic_ncols=True) as bar:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, dims in tensors:
            left = math.prod(dims)
            while left:
                n = min(left, chunk_values)
                f.write(memoryview(pool.take(n)).cast("B"))
                left -= n
                bar.update(2 * n)
    log.info("wrote %s (%d bytes)", folder, offset)
    return folder


# ---- token ids -------------------------------------------------------------------

def zipf_tokens(vocab_size: int, n: int, rng: np.random.Generator, exponent: float = 1.1,
                permutation: np.ndarray | None = None) -> np.ndarray:
    """n token ids where the k-th most frequent id has probability ~ 1/k^exponent (natural text is
    close to exponent 1). Ranks map to ids through `permutation` (default: a random one from rng),
    so hot ids are spread over the table rather than clustered at its start."""
    ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
    p = ranks ** -exponent
    p /= p.sum()
    if permutation is None:
        permutation = rng.permutation(vocab_size)
    return permutation[rng.choice(vocab_size, size=n, p=p)].astype(np.int64)
