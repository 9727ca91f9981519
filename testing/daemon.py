"""Run `lutstore serve` as a child process: start it on a free loopback port,
wait for its ready line, keep draining its output, stop it with SIGTERM.

Used by the demo, the benchmarks and the tests, and handy in scripts that
need a daemon for a while.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

READY = re.compile(r"lutstore: serving (.+) on 127\.0\.0\.1:(\d+)")
REPO = Path(__file__).resolve().parent.parent


class DaemonError(RuntimeError):
    """The daemon did not start, or did not stop when asked."""


class Daemon:
    """A running `lutstore serve --db DB --port 0` child; a context manager that stops it."""

    def __init__(self, db: Path, *flags: str, verbose: int = 0, timeout: float = 60.0,
                 on_ready_line=None) -> None:
        self.db = Path(db)
        cmd = [sys.executable, "-m", "lutstore.cli", *(["-" + "v" * verbose] if verbose else []),
               "serve", "--db", str(db), "--host", "127.0.0.1", "--port", "0", *flags]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                raise DaemonError(f"lutstore serve exited ({self.proc.returncode}) before serving:\n{''.join(self.output)}")
            self.output.append(line)
            match = READY.search(line)
            if match:
                if on_ready_line:
                    on_ready_line(line.rstrip())
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                raise DaemonError(f"lutstore serve not ready after {timeout:.0f}s:\n{''.join(self.output)}")
        self.port = int(match.group(2))
        # Keep draining so a chatty daemon never blocks on a full pipe.
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 15.0, strict: bool = False) -> int:
        """SIGTERM, then kill if it has not exited within `timeout` (DaemonError if strict); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                if strict:
                    raise DaemonError(f"lutstore serve did not stop within {timeout:.0f}s of SIGTERM; killed it") from None
        return self.proc.returncode

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
