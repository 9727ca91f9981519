"""Generate text with a MoLE model whose experts live in a lutstore daemon.

    python -m inference.generate --lut-addr 127.0.0.1:50051 --prompt "the water"

The backbone (config, tokenizer, non-expert weights) comes from the daemon and
is cached under its table's fingerprint; rows are fetched as soon as a token
is known (the prompt at once, each sampled token right after sampling) and
kept in a byte-budgeted device cache. A long prompt is prefilled in chunks
(--prefill-chunk), every chunk's rows announced up front in chunk order, so
chunk k computes while the rows of chunk k+1 are still arriving. Text streams
to stdout (with several prompts, each sequence under a header that names its
prompt); one line of statistics goes to stderr at the end.

The backbone is cached in $LUTSTORE_CACHE/<fingerprint>/ (default
~/.cache/lutstore/<fingerprint>/; $XDG_CACHE_HOME is honoured): fetched once per
table version, checked against the table's sha256s at every start.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":   # before torch loads: a Ctrl-C during the import is one line, not a traceback
    from lutstore.interrupts import quiet_keyboard_interrupt
    quiet_keyboard_interrupt("generate")

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from inference.connection import add_remote_args, connect
from inference.lut import LutSource, LutStats
from inference.model import Transformer
from inference.sampling import SamplingConfig, sample
from lutstore import alloc
from lutstore.client.address import parse_addresses
from lutstore.cli import HelpFormatter, add_verbose
from lutstore.errors import UserError
from lutstore.interrupts import quiet_on_closed_pipe

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


class TextStream:
    """Prints one sequence's text as it grows (decoding the whole list keeps multi-token characters whole)."""

    def __init__(self, tokenizer, out=sys.stdout) -> None:
        self.tokenizer, self.out, self.printed = tokenizer, out, ""

    def __call__(self, tokens: list[list[int]]) -> None:
        text = self.tokenizer.decode(tokens[0])
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def sequence_header(i: int, prompt_texts: list[str]) -> str:
    """The line above sequence i of a batch: which prompt it continues (prompts repeat under --batch-size)."""
    k = i % len(prompt_texts)
    return f"--- sequence {i} (prompt {k}: {_short(prompt_texts[k])})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m inference.generate", description=__doc__,
                                formatter_class=HelpFormatter)
    add_remote_args(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for several prompts)")
    p.add_argument("--prompt-file", type=Path, action="append", default=[], help="a file whose whole text is one prompt")
    p.add_argument("--bos", action="store_true", help="prepend the model's bos_token_id to each prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default: 0, all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1, all)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: a fresh one)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="sequences decoded together: the prompts repeated cyclically (default: one per prompt)")
    p.add_argument("--truncate", action="store_true", help="keep a too-long prompt's last tokens instead of failing")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help="prompt tokens per prefill forward, so a chunk computes while the next chunk's rows "
                        f"arrive (0: the whole prompt in one forward; default {DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--json", action="store_true", help="print one JSON object (ids, texts, stats) instead of streaming")
    add_verbose(p)
    return p


def cli_main(prog: str, parser: argparse.ArgumentParser, body, argv: list[str] | None) -> int:
    """Parse, set up logging (-v/-vv), run body(args); a UserError is one line on stderr and exit 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A process-wide malloc setting, so switched on here at the entry point, not by the client library:
    # received row messages reuse freed memory instead of faulting fresh pages in (lutstore/alloc.py).
    alloc.keep_freed_memory()
    try:
        return quiet_on_closed_pipe(lambda: body(args))   # `generate ... | head`: 141, quietly
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return cli_main("generate", build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    from inference.backbone import check_device, resolve_dtype

    if not args.lut_addr:
        raise UserError("--lut-addr is required (the address of a `lutstore serve` daemon, e.g. 127.0.0.1:50051)")
    parse_addresses(args.lut_addr)
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
        sampling.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if args.prefill_chunk < 0:
        raise UserError("--prefill-chunk must be >= 0 (0: the whole prompt in one forward)")
    texts = list(args.prompt)
    for f in args.prompt_file:
        try:
            texts.append(f.read_text())
        except OSError as e:
            raise UserError(f"cannot read --prompt-file {f}: {e.strerror}") from None
    if not texts:
        raise UserError("give a prompt with --prompt TEXT or --prompt-file FILE")
    batch_size = args.batch_size or len(texts)
    if batch_size < len(texts):
        raise UserError(f"--batch-size {batch_size} is smaller than the {len(texts)} prompts given")
    device = check_device(args.device)

    remote = connect("generate", args, device, resolve_dtype(args.dtype, device))
    try:
        bb = remote.backbone
        if bb.tokenizer is None:
            raise UserError(f"table {remote.info.name!r} has no tokenizer.json artifact; cannot encode text prompts")
        prompts = []
        for text in texts:
            ids = bb.tokenizer.encode(text).ids
            if args.bos and bb.args.bos_token_id is not None:
                ids = [bb.args.bos_token_id] + ids
            if not ids:
                raise UserError(f"prompt {text!r} encodes to no tokens")
            prompts.append(fit_context(ids, args.max_new_tokens, bb.args.max_position_embeddings, args.truncate))
        prompts = [prompts[i % len(prompts)] for i in range(batch_size)]
        stream = None if args.json else TextStream(bb.tokenizer)
        if stream is not None and batch_size > 1:
            print(sequence_header(0, texts), flush=True)   # sequence 0 streams under its header
        result = generate(bb.model, remote.source, prompts, args.max_new_tokens, sampling, args.seed,
                          bb.args.eos_token_id, on_step=stream, prefill_chunk=args.prefill_chunk)
    finally:
        remote.close()
    texts_out = [bb.tokenizer.decode(t) for t in result.tokens]
    if args.json:
        print(json.dumps({"sequences": [{"prompt_ids": p, "ids": t, "text": s}
                                        for p, t, s in zip(result.prompts, result.tokens, texts_out)],
                          "stats": result.stats_dict()}))
    else:
        print()
        for i, text in enumerate(texts_out[1:], start=1):
            print(sequence_header(i, texts))
            print(text)
    print(result.stats_line(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
