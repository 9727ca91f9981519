"""A checkpoint's lookup table, and whether a checkpoint's backbone belongs to a served table.

What every engine adapter (vLLM, transformers) needs besides its own layers:

  - table_from_checkpoint(folder, device, dtype) -> Tensor [V, L, N, D]: the table of an
    official checkpoint folder, in memory. The rep form's `model.moe_table.weight`, reshaped;
    the train form's experts evaluated on every token's normalised embedding, exactly as
    `lutstore ingest` and the official reparameterisation do (lutstore.ingest's row
    computation, reused), a chunk of the vocabulary at a time: the peak is the result plus
    one chunk, never a float32 copy of the whole table.
  - BackboneReference / backbone_matches_table: the checkpoint's backbone tensors compared,
    tensor by tensor, with the table's backbone.safetensors artifact (fetched once into the
    fingerprint-named cache by inference.backbone.ensure_backbone), so rows of one model are
    never mixed with another model's backbone. Values are compared, not file hashes: the same
    weights saved by another safetensors version, or as .bin, still match.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
import torch
from torch import Tensor

from inference.backbone import BackboneMismatch

log = logging.getLogger(__name__)

TABLE_TENSOR = "model.moe_table.weight"
# Tensors that only make the table: a model that takes its rows from a table never loads them.
_TABLE_ONLY = re.compile(r"^model\.layers\.\d+\.(experts\.\d+\.|expert_layernorm\.)")
CHUNK_BYTES = 64 << 20   # float32 bytes of rows computed or converted at a time


def is_table_only(name: str) -> bool:
    """True for the expert weights, expert_layernorm and moe_table (not part of the backbone)."""
    return name == TABLE_TENSOR or bool(_TABLE_ONLY.match(name))


def _chunk_rows(layers: int, experts: int, hidden: int) -> int:
    return max(1, CHUNK_BYTES // (4 * layers * experts * hidden))


def table_from_checkpoint(folder: str | Path, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32) -> Tensor:
    """The lookup table [V, L, N, D] of a train- or rep-form checkpoint folder, in dtype on device.

    Raises lutstore.errors.UserError (one line) for a folder that is not a MoLE checkpoint."""
    from lutstore.checkpoint import Checkpoint
    from lutstore.ingest.reparam import TrainRows   # the ingest's own reparameterisation, chunk by chunk

    device = torch.device(device)
    with Checkpoint.open(folder) as ckpt:
        c = ckpt.config
        V, L, N, D = c.vocab_size, c.num_layers, c.num_experts, c.hidden_size
        table = torch.empty((V, L, N, D), dtype=dtype, device=device)
        step = _chunk_rows(L, N, D)
        if ckpt.form == "rep":
            for start in range(0, V, step):
                stop = min(start + step, V)
                table[start:stop] = ckpt.rows(TABLE_TENSOR, start, stop).reshape(stop - start, L, N, D).to(device, dtype)
        else:
            # experts on the CPU in float32, as the ingest computes them (a GPU result would differ in the last bits)
            compute = TrainRows(ckpt, torch.device("cpu"))
            for start in range(0, V, step):
                stop = min(start + step, V)
                table[start:stop] = torch.from_numpy(compute(start, stop)).to(device, dtype)
        log.info("table of %s (%s form): [%d, %d, %d, %d] %s on %s", folder, ckpt.form, V, L, N, D,
                 str(dtype).removeprefix("torch."), device)
    return table


def table_from_rep_tensor(flat: Tensor, layers: int, experts: int, hidden: int,
                          device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """A rep form's moe_table [V, L*N*D] (already read by the caller) as [V, L, N, D] in dtype, converted
    a chunk at a time."""
    V = flat.shape[0]
    table = torch.empty((V, layers, experts, hidden), dtype=dtype, device=device)
    step = _chunk_rows(layers, experts, hidden)
    for start in range(0, V, step):
        stop = min(start + step, V)
        table[start:stop] = flat[start:stop].reshape(stop - start, layers, experts, hidden).to(device, dtype)
    return table


class BackboneReference:
    """The backbone tensors of a served table, to compare a checkpoint's with, one tensor at a time.

        ref = BackboneReference.of_table(client, info, checkpoint="ckpt/")
        for name, tensor in checkpoint_tensors:      # any order; table-only tensors are ignored
            ref.check(name, tensor)                  # BackboneMismatch at the first difference
        ref.finish()                                 # BackboneMismatch if the checkpoint lacked one
    """

    def __init__(self, backbone_file: Path, what_table: str, what_checkpoint: str) -> None:
        from safetensors import safe_open

        self._file = safe_open(str(backbone_file), framework="pt")
        self._left = set(self._file.keys())
        self.what_table, self.what_checkpoint = what_table, what_checkpoint

    @classmethod
    def of_table(cls, client, info, checkpoint: str | Path, cache_dir: Path | None = None) -> BackboneReference:
        """The reference of a served table (client: lutstore.client.LutClient, info: its pinned TableInfo)."""
        from inference.backbone import ensure_backbone

        folder = ensure_backbone(client, info, cache_dir)
        what = f"table {info.name!r} v{info.version} at {client.address} (fingerprint {info.fingerprint[:16]})"
        return cls(folder / "backbone.safetensors", what, f"checkpoint {checkpoint}")

    def _refuse(self, why: str) -> BackboneMismatch:
        return BackboneMismatch(f"{self.what_checkpoint} does not match {self.what_table}: {why}; "
                                f"refusing to mix a backbone with another model's rows")

    def check(self, name: str, tensor: Tensor) -> None:
        if is_table_only(name) or name.endswith("rotary_emb.inv_freq"):
            return
        if name not in self._left:
            raise self._refuse(f"its tensor {name} is not in the table's backbone")
        self._left.discard(name)
        want = self._file.get_tensor(name)
        if tuple(want.shape) != tuple(tensor.shape):
            raise self._refuse(f"{name} has shape {list(tensor.shape)}, the table's {list(want.shape)}")
        if not torch.equal(want.to(torch.float32), tensor.detach().to("cpu", torch.float32)):
            raise self._refuse(f"{name} differs")

    def finish(self) -> None:
        if self._left:
            raise self._refuse(f"it lacks {sorted(self._left)[0]}" + (f" (and {len(self._left) - 1} more)"
                                                                     if len(self._left) > 1 else ""))


def backbone_matches_table(folder: str | Path, client, info, cache_dir: Path | None = None) -> None:
    """Raise BackboneMismatch (one line naming the checkpoint and the table) unless every backbone tensor
    of the checkpoint folder equals the table's; table-only tensors (experts, moe_table) are ignored."""
    ref = BackboneReference.of_table(client, info, folder, cache_dir)
    names, tensor, close = _backbone_tensors(folder)
    try:
        for name in names:
            ref.check(name, tensor(name))
    finally:
        close()
    ref.finish()


def _backbone_tensors(folder: str | Path):
    """(names, get, close) of a folder's non-table tensors: an official checkpoint, or a backbone-only folder
    (which lutstore.checkpoint refuses as a checkpoint: it has neither experts nor a table)."""
    from lutstore.checkpoint import Checkpoint
    from lutstore.errors import UserError

    try:
        ckpt = Checkpoint.open(folder)
        return [n for n in ckpt.names() if not is_table_only(n)], ckpt.tensor, ckpt.close
    except UserError:
        from safetensors import safe_open

        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise
        handles = {}
        for f in files:
            h = safe_open(str(f), framework="pt")
            handles.update({n: h for n in h.keys()})
        return [n for n in handles if not is_table_only(n)], lambda n: handles[n].get_tensor(n), handles.clear
