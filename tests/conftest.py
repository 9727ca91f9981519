"""Shared test helpers: small random tables written through Store, and a real
`lutstore serve` subprocess on a free loopback port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from lutstore.codec import Encoding, RowFormat, encode_rows
from lutstore.store import Store, TableMeta

REPO = Path(__file__).resolve().parent.parent
READY = re.compile(r"lutstore: serving (.+) on 127\.0\.0\.1:(\d+)")


def random_rows(fmt: RowFormat, vocab_size: int, seed: int = 0) -> np.ndarray:
    """float32 [vocab, L, N, D] test rows."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((vocab_size, *fmt.shape)).astype(np.float32)


def write_table(db: Path, name: str, fmt: RowFormat | None = None, vocab_size: int = 64, seed: int = 0,
                artifacts: dict[str, bytes] | None = None, source_form: str = "rep") -> tuple[TableMeta, np.ndarray, list[bytes]]:
    """Write one random table version (creating the DB if needed); returns
    (meta, the float rows, the stored values)."""
    fmt = fmt or RowFormat(2, 4, 16, Encoding.FP16)
    rows = random_rows(fmt, vocab_size, seed)
    values = encode_rows(fmt, rows)
    with Store.open(db, "primary", create=True) as store:
        with store.begin_table(name, fmt, vocab_size, source_form) as writer:
            half = vocab_size // 2
            writer.add_rows(values[:half])  # two calls: rows arrive in chunks in real ingests
            writer.add_rows(values[half:])
            for art_name, data in (artifacts or {}).items():
                writer.add_artifact(art_name, data)
            meta = writer.commit()
    return meta, rows, values


@dataclass
class Server:
    """A running `lutstore serve` subprocess."""

    proc: subprocess.Popen
    port: int
    db: Path
    output: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then kill if it does not exit in time; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _drain(stream, sink: list[str]) -> None:
    for line in stream:
        sink.append(line)


def start_server(db: Path, *extra: str, verbose: int = 1, timeout: float = 30.0) -> Server:
    """Start `lutstore serve --db DB --port 0` and wait until it prints its ready line."""
    cmd = [sys.executable, "-m", "lutstore.cli", *(["-" + "v" * verbose] if verbose else []), "serve", "--db", str(db), "--port", "0",
           "--workers", "4", "--refresh-seconds", "0.2", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            raise RuntimeError(f"lutstore serve exited ({proc.returncode}) before serving:\n{''.join(output)}")
        output.append(line)
        m = READY.search(line)
        if m:
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"lutstore serve not ready after {timeout}s:\n{''.join(output)}")
    # Keep reading so a chatty server never blocks on a full pipe.
    threading.Thread(target=_drain, args=(proc.stdout, output), daemon=True).start()
    return Server(proc, int(m.group(2)), db, output)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "db"


@pytest.fixture
def serve():
    """Factory: serve(db, *flags) -> Server; every server started is stopped at teardown."""
    started: list[Server] = []

    def _serve(db: Path, *extra: str, verbose: int = 1) -> Server:
        server = start_server(db, *extra, verbose=verbose)
        started.append(server)
        return server

    yield _serve
    for server in started:
        server.stop()
