"""tie_word_embeddings=true: lm_head is the embedding, as in the official MoLE code (transformers 4.38.2
ties lm_head.weight to model.embed_tokens.weight, and save_pretrained then writes the tensor once).

tests/golden/tied_logits.npz holds the logits the official implementation computed, at recording, for
the checkpoint `tied_checkpoint` makes (the factory's train form without lm_head.weight, config
tie_word_embeddings=true), on two 16-token sequences. The checkpoint runs in process (inference.model),
in transformers (hf_mole) and through a daemon (lutstore ingest, fp32 rows): all three give those logits.
A checkpoint that holds an lm_head.weight unlike its embedding contradicts its config (the official
loader would overwrite the embedding with it; transformers 5 would untie them): refused.
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
from inference.model import ModelArgs
from lutstore import cli
from lutstore.errors import UserError

BOUND = 5e-5      # logits reach 48 here (the embedding as lm_head): fp32 reorderings, measured <= 1.2e-5
SHAPE = dict(vocab=128, layers=2, experts=4, hidden=64, intermediate=64, heads=2)
pytestmark = pytest.mark.usefixtures("single_threaded_torch")   # recorded numbers: one reduction order


def tied_checkpoint(dest: Path, keep_head: bool = False) -> Path:
    ckpt = make_checkpoint(dest, form="train", seed=9, **SHAPE)
    tensors = load_file(ckpt / "model.safetensors")
    if not keep_head:
        del tensors["lm_head.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    update_config(ckpt, tie_word_embeddings=True)
    return ckpt


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return load_golden("tied_logits")


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    return tied_checkpoint(tmp_path_factory.mktemp("tied") / "tied")


def test_reference_ties_lm_head_to_the_embedding(tied, golden) -> None:
    backbone, table = load_checkpoint(tied)
    model = backbone.model
    assert table is None and model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        logits = model(torch.from_numpy(golden["tokens"]))
    np.testing.assert_allclose(logits.numpy(), golden["tied"], rtol=0, atol=BOUND)
    assert ModelArgs.from_config(backbone.args.to_config()).tie_word_embeddings is True


def test_hf_ties_lm_head_to_the_embedding(tied, golden) -> None:
    from inference.engines.hf_mole import MoleForCausalLM

    model = MoleForCausalLM.from_pretrained(str(tied), dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(golden["tokens"])).logits
    np.testing.assert_allclose(logits.numpy(), golden["tied"], rtol=0, atol=BOUND)


def test_ingested_and_served(tied, golden, tmp_path, monkeypatch) -> None:
    db = tmp_path / "db"
    assert cli.main(["ingest", str(tied), "--db", str(db), "--name", "tied", "--encoding", "fp32", "--no-progress"]) == 0
    monkeypatch.setenv("LUTSTORE_CACHE", str(tmp_path / "cache"))
    server = start_server(db)
    try:
        remote = open_remote(server.address, "tied")
        try:
            ids = torch.from_numpy(golden["tokens"])
            with torch.no_grad():
                logits = remote.backbone.model(ids, lut_rows=remote.source.rows(ids))
        finally:
            remote.close()
    finally:
        server.stop()
    np.testing.assert_allclose(logits.numpy(), golden["tied"], rtol=0, atol=BOUND)


def test_an_lm_head_equal_to_the_embedding_is_accepted(tmp_path, golden) -> None:
    ckpt = tied_checkpoint(tmp_path / "both")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    backbone, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        logits = backbone.model(torch.from_numpy(golden["tokens"]))
    np.testing.assert_allclose(logits.numpy(), golden["tied"], rtol=0, atol=BOUND)


def test_an_lm_head_unlike_the_embedding_is_refused(tmp_path) -> None:
    from inference.engines.hf_mole import MoleForCausalLM

    ckpt = tied_checkpoint(tmp_path / "contradicts", keep_head=True)
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_checkpoint(ckpt)
    with pytest.raises(UserError, match="lm_head.weight differs from model.embed_tokens.weight"):
        MoleForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
