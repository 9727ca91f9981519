"""CUDA paths, checked against the CPU (issue 18). Marked `cuda`: skipped, with the reason, where no
CUDA device exists, so `make test` on a CPU-only machine is unchanged; `make gpu-check` runs them
(`pytest -m cuda`) on a lent GPU.

What is compared, and the bound each comparison is held to:
- rows fetched into a cuda RemoteTable vs a cpu one: bit for bit, every encoding (the device only
  copies bytes and dequantises with the same float32 arithmetic);
- evaluate's log-probs, cuda vs cpu: float32 backbone <= FP32_BOUND, bfloat16 <= BF16_BOUND (different
  kernels sum in different orders; bf16 keeps 8 bits of mantissa);
- greedy generate tokens, cuda vs cpu (float32): equal;
- `ingest --device cuda` vs `--device cpu`: the experts are computed in float32 on each device, so an
  fp16/int8 value may round the other way; decoded rows are held to INGEST_BOUND of the row's absmax;
- a long decode through a small cache (many evictions, every row fetched again and again) with
  non_blocking copies from pinned staging buffers vs blocking copies: equal tokens (a reused or freed
  staging buffer read by a copy still in flight shows up here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from ckpt_factory import make_checkpoint
from conftest import REPO, start_server

from inference import evaluate
from inference.backbone import open_remote
from inference.generation import generate
from inference.sampling import SamplingConfig
from inference.lut import MiB, RemoteTable
from lutstore import cli
from lutstore.client import LutClient
from lutstore.formats.codec import decode_rows
from lutstore.storage.rocksdb import Store

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]

ENCODINGS = ("fp32", "fp16", "bf16", "int8", "nf4")
FP32_BOUND = 1e-4
BF16_BOUND = 0.25
INGEST_BOUND = 2e-3


@pytest.fixture(scope="module")
def gpu_daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    ckpt = make_checkpoint(root / "ckpt", form="train", vocab=256, layers=2, experts=4, hidden=64, heads=4, seed=3)
    db = root / "db"
    for enc in ENCODINGS:
        extra = ["--block-size", "32"] if enc == "nf4" else []
        assert cli.main(["ingest", str(ckpt), "--db", str(db), "--name", enc, "--encoding", enc,
                         "--no-progress", *extra]) == 0
    server = start_server(db)
    with pytest.MonkeyPatch.context() as env:   # this module's client cache; restored afterwards
        env.setenv("LUTSTORE_CACHE", str(root / "cache"))
        yield {"ckpt": ckpt, "db": db, "addr": server.address, "root": root}
    server.stop()


def _ids(n: int, seed: int, vocab: int = 256) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, vocab, (4, n)).astype(np.int64))


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("cache_mb", [64, 0.05])   # everything cached / constant evictions
def test_rows_on_cuda_equal_cpu_bit_for_bit(gpu_daemon, encoding, cache_mb) -> None:
    idx = _ids(32, seed=1)
    with LutClient(gpu_daemon["addr"]) as client:
        got = {}
        for device in ("cpu", "cuda"):
            table = RemoteTable(client, encoding, device=device, cache_bytes=int(cache_mb * MiB))
            try:
                table.request(idx)
                deferred = table.rows(idx)
                layers = [deferred.layer(l).cpu() for l in range(table.num_layers)]
                got[device] = (table.gather(idx).cpu(), layers)
            finally:
                table.close()
    assert torch.equal(got["cpu"][0], got["cuda"][0])
    for a, b in zip(got["cpu"][1], got["cuda"][1]):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype,bound", [("float32", FP32_BOUND), ("bfloat16", BF16_BOUND)])
def test_evaluate_logprobs_cuda_vs_cpu(gpu_daemon, tmp_path, capsys, dtype, bound) -> None:
    ids = np.random.default_rng(2).integers(0, 256, 200).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    out = {}
    for device in ("cpu", "cuda"):
        path = tmp_path / f"{device}.npy"
        assert evaluate.main(["--lut-addr", gpu_daemon["addr"], "--table", "fp16", "--token-ids",
                              str(tmp_path / "ids.npy"), "--device", device, "--dtype", dtype,
                              "--logprobs-out", str(path), "--quiet"]) == 0
        out[device] = np.load(path)
    capsys.readouterr()
    delta = float(np.abs(out["cpu"] - out["cuda"]).max())
    print(f"{dtype}: max |log p(cuda) - log p(cpu)| = {delta:.3g}")
    assert delta <= bound


def _greedy(addr: str, device: str, table: str) -> list[list[int]]:
    cmd = [sys.executable, "-m", "inference.generate", "--lut-addr", addr, "--table", table, "--device", device,
           "--max-new-tokens", "24", "--json", "--prompt", "the water of", "--prompt", "one two three"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    return [s["ids"] for s in json.loads(proc.stdout)["sequences"]]


@pytest.mark.parametrize("table", ["fp32", "int8", "nf4"])
def test_greedy_generate_cuda_equals_cpu(gpu_daemon, table) -> None:
    assert _greedy(gpu_daemon["addr"], "cuda", table) == _greedy(gpu_daemon["addr"], "cpu", table)


@pytest.mark.parametrize("encoding", ["fp16", "int8", "nf4"])
def test_ingest_on_cuda_matches_cpu(gpu_daemon, tmp_path, encoding) -> None:
    rows = {}
    for device in ("cpu", "cuda"):
        db = tmp_path / device
        extra = ["--block-size", "32"] if encoding == "nf4" else []
        assert cli.main(["ingest", str(gpu_daemon["ckpt"]), "--db", str(db), "--name", "t", "--encoding", encoding,
                         "--device", device, "--no-progress", *extra]) == 0
        with Store.open(db, "secondary") as store:
            meta = store.resolve("t")
            values = store.get_values(meta, list(range(meta.vocab_size)))
            rows[device] = (decode_rows(meta.row_format(), values), values)
    a, b = rows["cpu"][0], rows["cuda"][0]
    scale = np.abs(a).reshape(len(a), -1).max(axis=1).reshape(-1, *([1] * (a.ndim - 1)))
    rel = float((np.abs(a - b) / np.maximum(scale, 1e-12)).max())
    same = sum(x == y for x, y in zip(rows["cpu"][1], rows["cuda"][1]))
    print(f"{encoding}: {same}/{len(a)} rows byte-identical, max |cuda - cpu| / row absmax = {rel:.3g}")
    assert rel <= INGEST_BOUND


def _long_decode(addr: str, non_blocking: bool) -> list[list[int]]:
    """Greedy decode of a batch of 8 for 96 tokens through a cache of 12 rows: most steps evict."""
    remote = open_remote(addr, "fp16", device="cuda", cache_mb=0.012)   # 12 rows of 1 KiB
    try:
        remote.source.non_blocking_copies = non_blocking
        prompts = [list(_ids(6, seed=s)[0].tolist()) for s in range(8)]
        result = generate(remote.backbone.model, remote.source, prompts, 96, SamplingConfig(0.0, 0, 1.0), 0,
                          None, prefill_chunk=4)
        assert remote.source.stats().misses > 200   # the cache really was too small
        return result.tokens
    finally:
        remote.close()


def test_non_blocking_copies_through_evictions_equal_blocking(gpu_daemon) -> None:
    assert _long_decode(gpu_daemon["addr"], True) == _long_decode(gpu_daemon["addr"], False)
