"""The first hour of a new user (issue 17): the real commands, run as subprocesses.

Each test is one rough edge that a newcomer met: what the command must say
(one line, no traceback) and what it must leave behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
from ckpt_factory import make_checkpoint
from conftest import REPO, start_server, write_table
from rocksdict import Options, Rdict

from lutstore import __version__
from lutstore.client.address import AddressError, parse_addresses
from lutstore.client import LutClient
from lutstore.formats.codec import decode_row
from lutstore.storage.backends import is_cluster_url
from lutstore.errors import UserError
from lutstore.storage.rocksdb import Store, row_key

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def run(*argv: str, cwd: Path = REPO, timeout: float = 180, env: dict | None = None,
        **kw) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` (argv[0] is the module), captured as text."""
    return subprocess.run([sys.executable, "-m", *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})}, **kw)


def lutstore(*argv: str, **kw) -> subprocess.CompletedProcess:
    return run("lutstore.cli", *argv, **kw)


def one_line_error(r: subprocess.CompletedProcess, prefix: str) -> str:
    """The single stderr line of a refused command (rc 2), checked to be one line and no traceback."""
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stdout, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith(prefix), err
    return err


def versions(db: Path) -> list[tuple[str, int]]:
    with Store.open(db, "secondary") as store:
        return [(m.name, m.version) for m in store.tables()]


# ---- 1. --db that is not a database folder -----------------------------------------------

def test_db_that_is_a_file_a_url_or_a_foreign_folder_is_refused(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", vocab=32)
    a_file = tmp_path / "f"
    a_file.touch()
    err = one_line_error(lutstore("ingest", str(ckpt), "--db", str(a_file), "--no-progress"), "lutstore ingest: error:")
    assert "is a file" in err
    assert "is a file" in one_line_error(lutstore("info", "--db", str(a_file)), "lutstore info: error:")

    mine = tmp_path / "my-files"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    err = one_line_error(lutstore("ingest", str(ckpt), "--db", str(mine), "--no-progress"), "lutstore ingest: error:")
    assert "not a lutstore database" in err and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]

    work = tmp_path / "cwd"
    work.mkdir()
    for url, needle in (("redis-cluster://127.0.0.1:7000", "cannot reach"),
                        ("http://127.0.0.1/db", "looks like a URL"),
                        ("redis://127.0.0.1:7000", "or a cluster URL, redis-cluster://HOST:PORT")):
        for argv in (["ingest", str(ckpt), "--no-progress"], ["info"], ["serve", "--port", "0"]):
            r = lutstore(argv[0], "--db", url, *argv[1:], cwd=work)
            assert needle in one_line_error(r, f"lutstore {argv[0]}: error:")
    assert list(work.iterdir()) == [], "a URL must not become a local folder"
    assert is_cluster_url("redis-cluster://h:1,h:2") and not is_cluster_url(str(tmp_path / "db"))

    # An empty folder, or an existing database, is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert lutstore("ingest", str(ckpt), "--db", str(empty), "--no-progress").returncode == 0
    assert versions(empty) == [("m", 1)]


# ---- 2. -v after the subcommand; 8. --version, defaults and help ----------------------------

def test_verbose_after_the_subcommand(tmp_path):
    db = tmp_path / "db"
    write_table(db, "t")
    r = lutstore("info", "-vv", "--db", str(db))
    assert r.returncode == 0 and "t v1" in r.stdout, r.stderr
    server = start_server(db, "-v", verbose=0)   # `serve ... -v`: after the subcommand only
    lines = list(server.output)   # up to its ready line
    assert any(" INFO " in line for line in lines), "".join(lines)   # -v took effect
    assert server.stop(30, strict=True) == 0


def test_version_and_defaults_in_help():
    r = lutstore("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"lutstore {__version__}"
    serve = lutstore("serve", "--help").stdout
    for flag, default in (("--port", "50051"), ("--cache-mb", "1024"), ("--workers", "16"),
                          ("--max-batch-rows", "4096"), ("--refresh-seconds", "1.0")):
        text = " ".join(serve.split(flag + " ", 2)[-1].split())   # that option's help, whitespace folded
        assert re.match(rf"\S+ .*?\(default: {re.escape(default)}\)", text), (flag, text[:200])
    drop = lutstore("drop", "--help").stdout
    assert "table name" in drop and "the version to delete" in drop
    for module, needle in (("inference.generate", "(default: 256)"), ("inference.evaluate", "(default: 10.0)"),
                           ("inference.serve", "(default: auto)")):
        out = " ".join(run(module, "--help").stdout.split())
        assert needle in out and "~/.cache/lutstore" in out and "$LUTSTORE_CACHE" in out


# ---- 8. lutstore get -------------------------------------------------------------------------

def test_get_prints_rows_and_names_a_corrupt_one(tmp_path):
    db = tmp_path / "db"
    meta, rows, values = write_table(db, "t", vocab_size=32)
    r = lutstore("get", "t", "0", "7", "--db", str(db), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["shape"] == list(meta.row_format().shape) and doc["encoding"] == "fp16"
    for got, token in zip(doc["rows"], (0, 7)):
        want = decode_row(meta.row_format(), values[token])
        assert got["token"] == token and got["checksum"] == "ok" and got["stored_bytes"] == len(values[token])
        assert np.allclose(got["head"], want[0, 0, :len(got["head"])]) and np.isclose(got["max"], want.max())
    text = lutstore("get", "t", "7", "--db", str(db))
    assert text.returncode == 0 and "token 7: checksum OK" in text.stdout and "fp16" in text.stdout

    bad = bytearray(values[7])
    bad[3] ^= 0xFF
    raw = Rdict(str(db), Options(raw_mode=True))
    raw[row_key(meta.table_id, 7)] = bytes(bad)
    raw.close()
    r = lutstore("get", "t", "6", "7", "--db", str(db))
    assert r.returncode == 1 and "token 6: checksum OK" in r.stdout and "token 7: checksum BAD" in r.stdout
    assert "vocabulary 0..31" in one_line_error(lutstore("get", "t", "32", "--db", str(db)), "lutstore get: error:")
    assert "no table named 'x'" in one_line_error(lutstore("get", "x", "1", "--db", str(db)), "lutstore get: error:")


# ---- 6. what ingest says -------------------------------------------------------------------

def test_ingest_says_what_it_did(tmp_path):
    db = tmp_path / "db"
    ckpt = make_checkpoint(tmp_path / "m", vocab=32)
    bare = make_checkpoint(tmp_path / "bare", vocab=32, seed=5)
    (bare / "tokenizer.json").unlink()

    err = one_line_error(lutstore("ingest", str(bare), "--db", str(db), "--no-progress"), "lutstore ingest: error:")
    assert "no tokenizer.json" in err and "--allow-no-tokenizer" in err and not db.exists()
    assert lutstore("ingest", str(bare), "--db", str(db), "--no-progress", "--allow-no-tokenizer").returncode == 0

    first = lutstore("ingest", str(ckpt), "--db", str(db), "--name", "t", "--no-progress")
    assert first.returncode == 0 and "ingested t v1" in first.stdout, first.stderr
    again = lutstore("ingest", str(ckpt), "--db", str(db), "--name", "t")   # with its progress bars
    assert again.returncode == 0 and "already holds this checkpoint" in again.stdout and "--force" in again.stdout
    # Decided from the checkpoint files' checksums before any row is computed: no "ingest" bar ran.
    assert "checksum" in again.stderr and "ingest:" not in again.stderr, again.stderr
    assert versions(db) == [("bare", 1), ("t", 1)] and not any((db / "staging").iterdir())
    # Another encoding is another table content: a new version, no --force needed.
    assert "ingested t v2" in lutstore("ingest", str(ckpt), "--db", str(db), "--name", "t", "--no-progress",
                                       "--encoding", "int8").stdout
    forced = lutstore("ingest", str(ckpt), "--db", str(db), "--name", "t", "--no-progress", "--encoding", "int8",
                      "--force", "--keep-versions", "1")
    assert forced.returncode == 0, forced.stderr
    lines = forced.stdout.strip().splitlines()
    assert lines[0].startswith("ingested t v3") and lines[1:] == [l for l in lines[1:] if l.startswith("dropped t v")]
    assert [l.split()[2] for l in lines[1:]] == ["v1", "v2"]
    assert versions(db) == [("bare", 1), ("t", 3)]


# ---- 5. SIGTERM during ingest, Ctrl-C while torch loads ---------------------------------------

def test_sigterm_during_ingest_aborts_cleanly(tmp_path):
    db = tmp_path / "db"
    small = make_checkpoint(tmp_path / "small", vocab=32)
    big = make_checkpoint(tmp_path / "big", vocab=8192, hidden=16, intermediate=32, seed=3)
    assert lutstore("ingest", str(small), "--db", str(db), "--name", "t", "--no-progress").returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "lutstore.cli", "ingest", str(big), "--db", str(db), "--name", "t",
                             "--chunk-tokens", "2"], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    staging = db / "staging"
    deadline = time.monotonic() + 60
    while not (staging.is_dir() and any(staging.iterdir())):   # rows are being written
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    last = err.decode().replace("\r", "\n").strip().splitlines()[-1]
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    assert last.startswith("lutstore ingest: terminated (SIGTERM)") and "nothing was added" in last, last
    assert "Traceback" not in err.decode()
    assert list(staging.iterdir()) == [], "SIGTERM left staging files"
    assert versions(db) == [("t", 1)]


def test_sigterm_after_the_commit_lets_ingest_finish_and_exit_0(tmp_path):
    """Once ingest has committed, a SIGTERM cannot undo it: the ingest finishes (its --keep-versions drop,
    its report), exits 0 and says the signal came after the commit. Its stdout is a pipe we fill first,
    so the ingest blocks on printing its report, after the commit, until we read."""
    db = tmp_path / "db"
    assert lutstore("ingest", str(make_checkpoint(tmp_path / "a", vocab=32)), "--db", str(db), "--name", "t",
                    "--no-progress").returncode == 0
    read_end, write_end = os.pipe()
    filler = b"x" * fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)   # a full pipe: the first print blocks
    os.write(write_end, filler)
    proc = subprocess.Popen([sys.executable, "-m", "lutstore.cli", "ingest", str(make_checkpoint(tmp_path / "b", vocab=32,
                             seed=4)), "--db", str(db), "--name", "t", "--no-progress", "--keep-versions", "1"],
                            cwd=REPO, env=ENV, stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    deadline = time.monotonic() + 120
    while versions(db) != [("t", 2)]:   # committed, and v1 dropped: it now waits to print its report
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    with os.fdopen(read_end, "rb") as out:
        printed = out.read()[len(filler):].decode()
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 0, (printed, err)
    assert "ingested t v2" in printed and "dropped t v1" in printed, printed
    assert "lutstore ingest: t v2 was already committed; finishing (SIGTERM ignored)" in err and "Traceback" not in err


def test_a_finished_command_is_not_killed_by_sigterm_while_python_exits(tmp_path):
    """After the entry point's block (sigterm_raises(until_exit=True)) a finished command's process is
    exiting: a SIGTERM then must not end it by the signal (rc -15)."""
    code = ("import os, signal\n"
            "from lutstore import interrupts\n"
            "with interrupts.sigterm_raises(until_exit=True):\n"
            "    interrupts.finished('done')\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "print('exited normally')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "exited normally\n", done
    assert done.stderr == "done (SIGTERM ignored)\n", done.stderr
    # Not finished, or not the process's own entry point: SIGTERM keeps its meaning after the block.
    code = code.replace("    interrupts.finished('done')\n", "    pass\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM, done


@pytest.mark.parametrize("module", ["inference.generate", "inference.evaluate", "inference.serve"])
def test_ctrl_c_while_torch_loads_is_one_line(module, tmp_path):
    argv = ["--lut-addr", "127.0.0.1:1", "--retry-seconds", "30"]
    argv += {"inference.generate": ["--prompt", "x"], "inference.evaluate": ["--token-ids", str(tmp_path / "ids.npy")],
             "inference.serve": ["--port", "0"]}[module]
    proc = subprocess.Popen([sys.executable, "-m", module, *argv], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while "libtorch" not in maps.read_text():   # torch's shared libraries are loading: its import is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("interrupted"), err
    assert proc.returncode != 0


def test_token_ids_that_are_not_npy(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", vocab=32)
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3\n")
    err = one_line_error(run("inference.evaluate", "--checkpoint", str(ckpt), "--token-ids", str(ids)),
                         "evaluate: error:")
    assert "is not a .npy file" in err and "allow_pickle" not in err
    np.save(tmp_path / "ids.npy", np.arange(1, 9))
    r = run("inference.evaluate", "--checkpoint", str(ckpt), "--token-ids", str(tmp_path / "ids.npy"))
    assert r.returncode == 0 and json.loads(r.stdout)["tokens"] == 8, r.stderr


def test_readme_own_checkpoint_lines_run_as_written_with_two_tables(tmp_path):
    """README's "Your own checkpoint" block, run line by line (its database through $LUTSTORE_DB, its
    fixed ports swapped for free ones) against a daemon that serves two tables: every line works."""
    from inference.endpoint_process import READY as ENDPOINT_READY
    from lutstore.child_server import ChildServer

    block = (REPO / "README.md").read_text().split("## Your own checkpoint", 1)[1].split("\n## ", 1)[0]
    lines = [line.strip().split("   #")[0].strip() for line in block.splitlines() if line.startswith("    ")]
    assert any(line.startswith("python -m inference.generate") for line in lines), lines
    db, cache = tmp_path / "db", tmp_path / "cache"
    env = {"LUTSTORE_DB": str(db), "LUTSTORE_CACHE": str(cache)}
    ckpt = make_checkpoint(tmp_path / "mole-160m", vocab=128, layers=2, experts=4, hidden=32, heads=4, seed=7)
    other = make_checkpoint(tmp_path / "other", vocab=64, seed=8)
    assert lutstore("ingest", str(other), "--no-progress", env=env).returncode == 0   # a second table
    (tmp_path / "some.txt").write_text("The water of the river runs down to the sea. " * 4)
    servers: list = []
    try:
        for line in lines:
            if line.startswith("source "):
                continue
            if servers:
                line = line.replace("127.0.0.1:50051", servers[0].address)
            argv = [a.replace("path/to/mole-160m", str(ckpt)) for a in shlex.split(line.rstrip("& "))]
            if argv[:2] == ["lutstore", "serve"]:
                servers.append(start_server(db))
            elif line.endswith("&"):      # the endpoint: it starts once it has resolved its table
                argv[argv.index("--port") + 1] = "0"
                servers.append(ChildServer([sys.executable, *argv[1:]], ENDPOINT_READY, cwd=tmp_path,
                                           env={"PYTHONPATH": ENV["PYTHONPATH"], **env}, timeout=120))
            else:
                module = "lutstore.cli" if argv[0] == "lutstore" else argv[2]
                r = run(module, *argv[1 if argv[0] == "lutstore" else 3:], cwd=tmp_path, env=env, timeout=300)
                assert r.returncode == 0, (line, r.stdout[-2000:], r.stderr[-2000:])
    finally:
        for server in reversed(servers):
            server.stop()
    assert len(servers) == 2, lines


# ---- 3. addresses --------------------------------------------------------------------------

def test_addresses_are_checked_at_once():
    assert parse_addresses("127.0.0.1:50051") == ["127.0.0.1:50051"]
    assert parse_addresses(" a:1, [::1]:2 ,localhost:3") == ["a:1", "[::1]:2", "localhost:3"]
    for bad, needle in (("127.0.0.1", "has no port"), ("http://127.0.0.1:50051", "is a URL"), ("", "empty"),
                        ("a:1,,b:2", "empty entry"), ("h:99999", "1..65535"), ("h:x", "not a number"),
                        ("::1:5", "brackets"), ("grpc://h:1", "without 'grpc://'")):
        with pytest.raises(AddressError, match=re.escape(needle)):
            parse_addresses(bad)
    with pytest.raises(ValueError, match="has no port"):   # the client checks too, before any connection
        LutClient("127.0.0.1")

    # refused before any retry: well inside a 300 s limit (a loaded machine's torch import included),
    # while the 600 s retry budget a bad address would otherwise spend is not
    for addr, needle in (("127.0.0.1", "has no port"), ("http://127.0.0.1:50051", "is a URL")):
        err = one_line_error(run("inference.generate", "--lut-addr", addr, "--retry-seconds", "600", "--prompt", "x",
                                 timeout=300), "generate: error:")
        assert needle in err and "unavailable" not in err

    r = run("inference.generate", "--lut-addr", "127.0.0.1:1", "--retry-seconds", "1", "--prompt", "x")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 2, r.stderr
    assert lines[0].startswith("generate: connecting to 127.0.0.1:1 (") and "retrying for 1 s)" in lines[0]
    assert lines[1].startswith("generate: error: UNAVAILABLE")


# ---- 4. generate's batch output, 5. --shared-memory on ----------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt = make_checkpoint(root / "ckpt", vocab=128, layers=2, experts=4, hidden=32, heads=4, seed=7)
    db = root / "db"
    assert lutstore("ingest", str(ckpt), "--db", str(db), "--name", "m", "--no-progress").returncode == 0
    server = start_server(db)
    yield {"db": db, "addr": server.address, "cache": root / "cache", "ckpt": ckpt}
    server.stop()


def generate(served, *argv: str) -> subprocess.CompletedProcess:
    return run("inference.generate", "--lut-addr", served["addr"], "--max-new-tokens", "4", *argv,
               env={"LUTSTORE_CACHE": str(served["cache"])})


def test_generate_batch_output_names_each_prompt(served):
    prompts = ["the water of", "one two"]
    r = generate(served, "--prompt", prompts[0], "--prompt", prompts[1], "--batch-size", "3")
    assert r.returncode == 0, r.stderr
    headers = [line for line in r.stdout.splitlines() if line.startswith("--- sequence")]
    assert headers == ["--- sequence 0 (prompt 0: 'the water of')", "--- sequence 1 (prompt 1: 'one two')",
                       "--- sequence 2 (prompt 0: 'the water of')"], r.stdout
    as_json = generate(served, "--prompt", prompts[0], "--prompt", prompts[1], "--json")
    doc = json.loads(as_json.stdout)
    assert len(doc["sequences"]) == 2 and "--- sequence" not in as_json.stdout
    single = generate(served, "--prompt", prompts[0])
    assert single.returncode == 0 and "--- sequence" not in single.stdout   # one prompt: just its text


def test_shared_memory_on_fails_when_the_daemon_does_not_allow_it(served):
    err = one_line_error(generate(served, "--prompt", "the", "--shared-memory", "on"), "generate: error:")
    assert "--shared-memory on" in err and "--allow-shared-memory" in err
    allowing = start_server(served["db"], "--allow-shared-memory")
    try:
        r = run("inference.generate", "--lut-addr", allowing.address, "--max-new-tokens", "2", "--prompt", "the",
                "--shared-memory", "on", env={"LUTSTORE_CACHE": str(served["cache"])})
        assert r.returncode == 0, r.stderr
    finally:
        allowing.stop()


# ---- 8. evaluate's progress bar ------------------------------------------------------------

def _stderr_through_a_terminal(argv: list[str]) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal (so isatty() is true); its exit code and what it wrote there."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))   # a 100-column terminal
    proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=follower)
    os.close(follower)
    seen = bytearray()
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:   # EIO: the child closed its end
            break
        if not chunk:
            break
        seen.extend(chunk)
    os.close(leader)
    proc.stdout.read()
    return proc.wait(60), seen.decode(errors="replace")


def test_evaluate_progress_bar_on_a_terminal_only(served, tmp_path):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 128, 600))   # > 2 windows of the 256-token context
    argv = ["inference.evaluate", "--checkpoint", str(served["ckpt"]), "--token-ids", str(ids), "--windows"]
    rc, tty_err = _stderr_through_a_terminal(argv)
    assert rc == 0 and "scoring" in tty_err and "599/599" in tty_err, tty_err
    rc, quiet_err = _stderr_through_a_terminal([*argv, "--quiet"])
    assert rc == 0 and "scoring" not in quiet_err, quiet_err
    piped = run(*argv)
    assert piped.returncode == 0 and "scoring" not in piped.stderr and json.loads(piped.stdout)["tokens"] == 600


# ---- 7. the Node example without its packages -------------------------------------------------

@pytest.mark.skipif(not shutil.which("node"), reason="node is not installed")
def test_node_example_without_npm_ci_says_so(tmp_path):
    """A copy of clients/node without node_modules: one line that says to run `npm ci`, no stack trace."""
    copy = tmp_path / "node"
    shutil.copytree(REPO / "clients" / "node", copy, ignore=shutil.ignore_patterns("node_modules"))
    r = subprocess.run(["node", "examples/get_rows.js", "--addr", "127.0.0.1:1"], cwd=copy, capture_output=True,
                       text=True, timeout=60)
    err = r.stderr.strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1 and "npm ci" in err and str(copy) in err, err


def test_table_names_that_would_break_listing_or_output_are_refused(tmp_path):
    """A name with a byte that is not UTF-8 (a lone surrogate in Python) was stored, and then every
    ListTables of the daemon failed (no gRPC string can carry it); control characters garbled `info`."""
    ckpt = make_checkpoint(tmp_path / "m", vocab=32)
    db = tmp_path / "db"
    assert lutstore("ingest", str(ckpt), "--db", str(db), "--no-progress").returncode == 0
    for name in ("bad\udcff", "new\nline", "tab\there", "a/b", "x" * 201):
        err = one_line_error(lutstore("ingest", str(ckpt), "--db", str(db), "--name", name, "--no-progress"),
                             "lutstore ingest: error:")
        assert "bad table name" in err
    odd = tmp_path / "odd\nname"     # the default name is the folder's
    shutil.copytree(ckpt, odd)
    assert "bad table name" in one_line_error(lutstore("ingest", str(odd), "--db", str(db), "--no-progress"),
                                              "lutstore ingest: error:")
    assert lutstore("ingest", str(ckpt), "--db", str(db), "--name", "modèle-été", "--no-progress").returncode == 0
    assert versions(db) == [("m", 1), ("modèle-été", 1)]


def test_output_into_a_closed_pipe_stops_quietly(tmp_path):
    """`lutstore info | head -1` printed a BrokenPipeError traceback once head had left."""
    db = tmp_path / "db"
    for name in ("a", "b", "c"):
        write_table(db, name, vocab_size=8, artifacts={f"f{i}.json": b"{}" for i in range(50)})
    for argv in (["info"], ["get", "a", *map(str, range(8))]):
        proc = subprocess.Popen([sys.executable, "-m", "lutstore.cli", *argv, "--db", str(db)], cwd=REPO, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()               # the reader leaves before the first line
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141, err
        assert err == "", err


def test_a_database_folder_anyone_can_write_is_warned_about(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", vocab=32)
    db = tmp_path / "shared-db"
    db.mkdir()
    db.chmod(0o777)
    r = lutstore("ingest", str(ckpt), "--db", str(db), "--no-progress")
    assert r.returncode == 0 and "writable by every local user (mode 777)" in r.stderr, r.stderr
    assert "writable by every local user" in lutstore("info", "--db", str(db)).stderr
    db.chmod(0o755)
    r = lutstore("info", "--db", str(db))
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_serve_on_a_busy_port_or_a_foreign_address_is_one_line(tmp_path: Path) -> None:
    """The exact reason, in one line, and nothing from gRPC's core before it."""
    db = tmp_path / "db"
    write_table(db, "t", vocab_size=8)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = lutstore("serve", "--db", str(db), "--port", str(port))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}: port {port} is in use" in r.stderr
    r = lutstore("serve", "--db", str(db), "--host", "192.0.2.1", "--port", "50051")   # TEST-NET-1: nobody's
    last = r.stderr.strip().splitlines()[-1]        # (after the plaintext-off-loopback warning)
    assert r.returncode == 2 and "add_port" not in r.stderr, r.stderr
    assert last == "lutstore serve: error: cannot listen on 192.0.2.1:50051: 192.0.2.1 is not an address of this host"


def test_sigterm_swallowed_by_a_tensor_read_is_still_sigterm(tmp_path, monkeypatch) -> None:
    """A SIGTERM whose Terminated is raised inside an extension that calls back into Python can come
    out as that extension's own error (seen: safetensors reporting "could not determine the shape of
    object type 'torch.storage.UntypedStorage'"); the checkpoint reader must not call that a damaged
    checkpoint, and ingest must end as terminated (143)."""
    from lutstore import interrupts
    from lutstore.ingest.checkpoint import Checkpoint

    ckpt = Checkpoint.open(make_checkpoint(tmp_path / "m", vocab=32))
    name = next(iter(ckpt.names()))
    source = ckpt._file_of[name]
    real = source.tensor

    def read_while_terminated(n):
        try:
            os.kill(os.getpid(), signal.SIGTERM)    # the handler raises Terminated here...
            return real(n)
        except BaseException as e:                  # ...and the extension turns it into its own error
            raise TypeError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from e

    monkeypatch.setattr(source, "tensor", read_while_terminated)
    with pytest.raises(interrupts.Terminated):
        with interrupts.sigterm_raises():
            ckpt.tensor(name)
    monkeypatch.setattr(source, "tensor", lambda n: (_ for _ in ()).throw(TypeError("truncated")))
    with pytest.raises(UserError, match="cannot read tensor"):   # no signal: a plain read error stays one
        with interrupts.sigterm_raises():
            ckpt.tensor(name)
