"""Continuous batching: many requests decoded together over one model and one row source.

One engine thread owns the model. Requests wait in a FIFO queue and join the
running batch at step boundaries, each in a slot of the model's static KV
cache (Transformer.setup_caches(max_batch, context); row i of a forward is
cache row slots[i] at its own positions). Each loop iteration is

  1. admit waiting requests into free slots and announce their prompts' rows
     (source.request, chunk by chunk, so the fetch overlaps everything below);
  2. run ONE prefill chunk (<= prefill_chunk tokens) of the oldest request
     still prefilling, so a long prompt delays the running rows by one chunk
     per step, not by its whole length;
  3. run one decode step for every request past its prefill: one forward of
     [B, 1] tokens at B different positions, each row sampled with its own
     parameters and generator (inference.sampling.sample_rows).

A request leaves at the step boundary where it finishes (EOS, max_tokens,
cancel); its slot is free for the next one. With static=True, requests are
admitted only when the batch is empty (static batching, for comparison).

All requests share the one row source: a hot token's row is fetched once and
served from its cache to everyone. Results go back through each request's
`emit` callback, called on the engine thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from inference.generation import chunk_bounds
from inference.lut import LutSource
from inference.model import Transformer
from inference.sampling import SamplingConfig, sample_rows

log = logging.getLogger(__name__)


@dataclass
class TokenEvent:
    token: int
    logprob: float | None = None                    # log p of the chosen token (raw model distribution)
    top: dict[int, float] | None = None             # the `logprobs` likeliest tokens -> log p
    at: float = 0.0                                 # time.perf_counter() when sampled


@dataclass
class PromptLogprobsEvent:
    """Log-probs of prompt tokens 1..T-1 (token 0 has none), with alternatives when asked."""
    logprobs: list[float]
    top: list[dict[int, float]] | None


@dataclass
class FinishedEvent:
    reason: str                                     # "stop" (EOS), "length", "cancelled"


@dataclass
class FailedEvent:
    error: BaseException


Event = TokenEvent | PromptLogprobsEvent | FinishedEvent | FailedEvent


@dataclass
class Sequence:
    """One request as the engine sees it."""
    prompt: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int | None = None
    logprobs: int | None = None                     # alternatives per token (0: only the chosen one's log p)
    prompt_logprobs: bool = False
    stop_ids: frozenset[int] = frozenset()
    # engine state
    id: int = 0
    slot: int = -1
    pos: int = 0                                    # next cache position to write
    generated: int = 0
    last_token: int = -1
    cancelled: bool = False
    submitted_at: float = 0.0
    generator: torch.Generator | None = None


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class QueueFull(RuntimeError):
    """More requests are waiting than the engine's max_queue."""


class Engine:
    def __init__(self, model: Transformer, source: LutSource | None, max_batch: int = 32, context: int | None = None,
                 prefill_chunk: int = 64, static: bool = False, max_queue: int = 1024,
                 on_step: Callable[[int], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1")
        self.model, self.source = model, source
        self.device = model.lm_head.weight.device
        self.context = context or model.args.context_length
        self.max_batch, self.prefill_chunk, self.static, self.max_queue = max_batch, prefill_chunk, static, max_queue
        self.on_step = on_step                      # called with each decode step's batch size
        model.setup_caches(max_batch, self.context)
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []           # in slots, in admission order
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self._cond = threading.Condition()
        self._stopping = False
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.steps = 0

    # -- the interface ----------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Fail what is waiting or running (EngineStopped) and end the engine thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def submit(self, seq: Sequence) -> Sequence:
        # the cache holds the prompt and every generated token but the last
        if seq.max_tokens < 0 or not seq.prompt or len(seq.prompt) + max(seq.max_tokens - 1, 0) > self.context:
            raise ValueError(f"a prompt of {len(seq.prompt)} tokens + max_tokens {seq.max_tokens} does not fit "
                             f"the context of {self.context} tokens")
        seq.id, seq.submitted_at = next(self._ids), time.perf_counter()
        if seq.seed is not None and seq.sampling.temperature > 0:
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.seed)
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self._waiting.append(seq)
            self._cond.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Ask for seq to leave at the next step boundary (its slot is freed then)."""
        with self._cond:
            seq.cancelled = True
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def alive(self) -> bool:
        """Is the engine thread running (False after stop, or if it died)?"""
        return self._thread.is_alive()

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._waiting or self._active or self._stopping):
                        self._cond.wait()
                    if self._stopping:
                        self._fail_all(EngineStopped("the server is shutting down"))
                        return
                    self._drop_cancelled()
                    admitted = self._admit()
                for seq in admitted:
                    self._guarded([seq], lambda: self._announce(seq))
                prefilling = next((s for s in self._active if s.pos < len(s.prompt)), None)
                if prefilling is not None:
                    self._guarded([prefilling], lambda: self._prefill_chunk(prefilling))
                decoding = [s for s in self._active if s.pos >= len(s.prompt) and s.last_token >= 0]
                if decoding:
                    self._guarded(decoding, lambda: self._decode(decoding))
                self.steps += 1

    def _guarded(self, seqs: list[Sequence], step: Callable[[], None]) -> None:
        """Run one forward; if it fails (a dead daemon, ...), fail only the requests in it."""
        try:
            step()
        except Exception as e:  # noqa: BLE001 - reported to each request, the engine goes on
            log.warning("step failed for %d request(s): %s", len(seqs), e)   # an expected condition: one line
            log.debug("the failed step", exc_info=True)
            for s in seqs:
                self._finish(s, FailedEvent(e))

    def _drop_cancelled(self) -> None:
        for s in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(s)
            s.emit(FinishedEvent("cancelled"))
        for s in [s for s in self._active if s.cancelled]:
            self._finish(s, FinishedEvent("cancelled"))

    def _admit(self) -> list[Sequence]:
        admitted = []
        if self.static and self._active:
            return admitted
        while self._waiting and self._free_slots:
            seq = self._waiting.popleft()
            seq.slot = self._free_slots.pop()
            self._active.append(seq)
            admitted.append(seq)
        return admitted

    def _announce(self, seq: Sequence) -> None:
        if self.source is not None:
            for s, e in chunk_bounds(len(seq.prompt), self.prefill_chunk):
                self.source.request(seq.prompt[s:e])

    def _finish(self, seq: Sequence, event: Event) -> None:
        if seq in self._active:
            with self._cond:
                self._active.remove(seq)
                self._free_slots.append(seq.slot)
        seq.emit(event)

    def _fail_all(self, error: BaseException) -> None:
        for s in list(self._waiting):
            s.emit(FailedEvent(error))
        self._waiting.clear()
        for s in list(self._active):
            self._finish(s, FailedEvent(error))

    def _rows(self, idx: torch.Tensor):
        return None if self.source is None else self.source.rows(idx)

    # -- steps ------------------------------------------------------------------------------
    def _prefill_chunk(self, seq: Sequence) -> None:
        start = seq.pos
        end = min(start + self.prefill_chunk, len(seq.prompt))
        idx = torch.tensor([seq.prompt[start:end]], device=self.device)
        pos = torch.arange(start, end, device=self.device)[None]
        logits = self.model(idx, pos, lut_rows=self._rows(idx),
                            slots=torch.tensor([seq.slot], device=self.device))[0].float()   # [T, V]
        seq.pos = end
        if seq.prompt_logprobs:
            self._emit_prompt_logprobs(seq, logits, start, end)
        if end < len(seq.prompt):
            return
        if seq.max_tokens == 0:
            self._finish(seq, FinishedEvent("length"))
            return
        tokens = sample_rows(logits[-1:], [seq.sampling], [seq.generator])
        self._emit_tokens([seq], logits[-1:], tokens)

    def _decode(self, seqs: list[Sequence]) -> None:
        idx = torch.tensor([[s.last_token] for s in seqs], device=self.device)
        pos = torch.tensor([[s.pos] for s in seqs], device=self.device)
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        logits = self.model(idx, pos, lut_rows=self._rows(idx), slots=slots)[:, -1].float()
        for s in seqs:
            s.pos += 1
        tokens = sample_rows(logits, [s.sampling for s in seqs], [s.generator for s in seqs])
        if self.on_step is not None:
            self.on_step(len(seqs))
        self._emit_tokens(seqs, logits, tokens)

    def _emit_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, start: int, end: int) -> None:
        """logits[i] (position start+i) predicts prompt[start+i+1]: score those inside the prompt."""
        targets = seq.prompt[start + 1:end + 1]
        if not targets:
            return
        logp = torch.log_softmax(logits[:len(targets)], dim=-1)
        chosen = logp.gather(-1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].tolist()
        top = _top(logp, seq.logprobs) if seq.logprobs else None
        seq.emit(PromptLogprobsEvent(chosen, top))

    def _emit_tokens(self, seqs: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor) -> None:
        token_list = tokens.tolist()
        if self.source is not None:
            self.source.request(token_list)   # the next step's rows start coming now
        now = time.perf_counter()
        want = [i for i, s in enumerate(seqs) if s.logprobs is not None]
        logp = torch.log_softmax(logits[want], dim=-1) if want else None
        lp_of = {i: j for j, i in enumerate(want)}
        for i, (seq, token) in enumerate(zip(seqs, token_list)):
            event = TokenEvent(token, at=now)
            if i in lp_of:
                row = logp[lp_of[i]]
                event.logprob = float(row[token])
                if seq.logprobs:
                    event.top = _top(row[None], seq.logprobs)[0]
            seq.last_token = token
            seq.generated += 1
            seq.emit(event)
            if token in seq.stop_ids:
                self._finish(seq, FinishedEvent("stop"))
            elif seq.generated >= seq.max_tokens:
                self._finish(seq, FinishedEvent("length"))


def _top(logp: torch.Tensor, k: int) -> list[dict[int, float]]:
    values, ids = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
    return [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
