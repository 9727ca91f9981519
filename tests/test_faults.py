"""Faults the daemon and its clients must survive (extending test_ingest/test_server/test_client):
kill -9 of ingest at several random points, and daemons killed under a running
`python -m inference.generate` (one address: retries then a clear failure, or success
when the daemon is back within the budget; two addresses: fail-over, generation completes).

The generate subprocess is paused (SIGSTOP) once it has started fetching rows, the daemon
is killed, and the process resumed: so "during generation" is deterministic, not a race.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ckpt_factory import make_checkpoint

from lutstore.client import LutClient
from lutstore.storage.rocksdb import Store

from conftest import REPO, Server, start_server, write_table

GEN_FLAGS = ["--table", "m", "--max-new-tokens", "150", "--lut-cache-mb", "0", "--json"]  # no row cache: every step fetches


def lutstore_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lutstore.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def live_tables(db: Path) -> list[tuple[str, int, str]]:
    with Store.open(db, "secondary") as store:
        return [(m.name, m.version, m.fingerprint) for m in store.tables()]


# ---- kill -9 of ingest at random points -------------------------------------------

def test_kill_9_of_ingest_at_random_points_keeps_serving_and_verifies(tmp_path: Path) -> None:
    db = tmp_path / "db"
    ckpt = make_checkpoint(tmp_path / "ckpt", vocab=4096, hidden=16, intermediate=32, seed=5)
    done = lutstore_cli("ingest", str(ckpt), "--db", str(db), "--name", "m", "--encoding", "fp32", "--no-progress")
    assert done.returncode == 0, done.stderr
    server = start_server(db)
    sample = list(range(0, 4096, 61))
    rng = random.Random(1234)  # fixed: the same "random" points on every run
    try:
        with LutClient(server.address) as client:
            v1_rows = client.get_raw("m", sample, version=1)
            for run in range(3):
                before = live_tables(db)
                proc = subprocess.Popen([sys.executable, "-m", "lutstore.cli", "ingest", str(ckpt), "--db", str(db),
                                         "--name", "m", "--encoding", "fp16", "--chunk-tokens", "8", "--no-progress",
                                         "--force"],   # the same checkpoint: computed every run, not refused at once
                                        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                delay = rng.uniform(0.8, 3.0)  # from interpreter start-up through row writing to the commit
                time.sleep(delay)
                finished = proc.poll() is not None
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                after = live_tables(db)
                print(f"run {run}: killed after {delay:.2f}s ({'had finished' if finished else 'mid-ingest'}); "
                      f"versions {[v for _, v, _ in after]}")
                # All or nothing: the old versions unchanged, plus at most one complete new version.
                assert after[: len(before)] == before and len(after) <= len(before) + 1
                verify = lutstore_cli("verify", "--db", str(db))
                assert verify.returncode == 0, verify.stderr
                # The previous version keeps serving, byte for byte; any new version serves checked rows.
                assert client.get_raw("m", sample, version=1) == v1_rows
                for _, version, _ in after:
                    assert len(client.get_rows("m", sample, version=version)) == len(sample)
            staging = db / "staging"
            assert not staging.exists() or len(list(staging.iterdir())) <= 3  # killed ingests' leftovers at most
    finally:
        server.stop()


# ---- daemons killed during generation ------------------------------------------------

@pytest.fixture(scope="module")
def model_db(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    ckpt = make_checkpoint(root / "ckpt", form="train", vocab=128, layers=2, experts=4, hidden=32, heads=4, seed=7)
    db = root / "db"
    done = lutstore_cli("ingest", str(ckpt), "--db", str(db), "--name", "m", "--encoding", "fp32", "--no-progress")
    assert done.returncode == 0, done.stderr
    cache = root / "backbones"
    # The greedy reference: a run against a healthy daemon (also fills the backbone cache).
    server = start_server(db)
    try:
        ref = run_generate(server.address, cache)
    finally:
        server.stop()
    assert ref.returncode == 0, ref.stderr
    return {"db": db, "cache": cache, "ids": json.loads(ref.stdout)["sequences"][0]["ids"]}


def generate_cmd(address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "inference.generate", "--lut-addr", address, "--prompt", "the water of", *GEN_FLAGS,
            *extra]


def run_generate(address: str, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(generate_cmd(address, *extra), cwd=REPO, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, LUTSTORE_CACHE=str(cache)))


def answered(server: Server) -> int:
    """BatchGets a daemon has answered: one debug line each, whether a call of its own or one
    request of a BatchGetStream session."""
    return sum("lutstore.daemon.servicer: BatchGet " in line for line in server.output)


def paused_mid_generation(address: str, cache: Path, servers: list[Server], *extra: str) -> subprocess.Popen:
    """Start generate; once a daemon has answered a few of its BatchGets, stop (SIGSTOP) it there."""
    proc = subprocess.Popen(generate_cmd(address, *extra), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, LUTSTORE_CACHE=str(cache)))
    deadline = time.monotonic() + 120
    while sum(answered(s) for s in servers) < 3:
        assert proc.poll() is None, f"generate ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "generate never fetched rows"
        time.sleep(0.002)
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None, "generate finished before it could be paused mid-generation"
    return proc


def resume(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str, float]:
    started = time.monotonic()
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err, time.monotonic() - started


def kill_9(server: Server) -> None:
    server.proc.kill()
    server.proc.wait()


def test_daemon_killed_during_generation_retries_then_fails_clearly(model_db) -> None:
    server = start_server(model_db["db"], verbose=2)  # debug: one access-log line per RPC
    try:
        proc = paused_mid_generation(server.address, model_db["cache"], [server], "--retry-seconds", "3")
        kill_9(server)
        rc, out, err, took = resume(proc)
    finally:
        server.stop()
    print(f"generate gave up after {took:.1f}s: {err.strip().splitlines()[-1]}")
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("generate: error: UNAVAILABLE") and server.address in last and "unavailable after" in last
    assert "Traceback" not in err
    assert took < 3 + 30  # the retry budget, plus one call's deadline and start-up slack


def test_daemon_back_within_the_retry_budget_generation_completes(model_db) -> None:
    server = start_server(model_db["db"], verbose=2)
    port = server.port
    try:
        proc = paused_mid_generation(server.address, model_db["cache"], [server], "--retry-seconds", "60")
        kill_9(server)
        proc.send_signal(signal.SIGCONT)  # it retries against the dead port ...
        time.sleep(1.0)
        server = start_server(model_db["db"], "--port", str(port))  # ... until the daemon is back
        rc, out, err, _ = resume(proc)
    finally:
        server.stop()
    assert rc == 0, err
    assert json.loads(out)["sequences"][0]["ids"] == model_db["ids"]


def test_two_daemons_one_killed_generation_fails_over_and_completes(model_db) -> None:
    a = start_server(model_db["db"], verbose=2)
    b = start_server(model_db["db"], verbose=2)
    try:
        proc = paused_mid_generation(f"{a.address},{b.address}", model_db["cache"], [a, b], "--retry-seconds", "20")
        kill_9(a)
        served_by_b = answered(b)
        rc, out, err, took = resume(proc)
        assert rc == 0, err
        assert json.loads(out)["sequences"][0]["ids"] == model_db["ids"]
        assert answered(b) > served_by_b  # b carried on
        print(f"fail-over: generation finished {took:.1f}s after the kill")
    finally:
        a.stop()
        b.stop()
