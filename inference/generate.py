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
from pathlib import Path

from inference.cli import cli_main
from inference.connection import add_remote_args, connect
from inference.generation import DEFAULT_PREFILL_CHUNK, fit_context, generate
from inference.sampling import SamplingConfig
from lutstore.client.address import parse_addresses
from lutstore.help_format import HelpFormatter, add_verbose
from lutstore.errors import UserError


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
            prompts.append(fit_context(ids, args.max_new_tokens, bb.args.context_length, args.truncate))
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
