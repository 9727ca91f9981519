"""Score text with a MoLE model: per-token log-probabilities, NLL and perplexity.

    python -m inference.evaluate --lut-addr 127.0.0.1:50051 --text-file wiki.txt
    python -m inference.evaluate --checkpoint ./mole-160m --token-ids ids.npy --logprobs-out lp.npy

Prints one JSON line {"tokens": T, "nll": mean NLL (nats) over T-1 predictions,
"ppl": exp(nll)}. --logprobs-out writes float32 [T-1]: log p(ids[i+1] | ids[:i+1]).
Run it against a quantised table and against the original to see what the
quantisation costs. A long text (--windows) shows a progress bar on stderr when
that is a terminal (--quiet: none).

The backbone is cached in $LUTSTORE_CACHE/<fingerprint>/ (default
~/.cache/lutstore/<fingerprint>/), as for inference.generate.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":   # before torch loads: a Ctrl-C during the import is one line, not a traceback
    from lutstore.interrupts import quiet_keyboard_interrupt
    quiet_keyboard_interrupt("evaluate")

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from inference.connection import add_remote_args, connect
from inference.cli import cli_main
from inference.lut import InProcessTable, LutSource
from inference.model import Transformer
from lutstore.client.address import parse_addresses
from lutstore.help_format import HelpFormatter, add_verbose
from lutstore.errors import UserError

log = logging.getLogger(__name__)


@torch.no_grad()
def token_logprobs(model: Transformer, source: LutSource | None, ids: list[int]) -> np.ndarray:
    """float32 [T-1]: log p(ids[i+1] | ids[:i+1]), from one full causal pass (logits in fp32)."""
    device = model.lm_head.weight.device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    if source is not None:
        source.request(ids)
    logits = model(idx, lut_rows=None if source is None else source.rows(idx))[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, idx[0, 1:, None])[:, 0].cpu().numpy().astype(np.float32)


def score_windows(model: Transformer, source: LutSource | None, ids: list[int], context: int,
                  progress: bool = True) -> np.ndarray:
    """token_logprobs over consecutive windows of at most `context` tokens (stride context-1: a window's
    first token was the previous window's last prediction); a progress bar in predictions on stderr
    when progress and stderr is a terminal."""
    from tqdm import tqdm

    stride = context - 1
    parts = []
    with tqdm(total=len(ids) - 1, unit="tok", desc="scoring", file=sys.stderr, dynamic_ncols=True,
              disable=not (progress and sys.stderr.isatty())) as bar:
        for s in range(0, len(ids) - 1, stride):
            parts.append(token_logprobs(model, source, ids[s:s + context]))
            bar.update(len(parts[-1]))
    return np.concatenate(parts)


def summary(logprobs: np.ndarray) -> dict:
    nll = float(-logprobs.astype(np.float64).mean())
    return {"tokens": int(len(logprobs) + 1), "nll": nll, "ppl": math.exp(nll)}


NPY_MAGIC = b"\x93NUMPY"


def read_token_ids(path: Path) -> list[int]:
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
    except OSError as e:
        raise UserError(f"cannot read --token-ids {path}: {e.strerror}") from None
    if magic != NPY_MAGIC:
        raise UserError(f"--token-ids {path} is not a .npy file; save the ids with "
                        f"numpy.save(path, np.asarray(ids, dtype=np.int64)), or score text with --text-file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read --token-ids {path}: {e}") from None
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise UserError(f"--token-ids {path} must hold a 1-D integer array, not {arr.dtype} {list(arr.shape)}")
    return arr.astype(np.int64).tolist()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m inference.evaluate", description=__doc__,
                                formatter_class=HelpFormatter)
    add_remote_args(p)
    p.add_argument("--checkpoint", type=Path, help="run a local train- or rep-form checkpoint folder in-process (no daemon)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", type=Path, help="UTF-8 text to score (tokenized with the model's tokenizer)")
    src.add_argument("--token-ids", type=Path, help=".npy 1-D integer array of token ids to score")
    p.add_argument("--bos", action="store_true", help="prepend the model's bos_token_id")
    p.add_argument("--truncate", action="store_true", help="score only the first context-length tokens of a longer text")
    p.add_argument("--windows", action="store_true",
                   help="score a longer text in consecutive context-length windows (stride context-1, so every "
                        "token is predicted once, from at most a window of context)")
    p.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (default: 0, all)")
    p.add_argument("--logprobs-out", type=Path, help="write float32 [T-1] per-token log-probs here (.npy)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    add_verbose(p)
    return p


def main(argv: list[str] | None = None) -> int:
    def score(args: argparse.Namespace) -> int:
        print(json.dumps(run(args)))
        return 0

    return cli_main("evaluate", build_parser(), score, argv)


def run(args: argparse.Namespace) -> dict:
    from inference.backbone import check_device, load_checkpoint, resolve_dtype

    if bool(args.lut_addr) == bool(args.checkpoint):
        raise UserError("give exactly one of --lut-addr (a daemon) or --checkpoint (a local folder)")
    if args.lut_addr:
        parse_addresses(args.lut_addr)
    device = check_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    remote = None
    if args.checkpoint:
        backbone, table = load_checkpoint(args.checkpoint, device, dtype)
        source = None if table is None else InProcessTable(table, device)
    else:
        remote = connect("evaluate", args, device, dtype)
        backbone, source = remote.backbone, remote.source
    try:
        if args.text_file:
            if backbone.tokenizer is None:
                raise UserError("this model has no tokenizer.json; score --token-ids instead")
            try:
                text = args.text_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read --text-file {args.text_file}: {e}") from None
            ids = backbone.tokenizer.encode(text).ids
        else:
            ids = read_token_ids(args.token_ids)
        if args.bos and backbone.args.bos_token_id is not None:
            ids = [backbone.args.bos_token_id] + ids
        vocab, context = backbone.args.vocab_size, backbone.args.context_length
        if len(ids) < 2:
            raise UserError(f"need at least 2 tokens to score, got {len(ids)}")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the model's vocabulary 0..{vocab - 1}")
        if args.max_tokens > 0:
            ids = ids[: args.max_tokens]
        if len(ids) > context and not args.windows:
            if not args.truncate:
                raise UserError(f"{len(ids)} tokens exceed the model's context of {context}; pass --truncate "
                                f"to score the first {context}, or --windows to score all of them")
            ids = ids[:context]
        logprobs = score_windows(backbone.model, source, ids, context, progress=not args.quiet)
    finally:
        if remote is not None:
            remote.close()
    if args.logprobs_out:
        np.save(args.logprobs_out, logprobs)
    return summary(logprobs)


if __name__ == "__main__":
    sys.exit(main())
