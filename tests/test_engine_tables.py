"""inference.engines.tables: a checkpoint's table in memory, and the backbone check against a served table."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpt_factory import make_checkpoint, reference_lut
from inference.backbone import BackboneMismatch
from inference.engines.tables import backbone_matches_table, is_table_only, table_from_checkpoint
from inference.lut import InProcessTable
from lutstore.client import LutClient
from lutstore.ingest import ingest_checkpoint


@pytest.mark.parametrize("form", ["train", "rep"])
def test_table_from_checkpoint_equals_the_reference_in_small_chunks(tmp_path: Path, form: str, monkeypatch) -> None:
    import inference.engines.tables as tables

    ckpt = make_checkpoint(tmp_path / form, form=form, vocab=50)
    monkeypatch.setattr(tables, "CHUNK_BYTES", 4 * 2 * 4 * 32 * 7)   # 7 rows a chunk: the last chunk is partial
    table = table_from_checkpoint(ckpt, "cpu", torch.float32)
    assert table.shape == (50, 2, 4, 32) and table.dtype == torch.float32
    np.testing.assert_allclose(table.numpy(), reference_lut(ckpt), rtol=0, atol=2e-6)
    assert table_from_checkpoint(ckpt, "cpu", torch.bfloat16).dtype == torch.bfloat16


def test_table_only_names() -> None:
    assert is_table_only("model.moe_table.weight")
    assert is_table_only("model.layers.3.experts.12.up_proj.weight")
    assert is_table_only("model.layers.0.expert_layernorm.weight")
    assert not is_table_only("model.layers.0.mlp.up_proj.weight")
    assert not is_table_only("model.layers.0.router.weight")


def test_backbone_check_against_a_served_table(tmp_path: Path, serve) -> None:
    ckpt = make_checkpoint(tmp_path / "m", form="train", vocab=40)
    ingest_checkpoint(ckpt, tmp_path / "db", name="m", progress=False)
    server = serve(tmp_path / "db")
    with LutClient(server.address) as client:
        info = client.info("m")
        backbone_matches_table(ckpt, client, info, cache_dir=tmp_path / "cache")       # the same model: fine
        rep = make_checkpoint(tmp_path / "rep", form="rep", vocab=40, dtype=torch.float32)
        backbone_matches_table(rep, client, info, cache_dir=tmp_path / "cache")        # its rep form: same backbone
        other = make_checkpoint(tmp_path / "other", form="train", vocab=40, seed=1)
        with pytest.raises(BackboneMismatch) as e:
            backbone_matches_table(other, client, info, cache_dir=tmp_path / "cache")
        line = str(e.value)
        assert "\n" not in line and str(other) in line and "'m' v1" in line and info.fingerprint[:16] in line
        assert "differs" in line
        # the served table's rows are the checkpoint's table
        served = InProcessTable.from_client(client, "m").table
    np.testing.assert_allclose(served.numpy(), table_from_checkpoint(ckpt).numpy(), rtol=0, atol=1e-3)


def test_folder_command_refuses_in_one_line(tmp_path: Path, serve) -> None:
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "inference.engines.folder", *args], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "LUTSTORE_CACHE": str(tmp_path / "cache")})

    assert run("--help").returncode == 0
    ckpt = make_checkpoint(tmp_path / "m", form="train", vocab=40)
    ingest_checkpoint(ckpt, tmp_path / "db", name="m", progress=False)
    server = serve(tmp_path / "db")
    wrong = run("--lut-addr", server.address, "--table", "nope")
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert wrong.stderr.strip().splitlines()[-1] == (f"python -m inference.engines.folder: error: no table 'nope' at "
                                                     f"{server.address}; tables: m")
    done = run("--lut-addr", server.address)
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip())
    assert folder.parent == tmp_path / "cache" / "models" and (folder / "model.safetensors").is_file()
    with LutClient(server.address) as client:
        backbone_matches_table(folder, client, client.info("m"), cache_dir=tmp_path / "cache")   # a backbone-only folder
