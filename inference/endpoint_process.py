"""Run `python -m inference.serve` as a child process: on a free loopback port, wait for its
ready line, keep draining its output, stop it with SIGTERM (lutstore.child_server does the
child-process part, as for testing.daemon.Daemon). Used by the demo, the benchmark and the tests."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from lutstore.child_server import ChildServer, ChildServerError

REPO = Path(__file__).resolve().parent.parent   # the child runs `-m inference.serve` from the checkout
READY = re.compile(r"inference\.serve: serving (\S+) on (http://\S+)")


class EndpointError(ChildServerError):
    """The endpoint did not start, or did not stop when asked."""


class Endpoint(ChildServer):
    """A running endpoint child; a context manager that stops it."""

    name = "inference.serve"
    error = EndpointError

    def __init__(self, lut_addr: str, *flags: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> None:
        cmd = [sys.executable, "-m", "inference.serve", "--lut-addr", lut_addr, "--host", "127.0.0.1", "--port", "0",
               *flags]
        super().__init__(cmd, READY, cwd=REPO, env=env, timeout=timeout)
        self.model, self.url = self.ready.group(1), self.ready.group(2)

    @property
    def base_url(self) -> str:
        """The OpenAI client's base_url."""
        return self.url + "/v1"

    def stop(self, timeout: float = 60.0, strict: bool = True) -> int:
        """SIGTERM, wait; kill if it does not exit in time (EndpointError unless strict=False). The exit status."""
        return super().stop(timeout, strict)
