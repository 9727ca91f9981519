"""inference.engines.vllm_outage: the outage middleware in a real HTTP server (uvicorn), against a real
daemon killed and restarted, in front of a stand-in for vLLM's generation routes (so it runs without
vLLM, in seconds; tests/test_vllm.py runs the middleware inside `vllm serve`).

The stand-in does what the middleware relies on in vLLM: a stream of `data:` events, or a JSON answer
that may stall (a step waiting for its rows), either of them cancelled by the client's disconnect
(vLLM's StreamingResponse and with_cancellation), after which vLLM still sends a `null` answer.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from ckpt_factory import make_checkpoint
from lutstore.ingest import ingest_checkpoint
from testing.daemon import Daemon

pytest.importorskip("starlette")
import uvicorn  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.routing import Route  # noqa: E402

from inference.engines.vllm_outage import DaemonOutageMiddleware  # noqa: E402

BUDGET = 1.0   # the settings' retry_seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, what: str, pause: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(pause)
    return value


class StandIn:
    """POST /v1/completions {"stream": bool, "events": n (0: endless), "stall": bool}."""

    def __init__(self) -> None:
        self.open = 0
        self.cancelled = 0   # requests the client's disconnect ended (vLLM aborts these)

    async def __call__(self, scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        ask = json.loads(body)
        self.open += 1
        try:
            work = asyncio.ensure_future(self._stream(send, ask) if ask.get("stream") else self._answer(send, ask))
            gone = asyncio.ensure_future(self._disconnect(receive))
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone in done:
                work.cancel()
                self.cancelled += 1
                if not ask.get("stream"):   # vLLM's with_cancellation returns None, which FastAPI sends
                    await self._json(send, 200, None)
            else:
                gone.cancel()
        finally:
            self.open -= 1

    @staticmethod
    async def _disconnect(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    @staticmethod
    async def _json(send, status: int, value) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(value).encode()})

    async def _answer(self, send, ask: dict) -> None:
        if ask.get("stall"):
            await asyncio.Event().wait()   # a step waiting for its rows
        await self._json(send, 200, {"ok": True})

    @staticmethod
    async def _stream(send, ask: dict) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        i = 0
        while not ask.get("events") or i < ask["events"]:
            await send({"type": "http.response.body", "body": f"data: {json.dumps({'i': i})}\n\n".encode(),
                        "more_body": True})
            i += 1
            await asyncio.sleep(0.02)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


class Server:
    """uvicorn in a thread: the stand-in behind the middleware, the model config as vLLM keeps it."""

    def __init__(self, lutstore: dict | None) -> None:
        self.stand_in = StandIn()
        app = Starlette(routes=[Route("/v1/completions", self.stand_in, methods=["POST"])],
                        middleware=[Middleware(DaemonOutageMiddleware)])
        app.state.vllm_config = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(lutstore=lutstore)))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/completions"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 60, "uvicorn started")

    def post(self, **ask) -> requests.Response:
        return requests.post(self.url, json=ask, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class Reader(threading.Thread):
    """A client reading one response to its end: its status and its lines."""

    def __init__(self, url: str, ask: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.ask = url, ask
        self.status: int | None = None
        self.lines: list[str] = []
        self.first = threading.Event()
        self.start()

    def run(self) -> None:
        with requests.post(self.url, json=self.ask, stream=True, timeout=120) as r:
            self.status = r.status_code
            for line in r.iter_lines(decode_unicode=True):
                if line:
                    self.lines.append(line)
                    self.first.set()
        self.first.set()


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    ckpt = make_checkpoint(tmp_path / "m", form="train", vocab=40)
    ingest_checkpoint(ckpt, tmp_path / "db", name="m", encoding="fp32", progress=False)
    return tmp_path / "db"


def test_an_outage_ends_open_requests_with_the_error_and_refuses_new_ones_then_serves_again(db: Path) -> None:
    port = free_port()
    daemon = Daemon(db, "--port", str(port))
    server = Server({"addr": f"127.0.0.1:{port}", "table": "m", "retry_seconds": BUDGET})
    readers: list[Reader] = []
    try:
        # the daemon answers: requests go through untouched
        assert server.post(stream=False).json() == {"ok": True}
        whole = Reader(server.url, {"stream": True, "events": 3})
        whole.join(60)
        assert whole.status == 200 and whole.lines == [f'data: {{"i": {i}}}' for i in range(3)] + ["data: [DONE]"]

        # two endless streams and a stalled answer are open when the daemon dies
        readers = [Reader(server.url, {"stream": True}), Reader(server.url, {"stream": True}),
                   Reader(server.url, {"stream": False, "stall": True})]
        for r in readers[:2]:
            assert r.first.wait(60)
        wait_until(lambda: server.stand_in.open == 3, 60, "3 requests open")
        daemon.proc.kill()
        daemon.proc.wait(30)
        killed = time.monotonic()

        # a new request once the outage is known: a 503 at once, in vLLM's error shape
        refused, = wait_until(lambda: (r := server.post(stream=False)).status_code == 503 and [r], 60, "a 503")
        error = refused.json()["error"]
        assert error["type"] == "ServiceUnavailableError" and error["code"] == 503, error
        assert error["message"].startswith(f"the lutstore daemon at 127.0.0.1:{port} does not answer "
                                           f"(Connection refused)"), error
        assert refused.headers["retry-after"] == "1"

        # past the budget the open requests end: the streams with an error event, the stalled one with a 503
        for r in readers:
            r.join(60)
            assert not r.is_alive()
        assert time.monotonic() - killed > BUDGET
        for r in readers[:2]:
            assert r.status == 200 and r.lines[-1] == "data: [DONE]", r.lines[-3:]
            ended = json.loads(r.lines[-2][len("data: "):])["error"]
            assert ended["code"] == 503 and ended["type"] == "ServiceUnavailableError"
            assert f"the lutstore daemon at 127.0.0.1:{port} has not answered for" in ended["message"], ended
            assert all(line.startswith('data: {"i": ') for line in r.lines[:-2])   # nothing of ours before
        assert readers[2].status == 503 and "has not answered for" in json.loads(readers[2].lines[0])["error"]["message"]
        # the stand-in saw each client go away (vLLM aborts such a request); its late `null` went nowhere
        wait_until(lambda: server.stand_in.cancelled == 3 and server.stand_in.open == 0, 60, "3 disconnects")

        # the daemon back on the same port: requests go through again
        daemon = Daemon(db, "--port", str(port))
        wait_until(lambda: server.post(stream=False).status_code == 200, 60, "a 200 after the restart")
    finally:
        server.stop()
        daemon.stop()


def test_without_a_lutstore_key_everything_goes_through() -> None:
    server = Server(None)   # a table in memory: no daemon to watch
    try:
        assert server.post(stream=False).json() == {"ok": True}
        r = Reader(server.url, {"stream": True, "events": 2})
        r.join(60)
        assert r.lines == ['data: {"i": 0}', 'data: {"i": 1}', "data: [DONE]"]
    finally:
        server.stop()
