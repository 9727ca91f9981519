"""Logits of tiny MoLE checkpoints against recorded reference numbers (tests/golden/mole_logits.npz).

The numbers are inference.model's logits for three checkpoints made here with
ckpt_factory, on two 16-token sequences (the second repeats tokens):
  - train: the train form, fp32 (experts computed);
  - rep:   the rep form as the official reparameterisation script writes it (every tensor fp16,
           the table [V, L*N*D] layer-major), run in fp32 as the official loader does;
  - gqa:   a train form with 4 query heads sharing 2 key/value heads.
When recorded they were equal to the official MoLE implementation's (transformers 4.38.2,
SDPA attention; eager attention within 2e-6), so a change in any formula (norms, rotary,
attention, GELU, router, the table's layout) breaks these tests: a wrong RMSNorm epsilon
alone moves the logits by 2.5e-5, the tanh GELU by 7e-4, the others by more than 0.3.

Each checkpoint runs in process (load_checkpoint) and through a real daemon (lutstore
ingest, fp32 rows, open_remote), the path a client takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_factory import load_golden, make_checkpoint, update_config
from conftest import start_server
from safetensors.torch import load_file, save_file

from inference.backbone import load_checkpoint, open_remote
from lutstore import cli

# CPU kernels reorder fp32 sums (SDPA vs eager, batch sizes): measured <= 2e-6 here
BOUND = 1e-5
SHAPE = dict(vocab=128, layers=2, experts=4, hidden=64, intermediate=64)
pytestmark = pytest.mark.usefixtures("single_threaded_torch")   # recorded numbers: one reduction order


def _gqa_checkpoint(dest: Path) -> Path:
    """4 query heads, 2 key/value heads: the factory's train form with narrower k/v projections."""
    ckpt = make_checkpoint(dest, form="train", heads=4, seed=3, **SHAPE)
    tensors = load_file(ckpt / "model.safetensors")
    gen = torch.Generator().manual_seed(7)
    for name in sorted(tensors):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            tensors[name] = torch.randn(2 * 16, 64, generator=gen) / 8
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    update_config(ckpt, num_key_value_heads=2)
    return ckpt


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return load_golden("mole_logits")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    return {
        "train": make_checkpoint(root / "train", form="train", heads=2, **SHAPE),
        "rep": make_checkpoint(root / "rep", form="rep", heads=2, **SHAPE),   # fp16 throughout
        "gqa": _gqa_checkpoint(root / "gqa"),
    }


@pytest.fixture(scope="module")
def daemon(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity-db")
    for name, ckpt in checkpoints.items():
        assert cli.main(["ingest", str(ckpt), "--db", str(root / "db"), "--name", name, "--encoding", "fp32",
                         "--no-progress"]) == 0
    server = start_server(root / "db")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LUTSTORE_CACHE", str(root / "cache"))
        yield server.address
    server.stop()


@pytest.mark.parametrize("name", ["train", "rep", "gqa"])
def test_in_process_logits_equal_the_reference(name, checkpoints, golden) -> None:
    backbone, table = load_checkpoint(checkpoints[name])
    ids = torch.from_numpy(golden["tokens"])
    with torch.no_grad():
        logits = backbone.model(ids) if table is None else backbone.model(ids, lut_rows=table[ids])
    assert backbone.model.form == ("train" if name != "rep" else "lut")
    np.testing.assert_allclose(logits.numpy(), golden[name], rtol=0, atol=BOUND)


@pytest.mark.parametrize("name", ["train", "rep", "gqa"])
def test_served_rows_give_the_reference_logits(name, daemon, golden) -> None:
    remote = open_remote(daemon, name)
    try:
        ids = torch.from_numpy(golden["tokens"])
        with torch.no_grad():
            logits = remote.backbone.model(ids, lut_rows=remote.source.rows(ids))
    finally:
        remote.close()
    np.testing.assert_allclose(logits.numpy(), golden[name], rtol=0, atol=BOUND)
