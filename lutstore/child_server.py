"""A server run as a child process: start it, wait for the line it prints once it serves, keep
draining its output, stop it with SIGTERM.

The one home of that logic for `testing.daemon.Daemon` (`lutstore serve`: tests, benchmarks, demo)
and `inference.endpoint_process.Endpoint` (`python -m inference.serve`); each says only its command,
its ready line and what it reads from that line.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

_Child = TypeVar("_Child", bound="ChildServer")


class ChildServerError(RuntimeError):
    """The child did not start, or did not stop when asked."""


class ChildServer:
    """A running child server; a context manager that stops it. Subclasses set `name` (for messages)
    and `error` (the ChildServerError subclass they raise)."""

    name = "child server"
    error: type[ChildServerError] = ChildServerError

    def __init__(self, cmd: list[str], ready: re.Pattern[str], *, cwd: Path, env: dict[str, str] | None = None,
                 timeout: float = 60.0, on_ready_line: Callable[[str], None] | None = None) -> None:
        """Start `cmd` and return once a line of its output matches `ready` (`self.ready` is the
        match); the child's stdout and stderr are kept, in order, in `self.output`."""
        child_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.output: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                raise self.error(f"{self.name} exited ({self.proc.returncode}) before serving:\n{''.join(self.output)}")
            self.output.append(line)
            match = ready.search(line)
            if match:
                if on_ready_line:
                    on_ready_line(line.rstrip())
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                raise self.error(f"{self.name} not ready after {timeout:.0f}s:\n{''.join(self.output)}")
        self.ready = match
        # Keep draining so a chatty child never blocks on a full pipe.
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 60.0, strict: bool = False) -> int:
        """SIGTERM, then kill if it has not exited within `timeout` (self.error if strict); the exit code.

        A stop takes about a second on an idle machine; the default is a bound for a stop that hangs,
        not a speed: it holds on a 2-core machine whose cores are both busy (15 s did not: the
        endpoint's exit took longer there)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                if strict:
                    raise self.error(f"{self.name} did not stop within {timeout:.0f}s of SIGTERM; killed it") from None
        return self.proc.returncode

    def __enter__(self: _Child) -> _Child:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
