"""Run `python -m inference.serve` as a child process: on a free loopback port, wait for its
ready line, keep draining its output, stop it with SIGTERM. Used by the demo, the
benchmark and the tests (as testing.daemon.Daemon is for the daemon)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent   # the child runs `-m inference.serve` from the checkout
READY = re.compile(r"inference\.serve: serving (\S+) on (http://\S+)")


class EndpointError(RuntimeError):
    """The endpoint did not start, or did not stop when asked."""


class Endpoint:
    """A running endpoint child; a context manager that stops it."""

    def __init__(self, lut_addr: str, *flags: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> None:
        cmd = [sys.executable, "-m", "inference.serve", "--lut-addr", lut_addr, "--host", "127.0.0.1", "--port", "0",
               *flags]
        child_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.output: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                raise EndpointError(f"inference.serve exited ({self.proc.returncode}) before serving:\n"
                                    f"{''.join(self.output)}")
            self.output.append(line)
            match = READY.search(line)
            if match:
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                raise EndpointError(f"inference.serve not ready after {timeout:.0f}s:\n{''.join(self.output)}")
        self.model, self.url = match.group(1), match.group(2)
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()

    @property
    def base_url(self) -> str:
        """The OpenAI client's base_url."""
        return self.url + "/v1"

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait; kill if it does not exit in time. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise EndpointError(f"inference.serve did not stop within {timeout:.0f}s") from None
        return self.proc.returncode

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
