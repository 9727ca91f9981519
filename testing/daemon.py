"""Run `lutstore serve` as a child process: start it on a free loopback port,
wait for its ready line, keep draining its output, stop it with SIGTERM
(lutstore.child_server does the child-process part).

Used by the demo, the benchmarks and the tests, and handy in scripts that
need a daemon for a while.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from lutstore.child_server import ChildServer, ChildServerError

READY = re.compile(r"lutstore: serving (.+) on 127\.0\.0\.1:(\d+)")
REPO = Path(__file__).resolve().parent.parent


class DaemonError(ChildServerError):
    """The daemon did not start, or did not stop when asked."""


class Daemon(ChildServer):
    """A running `lutstore serve --db DB --port 0` child; a context manager that stops it."""

    name = "lutstore serve"
    error = DaemonError

    def __init__(self, db: Path, *flags: str, verbose: int = 0, timeout: float = 60.0,
                 on_ready_line=None) -> None:
        self.db = Path(db)
        cmd = [sys.executable, "-m", "lutstore.cli", *(["-" + "v" * verbose] if verbose else []),
               "serve", "--db", str(db), "--host", "127.0.0.1", "--port", "0", *flags]
        super().__init__(cmd, READY, cwd=REPO, timeout=timeout, on_ready_line=on_ready_line)
        self.port = int(self.ready.group(2))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"
