"""benchmarks/bench_vllm.py at toy size (its speeds are never judged here): vLLM + lutstore and
inference.serve start on the benchmark's own checkpoint and daemon, every load runs through the
HTTP client, every request runs to max_tokens, and the result file says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_vllm
from testing.daemon import REPO
from testing.vllm_server import vllm_python


def test_bad_flags_are_one_line(capsys) -> None:
    for argv, says in ((["--dtypes", "fp8"], "--dtypes takes fp32, bf16"),
                       (["--concurrency", "1,2", "--requests-per-stream", "1"], "one number >= 1 per --concurrency"),
                       (["--only", "vllm-lutstore-fp64"], "--only takes setups of"),
                       (["--prompt-len", "200", "--max-tokens", "100"], "exceeds --context 256"),
                       (["--markdown", str(REPO / "README.md")], "is not a bench_vllm result file")):
        assert bench_vllm.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("bench_vllm: error: ") and says in err[0], err


# make test sets LUTSTORE_REQUIRE_VLLM=1: there a missing .venv-vllm fails the test instead of skipping it
REQUIRED = os.environ.get("LUTSTORE_REQUIRE_VLLM") == "1"


@pytest.mark.skipif(vllm_python() is None and not REQUIRED, reason="no vLLM environment (make install-vllm)")
def test_bench_vllm_runs_end_to_end(tmp_path: Path) -> None:
    assert vllm_python() is not None, "LUTSTORE_REQUIRE_VLLM=1 but no .venv-vllm: run `make install-vllm`"
    env = dict(os.environ, LUTSTORE_BENCH_RESULTS=str(tmp_path / "results"))
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_vllm", "--toy", "--only", "vllm-lutstore-fp32,serve-fp32",
                        "--concurrency", "1,2", "--requests-per-stream", "2,1", "--prompt-len", "8", "--max-tokens", "6",
                        "--fill-streams", "2", "--fill-requests", "2", "--name", "smoke", "--work-dir", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "smoke.json").read_text())
    assert set(result["results"]) == {"vllm-lutstore-fp32", "serve-fp32"}
    for name, setup in result["results"].items():
        for phase in ("cold", "steady"):
            assert set(setup[phase]) == {"1", "2"}, (name, phase)
            for streams, load in setup[phase].items():
                want = {"1": 2, "2": 2}[streams]
                assert (load["requests"], load["errors"]) == (want, 0), (name, phase, load)
                assert load["tokens"] == 6 * want and load["tok_s"] > 0, (name, phase, load)
    assert result["figures"] and not result["targets"]      # no in-memory setup ran: no lutstore/memory ratio
    assert (tmp_path / "results" / "smoke.png").stat().st_size > 0
    # the README's tables come from the result file
    md = subprocess.run([sys.executable, "-m", "benchmarks.bench_vllm", "--markdown", str(tmp_path / "results" / "smoke.json")],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert md.returncode == 0, md.stderr
    assert "| 2 | " in md.stdout and "serve / vLLM+lutstore fp32" in md.stdout, md.stdout
