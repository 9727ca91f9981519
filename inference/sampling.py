"""Next-token choice from logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SamplingConfig:
    temperature: float = 0.0   # 0: greedy (argmax)
    top_k: int = 0             # 0: no top-k cut
    top_p: float = 1.0         # 1: no nucleus cut

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError("--temperature must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError("--top-k must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise ValueError("--top-p must be in (0, 1]")


def sample(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """logits [B, V] -> token ids [B] (int64)."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < scores.shape[-1]:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        # drop a token when the tokens ranked before it already cover top_p
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
