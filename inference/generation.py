"""Generation with a MoLE model: prompts in, tokens out, the LUT rows of each step asked for
the moment its ids are known.

    result = generate(model, source, prompts, max_new_tokens, sampling)

A long prompt is prefilled in chunks, every chunk's rows announced up front in chunk order,
so chunk k computes while the rows of chunk k+1 are still arriving (prefill, announce_chunks).
The CLI around it is inference.generate; inference.engine uses chunk_bounds for its prefill.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from inference.lut import LutSource, LutStats
from inference.model import Transformer
from inference.sampling import SamplingConfig, sample
from lutstore.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    prompts: list[list[int]]
    tokens: list[list[int]]                 # generated ids of each sequence (up to and with EOS)
    ttft_s: float = 0.0                      # start -> first token sampled (prefill + its fetches)
    decode_s: float = 0.0                    # first token -> last token
    decode_tokens: int = 0                   # tokens sampled after the first step, over the batch
    lut: LutStats = field(default_factory=LutStats)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def stats_line(self) -> str:
        s = self.lut
        return (f"prompt tokens: {self.prompt_tokens} | TTFT: {1000 * self.ttft_s:.1f} ms | "
                f"decode: {self.decode_tok_s:.1f} tok/s ({self.decode_tokens} tokens) | "
                f"row cache hit rate: {100 * s.hit_rate:.1f}% ({s.hits} hits, {s.misses} misses) | "
                f"fetched: {s.bytes_fetched / 1e6:.2f} MB")

    def stats_dict(self) -> dict:
        s = self.lut
        return {"prompt_tokens": self.prompt_tokens, "ttft_ms": 1000 * self.ttft_s, "decode_tok_s": self.decode_tok_s,
                "decode_tokens": self.decode_tokens, "hits": s.hits, "misses": s.misses, "hit_rate": s.hit_rate,
                "bytes_fetched": s.bytes_fetched, "cache_bytes": s.cache_bytes, "cache_budget": s.cache_budget}


def fit_context(prompt: list[int], max_new_tokens: int, context: int, truncate: bool) -> list[int]:
    """The prompt, checked (or cut to its last tokens) so that prompt + new tokens fit the context."""
    room = context - max_new_tokens
    if room < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                        f"context of {context} tokens")
    if len(prompt) > room:
        if not truncate:
            raise UserError(f"prompt of {len(prompt)} tokens + --max-new-tokens {max_new_tokens} exceeds the "
                            f"model's context of {context} tokens; shorten it or pass --truncate to keep its last {room}")
        log.warning("prompt cut from %d to its last %d tokens", len(prompt), room)
        prompt = prompt[-room:]
    return prompt


DEFAULT_PREFILL_CHUNK = 256


def left_pad(prompts: list[list[int]], max_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as one left-padded batch idx [B, longest] and its key_mask [B, max_seq]
    (False on padding: no query attends to it)."""
    longest = max(len(p) for p in prompts)
    pad = prompts[0][0]   # any valid id; padded positions are masked out of attention
    idx = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], dtype=torch.long)
    key_mask = torch.ones(len(prompts), max_seq, dtype=torch.bool)
    for i, p in enumerate(prompts):
        key_mask[i, : longest - len(p)] = False
    return idx, key_mask


def chunk_bounds(length: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) of each prefill chunk of a prompt of `length` tokens; chunk 0 (or >= length): one."""
    if chunk < 0:
        raise ValueError(f"prefill chunk must be >= 0, not {chunk}")
    if chunk == 0 or chunk >= length:
        return [(0, length)]
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


def announce_chunks(source: LutSource | None, idx: torch.Tensor, chunk: int) -> None:
    """source.request each prefill chunk's ids, in chunk order (a FIFO fetcher brings chunk 0's first)."""
    if source is not None:
        for s, e in chunk_bounds(idx.shape[1], chunk):
            source.request(idx[:, s:e])


@torch.no_grad()
def prefill(model: Transformer, source: LutSource | None, idx: torch.Tensor, key_mask: torch.Tensor | None,
            chunk: int = DEFAULT_PREFILL_CHUNK, announce: bool = True) -> torch.Tensor:
    """Run the prompt idx [B, T] (positions 0..T-1) into the model's KV cache (setup_caches first);
    logits [B, V] of its last position.

    Chunk by chunk: layer 0 of chunk k waits only for chunk k's rows, not the whole prompt's.
    With announce, every chunk's ids go to source.request in chunk order before the first forward,
    so a FIFO fetcher brings chunk 0's rows first (pass announce=False if the caller already did).
    """
    if announce:
        announce_chunks(source, idx, chunk)
    device = idx.device
    logits = None
    for s, e in chunk_bounds(idx.shape[1], chunk):
        part = idx[:, s:e]
        logits = model(part, torch.arange(s, e, device=device),
                       lut_rows=None if source is None else source.rows(part), key_mask=key_mask)
    return logits[:, -1]


@torch.no_grad()
def generate(model: Transformer, source: LutSource | None, prompts: list[list[int]], max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), seed: int | None = None, eos_id: int | None = None,
             on_step: Callable[[list[list[int]]], None] | None = None,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> GenerationResult:
    """Decode a batch of prompts together (left-padded) with the static KV cache.

    source None: the model is in train form and computes its experts.
    on_step(tokens) is called after each sampled step with every sequence's tokens so far.
    prefill_chunk: prompt tokens per prefill forward (0: the whole prompt in one).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    device = model.lm_head.weight.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    max_seq = longest + max_new_tokens
    started = time.perf_counter()
    idx, key_mask = left_pad(prompts, max_seq)
    announce_chunks(source, idx, prefill_chunk)          # every prompt row, before anything else
    model.setup_caches(batch, max_seq)
    idx, key_mask = idx.to(device), key_mask.to(device)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)

    def rows(ids: torch.Tensor):
        return None if source is None else source.rows(ids)

    tokens: list[list[int]] = [[] for _ in prompts]
    done = [False] * batch
    next_logits = prefill(model, source, idx, key_mask, prefill_chunk, announce=False)   # [B, V]
    first_step_at = None
    for step in range(max_new_tokens):
        nxt = sample(next_logits, sampling, gen)
        nxt_list = nxt.tolist()
        if source is not None:
            source.request(nxt_list)       # the fetch runs while the next step's first attention computes
        if first_step_at is None:
            first_step_at = time.perf_counter()
        for i, t in enumerate(nxt_list):
            if not done[i]:
                tokens[i].append(t)
                done[i] = eos_id is not None and t == eos_id
        if on_step is not None:
            on_step(tokens)
        if all(done) or step == max_new_tokens - 1:
            break
        cur = nxt[:, None]
        next_logits = model(cur, torch.tensor([longest + step], device=device), lut_rows=rows(cur),
                            key_mask=key_mask)[:, -1]
    finished = time.perf_counter()
    result = GenerationResult(prompts, tokens, lut=source.stats() if source is not None else LutStats())
    if first_step_at is not None:
        result.ttft_s = first_step_at - started
        result.decode_s = finished - first_step_at
        result.decode_tokens = batch * (max(len(t) for t in tokens) - 1)
    return result
