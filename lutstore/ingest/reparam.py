"""A checkpoint's rows, computed: what ingest encodes and stores.

    TrainRows(ckpt, device)(start, stop)   train form: every expert on each token's normalised
                                           embedding, fp32 [stop - start, L, N, D]
    RepRows(ckpt)(start, stop)             rep form: slices of the reparameterised table

Imports nothing of storage: engines that hold a checkpoint's table in memory compute it here too.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from lutstore.ingest.checkpoint import EMBED, TABLE, Checkpoint

log = logging.getLogger(__name__)

EXPERT_CACHE_BYTES = 2 << 30        # keep all experts resident (fp32) when they fit in this


class TrainRows:
    """Computes train-form rows: every expert on the token's normalised embedding, in fp32.

        rows = TrainRows(Checkpoint.open(folder), torch.device("cpu"))(start, stop)   # [stop - start, L, N, D]

    What ingest stores for a train-form checkpoint (before encoding); engines that compute a
    table's rows themselves use it to match."""

    def __init__(self, ckpt: Checkpoint, device: torch.device):
        self.ckpt, self.device = ckpt, device
        c = ckpt.config
        expert_bytes = 4 * 2 * c.num_layers * c.num_experts * c.hidden_size * c.intermediate_size
        self._cache: dict[int, tuple[torch.Tensor, ...]] | None = {} if expert_bytes <= EXPERT_CACHE_BYTES else None
        if self._cache is None:
            log.info("experts need %.1f MB in fp32; reloading them per chunk", expert_bytes / 1e6)

    def _layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(expert_layernorm weight [D], stacked up [N, I, D], stacked down [N, D, I]) in fp32 on device."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        p, n = f"model.layers.{i}.", self.ckpt.config.num_experts

        def load(name: str) -> torch.Tensor:
            return self.ckpt.tensor(name).to(self.device, torch.float32)

        weights = (load(p + "expert_layernorm.weight"),
                   torch.stack([load(p + f"experts.{j}.up_proj.weight") for j in range(n)]),
                   torch.stack([load(p + f"experts.{j}.down_proj.weight") for j in range(n)]))
        if self._cache is not None:
            self._cache[i] = weights
        return weights

    @torch.inference_mode()
    def __call__(self, start: int, stop: int) -> np.ndarray:
        c = self.ckpt.config
        x = self.ckpt.rows(EMBED, start, stop).to(self.device, torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)
        out = torch.empty(stop - start, c.num_layers, c.num_experts, c.hidden_size, device=self.device)
        for i in range(c.num_layers):
            norm_w, up, down = self._layer(i)
            e = (x * norm_w).unsqueeze(0)                                             # [1, C, D]
            h = torch.nn.functional.gelu(e @ up.transpose(1, 2), approximate="none")  # [N, C, I]
            out[:, i] = (h @ down.transpose(1, 2)).transpose(0, 1)                    # [C, N, D]
        return out.cpu().numpy()


class RepRows:
    """Slices of the reparameterised table; fp16 stays fp16 (the codec takes it as is)."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt

    def __call__(self, start: int, stop: int) -> np.ndarray:
        c = self.ckpt.config
        rows = self.ckpt.rows(TABLE, start, stop)
        if rows.dtype not in (torch.float16, torch.float32):
            rows = rows.to(torch.float32)  # bf16 and others: numpy has no bf16
        return rows.reshape(stop - start, c.num_layers, c.num_experts, c.hidden_size).numpy()
