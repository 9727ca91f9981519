"""Run vLLM's OpenAI server as a child process (lutstore.child_server does the child-process part):
on a free loopback port, with the Python of `.venv-vllm` (`make install-vllm`), whose lutstore
plugin registers MoleForCausalLM. Used by the tests and benchmarks/bench_vllm.py.

    with VllmServer(ckpt, "--dtype", "float32", "--max-model-len", "256") as server:
        requests.post(server.url + "/v1/completions", json={"model": server.model, ...})
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.request
from pathlib import Path

from lutstore.child_server import ChildServer, ChildServerError

REPO = Path(__file__).resolve().parent.parent
PYTHON_ENV = "LUTSTORE_VLLM_PYTHON"       # another vLLM environment's python (default: .venv-vllm)
READY = re.compile(r"Application startup complete")


class VllmServerError(ChildServerError):
    """vLLM did not start, or did not stop when asked."""


def vllm_python() -> Path | None:
    """The Python that runs vLLM: $LUTSTORE_VLLM_PYTHON, else .venv-vllm/bin/python; None when absent."""
    path = Path(os.environ.get(PYTHON_ENV) or REPO / ".venv-vllm" / "bin" / "python")
    return path if path.exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer(ChildServer):
    """`python -m vllm.entrypoints.openai.api_server --model CKPT` serving as `model`; a context
    manager that stops it. env adds variables (e.g. VLLM_CPU_NUM_OF_RESERVED_CPU); the child runs
    from this checkout, which is first on its PYTHONPATH, so the plugin is this checkout's."""

    name = "vLLM"
    error = VllmServerError

    def __init__(self, checkpoint: Path | str, *flags: str, model: str = "mole", lutstore: dict | None = None,
                 env: dict[str, str] | None = None, timeout: float = 600.0) -> None:
        python = vllm_python()
        if python is None:
            raise VllmServerError(f"no vLLM environment: run `make install-vllm` (or set ${PYTHON_ENV})")
        self.port, self.model = free_port(), model
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
               "--served-model-name", model, "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-log-stats", *flags]
        if lutstore is not None:
            cmd += ["--hf-overrides", json.dumps({"lutstore": lutstore})]
        child_env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                     "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        super().__init__(cmd, READY, cwd=REPO, env=child_env, timeout=timeout)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_until_answering(timeout)

    def _wait_until_answering(self, timeout: float) -> None:
        """uvicorn prints its ready line before it accepts connections: GET /v1/models until it answers."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=10) as r:
                    if r.status == 200:
                        return
            except OSError:   # refused, reset, timed out, or an HTTP error status
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise self.error(f"vLLM printed its ready line but does not answer on {self.url}:\n"
                                 f"{''.join(self.output)[-4000:]}")
            time.sleep(0.5)

    @property
    def base_url(self) -> str:
        """The OpenAI client's base_url."""
        return self.url + "/v1"

    def stop(self, timeout: float = 30.0, strict: bool = False) -> int:
        return super().stop(timeout, strict)
