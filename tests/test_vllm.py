"""MoLE in vLLM (inference.engines): the plugin in a real vLLM (CPU build, .venv-vllm) against a real daemon.

Two kinds of vLLM run, kept few because a start costs 20-60 s here:
  - one `vllm serve` of the train checkpoint with its rows from `lutstore serve` (no row cache, so
    every step fetches), talked to with the openai client: completions, streaming, echo + logprobs,
    8 concurrent requests, the daemon killed and restarted under running requests; and one that is
    refused at start (a wrong table), for the line a user sees;
  - one process of vLLM's offline engine (tests/vllm_offline.py) running every other case one after
    another: each encoding, the in-memory tables of both forms, a folder written from an address,
    and the refusals at start.
References are this repository's own engine (inference.evaluate / inference.generate), fp32.

Without .venv-vllm (or LUTSTORE_VLLM_PYTHON) the tests skip, unless LUTSTORE_REQUIRE_VLLM=1 (make test), where they fail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpt_factory import make_checkpoint
from testing.daemon import Daemon

REPO = Path(__file__).resolve().parent.parent
# .venv-vllm by default; LUTSTORE_VLLM_PYTHON names another python with vLLM (a GPU host's: make gpu-check)
VPY = Path(os.environ.get("LUTSTORE_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
VLLM = VPY.parent / "vllm"
REQUIRED = os.environ.get("LUTSTORE_REQUIRE_VLLM") == "1"
MISSING = None if VLLM.exists() and VPY.exists() else f"{VPY.parent.parent} is missing: `make install-vllm` creates it"
pytestmark = pytest.mark.skipif(MISSING is not None and not REQUIRED, reason=MISSING or "")

SHAPE = dict(vocab=128, layers=2, experts=4, hidden=64, intermediate=128, heads=2)   # head_dim 32: vLLM's CPU minimum
ENCODINGS = ("fp32", "fp16", "bf16", "int8", "nf4")
LOGPROB_BOUND = 1e-4     # fp32, same rows: measured <= 2e-6 here (kernels differ: vLLM's CPU attention vs SDPA)
START_DEADLINE = 600.0   # seconds for a vLLM server to answer, on a loaded 2-core box
N_PROMPTS = 3


@pytest.fixture(scope="module", autouse=True)
def _vllm_installed() -> None:
    if MISSING is not None:   # only reached with LUTSTORE_REQUIRE_VLLM=1
        pytest.fail(f"LUTSTORE_REQUIRE_VLLM=1 but {MISSING}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_env() -> dict[str, str]:
    """This checkout's code (not what .venv-vllm was installed from), offline, a small KV cache."""
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_LOGGING_LEVEL": "INFO", "TOKENIZERS_PARALLELISM": "false"}


# ---- the models, the table, the daemon ---------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-models")
    return {
        "train": make_checkpoint(root / "train", form="train", **SHAPE),
        # the same weights in rep form: fp32 (its table equals the train form's) and fp16 (the official format)
        "rep": make_checkpoint(root / "rep", form="rep", dtype=torch.float32, **SHAPE),
        "rep16": make_checkpoint(root / "rep16", form="rep", **SHAPE),
        "other": make_checkpoint(root / "other", form="train", seed=1, **SHAPE),   # another model, same shapes
    }


@pytest.fixture(scope="module")
def db(models, tmp_path_factory) -> Path:
    from lutstore.ingest import ingest_checkpoint

    path = tmp_path_factory.mktemp("vllm-db") / "db"
    for enc in ENCODINGS:
        ingest_checkpoint(models["train"], path, name=f"m-{enc}", encoding=enc, progress=False)
    return path


class RestartableDaemon:
    """`lutstore serve` on a fixed port, so that a restarted daemon is the same address."""

    def __init__(self, db: Path) -> None:
        self.db, self.port = db, free_port()
        self.daemon = self._start()

    def _start(self) -> Daemon:
        return Daemon(self.db, "--port", str(self.port))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill_9(self) -> None:
        self.daemon.proc.kill()
        self.daemon.proc.wait(30)

    def restart(self) -> None:
        self.daemon = self._start()

    def stop(self) -> None:
        if self.daemon.proc.poll() is None:
            self.daemon.stop()


@pytest.fixture(scope="module")
def daemon(db):
    d = RestartableDaemon(db)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(3, SHAPE["vocab"], 24 + 8 * i).tolist() for i in range(8)]


# ---- references: this repository's engine ----------------------------------------------------------

@pytest.fixture(scope="module")
def reference(models):
    from inference.backbone import load_checkpoint
    from inference.evaluate import token_logprobs
    from inference.generate import generate
    from inference.lut import InProcessTable

    train, _ = load_checkpoint(models["train"])     # computes its experts
    lut_model, _ = load_checkpoint(models["rep"])   # lut form: takes any table's rows

    class Reference:
        def logprobs(self, ids: list[int], table: torch.Tensor | None = None, model=None) -> np.ndarray:
            if table is None:
                return token_logprobs(model or train.model, None, ids)
            return token_logprobs(model or lut_model.model, InProcessTable(table), ids)

        def greedy(self, ids: list[int], n: int) -> list[int]:
            return generate(train.model, None, [ids], n).tokens[0]

    return Reference()


def served_table(address: str, name: str) -> torch.Tensor:
    """Every row of a served table, decoded to float32 by the client (what the plugin must see)."""
    from inference.lut import InProcessTable
    from lutstore.client import LutClient

    with LutClient(address) as client:
        return InProcessTable.from_client(client, name, dtype=torch.float32).table


# ---- vLLM's offline engine: many cases, one process ---------------------------------------------

@pytest.fixture(scope="module")
def offline(models, daemon, prompts, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("vllm-offline")
    folder = subprocess.run([sys.executable, "-m", "inference.engines.folder", "--lut-addr", daemon.address,
                             "--table", "m-fp32", "--dest", str(root / "from-address")],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "LUTSTORE_CACHE": str(root / "cache")},
                            timeout=120)
    assert folder.returncode == 0, folder.stderr
    lut = lambda table, **extra: {"addr": daemon.address, "table": table, **extra}  # noqa: E731
    run = lambda name, model, lutstore=None: {"name": name, "model": str(model), "lutstore": lutstore,  # noqa: E731
                                              "prompts": prompts[:N_PROMPTS], "max_tokens": 12}
    cases = [run(f"lut-{enc}", models["train"], lut(f"m-{enc}")) for enc in ENCODINGS]
    cases += [run("memory-train", models["train"]), run("memory-rep", models["rep"]),
              run("memory-rep16", models["rep16"]), run("folder", folder.stdout.strip())]
    cases += [run("wrong-table", models["train"], lut("nope")),
              run("unreachable", models["train"], {"addr": f"127.0.0.1:{free_port()}", "retry_seconds": 1}),
              run("fingerprint", models["other"], lut("m-fp32"))]
    spec = root / "cases.json"
    spec.write_text(json.dumps(cases))
    proc = subprocess.run([str(VPY), str(REPO / "tests" / "vllm_offline.py"), str(spec)], capture_output=True,
                          text=True, cwd=REPO, env={**vllm_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, timeout=900)
    mark = "vllm_offline: "
    results = {r["name"]: r for r in (json.loads(line[len(mark):]) for line in proc.stdout.splitlines()
                                      if line.startswith(mark))}
    assert len(results) == len(cases), f"vllm_offline.py exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    results["_folder"] = {"stdout": folder.stdout}
    return results


def compare_logprobs(result: dict, prompts: list[list[int]], ref) -> float:
    """Largest |vLLM prompt logprob - reference| over the offline prompts; ref(ids) -> [T-1]."""
    worst = 0.0
    for got, ids in zip(result["prompt_logprobs"], prompts[:N_PROMPTS]):
        worst = max(worst, float(np.abs(np.array(got[1:], dtype=np.float64) - ref(ids)).max()))
    return worst


def test_prompt_logprobs_with_lutstore_equal_in_memory_and_the_reference(offline, prompts, reference) -> None:
    lut, memory = offline["lut-fp32"], offline["memory-train"]
    for name in ("lut-fp32", "memory-train"):
        assert "error" not in offline[name], offline[name]
    between = max(float(np.abs(np.array(a[1:], dtype=np.float64) - np.array(b[1:], dtype=np.float64)).max())
                  for a, b in zip(lut["prompt_logprobs"], memory["prompt_logprobs"]))
    to_reference = compare_logprobs(lut, prompts, reference.logprobs)
    print(f"fp32 prompt logprobs: lutstore vs in-memory {between:.2e}, vs inference.evaluate {to_reference:.2e}")
    assert between <= LOGPROB_BOUND and to_reference <= LOGPROB_BOUND
    # greedy tokens equal inference.generate's
    assert lut["tokens"] == memory["tokens"] == [reference.greedy(p, 12) for p in prompts[:N_PROMPTS]]


@pytest.mark.parametrize("enc", ENCODINGS)
def test_every_encoding_gives_the_rows_the_client_decodes(offline, prompts, reference, daemon, enc) -> None:
    result = offline[f"lut-{enc}"]
    assert "error" not in result, result
    table = served_table(daemon.address, f"m-{enc}")
    worst = compare_logprobs(result, prompts, lambda ids: reference.logprobs(ids, table))
    print(f"{enc}: prompt logprobs vs inference.evaluate on the same rows {worst:.2e}")
    assert worst <= LOGPROB_BOUND


def test_in_memory_tables_of_both_forms(offline, prompts, reference, models) -> None:
    from inference.backbone import load_checkpoint

    for name in ("memory-rep", "memory-train"):
        worst = compare_logprobs(offline[name], prompts, reference.logprobs)
        print(f"{name}: vs inference.evaluate {worst:.2e}")
        assert worst <= LOGPROB_BOUND
    rep16, table16 = load_checkpoint(models["rep16"])   # fp16 backbone and table, run in fp32 as the official loader
    worst = compare_logprobs(offline["memory-rep16"], prompts, lambda ids: reference.logprobs(ids, table16, rep16.model))
    assert worst <= LOGPROB_BOUND, worst


def test_folder_from_an_address_serves_without_a_checkpoint(offline, prompts, reference) -> None:
    path = Path(offline["_folder"]["stdout"].strip())
    assert offline["_folder"]["stdout"] == f"{path}\n"            # the path alone, for $(...)
    config = json.loads((path / "config.json").read_text())
    assert config["lutstore"]["table"] == "m-fp32" and config["lutstore"]["version"] == 1
    assert sorted(p.name for p in path.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    assert (path / "tokenizer.json").is_file()
    assert compare_logprobs(offline["folder"], prompts, reference.logprobs) <= LOGPROB_BOUND
    assert offline["folder"]["tokens"] == offline["lut-fp32"]["tokens"]


@pytest.mark.parametrize("case, words", [
    ("wrong-table", ["lutstore: no table 'nope' at 127.0.0.1:", "tables: m-bf16, m-fp16, m-fp32, m-int8, m-nf4"]),
    ("unreachable", ["lutstore: ", "UNAVAILABLE"]),
    ("fingerprint", ["lutstore: checkpoint ", "/other does not match table 'm-fp32' v1 at 127.0.0.1:", "differs"]),
])
def test_refused_at_start_in_one_line(offline, case, words) -> None:
    error = offline[case].get("error")
    assert error is not None, f"{case} started: {offline[case]}"
    line = error.strip()
    print(f"{case}: {line}")
    assert "\n" not in line, line
    for w in words:
        assert w in line, line


# ---- vllm serve with its rows from the daemon ------------------------------------------------------

class VllmServer:
    """`vllm serve MODEL` (the documented command) on a free port; output to a file."""

    def __init__(self, model: Path, log: Path, overrides: dict | None = None) -> None:
        self.port, self.log = free_port(), log
        cmd = [str(VLLM), "serve", str(model), "--host", "127.0.0.1", "--port", str(self.port),
               "--served-model-name", "mole", "--enforce-eager", "--dtype", "float32", "--max-model-len", "256",
               "--max-num-seqs", "16"]
        if overrides:
            cmd += ["--hf-overrides", json.dumps(overrides)]
        self._out = open(log, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, cwd=REPO, env=vllm_env(),
                                     start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> float:
        import urllib.request

        deadline = self.started + START_DEADLINE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vllm serve exited {self.proc.returncode}:\n{self.output()[-6000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"vllm serve did not answer within {START_DEADLINE:g} s:\n{self.output()[-6000:]}")

    def wait_exit(self, timeout: float = START_DEADLINE) -> int:
        return self.proc.wait(timeout)

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", timeout=600, max_retries=0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)   # the API server and its engine process
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._out.close()


@pytest.fixture(scope="module")
def server(models, daemon, tmp_path_factory):
    # cache_mb 0: no row cache, so every step fetches its rows (the daemon's death is felt at once)
    s = VllmServer(models["train"], tmp_path_factory.mktemp("vllm-serve") / "serve.log",
                   {"lutstore": {"addr": daemon.address, "table": "m-fp32", "cache_mb": 0, "retry_seconds": 2}})
    try:
        print(f"vllm serve answered after {s.wait_ready():.1f} s")
        yield s
    finally:
        s.stop()


EXTRA = {"ignore_eos": True, "return_token_ids": True}


def test_completions_streaming_and_echo_logprobs(server, prompts, reference) -> None:
    client, ids = server.client(), prompts[0]
    want = reference.greedy(ids, 16)
    done = client.completions.create(model="mole", prompt=ids, max_tokens=16, temperature=0, extra_body=EXTRA)
    assert done.choices[0].token_ids == want and done.choices[0].finish_reason == "length"
    streamed, text = [], ""
    for chunk in client.completions.create(model="mole", prompt=ids, max_tokens=16, temperature=0, stream=True,
                                           extra_body=EXTRA):
        for choice in chunk.choices:
            streamed += choice.token_ids or []
            text += choice.text
    assert streamed == want and text == done.choices[0].text
    echo = client.completions.create(model="mole", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    got = np.array(echo.choices[0].logprobs.token_logprobs[1:len(ids)], dtype=np.float64)
    worst = float(np.abs(got - reference.logprobs(ids)).max())
    print(f"vllm serve echo logprobs vs inference.evaluate: {worst:.2e}")
    assert worst <= LOGPROB_BOUND


def _complete_all(client, prompts: list[list[int]], n: int) -> list[list[int]]:
    results: list = [None] * len(prompts)

    def one(i: int) -> None:
        r = client.completions.create(model="mole", prompt=prompts[i], max_tokens=n, temperature=0, extra_body=EXTRA)
        results[i] = r.choices[0].token_ids

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_greedy_tokens_do_not_change_in_a_batch_of_8(server, prompts, reference) -> None:
    got = _complete_all(server.client(), prompts, 16)
    assert got == [reference.greedy(p, 16) for p in prompts]


def test_daemon_killed_and_restarted_while_requests_run(server, daemon, prompts, reference) -> None:
    client, n = server.client(), 96   # long enough to be running when the daemon dies, even on a fast host
    first_token = [threading.Event() for _ in range(4)]
    tokens: list[list[int]] = [[] for _ in range(4)]
    finish: list = [None] * 4

    def stream(i: int) -> None:
        try:
            for chunk in client.completions.create(model="mole", prompt=prompts[i], max_tokens=n, temperature=0,
                                                   stream=True, extra_body=EXTRA):
                for choice in chunk.choices:
                    tokens[i] += choice.token_ids or []
                    finish[i] = choice.finish_reason or finish[i]
                    first_token[i].set()
        except Exception as e:   # an error the client sees ends the request
            finish[i] = f"error: {e}"
            first_token[i].set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for event in first_token:
        assert event.wait(300), "no request produced a token"
    daemon.kill_9()
    deadline = time.monotonic() + 300
    while "did not arrive" not in server.output():   # a step is waiting for its rows
        assert time.monotonic() < deadline and all(t.is_alive() for t in threads), server.output()[-3000:]
        time.sleep(0.2)
    daemon.restart()
    for t in threads:
        t.join(600)
        assert not t.is_alive()
    assert "rows arrive again" in server.output()
    # every request completed with the rows it needed: the tokens of the reference, none wrong
    assert finish == ["length"] * 4
    assert tokens == [reference.greedy(p, n) for p in prompts[:4]]
    assert server.proc.poll() is None
    after = client.completions.create(model="mole", prompt=prompts[5], max_tokens=8, temperature=0, extra_body=EXTRA)
    assert after.choices[0].token_ids == reference.greedy(prompts[5], 8)


def test_vllm_serve_refuses_a_wrong_table_in_one_line(models, daemon, tmp_path) -> None:
    s = VllmServer(models["train"], tmp_path / "serve.log", {"lutstore": {"addr": daemon.address, "table": "nope"}})
    try:
        assert s.wait_exit() != 0
    finally:
        s.stop()
    lines = [l for l in s.output().splitlines() if "lutstore: no table 'nope'" in l]
    assert lines, s.output()[-4000:]
    assert f"no table 'nope' at {daemon.address}; tables: m-bf16, m-fp16, m-fp32, m-int8, m-nf4" in lines[0]
