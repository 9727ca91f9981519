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


def sample_rows(logits: Tensor, configs: list[SamplingConfig],
                generators: list[torch.Generator | None] | None = None) -> Tensor:
    """Per-row sampling for a continuously batched step: logits [B, V] -> ids [B] (int64).

    Row i uses configs[i] and draws from generators[i] (its request's seeded generator, or
    None for the global one), so a row's choice depends on nothing else in the batch.
    Greedy rows are an argmax; the others share one sort for their top-k / top-p cuts.
    """
    if len(configs) != logits.shape[0]:
        raise ValueError(f"{len(configs)} sampling configs for {logits.shape[0]} rows")
    generators = generators or [None] * len(configs)
    out = logits.argmax(dim=-1)
    sampled = [i for i, c in enumerate(configs) if c.temperature > 0]
    if not sampled:
        return out
    vocab = logits.shape[-1]
    rows = torch.tensor(sampled, device=logits.device)
    temps = torch.tensor([configs[i].temperature for i in sampled], device=logits.device)
    top_k = torch.tensor([configs[i].top_k or vocab for i in sampled], device=logits.device)
    top_p = torch.tensor([configs[i].top_p for i in sampled], device=logits.device)
    scores = logits.index_select(0, rows).float() / temps[:, None]
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)
    sorted_scores = sorted_scores.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = sorted_scores.softmax(-1)
    # drop a token when the tokens ranked before it already cover top_p (rows with top_p = 1 keep all)
    drop = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p[:, None] < 1)
    probs = sorted_scores.masked_fill(drop, float("-inf")).softmax(-1)
    for j, i in enumerate(sampled):
        choice = torch.multinomial(probs[j], 1, generator=generators[i])
        out[i] = order[j, choice[0]]
    return out
