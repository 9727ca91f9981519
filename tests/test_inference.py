"""The inference client against a real `lutstore serve` daemon on loopback.

Tables are ingested from small official-format checkpoints (tests/ckpt_factory.py);
the reference is the train form of inference/model.py computing its experts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_factory import make_checkpoint, reference_lut
from conftest import REPO, start_server

from inference import evaluate, generate, generation
from inference.backbone import ensure_backbone, load_checkpoint, open_remote, pick_table
from inference.sampling import SamplingConfig
from inference.lut import InProcessTable, RemoteTable
from lutstore import cli
from lutstore.client import LutClient
from lutstore.errors import UserError

INT8_BOUND = 2e-2   # measured: max |delta log-prob| 7.4e-3 here, <= 8.1e-3 over 8 sequences of 256 tokens
# nf4, block 32 (hidden_size is 32 here): measured max |delta log-prob| vs the fp32 table 0.15 over 8 sequences of
# 256 tokens (blocks of 16: 0.156, of 8: 0.137); these random-weight test models have no structure a 4-bit code
# book fits better than noise (the demo model's held-out perplexity moves far less, see demo/run_demo.py)
NF4_BOUND = 0.3


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One DB with the same train-form model as fp32/fp16/int8/nf4 tables, plus a different model."""
    root = tmp_path_factory.mktemp("inference")
    ckpt = make_checkpoint(root / "ckpt", form="train", vocab=128, layers=2, experts=4, hidden=32, heads=4, seed=7)
    other = make_checkpoint(root / "other", form="train", vocab=128, layers=2, experts=4, hidden=32, heads=4, seed=8)
    db = root / "db"
    for name, enc, src in (("m32", "fp32", ckpt), ("m16", "fp16", ckpt), ("m8", "int8", ckpt),
                           ("m4", "nf4 --block-size 32", ckpt), ("other", "fp32", other)):
        assert cli.main(["ingest", str(src), "--db", str(db), "--name", name, "--encoding", *enc.split(),
                         "--no-progress"]) == 0
    server = start_server(db)
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as env:   # this module's client cache; restored afterwards
        env.setenv("LUTSTORE_CACHE", str(cache))
        yield {"ckpt": ckpt, "other": other, "addr": server.address, "cache": cache, "root": root}
    server.stop()


def _ids(n: int, seed: int = 0, vocab: int = 128) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.int64)


def _train_logprobs(ckpt: Path, ids: np.ndarray) -> np.ndarray:
    backbone, table = load_checkpoint(ckpt)
    assert table is None and backbone.model.form == "train"
    return evaluate.token_logprobs(backbone.model, None, ids.tolist())


def _evaluate(capsys, *argv: str) -> dict:
    assert evaluate.main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("table,tol", [("m32", 1e-4), ("m16", 2e-3), ("m8", INT8_BOUND), ("m4", NF4_BOUND)])
def test_evaluate_through_daemon_matches_train_form(daemon, tmp_path, capsys, table, tol) -> None:
    ids = _ids(200, seed=1)
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "lp.npy"
    result = _evaluate(capsys, "--lut-addr", daemon["addr"], "--table", table, "--token-ids", str(tmp_path / "ids.npy"),
                       "--logprobs-out", str(out))
    got = np.load(out)
    want = _train_logprobs(daemon["ckpt"], ids)
    assert got.dtype == np.float32 and got.shape == (199,)
    delta = np.abs(got - want).max()
    print(f"{table}: max |delta log p| = {delta:.3g}")
    assert delta <= tol, f"{table}: max |delta log p| = {delta:.3g} > {tol}"
    assert result["tokens"] == 200
    assert result["nll"] == pytest.approx(float(-got.astype(np.float64).mean()), rel=1e-6)
    assert result["ppl"] == pytest.approx(np.exp(result["nll"]), rel=1e-9)


def test_evaluate_checkpoint_forms_in_process(daemon, tmp_path, capsys) -> None:
    """--checkpoint runs train form (experts computed) and rep form (moe_table as the LUT)."""
    rep = make_checkpoint(tmp_path / "rep", form="rep", vocab=128, layers=2, experts=4, hidden=32, heads=4, seed=7,
                          dtype=torch.float32)
    ids = _ids(100, seed=2)
    np.save(tmp_path / "ids.npy", ids)
    for ckpt in (daemon["ckpt"], rep):
        _evaluate(capsys, "--checkpoint", str(ckpt), "--token-ids", str(tmp_path / "ids.npy"),
                  "--logprobs-out", str(tmp_path / f"{ckpt.name}.npy"))
    train, rep_lp = np.load(tmp_path / "ckpt.npy"), np.load(tmp_path / "rep.npy")
    assert np.abs(train - _train_logprobs(daemon["ckpt"], ids)).max() == 0
    assert np.abs(train - rep_lp).max() < 1e-4


def test_text_file_and_truncation(daemon, tmp_path, capsys) -> None:
    text = tmp_path / "t.txt"
    text.write_text("the water of the day " * 60)   # 300 tokens > context of 256
    assert evaluate.main(["--lut-addr", daemon["addr"], "--table", "m32", "--text-file", str(text)]) == 2
    assert "context of 256" in capsys.readouterr().err
    result = _evaluate(capsys, "--lut-addr", daemon["addr"], "--table", "m32", "--text-file", str(text), "--truncate")
    assert result["tokens"] == 256 and np.isfinite(result["ppl"])


def test_greedy_generate_through_daemon_equals_in_process_table(daemon) -> None:
    prompts = ["the water of", "one two three four five six"]
    cmd = [sys.executable, "-m", "inference.generate", "--lut-addr", daemon["addr"], "--table", "m32",
           "--max-new-tokens", "12", "--json"]
    for p in prompts:
        cmd += ["--prompt", p]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, LUTSTORE_CACHE=str(daemon["cache"])))
    assert proc.returncode == 0, proc.stderr
    remote = json.loads(proc.stdout)
    assert "row cache hit rate" in proc.stderr and "TTFT" in proc.stderr

    backbone, _ = load_checkpoint(daemon["ckpt"])
    lut_model, _ = load_checkpoint_lut(daemon["ckpt"])
    table = InProcessTable(torch.from_numpy(reference_lut(daemon["ckpt"])).float())
    for seq in remote["sequences"]:
        want = generation.generate(lut_model, table, [seq["prompt_ids"]], 12, eos_id=backbone.args.eos_token_id)
        assert seq["ids"] == want.tokens[0]
        trained = generation.generate(backbone.model, None, [seq["prompt_ids"]], 12, eos_id=backbone.args.eos_token_id)
        assert seq["ids"] == trained.tokens[0]
    assert len(remote["sequences"]) == 2 and all(len(s["ids"]) > 0 for s in remote["sequences"])


def load_checkpoint_lut(ckpt: Path):
    """The checkpoint's backbone as a lut-form model (experts dropped by name)."""
    from inference.model import Transformer
    from lutstore.ingest.checkpoint import Checkpoint

    backbone, _ = load_checkpoint(ckpt)
    model = Transformer(backbone.args, "lut").eval()
    with Checkpoint.open(ckpt) as c:
        model.load_official_state_dict({n: c.tensor(n).float() for n in c.names()})
    return model, backbone


def test_batched_sampling_is_per_sequence_and_seeded(daemon) -> None:
    remote = open_remote(daemon["addr"], "m16", cache_mb=1)
    try:
        model, source = remote.backbone.model, remote.source
        prompts = [[5, 6, 7], [9], [5, 6, 7]]
        greedy = generation.generate(model, source, prompts, 8)
        for p, toks in zip(prompts, greedy.tokens):     # left padding changes nothing for a sequence
            assert generation.generate(model, source, [p], 8).tokens[0] == toks
        cfg = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9)
        a = generation.generate(model, source, prompts, 8, cfg, seed=3).tokens
        b = generation.generate(model, source, prompts, 8, cfg, seed=3).tokens
        assert a == b and all(0 <= t < 128 for seq in a for t in seq)
    finally:
        remote.close()


def test_row_cache_budget_and_hit_rate(daemon) -> None:
    with LutClient(daemon["addr"]) as client:
        info = client.info("m16")
        row_device_bytes = info.num_layers * info.num_experts * info.hidden_size * 2   # fp16 rows stay fp16
        stored = info.row_bytes + 4
        source = RemoteTable(client, "m16", cache_bytes=3 * row_device_bytes + 100)
        assert source.capacity == 3
        want_rows = torch.from_numpy(client.get_rows("m16", list(range(128)))).half()

        def step(ids: list[int]) -> torch.Tensor:
            source.request(ids)
            idx = torch.tensor([ids])
            rows = source.rows(idx).all()
            assert torch.equal(rows[0], want_rows[ids])          # the right rows, in order, duplicates too
            return rows

        step([1, 2, 1])      # 2 misses (1 deduplicated)
        step([1, 2])         # 2 hits
        step([3])            # miss; cache {1, 2, 3} full
        step([4])            # miss; evicts 1 (least recent)
        step([2])            # hit
        step([1])            # miss again; evicts 3
        step([3])            # miss; evicts 4
        s = source.stats()
        assert (s.hits, s.misses) == (3, 6) and s.hit_rate == pytest.approx(3 / 9)
        assert s.bytes_fetched == 6 * stored
        assert s.cache_bytes <= s.cache_budget and s.cache_bytes == 3 * row_device_bytes

        # a batch wider than the cache is served whole and still correct
        wide = list(range(10, 20))
        rows = source.rows(torch.tensor([wide])).all()
        assert torch.equal(rows[0], want_rows[wide])
        assert source.stats().cache_bytes <= s.cache_budget
        source.close()


def test_int8_rows_decoded_on_fetch(daemon) -> None:
    with LutClient(daemon["addr"]) as client:
        source = RemoteTable(client, "m8", cache_bytes=1 << 20)
        ids = [0, 127, 64]
        got = source.rows(torch.tensor([ids])).all()[0]
        assert torch.equal(got, torch.from_numpy(client.get_rows("m8", ids)))
        source.close()


def test_backbone_cache_and_fingerprint_refusal(daemon, capsys) -> None:
    with LutClient(daemon["addr"]) as client:
        info, other = pick_table(client, "m32"), pick_table(client, "other")
        folder = ensure_backbone(client, info)
        assert folder.name == info.fingerprint
        mtime = (folder / "backbone.safetensors").stat().st_mtime_ns
        assert ensure_backbone(client, info) == folder                         # reused, not fetched again
        assert (folder / "backbone.safetensors").stat().st_mtime_ns == mtime
        (folder / "config.json").write_text("{}")                               # damaged: fetched again
        assert json.loads((ensure_backbone(client, info) / "config.json").read_text())["num_experts"] == 4
        other_folder = ensure_backbone(client, other)
    rc = generate.main(["--lut-addr", daemon["addr"], "--table", "m32", "--backbone", str(other_folder),
                        "--prompt", "the", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "refusing" in err and "Traceback" not in err


def test_user_errors_are_one_line(daemon, capsys) -> None:
    cases = [
        (["--lut-addr", daemon["addr"], "--prompt", "the"], "choose one with --table"),
        (["--lut-addr", daemon["addr"], "--table", "nope", "--prompt", "the"], "tables: m16, m32, m4, m8, other"),
        (["--lut-addr", "127.0.0.1:1", "--retry-seconds", "0.5", "--prompt", "the"], "127.0.0.1:1"),
        (["--lut-addr", daemon["addr"], "--table", "m32", "--prompt", "the " * 250, "--max-new-tokens", "10"],
         "context of 256"),
        (["--lut-addr", daemon["addr"], "--table", "m32", "--version", str(2**40), "--prompt", "the"],
         "version must be an integer in 0..2^32-1"),
        (["--lut-addr", daemon["addr"], "--table", "m32", "--version", "-3", "--prompt", "the"],
         "version must be an integer in 0..2^32-1"),
    ]
    for argv, needle in cases:
        assert generate.main(argv) == 2
        err = capsys.readouterr().err.strip()
        # An unreachable daemon is announced first ("connecting to ... (retrying for N s)"); the error is one line.
        lines = [line for line in err.splitlines() if not line.startswith("generate: connecting to ")]
        assert needle in err and len(lines) == 1, err
    assert "retry budget" in _last_err(capsys, ["--lut-addr", "127.0.0.1:1", "--retry-seconds", "0.5", "--prompt", "a"])
    # --truncate keeps the prompt's last tokens instead
    assert generate.main(["--lut-addr", daemon["addr"], "--table", "m32", "--prompt", "the " * 300,
                          "--max-new-tokens", "4", "--truncate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["sequences"][0]["prompt_ids"]) == 252


def _last_err(capsys, argv: list[str]) -> str:
    assert generate.main(argv) == 2
    return capsys.readouterr().err


def test_open_remote_rejects_unknown_table(daemon) -> None:
    with pytest.raises(UserError, match="no table 'x'"):
        open_remote(daemon["addr"], "x")


# ---- chunked prefill -------------------------------------------------------------------------

class RecordingTable(InProcessTable):
    """The in-process table, noting each request and each forward's rows call in order."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__(table)
        self.events: list[tuple[str, list[int]]] = []

    def request(self, ids) -> None:
        self.events.append(("request", sorted(set(torch.as_tensor(ids).reshape(-1).tolist()))))

    def rows(self, idx: torch.Tensor):
        self.events.append(("rows", sorted(set(idx.reshape(-1).tolist()))))
        return super().rows(idx)


def _prefill_logits(model, source, prompts: list[list[int]], chunk: int) -> torch.Tensor:
    idx, key_mask = generation.left_pad(prompts, max(len(p) for p in prompts) + 4)
    model.setup_caches(len(prompts), key_mask.shape[1])
    return generation.prefill(model, source, idx, key_mask, chunk)


def test_chunk_bounds() -> None:
    assert generation.chunk_bounds(10, 0) == [(0, 10)]
    assert generation.chunk_bounds(10, 10) == generation.chunk_bounds(10, 64) == [(0, 10)]
    assert generation.chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert generation.chunk_bounds(8, 4) == [(0, 4), (4, 8)]
    with pytest.raises(ValueError, match=">= 0"):
        generation.chunk_bounds(10, -1)


def test_chunked_prefill_matches_one_forward(daemon) -> None:
    """Logits after a chunked prefill equal one forward's, for an in-process and a served table,
    one prompt and a left-padded batch, chunks that do and do not divide the prompt; then the
    greedy tokens of generate agree too (so the KV cache the chunks wrote is the same)."""
    model, _ = load_checkpoint_lut(daemon["ckpt"])
    table = InProcessTable(torch.from_numpy(reference_lut(daemon["ckpt"])).float())
    single = [_ids(150, seed=11).tolist()]
    padded = [_ids(150, seed=12).tolist(), _ids(61, seed=13).tolist(), [5]]
    with LutClient(daemon["addr"]) as client:
        # room for 40 rows (of 1 KiB): small chunks evict each other's rows, big ones exceed the cache
        remote = RemoteTable(client, "m32", cache_bytes=40 * 2 * 4 * 32 * 4)
        assert remote.capacity == 40
        try:
            for source in (table, remote):
                for prompts in (single, padded):
                    whole = _prefill_logits(model, source, prompts, 0)
                    assert whole.shape == (len(prompts), 128)
                    for chunk in (64, 50, 7, 150):
                        got = _prefill_logits(model, source, prompts, chunk)
                        delta = (got - whole).abs().max().item()
                        assert delta < 1e-4, f"{type(source).__name__} chunk {chunk}: max |delta logit| {delta:.3g}"
                    want = generation.generate(model, source, prompts, 6, prefill_chunk=0).tokens
                    assert generation.generate(model, source, prompts, 6, prefill_chunk=32).tokens == want
            # the served table and the in-process one give the same logits, chunked
            delta = (_prefill_logits(model, remote, padded, 32) - _prefill_logits(model, table, padded, 0)).abs().max()
            assert delta.item() < 1e-4
        finally:
            remote.close()


def test_chunked_prefill_announces_every_chunk_first(daemon) -> None:
    """Every chunk's ids are requested, in chunk order, before the first forward asks for rows;
    then each forward asks for its own chunk's rows only."""
    model, _ = load_checkpoint_lut(daemon["ckpt"])
    source = RecordingTable(torch.from_numpy(reference_lut(daemon["ckpt"])).float())
    prompts = [_ids(70, seed=21).tolist(), _ids(40, seed=22).tolist()]
    idx, _ = generation.left_pad(prompts, 80)
    result = generation.generate(model, source, prompts, 1, prefill_chunk=32)
    assert len(result.tokens[0]) == 1
    chunks = [sorted(set(idx[:, s:e].reshape(-1).tolist())) for s, e in ((0, 32), (32, 64), (64, 70))]
    assert source.events[:3] == [("request", c) for c in chunks]
    assert source.events[3:6] == [("rows", c) for c in chunks]


def test_generate_cli_prefill_chunk(daemon, capsys) -> None:
    base = ["--lut-addr", daemon["addr"], "--table", "m16", "--prompt", "the water of the day " * 8,
            "--max-new-tokens", "5", "--json"]
    outs = []
    for chunk in ("0", "7"):
        assert generate.main(base + ["--prefill-chunk", chunk]) == 0
        outs.append(json.loads(capsys.readouterr().out)["sequences"][0])
    assert outs[0]["ids"] == outs[1]["ids"] and len(outs[0]["prompt_ids"]) == 40
    assert generate.main(base + ["--prefill-chunk", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--prefill-chunk must be >= 0" in err and len(err.splitlines()) == 1


def test_nf4_logprobs_within_the_measured_bound_of_the_fp32_table(daemon) -> None:
    """The in-process nf4 table (packed, dequantised per layer) against the fp32 table, same backbone,
    8 sequences of 256 tokens: the largest next-token log-prob difference stays within NF4_BOUND."""
    from inference.lut import PackedTable

    remote = open_remote(daemon["addr"], "m32")
    try:
        with LutClient(daemon["addr"]) as client:
            fp32, q4 = InProcessTable.from_client(client, "m32"), InProcessTable.from_client(client, "m4")
        assert isinstance(q4, PackedTable) and q4.table.dtype == torch.uint8
        worst = 0.0
        for seq in range(8):
            ids = _ids(256, seed=100 + seq).tolist()
            want = evaluate.token_logprobs(remote.backbone.model, fp32, ids)
            got = evaluate.token_logprobs(remote.backbone.model, q4, ids)
            worst = max(worst, float(np.abs(got - want).max()))
    finally:
        remote.close()
    print(f"nf4 vs fp32 table: max |delta log p| = {worst:.3g}")
    assert 0 < worst <= NF4_BOUND


@pytest.mark.parametrize("fingerprint", ["VICTIM", "../victim", ""])
def test_backbone_cache_refuses_a_fingerprint_that_is_not_a_digest(tmp_path, fingerprint) -> None:
    """The fingerprint comes from the daemon and names the cache folder that a failed check deletes:
    a daemon answering a path must not get a folder outside the cache removed."""
    from lutstore.v1 import lutstore_pb2 as pb
    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    cache = tmp_path / "cache"
    fingerprint = str(victim) if fingerprint == "VICTIM" else fingerprint
    info = pb.TableInfo(name="m", version=1, fingerprint=fingerprint,
                        artifacts=[pb.ArtifactInfo(name="config.json", size=2, sha256="0" * 64)])
    with pytest.raises(UserError, match="not a sha256 digest"):
        ensure_backbone(None, info, cache_dir=cache)
    assert (victim / "keep").is_dir()


def test_generate_into_a_closed_pipe_stops_quietly(daemon) -> None:
    """`generate ... | head -c 10` ended in a BrokenPipeError traceback once head had left."""
    cmd = [sys.executable, "-m", "inference.generate", "--lut-addr", daemon["addr"], "--table", "m32",
           "--max-new-tokens", "20", "--prompt", "the water of"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, LUTSTORE_CACHE=str(daemon["cache"])))
    proc.stdout.close()               # the reader leaves before the first token
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err, err
