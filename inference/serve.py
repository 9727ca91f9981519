"""An OpenAI-compatible HTTP endpoint for a MoLE model served by a lutstore daemon.

    python -m inference.serve --lut-addr 127.0.0.1:50051 [--table T] [--port 8000] [--max-batch 32]
    curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
         -d '{"prompt": "the water", "max_tokens": 16, "temperature": 0}'

Routes: POST /v1/completions (text or token-id prompts, a list of prompts,
max_tokens (default 16), temperature, top_p, top_k, seed, stop, stream over
server-sent events, logprobs, echo: with echo=true, max_tokens=0, logprobs=0 it
returns the prompt's log-probs), POST /v1/chat/completions (messages, rendered
by the tokenizer's chat template; a model without one answers 400
no_chat_template), GET /v1/models, GET /health (200 only when the backbone is
loaded and the daemon answers), GET /metrics (Prometheus).

Requests are decoded together by inference.engine (continuous batching over a
slot KV cache); all of them share ONE RemoteTable, so a row fetched for one
user is a cache hit for the next. Binds to 127.0.0.1 unless --host says
otherwise; with an API key (--api-key-file, or $LUTSERVE_API_KEY) the /v1
routes want `Authorization: Bearer KEY`. Errors are OpenAI-shaped:
{"error": {"message", "type", "param", "code"}}; a body over --max-body-bytes
gets 413, a request finding --max-queue prompts waiting gets 429 with
Retry-After, and a client that disconnects (streamed or not) frees its slot.
SIGTERM or Ctrl-C stops it: open requests get --shutdown-grace seconds, then
end with an error (a stream's last event); a second Ctrl-C ends them at once
(exit 130).

FastAPI (on Starlette) + uvicorn: pydantic checks every request parameter
and names the bad one, and uvicorn is the common production ASGI server.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":   # before torch loads: a Ctrl-C during the import is one line, not a traceback
    from lutstore.interrupts import quiet_keyboard_interrupt
    quiet_keyboard_interrupt("serve")

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Union

import grpc
import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference.engine import (Engine, EngineStopped, FailedEvent, FinishedEvent, PromptLogprobsEvent, QueueFull,
                              Sequence, TokenEvent)
from inference.connection import LutstoreSettings, add_remote_args, connect
from inference.chat_template import ChatTemplate, ChatTemplateError
from inference.daemon_health import PROBE_TIMEOUT_S, DaemonHealth
from inference.cli import cli_main
from lutstore.help_format import HelpFormatter
from lutstore.security import warn_if_others_can_read
from inference.sampling import SamplingConfig
from lutstore.errors import UserError
from lutstore.interrupts import EXIT_SIGINT

log = logging.getLogger(__name__)

PROG = "serve"                 # how its lines on stderr begin (as cli_main's errors)
API_KEY_ENV = "LUTSERVE_API_KEY"
DEFAULT_MAX_TOKENS = 16        # as the OpenAI completions API
MAX_LOGPROBS = 20
MAX_STOP = 4
MAX_STOP_CHARS = 256           # per stop string: a stream holds back that many characters
MIN_TEMPERATURE = 1e-5         # below it, greedy (as vLLM): logits / ~0 (1e-300 is 0 in fp32) NaN the sampler
DEFAULT_MAX_BODY = 1 << 20     # bytes of one request body (--max-body-bytes)
RETRY_AFTER_S = 1              # the Retry-After of a 429 (queue full)
DEFAULT_GRACE_S = 5.0          # a stop's wait for open requests before it ends them (--shutdown-grace)
FLUSH_S = 3                    # then, for the ended requests to send their error and close
# OpenAI parameters accepted only at their default value: what a request must send, if anything
ONLY_DEFAULT = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0}


# -- errors in the OpenAI shape ---------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def engine_error(error: BaseException) -> APIError:
    """What a failed generation means for the client."""
    from lutstore.client import LutError

    if isinstance(error, LutError):
        return APIError(503, f"the lutstore daemon could not serve rows: {error}", "server_error", None, "lut_unavailable")
    if isinstance(error, EngineStopped):
        return APIError(503, str(error), "server_error", None, "shutting_down")
    if isinstance(error, QueueFull):
        return APIError(429, f"server busy: {error}; retry later", "rate_limit_error", None, "queue_full",
                        {"Retry-After": str(RETRY_AFTER_S)})
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", "server_error", None, None)


# -- the request ---------------------------------------------------------------------------------
class CompletionRequest(BaseModel):
    # Python's json (Starlette's request.json) reads NaN and Infinity literals: refuse them by name
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = None
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(default=DEFAULT_MAX_TOKENS, ge=0)
    temperature: float | None = Field(default=1.0, ge=0, le=2)
    top_p: float | None = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=0, ge=-1)          # extension (as vLLM): 0 or -1 = no cut
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    n: int | None = Field(default=1, ge=1, le=1)
    best_of: int | None = Field(default=None, ge=1, le=1)
    presence_penalty: float | None = Field(default=0.0, ge=0, le=0)
    frequency_penalty: float | None = Field(default=0.0, ge=0, le=0)
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")            # name, tool_calls, ...: the template may read them

    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)              # None: until the model ends its turn
    max_completion_tokens: int | None = Field(default=None, ge=1)   # the newer name of max_tokens
    temperature: float | None = Field(default=1.0, ge=0, le=2)
    top_p: float | None = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=0, ge=-1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    n: int | None = Field(default=1, ge=1, le=1)
    presence_penalty: float | None = Field(default=0.0, ge=0, le=0)
    frequency_penalty: float | None = Field(default=0.0, ge=0, le=0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None


@dataclass
class Choice:
    """One prompt's completion as it grows: tokens -> text, stop strings, log-probs."""
    index: int
    prompt: list[int]
    prompt_text: str
    seq: Sequence | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""                       # completion text (cut at a stop string)
    prompt_decoded: str | None = None
    sent: int = 0                        # chars of text already streamed
    echo_sent: bool = False
    role_sent: bool = False              # chat: the first delta (which names the role) went out
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict | None] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top: list[dict | None] = field(default_factory=list)
    lp_sent: int = 0                     # completion tokens whose log-probs were streamed
    pieces: list[str] = field(default_factory=list)   # text of each token (echoed prompt's first)
    offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: APIError | None = None
    last_at: float = 0.0


# -- metrics --------------------------------------------------------------------------------------
class Metrics:
    def __init__(self, state: ServeState) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("lutserve_requests", "completion requests by outcome", ["status"], registry=r)
        self.prompt_tokens = Counter("lutserve_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("lutserve_generation_tokens", "tokens generated", registry=r)
        Gauge("lutserve_queue_length", "requests waiting for a slot", registry=r).set_function(
            lambda: state.engine.waiting if state.engine else 0)
        Gauge("lutserve_running_requests", "requests in the running batch (slots in use)", registry=r).set_function(
            lambda: state.engine.running if state.engine else 0)
        self.batch = Histogram("lutserve_batch_size", "rows per decode step", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.ttft = Histogram("lutserve_time_to_first_token_seconds", "submit -> first token sampled", registry=r,
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("lutserve_inter_token_latency_seconds", "time between a request's tokens", registry=r,
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))

        def cache(attr: str) -> float:
            return getattr(state.source.stats(), attr) if state.source is not None else 0.0

        Gauge("lutserve_row_cache_hit_rate", "share of row lookups served from the shared row cache",
              registry=r).set_function(lambda: cache("hit_rate"))
        Gauge("lutserve_row_cache_hits", "row lookups served from the cache (cumulative)",
              registry=r).set_function(lambda: cache("hits"))
        Gauge("lutserve_row_cache_misses", "rows fetched from the daemon (cumulative)",
              registry=r).set_function(lambda: cache("misses"))


# -- the server state -------------------------------------------------------------------------------
@dataclass
class ServeState:
    model_name: str
    engine: Engine | None = None
    source: Any = None
    remote: Any = None                   # inference.backbone.RemoteModel (None: not loaded yet)
    tokenizer: Any = None
    context: int = 0
    vocab_size: int = 0
    eos_id: int | None = None
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics | None = None
    health: DaemonHealth | None = None   # the daemon's state (None: not loaded yet)
    chat_template: ChatTemplate | None = None
    no_chat: str = "this model has no chat template (its tokenizer_config.json has no chat_template)"
    chat_stop_ids: frozenset[int] = frozenset()   # the model's EOS and the template's eos_token: a turn ends
    probe_client: Any = None             # the LutClient of health's probes

    runs: set = field(default_factory=set)   # the requests being answered (Run), for a stop that ends them

    def end_requests(self) -> int:
        """End every open request now with a 503 shutting_down (a stream gets it as its last event)."""
        runs = list(self.runs)
        for run in runs:
            run.abort(EngineStopped("the server is shutting down"))
        return len(runs)

    def daemon_unavailable(self) -> APIError:
        return APIError(503, f"the lutstore daemon at {self.health.address} does not answer ({self.health.reason}); "
                             f"/health answers 200 again when it does", "server_error", None, "lut_unavailable")


def _tokenize(state: ServeState, prompt) -> list[tuple[list[int], str]]:
    """(ids, text) of each prompt of the request."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt is empty", param="prompt")
    if state.engine is not None and len(prompts) > state.engine.max_queue:
        # each prompt waits in the engine's queue: more than it holds would be refused (429) forever
        raise APIError(400, f"prompt is a list of {len(prompts)} prompts; at most {state.engine.max_queue} "
                            f"(--max-queue) in one request", param="prompt")
    out = []
    for p in prompts:
        if isinstance(p, str):
            if state.tokenizer is None:
                raise APIError(400, "this model has no tokenizer; send the prompt as token ids", param="prompt")
            ids = state.tokenizer.encode(p).ids
            text = p
        else:
            ids = list(p)
            bad = [t for t in ids if not 0 <= t < state.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary 0..{state.vocab_size - 1}",
                               param="prompt")
            text = state.tokenizer.decode(ids, skip_special_tokens=False) if state.tokenizer else ""
        if not ids:
            raise APIError(400, "the prompt is empty (it encodes to no tokens)", param="prompt")
        out.append((ids, text))
    return out


def _check(state: ServeState, req: CompletionRequest) -> tuple[list[Choice], int, list[str]]:
    if req.model is not None and req.model != state.model_name:
        raise APIError(404, f"the model {req.model!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")
    for name in ("logit_bias", "suffix"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported", param=name)
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop has {len(stops)} sequences; at most {MAX_STOP} are allowed", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"a stop sequence has {max(len(s) for s in stops)} characters; at most {MAX_STOP_CHARS} "
                            f"are allowed", param="stop")
    stops = [s for s in stops if s]
    choices = []
    for i, (ids, text) in enumerate(_tokenize(state, req.prompt)):
        if len(ids) + max_tokens > state.context:
            # as OpenAI: a prompt that leaves no room names the prompt, else max_tokens asks for too much
            param = "prompt" if len(ids) + min(max_tokens, 1) > state.context else "max_tokens"
            raise APIError(400, f"This model's maximum context length is {state.context} tokens. However, you "
                                f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} "
                                f"for the completion). Please reduce the {param}.",
                           param=param, code="context_length_exceeded")
        choices.append(Choice(i, ids, text))
    if max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens=0 generates nothing; pass echo=true to score the prompt", param="max_tokens")
    return choices, max_tokens, stops


def _chat_prompt(state: ServeState, req: ChatRequest) -> CompletionRequest:
    """The completion request a chat request amounts to: its messages rendered by the chat template
    and tokenized (the template writes the special tokens itself, so none are added)."""
    for name, value in (("logprobs", req.logprobs), ("top_logprobs", req.top_logprobs)):
        if value:
            raise APIError(400, f"{name} is not supported on /v1/chat/completions; /v1/completions returns "
                                f"log-probs", param=name)
    messages = []
    for i, m in enumerate(req.messages):
        message = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):      # content parts: only text ones, joined as vLLM joins them
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in m.content):
                raise APIError(400, f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": "
                                    f"...}}) are supported", param="messages")
            message["content"] = "\n".join(part["text"] for part in m.content)
        messages.append(message)
    try:
        text = state.chat_template.render(messages)
    except ChatTemplateError as e:
        raise APIError(400, f"the model's chat template refused the messages: {e}", param="messages") from None
    ids = state.tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise APIError(400, "the messages render to an empty prompt", param="messages")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is None:
        max_tokens = max(state.context - len(ids), 1)        # until the turn ends (a prompt too long is named)
    return CompletionRequest(model=req.model, prompt=ids, max_tokens=max_tokens, temperature=req.temperature,
                             top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=req.stop, stream=req.stream,
                             stream_options=req.stream_options, n=req.n, presence_penalty=req.presence_penalty,
                             frequency_penalty=req.frequency_penalty, logit_bias=req.logit_bias, user=req.user)


# -- running a request ------------------------------------------------------------------------------
class Run:
    """The engine sequences of one HTTP request, their events on one asyncio queue."""

    def __init__(self, state: ServeState, req: CompletionRequest, choices: list[Choice], max_tokens: int,
                 stops: list[str], chat: bool = False) -> None:
        self.state, self.req, self.choices, self.stops, self.chat = state, req, choices, stops, chat
        self.queue: asyncio.Queue = asyncio.Queue()
        self.disconnected = False                                 # the client went away (non-streamed)
        self.loop = asyncio.get_running_loop()
        self.hold = max((len(s) for s in stops), default=1) - 1   # chars kept back: a stop may be starting
        temperature = req.temperature if req.temperature is not None else 1.0
        # a top_k past the vocabulary cuts nothing (and 10**30 would overflow the engine's int64 tensor)
        sampling = SamplingConfig(temperature if temperature >= MIN_TEMPERATURE else 0.0,
                                  min(max(0, req.top_k or 0), state.vocab_size),
                                  req.top_p if req.top_p is not None else 1.0)
        stop_ids = frozenset() if state.eos_id is None else frozenset([state.eos_id])
        if chat:
            stop_ids = state.chat_stop_ids
        self.stop_ids = stop_ids
        try:
            for c in choices:
                c.seq = Sequence(c.prompt, max_tokens, self._emitter(c.index), sampling,
                                 None if req.seed is None else req.seed & 0xFFFF_FFFF_FFFF_FFFF,
                                 req.logprobs, bool(req.echo and req.logprobs is not None), stop_ids)
                state.engine.submit(c.seq)
                state.metrics.prompt_tokens.inc(len(c.prompt))
        except (QueueFull, EngineStopped) as e:
            self.cancel()
            raise engine_error(e) from None
        state.runs.add(self)

    def _emitter(self, index: int):
        def emit(event) -> None:   # on the engine thread
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:   # the event loop is gone (shutdown)
                pass
        return emit

    def cancel(self) -> None:
        for c in self.choices:
            if c.seq is not None and c.finish_reason is None and c.error is None:
                self.state.engine.cancel(c.seq)

    def close(self) -> None:
        """The response is done (or its client gone): free the slots, forget the run."""
        self.cancel()
        self.state.runs.discard(self)

    def abort(self, error: BaseException) -> None:
        """Fail the open choices now, on the event loop (not at the engine's next step, which may be slow)."""
        for c in self.choices:
            if c.finish_reason is None and c.error is None:
                self.queue.put_nowait((c.index, FailedEvent(error)))

    @property
    def open(self) -> int:
        return sum(1 for c in self.choices if c.finish_reason is None and c.error is None)

    async def events(self) -> AsyncIterator[Choice]:
        """Apply events to the choices; yields the choice each event changed."""
        while self.open:
            index, event = await self.queue.get()
            c = self.choices[index]
            if c.finish_reason is not None or c.error is not None:
                continue                                 # late tokens of a choice cut at a stop string
            self._apply(c, event)
            yield c

    def _apply(self, c: Choice, event) -> None:
        m, tok = self.state.metrics, self.state.tokenizer
        if isinstance(event, TokenEvent):
            m.generation_tokens.inc()
            if not c.tokens:
                m.ttft.observe(event.at - c.seq.submitted_at)
            else:
                m.itl.observe(event.at - c.last_at)
            c.last_at = event.at
            c.tokens.append(event.token)
            c.token_logprobs.append(event.logprob)
            c.top_logprobs.append(self._named(event.top))
            c.text = self._continuation(c)
            for s in self.stops:
                at = c.text.find(s)
                if at >= 0:
                    c.text = c.text[:at]
                    c.finish_reason = "stop"
                    self.state.engine.cancel(c.seq)
        elif isinstance(event, PromptLogprobsEvent):
            c.prompt_logprobs.extend(event.logprobs)
            if event.top:
                c.prompt_top.extend(self._named(t) for t in event.top)
        elif isinstance(event, FinishedEvent):
            c.finish_reason = event.reason
        elif isinstance(event, FailedEvent):
            c.error = engine_error(event.error)
            if c.error.code == "lut_unavailable" and getattr(event.error, "code", None) == grpc.StatusCode.UNAVAILABLE:
                self.state.health.went_down(event.error.message)

    def _continuation(self, c: Choice) -> str:
        """The completion's text as it continues the prompt (decoded together, so the joining space is kept)."""
        tok = self.state.tokenizer
        if tok is None:
            return ""
        if c.prompt_decoded is None:
            c.prompt_decoded = tok.decode(c.prompt, skip_special_tokens=False)
        # a chat message's content ends before the token that ended the turn
        tokens = [t for t in c.tokens if t not in self.stop_ids] if self.chat else c.tokens
        full = tok.decode(c.prompt + tokens, skip_special_tokens=False)
        if full.startswith(c.prompt_decoded):
            return full[len(c.prompt_decoded):]
        return tok.decode(tokens, skip_special_tokens=False)

    def _named(self, top: dict[int, float] | None) -> dict[str, float] | None:
        if top is None:
            return None
        tok = self.state.tokenizer
        return {(tok.decode([t], skip_special_tokens=False) if tok else str(t)): lp for t, lp in top.items()}

    # -- response pieces --------------------------------------------------------------------
    def logprobs_of(self, c: Choice, with_prompt: bool, start: int, end: int) -> dict | None:
        """The OpenAI logprobs object for completion tokens start..end (after the prompt's, with_prompt)."""
        if self.req.logprobs is None:
            return None
        self._extend_pieces(c)
        skip = len(c.prompt) if self.req.echo else 0
        lps: list = c.token_logprobs[start:end]
        tops: list = [t if t is not None else {} for t in c.top_logprobs[start:end]]
        first, last = skip + start, skip + end
        if with_prompt:
            lps = [None] + c.prompt_logprobs + lps
            tops = [None] + (c.prompt_top or [{} for _ in c.prompt_logprobs]) + tops
            first = 0
        return {"tokens": c.pieces[first:last], "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": c.offsets[first:last]}

    def _extend_pieces(self, c: Choice) -> None:
        """Each token's text as it adds to the decoded text (so pieces join to the text), and where it starts."""
        tok = self.state.tokenizer
        ids = (c.prompt if self.req.echo else []) + c.tokens
        while len(c.pieces) < len(ids):
            i = len(c.pieces)
            if tok is None:
                c.pieces.append("")
                c.offsets.append(0)
                continue
            before = tok.decode(ids[:i], skip_special_tokens=False) if i else ""
            after = tok.decode(ids[:i + 1], skip_special_tokens=False)
            c.pieces.append(after[len(before):] if after.startswith(before) else tok.decode([ids[i]]))
            c.offsets.append(len(before))

    def header(self, rid: str, chunk: bool = False) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.state.model_name}

    def usage(self) -> dict:
        p = sum(len(c.prompt) for c in self.choices)
        g = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}


def _echo_text(req: CompletionRequest, c: Choice) -> str:
    return c.prompt_text if req.echo else ""


async def _cancel_on_disconnect(request: Request, run: Run) -> None:
    """Cancel the run when its client goes away.

    After the body is read, the ASGI receive() returns only when the connection is lost
    (http.disconnect), as Starlette's StreamingResponse listens for it; the engine frees the
    run's slots (or queue places) at its next step boundary."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    run.disconnected = True
    run.cancel()


def _finish_reason(c: Choice) -> str:
    return "stop" if c.finish_reason == "stop" else "length"


async def complete(state: ServeState, req: CompletionRequest, request: Request, chat: bool = False) -> Response:
    choices, max_tokens, stops = _check(state, req)
    run = Run(state, req, choices, max_tokens, stops, chat)
    watcher = asyncio.create_task(_cancel_on_disconnect(request, run))
    try:
        async for _ in run.events():
            pass
    finally:
        watcher.cancel()
        run.close()
    if run.disconnected:
        state.metrics.requests.labels("cancelled").inc()
        return Response(status_code=499)                 # nobody reads it (nginx's "client closed request")
    failed = next((c.error for c in choices if c.error is not None), None)
    if failed is not None:
        state.metrics.requests.labels("error").inc()
        return failed.response()
    state.metrics.requests.labels("ok").inc()
    if chat:
        body = run.header(f"chatcmpl-{uuid.uuid4().hex}")
        body["choices"] = [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                            "finish_reason": _finish_reason(c)} for c in choices]
        body["usage"] = run.usage()
        return JSONResponse(body)
    body = run.header(f"cmpl-{uuid.uuid4().hex}")
    body["choices"] = [{"index": c.index, "text": _echo_text(req, c) + c.text,
                        "logprobs": run.logprobs_of(c, bool(req.echo), 0, len(c.tokens)),
                        "finish_reason": _finish_reason(c)} for c in choices]
    body["usage"] = run.usage()
    return JSONResponse(body)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def stream(state: ServeState, req: CompletionRequest, chat: bool = False) -> StreamingResponse:
    choices, max_tokens, stops = _check(state, req)
    run = Run(state, req, choices, max_tokens, stops, chat)
    rid = f"chatcmpl-{uuid.uuid4().hex}" if chat else f"cmpl-{uuid.uuid4().hex}"

    def chunk(c: Choice, text: str, logprobs: dict | None, finish: str | None) -> str:
        body = run.header(rid, chunk=True)
        if chat:
            delta = {"content": text} if c.role_sent else {"role": "assistant", "content": text}
            c.role_sent = True
            body["choices"] = [{"index": c.index, "delta": delta, "logprobs": None, "finish_reason": finish}]
        else:
            body["choices"] = [{"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": finish}]
        if req.stream_options and req.stream_options.get("include_usage"):
            body["usage"] = None
        return _sse(body)

    async def body() -> AsyncIterator[str]:
        status = "cancelled"
        try:
            async for c in run.events():
                if c.error is not None:
                    status = "error"
                    yield _sse(c.error.body())
                    run.cancel()
                    break
                done = c.finish_reason is not None
                upto = len(c.text) if done else max(c.sent, len(c.text) - run.hold)
                if not done and c.text.endswith("\ufffd"):
                    upto = c.sent                       # half a multi-byte character: wait for the rest
                text = c.text[c.sent:upto]
                with_prompt = bool(req.echo) and not c.echo_sent
                if with_prompt and not (done or c.tokens):
                    continue                            # the echoed prompt goes out whole, with all its log-probs
                if with_prompt or text or done:
                    prefix = c.prompt_text if with_prompt else ""
                    lp = run.logprobs_of(c, with_prompt, c.lp_sent, len(c.tokens))
                    c.sent, c.lp_sent, c.echo_sent = upto, len(c.tokens), c.echo_sent or with_prompt
                    finish = None if not done else _finish_reason(c)
                    yield chunk(c, prefix + text, lp, finish)
            else:
                status = "ok"
                if req.stream_options and req.stream_options.get("include_usage"):
                    yield _sse({**run.header(rid, chunk=True), "choices": [], "usage": run.usage()})
            yield _sse("[DONE]")
        finally:
            run.close()                                   # a client that went away frees its slots
            state.metrics.requests.labels(status).inc()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -- the app --------------------------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: a request body over max_bytes gets 413 before the app sees it.

    A Content-Length over the limit is refused unread (uvicorn discards the rest as it arrives,
    so the client still reads the 413); a chunked body is read up to the limit (memory stays
    bounded) and then replayed to the app, whose later receive() calls (the disconnect watch)
    go to the connection."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and int(length) > self.max_bytes:   # h11 has checked it is a number
            return await self._refuse(scope, send, int(length))
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return                                           # gone before the body arrived
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(scope, send, None)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, send, length: int | None) -> None:
        size = f"{length} bytes" if length is not None else f"over {self.max_bytes} bytes"
        response = APIError(413, f"the request body is {size}; at most {self.max_bytes} are allowed "
                                 f"(--max-body-bytes)", code="request_too_large").response()
        await response(scope, None, send)


def create_app(state: ServeState, max_body_bytes: int = DEFAULT_MAX_BODY) -> FastAPI:
    app = FastAPI(title="lutstore MoLE completions", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        if err.get("type") == "extra_forbidden":
            msg = f"unknown parameter {param!r}"
        elif err.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        elif param is None:
            msg = f"the request body must be a JSON object of parameters: {err.get('msg')}"
        elif param == "prompt" and err.get("type") != "missing":
            # pydantic reports the union's first member ("prompt.str: ..."): say what is accepted
            msg = "prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists"
        else:
            where = ".".join(loc)
            msg = f"{where}: {err.get('msg')}" if where else str(err.get("msg"))
            if param in ONLY_DEFAULT and err.get("type") != "missing":
                # pydantic's bound ("Input should be <= 0") reads as if other values were allowed
                msg = f"{param} is not supported (must be {ONLY_DEFAULT[param]})"
        return APIError(400, msg, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error",
                        code=str(e.status_code)).response()

    async def authorized(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                           "authentication_error", code="invalid_api_key")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "lutstore", "max_model_len": state.context}]}

    async def answer(req: CompletionRequest, request: Request, chat: bool = False):
        try:
            return await (stream(state, req, chat) if req.stream else complete(state, req, request, chat))
        except APIError:
            state.metrics.requests.labels("rejected").inc()
            raise

    async def ready() -> None:
        if state.engine is None:
            raise APIError(503, "the model is still loading", "server_error", code="not_ready")
        if not state.engine.alive:
            raise APIError(503, "the engine has stopped", "server_error", code="shutting_down")
        if state.health.down and not await state.health.check():
            # known down: answer now, not after the retry budget that the last request already spent
            log.info("completion refused: the daemon does not answer (%s)", state.health.reason)
            state.metrics.requests.labels("rejected").inc()
            raise state.daemon_unavailable()

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(req: CompletionRequest, request: Request):
        await ready()
        return await answer(req, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(req: ChatRequest, request: Request):
        if state.chat_template is None:
            state.metrics.requests.labels("rejected").inc()
            raise APIError(400, f"{state.no_chat}, so /v1/chat/completions cannot turn messages into a prompt; "
                                f"send the prompt text to /v1/completions instead", code="no_chat_template")
        await ready()
        try:
            as_completion = _chat_prompt(state, req)
        except APIError:
            state.metrics.requests.labels("rejected").inc()
            raise
        try:
            return await answer(as_completion, request, chat=True)
        except APIError as e:
            if e.param == "prompt":       # the prompt is the messages here
                e.param = "messages"
                e.message = e.message.replace("reduce the prompt", "shorten the messages")
            raise

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not state.engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        if not await state.health.check():
            return JSONResponse({"status": "daemon unreachable", "reason": state.health.reason}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.model_name, "running": state.engine.running,
                             "waiting": state.engine.waiting})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# -- stopping ------------------------------------------------------------------------------------------
class Server(uvicorn.Server):
    """uvicorn's server, stopping as a user expects.

    SIGTERM or Ctrl-C: no new connections; open requests get `grace` seconds to finish, then end with a
    503 shutting_down (a stream gets it as an error event); exit 0. A second Ctrl-C ends them at
    once, the same way, and the process exits 130 with one line. uvicorn alone would cancel the
    request tasks instead (a traceback each, streams cut without a word) and re-raise the signal."""

    def __init__(self, config: uvicorn.Config, state: ServeState, url: str, grace: float = DEFAULT_GRACE_S) -> None:
        super().__init__(config)
        self.state, self.url, self.grace = state, url, grace
        self.ended: int | None = None          # requests a second Ctrl-C ended (None: it did not come)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        print(f"inference.serve: serving {self.state.model_name} on {self.url}", flush=True)

    def handle_exit(self, sig: int, frame) -> None:
        first, forced = not self.should_exit, self.force_exit
        super().handle_exit(sig, frame)
        # a signal handler interrupts the loop anywhere: do the work in a callback of the loop
        if self._loop is None:
            return
        if first:
            self._loop.call_soon_threadsafe(self._stopping)
        elif self.force_exit and not forced:
            self._loop.call_soon_threadsafe(self._end_now)

    def _stopping(self) -> None:
        if self.state.runs:
            print(f"{PROG}: stopping; waiting up to {self.grace:g} s for {len(self.state.runs)} open request(s) "
                  f"(Ctrl-C again ends them now)", file=sys.stderr, flush=True)

    def _end_now(self) -> None:
        self.ended = self.state.end_requests()

    async def shutdown(self, sockets=None) -> None:
        grace = asyncio.get_running_loop().call_later(self.grace, self.state.end_requests)
        try:
            await super().shutdown(sockets)   # waits for the open requests (a second Ctrl-C stops the wait)
        finally:
            grace.cancel()
        # the ended requests send their error and close: give them the moment they need, bounded
        deadline = time.monotonic() + FLUSH_S
        while (self.server_state.tasks or self.server_state.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown (exit status -15);
        # like `lutstore serve`, a requested stop that went well exits 0 instead (run() says 130
        # for a second Ctrl-C).
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()


# -- the CLI ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m inference.serve", description=__doc__,
                                formatter_class=HelpFormatter)
    add_remote_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed at start)")
    p.add_argument("--model-name", help="the model id clients name (default: the table's name)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together: KV-cache slots (default 32)")
    p.add_argument("--context", type=int, default=0,
                   help="tokens per slot, prompt + completion (default 0: the model's context, max_position_embeddings "
                        "times its rope scaling factor if any)")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="prompt tokens prefilled per step, between decode steps of the running batch (default 64)")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="prompts allowed to wait for a slot (default 1024); past it a request gets 429 with "
                        f"Retry-After: {RETRY_AFTER_S}")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY,
                   help=f"largest request body; a larger one gets 413 (default {DEFAULT_MAX_BODY}: 1 MiB)")
    p.add_argument("--shutdown-grace", type=float, default=DEFAULT_GRACE_S, metavar="SECONDS",
                   help=f"how long a stop (SIGTERM, Ctrl-C) waits for open requests to finish before ending them "
                        f"with an error (default {DEFAULT_GRACE_S:g}); a second Ctrl-C ends them at once")
    p.add_argument("--static-batching", action="store_true",
                   help="admit requests only when the batch is empty (for comparison with continuous batching)")
    p.add_argument("--in-process-table", action="store_true",
                   help="copy the whole table into memory at start and serve rows from it (for comparison)")
    p.add_argument("--api-key-file", type=Path,
                   help=f"require `Authorization: Bearer KEY` with the key in this file (or set ${API_KEY_ENV})")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logging")
    return p


def read_api_key(path: Path | None) -> str | None:
    if path is not None:
        try:
            key = path.read_text().strip()
        except OSError as e:
            raise UserError(f"cannot read --api-key-file {path}: {e.strerror}") from None
        if not key:
            raise UserError(f"--api-key-file {path} is empty")
        warn_if_others_can_read(path, "--api-key-file")
        return key
    return os.environ.get(API_KEY_ENV) or None


def _load_chat_template(state: ServeState, folder: Path) -> None:
    """The backbone's chat template (for /v1/chat/completions), and the tokens that end a turn."""
    if state.tokenizer is None:
        state.no_chat = "this model has no tokenizer"
        return
    try:
        state.chat_template = ChatTemplate.from_folder(folder)
    except ChatTemplateError as e:
        state.no_chat = f"this model's chat template cannot be used ({e})"
        log.warning("%s; /v1/chat/completions answers an error", state.no_chat)
        return
    if state.chat_template is None:
        return
    stop = {state.eos_id} if state.eos_id is not None else set()
    eos = state.chat_template.special.get("eos_token")
    if eos is not None and state.tokenizer.token_to_id(eos) is not None:
        stop.add(state.tokenizer.token_to_id(eos))
    state.chat_stop_ids = frozenset(stop)


def load(args: argparse.Namespace) -> ServeState:
    """Connect to the daemon, load the backbone, start the engine."""
    from inference.backbone import check_device, resolve_dtype
    from inference.lut import InProcessTable
    from lutstore.client import LutClient

    if not args.lut_addr:
        raise UserError("--lut-addr is required (the address of a `lutstore serve` daemon)")
    for flag, value in (("--max-batch", args.max_batch), ("--prefill-chunk", args.prefill_chunk),
                        ("--max-queue", args.max_queue), ("--max-body-bytes", args.max_body_bytes)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1")
    device = check_device(args.device)
    remote = connect(PROG, args, device, resolve_dtype(args.dtype, device))   # says so at once if nobody answers
    probe = None
    try:
        settings = LutstoreSettings.from_args(args)
        # its own client: no retries and a short deadline, so /health and the fail-fast check answer at once
        probe = LutClient(settings.addr, timeout=PROBE_TIMEOUT_S, retries=0, retry_seconds=0,
                          **{**settings.client_options(), "shared_memory": False})
        bb = remote.backbone
        context = args.context or bb.args.context_length
        if not 2 <= context <= bb.args.context_length:
            raise UserError(f"--context must be in 2..{bb.args.context_length}")
        source = remote.source
        if args.in_process_table:
            source = InProcessTable.from_client(remote.client, remote.info.name, remote.info.version, device)
        state = ServeState(args.model_name or remote.info.name, source=source, remote=remote,
                           tokenizer=bb.tokenizer, context=context, vocab_size=bb.args.vocab_size,
                           eos_id=bb.args.eos_token_id, api_key=read_api_key(args.api_key_file))
        state.metrics = Metrics(state)
        _load_chat_template(state, bb.folder)
        state.health = DaemonHealth(settings, probe.tables)
        state.probe_client = probe
        state.engine = Engine(bb.model, source, args.max_batch, context, args.prefill_chunk, args.static_batching,
                              args.max_queue, on_step=state.metrics.batch.observe).start()
    except BaseException:
        if probe is not None:
            probe.close()
        remote.close()
        raise
    return state


def run(args: argparse.Namespace) -> int:
    api_key = read_api_key(args.api_key_file)   # fail on a bad key file before loading anything
    if not 0 <= args.shutdown_grace < float("inf"):
        raise UserError("--shutdown-grace must be a number of seconds >= 0")
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    try:
        state = load(args)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]

    # log_config=None: uvicorn's lines go through the logging cli_main set up, in the project's format
    server = Server(uvicorn.Config(create_app(state, args.max_body_bytes), lifespan="off", log_config=None,
                                   log_level="warning" if args.verbose == 0 else "info",
                                   timeout_graceful_shutdown=args.shutdown_grace + 5, access_log=args.verbose > 0),
                    state, f"http://{host}:{port}", args.shutdown_grace)
    try:
        server.run(sockets=[sock])
    finally:
        state.engine.stop()
        state.probe_client.close()
        state.remote.close()
        sock.close()
    if server.ended is not None:
        ended = f"; {server.ended} open request(s) ended with an error" if server.ended else ""
        print(f"{PROG}: interrupted{ended}", file=sys.stderr, flush=True)
        return EXIT_SIGINT
    return 0


def main(argv: list[str] | None = None) -> int:
    torch.set_grad_enabled(False)
    return cli_main(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
