"""bench_decode's set-up pieces (never its speeds): the nf4 ceilings it compares with, against a
real `lutstore serve`; the fixed-step defaults read from a GPU's step-time file; --device cuda
refused in one line where there is no GPU."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO, write_table
from inference.lut import PackedTable
from lutstore.client import LutClient
from lutstore.formats.codec import Encoding, RowFormat
from lutstore.errors import UserError

sys.path.insert(0, str(REPO))
from benchmarks import bench_decode  # noqa: E402


def test_nf4_run_compares_with_the_fp16_and_the_nf4_table(db_path, serve) -> None:
    fmt = RowFormat(3, 2, 16, Encoding.NF4, block_size=8)
    write_table(db_path, "q", fmt, vocab_size=24)
    server = serve(db_path)
    args = SimpleNamespace(encoding="nf4", device=torch.device("cpu"))
    with LutClient(server.address) as client:
        fp16, packed = bench_decode.ceilings(client, "q", args)
        want = torch.from_numpy(client.get_rows("q", list(range(24))))
    assert fp16.table.dtype == torch.float16 and isinstance(packed, PackedTable)
    idx = torch.tensor([[5, 23, 0]])
    # the same model's rows both ways: the fp16 ceiling holds the nf4 values, rounded to fp16
    np.testing.assert_allclose(fp16.gather(idx).float().numpy(), want[idx].numpy(), rtol=1e-3, atol=1e-3)
    assert torch.equal(packed.gather(idx), want[idx])
    assert "inprocess_nf4" in bench_decode.cases_for("off", "nf4")
    assert "inprocess_nf4" not in bench_decode.cases_for("off", "fp16")


def test_fixed_step_defaults_come_from_the_gpu_step_file(tmp_path) -> None:
    missing = tmp_path / "gpu_step_times.json"
    assert bench_decode.step_time_defaults(missing) == ((2.0, 4.0), 25.0, None)
    missing.write_text(json.dumps({"step_ms_b1": 1.5, "step_ms_b32": 3.0, "prefill_ms_2048": 18, "card": "H200"}))
    assert bench_decode.step_time_defaults(missing) == ((1.5, 3.0), 18.0, "H200")
    missing.write_text(json.dumps({"step_ms_b1": 1.5}))
    with pytest.raises(UserError, match="unreadable GPU step times"):
        bench_decode.step_time_defaults(missing)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_one_line(capsys) -> None:
    assert bench_decode.main(["--model", "160m", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU" in err
