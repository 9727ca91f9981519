"""vLLM's OpenAI server through a lutstore daemon outage: requests end with an error a client sees.

    vllm serve CKPT --hf-overrides '{"lutstore": {...}}' \\
        --middleware inference.engines.vllm_outage.DaemonOutageMiddleware

Why here, in the API server process: while the daemon does not answer, the engine's step waits
for its rows (inference.engines.step_rows), because in vLLM an exception in the forward kills the
engine core (every request fails, the server exits), and a request can only be failed from the
scheduler's side, which a model cannot reach. So the step waits, and this ASGI middleware, which
reads the same `lutstore` settings from the model config vLLM keeps in app.state, watches the
daemon and answers the clients:

  - while the daemon is known down, a new generation request gets an OpenAI-shaped 503 at once
    (naming the daemon and why) instead of queueing behind the stalled step;
  - once the outage has lasted longer than the settings' retry_seconds, every generation request
    in flight is ended: a stream gets an error event (`data: {"error": ...}`, then
    `data: [DONE]`) and is closed, a non-streamed request gets the 503. vLLM is told that the
    client went away (an http.disconnect), so it aborts the request as for any disconnect;
  - as soon as a probe answers, requests go through again; the stalled step completes by itself
    when its rows arrive (never a wrong row).

Probes (inference.daemon_health: a ListTables with its own client, no retries, a 3 s deadline,
one at a time) run once a second while a generation request is open, and for a new request
while the daemon is known down; an idle server does not probe. Without a `lutstore` key (the
table in memory) the middleware lets everything through.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference.connection import LutstoreSettings
from inference.daemon_health import PROBE_TIMEOUT_S, DaemonHealth

# Under vLLM's "vllm" logger, so these lines come out in its format next to its own.
log = logging.getLogger("vllm.lutstore")

# vLLM's routes that run the model (and so need rows); the rest (/tokenize, /v1/models, /metrics,
# /health ...) never wait for the daemon and are let through.
GENERATING = frozenset({
    "/v1/completions", "/v1/chat/completions", "/v1/chat/completions/batch", "/v1/responses", "/v1/messages",
    "/inference/v1/generate", "/generative_scoring", "/cohere/v2/chat", "/invocations",
})
WATCH_EVERY_S = 1.0      # probe period while requests are open
DISCONNECT: Message = {"type": "http.disconnect"}


def route_path(scope: Scope) -> str:
    """The request's path without the server's --root-path prefix."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def error_body(message: str) -> dict[str, Any]:
    """vLLM's own error shape (ErrorResponse), so clients parse it as any other vLLM error."""
    return {"error": {"message": message, "type": "ServiceUnavailableError", "param": None, "code": 503}}


class OpenRequest:
    """One generation request in flight: its receive/send wrapped so that it can be ended from outside
    (the client gets the error, vLLM gets a disconnect)."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._receive, self._send = receive, send
        # ASGI 2.4 servers report a gone client by send raising OSError; earlier ones by http.disconnect
        spec = tuple(int(p) for p in scope.get("asgi", {}).get("spec_version", "2.0").split("."))
        self._raise_on_send = spec >= (2, 4)
        self.ended = asyncio.Event()
        self._lock = asyncio.Lock()     # our last message never interleaves with one of vLLM's
        self.started = self.streaming = self.finished = False

    async def receive(self) -> Message:
        if self.ended.is_set():
            return DISCONNECT
        got = asyncio.ensure_future(self._receive())
        ended = asyncio.ensure_future(self.ended.wait())
        try:
            await asyncio.wait({got, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:   # also when vLLM cancels its disconnect listener
            ended.cancel()
            if not got.done():
                got.cancel()
        if got.done() and not got.cancelled():
            return got.result()
        return DISCONNECT

    async def send(self, message: Message) -> None:
        async with self._lock:
            if self.ended.is_set():   # we answered the client already: what vLLM still says goes nowhere
                if self._raise_on_send:
                    raise OSError("the request was ended: the lutstore daemon does not answer")
                return
            if message["type"] == "http.response.start":
                self.started = True
                headers = dict(message.get("headers") or [])
                self.streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self.finished = True
            await self._send(message)

    async def end(self, message: str) -> bool:
        """Answer the client with the error now and close; False if the response was already complete."""
        async with self._lock:
            if self.ended.is_set() or self.finished:
                return False
            self.ended.set()
            try:
                if not self.started:
                    await send_json(self._send, 503, error_body(message))
                elif self.streaming:
                    event = f"data: {json.dumps(error_body(message))}\n\ndata: [DONE]\n\n".encode()
                    await self._send({"type": "http.response.body", "body": event, "more_body": False})
                else:   # a JSON body already begun (vLLM sends them whole, so hardly ever): cut it
                    await self._send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:   # the client has gone too
                pass
            return True


async def send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class OutageGuard:
    """The daemon's state as the API server sees it, and the generation requests it may end."""

    def __init__(self, settings: LutstoreSettings, health: DaemonHealth) -> None:
        self.settings, self.health = settings, health
        self.budget = settings.retry_seconds
        self.open: set[OpenRequest] = set()
        self.since: float | None = None        # monotonic time of this outage's first failed probe
        self._watch: asyncio.Task | None = None

    async def check(self) -> bool:
        answers = await self.health.check()
        if answers and self.since is not None:
            log.warning("lutstore: the daemon at %s answers again after %.0f s: requests go through",
                        self.health.address, time.monotonic() - self.since)
            self.since = None
        elif not answers and self.since is None:
            log.warning("lutstore: the daemon at %s does not answer (%s): new requests get a 503; requests in "
                        "flight end with one if it does not answer within %g s", self.health.address,
                        self.health.reason, self.budget)
            self.since = time.monotonic()
        return answers

    def refusal(self) -> str:
        return (f"the lutstore daemon at {self.health.address} does not answer ({self.health.reason}); "
                f"the model's lookup rows cannot be fetched, retry when it answers again")

    async def serve(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        if self.health.down and not await self.check():
            log.debug("a request was answered 503: the lutstore daemon does not answer (%s)", self.health.reason)
            await send_json(send, 503, error_body(self.refusal()))
            return
        request = OpenRequest(scope, receive, send)
        self.open.add(request)
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watch_open_requests())
        try:
            await app(scope, request.receive, request.send)
        finally:
            self.open.discard(request)

    async def _watch_open_requests(self) -> None:
        """While requests are open: probe, and end them all once the outage outlasts the budget."""
        while self.open:
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - a probe that fails oddly must not stop the watch
                log.exception("lutstore: probing the daemon failed")
            if self.since is not None and (lasted := time.monotonic() - self.since) > self.budget:
                message = (f"the lutstore daemon at {self.health.address} has not answered for {lasted:.0f} s "
                           f"({self.health.reason}; retry_seconds {self.budget:g}): the request was ended, its "
                           f"lookup rows could not be fetched")
                ended = [r for r in list(self.open) if await r.end(message)]
                if ended:
                    log.warning("lutstore: %d request(s) in flight ended with a 503: the daemon at %s has not "
                                "answered for %.0f s (%s)", len(ended), self.health.address, lasted, self.health.reason)
            await asyncio.sleep(WATCH_EVERY_S)


class DaemonOutageMiddleware:
    """vLLM `--middleware inference.engines.vllm_outage.DaemonOutageMiddleware`: see the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._guard: OutageGuard | None = None
        self._looked = False    # the model config is read at the first request (app.state has it by then)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST" and route_path(scope) in GENERATING:
            guard = self._guard if self._looked else self._make_guard(scope)
            if guard is not None:
                return await guard.serve(self.app, scope, receive, send)
        await self.app(scope, receive, send)

    def _make_guard(self, scope: Scope) -> OutageGuard | None:
        self._looked = True
        try:
            return self._open_guard(scope)
        except Exception as e:  # noqa: BLE001 - never take the server down: say it once, let requests through
            log.error("lutstore outage middleware is off (requests only stall while the daemon is down): %s", e)
            return None

    def _open_guard(self, scope: Scope) -> OutageGuard | None:
        state = getattr(scope.get("app"), "state", None)
        config = getattr(getattr(state, "vllm_config", None), "model_config", None)
        values = getattr(getattr(config, "hf_config", None), "lutstore", None)
        if not values:
            log.info("lutstore outage middleware: the model has no \"lutstore\" key (table in memory): nothing to watch")
            return None
        from lutstore.client import LutClient

        # the engine has checked these settings at start; its own client has no retries and a short deadline
        settings = LutstoreSettings.from_mapping(values, where="the model config's \"lutstore\" key")
        probe = LutClient(settings.addr, timeout=PROBE_TIMEOUT_S, retries=0, retry_seconds=0,
                          **{**settings.client_options(), "shared_memory": False})
        self._guard = OutageGuard(settings, DaemonHealth(settings, probe.tables))
        log.info("lutstore: while the daemon at %s does not answer, new requests get a 503 and requests in flight "
                 "end after %g s (retry_seconds)", settings.addr, settings.retry_seconds)
        return self._guard
