"""The OpenAI-compatible endpoint (inference/serve.py) against a real daemon, with the real
`openai` client, plus plain HTTP for the error paths.

One endpoint (max 20 slots, prefill chunks of 8 tokens) on a daemon serving an fp32 table
ingested from a small train-form checkpoint (no chat template); a second one, with an API
key and no row cache, for authentication and a daemon that dies and comes back; a third,
`tight` (one slot, a queue of one, 4 KiB bodies, a 4096-token model without EOS so a
request runs as long as asked, whose tokenizer has a chat template), for clients that
leave, a full queue, oversized bodies and chat; a fourth on the long model for Ctrl-C.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from ckpt_factory import make_checkpoint
from conftest import start_server

from inference import evaluate
from inference.backbone import open_remote
from inference.endpoint_process import REPO, Endpoint
from inference.engine import Engine, FailedEvent, FinishedEvent, Sequence
from inference.lut import InProcessTable
from inference.generation import generate
from inference.model import ModelArgs, Transformer, init_weights
from lutstore import cli

openai = pytest.importorskip("openai")

VOCAB, CONTEXT = 128, 256
LOGPROB_TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt = make_checkpoint(root / "ckpt", form="train", vocab=VOCAB, layers=2, experts=4, hidden=32, heads=4, seed=7)
    db = root / "db"
    assert cli.main(["ingest", str(ckpt), "--db", str(db), "--name", "m32", "--encoding", "fp32", "--no-progress"]) == 0
    daemon = start_server(db)
    env = {"LUTSTORE_CACHE": str(root / "cache")}
    with pytest.MonkeyPatch.context() as patch:          # this module's client cache; restored afterwards
        patch.setenv("LUTSTORE_CACHE", env["LUTSTORE_CACHE"])
        endpoint = Endpoint(daemon.address, "--max-batch", "20", "--prefill-chunk", "8", env=env)
        remote = open_remote(daemon.address, "m32")      # the in-process reference: same daemon, same backbone
        yield {"root": root, "db": db, "daemon": daemon, "endpoint": endpoint, "env": env, "remote": remote}
        remote.close()
        assert endpoint.stop() == 0, "".join(endpoint.output)
    daemon.stop()


# a chat template as tokenizer_config.json holds one: special tokens, a loop, a refusal, the generation prompt
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
                 "{{ raise_exception('roles are system, user and assistant, not ' + m['role']) }}{% endif %}"
                 "{{ m['role'] }} : {{ m['content'] | trim }} {{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
LONG_CONTEXT, LONG_RUN = 4096, 4000      # the tight endpoint's model: a request of LONG_RUN tokens runs for seconds
TIGHT_BODY = 4096


@pytest.fixture(scope="module")
def long_daemon(setup):
    """A daemon serving the same weights with a 4096-token context and no EOS (a copy of the checkpoint
    with its config changed), so a request runs as long as asked; its tokenizer has a chat template."""
    root = setup["root"]
    ckpt = root / "ckpt-long"
    shutil.copytree(root / "ckpt", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(max_position_embeddings=LONG_CONTEXT, eos_token_id=None)
    (ckpt / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": CHAT_TEMPLATE}))
    db = root / "db-long"
    assert cli.main(["ingest", str(ckpt), "--db", str(db), "--name", "long", "--encoding", "fp32",
                     "--no-progress"]) == 0
    daemon = start_server(db)
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def tight(setup, long_daemon):
    """One slot, one queue place, 4 KiB bodies, on the long model."""
    endpoint = Endpoint(long_daemon.address, "--max-batch", "1", "--max-queue", "1", "--max-body-bytes",
                        str(TIGHT_BODY), env=setup["env"])
    yield endpoint
    assert endpoint.stop() == 0, "".join(endpoint.output)


def _client(endpoint: Endpoint, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=endpoint.base_url, api_key=key, max_retries=0, timeout=60)


def _post(endpoint: Endpoint, path: str, body: bytes | dict, headers: dict | None = None,
          timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(endpoint.url + path, data=data, headers={"content-type": "application/json",
                                                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _raw(endpoint: Endpoint, body: bytes | list[bytes], path: str = "/v1/completions") -> tuple[int, dict, dict]:
    """POST raw bytes (a list: sent chunked, without Content-Length): (status, headers, JSON body)."""
    url = urlparse(endpoint.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request("POST", path, iter(body) if isinstance(body, list) else body,
                     {"content-type": "application/json"}, encode_chunked=isinstance(body, list))
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(resp.read())
    finally:
        conn.close()


def _send(endpoint: Endpoint, body: dict) -> http.client.HTTPConnection:
    """Send a request and leave its answer unread (the caller closes the connection to go away)."""
    url = urlparse(endpoint.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    return conn


def _wait_for(what: str, condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still not true after {timeout:.0f}s: {what}"
        time.sleep(0.02)


def _get(endpoint: Endpoint, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(endpoint.url + path, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _metric(endpoint: Endpoint, name: str) -> float:
    text = _get(endpoint, "/metrics")[1]
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def _assert_openai_error(status: int, body: dict, want_status: int, param: str | None = None, code: str | None = None):
    assert status == want_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body


def _ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, n).tolist()   # no bos/eos/unk


# -- the model's slot mode --------------------------------------------------------------------
def test_slot_forward_equals_one_request_at_a_time() -> None:
    """Rows at different positions in one forward (slots) give each row what it gets alone."""
    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_experts=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Transformer(args, "train")
    init_weights(model, 0, std=0.1)
    prompts = [_ids(n, s)[:n] for n, s in ((5, 1), (11, 2), (3, 3))]
    prompts = [[t % 64 for t in p] for p in prompts]
    with torch.no_grad():
        want = [model(torch.tensor([p]))[0, -1] for p in prompts]
        model.setup_caches(4, 64)
        slots = [3, 0, 2]
        for p, slot in zip(prompts, slots):    # prefill each into its slot, all but the last token
            model(torch.tensor([p[:-1]]), torch.arange(len(p) - 1)[None], lut_rows=None, slots=torch.tensor([slot]))
        last = torch.tensor([[p[-1]] for p in prompts])
        pos = torch.tensor([[len(p) - 1] for p in prompts])
        got = model(last, pos, slots=torch.tensor(slots))[:, -1]
    for i in range(3):
        torch.testing.assert_close(got[i], want[i], atol=1e-5, rtol=1e-5)


# -- the engine in-process ------------------------------------------------------------------------
def _engine_model() -> tuple[Transformer, InProcessTable]:
    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_experts=4, max_position_embeddings=256)
    model = Transformer(args, "lut").eval()
    init_weights(model, 1, std=0.1)
    return model, InProcessTable(torch.randn(64, 2, 4, 32, generator=torch.Generator().manual_seed(0)) * 0.1)


class _Recorder:
    """emit() target: (request name, event kind) in arrival order; done[name] when it ends."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.done: dict[str, threading.Event] = {}

    def emit_for(self, name: str):
        self.done[name] = threading.Event()

        def emit(ev) -> None:
            self.log.append((name, type(ev).__name__))
            if isinstance(ev, (FinishedEvent, FailedEvent)):
                self.done[name].set()
        return emit


def test_long_prefill_is_chunked_between_decode_steps() -> None:
    """A 200-token prompt prefilled 8 tokens per step: the running request gets a token each step meanwhile."""
    model, table = _engine_model()
    engine = Engine(model, table, max_batch=4, prefill_chunk=8).start()
    rec = _Recorder()
    try:
        engine.submit(Sequence([1, 2, 3], 60, rec.emit_for("running")))
        while ("running", "TokenEvent") not in rec.log:
            time.sleep(0.001)
        mark = len(rec.log)
        engine.submit(Sequence([t % 64 for t in range(200)], 1, rec.emit_for("long")))
        assert rec.done["long"].wait(30) and rec.done["running"].wait(30)
    finally:
        engine.stop()
    first_long = rec.log.index(("long", "TokenEvent"))
    during = [name for name, kind in rec.log[mark:first_long] if kind == "TokenEvent"]
    assert len(during) >= 200 // 8 - 1, f"only {len(during)} tokens of the running request during the prefill"


def test_static_batching_admits_only_into_an_empty_batch() -> None:
    model, table = _engine_model()
    engine = Engine(model, table, max_batch=4, prefill_chunk=8, static=True).start()
    rec = _Recorder()
    try:
        engine.submit(Sequence([1, 2, 3], 20, rec.emit_for("first")))
        while ("first", "TokenEvent") not in rec.log:
            time.sleep(0.001)
        engine.submit(Sequence([4, 5], 5, rec.emit_for("second")))
        assert rec.done["second"].wait(30)
    finally:
        engine.stop()
    assert rec.log.index(("first", "FinishedEvent")) < rec.log.index(("second", "TokenEvent"))


# -- completions ----------------------------------------------------------------------------------
def test_completion_equals_in_process_generate(setup) -> None:
    ep, remote = setup["endpoint"], setup["remote"]
    client = _client(ep)
    assert [m.id for m in client.models.list().data] == ["m32"]
    prompt = "the water is hot and the"
    out = client.completions.create(model="m32", prompt=prompt, max_tokens=12, temperature=0)
    ids = remote.backbone.tokenizer.encode(prompt).ids
    want = generate(remote.backbone.model, remote.source, [ids], 12, eos_id=remote.backbone.args.eos_token_id)
    tok = remote.backbone.tokenizer
    want_text = tok.decode(ids + want.tokens[0])[len(tok.decode(ids)):]
    assert out.choices[0].text == want_text
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(want.tokens[0])
    # a list of prompts (token ids): one choice each, in order
    many = client.completions.create(model="m32", prompt=[ids, _ids(9, 1)], max_tokens=12, temperature=0)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == want_text


def test_streaming_and_stop(setup) -> None:
    client = _client(setup["endpoint"])
    full = client.completions.create(model="m32", prompt="you that he was", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="m32", prompt="you that he was", max_tokens=20, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    # a stop string cuts the text before it, streamed or not
    words = full.choices[0].text.split()
    stop = " " + words[3]
    cut = full.choices[0].text[:full.choices[0].text.index(stop)]
    short = client.completions.create(model="m32", prompt="you that he was", max_tokens=20, temperature=0, stop=stop)
    assert short.choices[0].text == cut and short.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="m32", prompt="you that he was", max_tokens=20, temperature=0,
                                              stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_prompt_logprobs_equal_evaluate(setup) -> None:
    """echo + max_tokens=0 + logprobs=0: the prompt's log-probs, as inference.evaluate computes them
    (one full causal pass, no cache) - the endpoint prefills in chunks of 8 into its KV cache."""
    ids = _ids(45, seed=3)
    out = _client(setup["endpoint"]).completions.create(model="m32", prompt=ids, max_tokens=0, echo=True, logprobs=0,
                                                        temperature=0)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    remote = setup["remote"]
    want = evaluate.token_logprobs(remote.backbone.model, remote.source, ids)
    got = np.array(lp.token_logprobs[1:], dtype=np.float64)
    delta = np.abs(got - want).max()
    print(f"max |endpoint - evaluate| log-prob: {delta:.3g}")
    assert delta < LOGPROB_TOL
    # streamed: the echoed prompt goes out in one chunk, with all its log-probs
    chunks = list(_client(setup["endpoint"]).completions.create(model="m32", prompt=ids, max_tokens=0, echo=True,
                                                                logprobs=0, stream=True))
    assert [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs] == \
        lp.token_logprobs
    # generated tokens' log-probs with alternatives
    gen = _client(setup["endpoint"]).completions.create(model="m32", prompt=ids[:5], max_tokens=3, logprobs=2,
                                                        temperature=0)
    lp = gen.choices[0].logprobs
    assert len(lp.token_logprobs) == 3 and all(len(t) == 2 for t in lp.top_logprobs)
    assert all(lp.token_logprobs[i] == max(lp.top_logprobs[i].values()) for i in range(3))   # greedy: the top one


def test_greedy_output_does_not_depend_on_the_batch(setup) -> None:
    """A greedy request gives the same tokens alone and among 16 random neighbours (sampled or not,
    streamed or not, prompts of 1..60 tokens), and a seeded sampled one too."""
    ep = setup["endpoint"]
    client = _client(ep)
    target = dict(model="m32", prompt=_ids(20, seed=11), max_tokens=24, temperature=0, logprobs=0)
    seeded = dict(model="m32", prompt=_ids(7, seed=12), max_tokens=16, temperature=0.9, top_p=0.9, seed=5,
                  extra_body={"top_k": 20})
    alone = client.completions.create(**target).choices[0]
    alone_seeded = client.completions.create(**seeded).choices[0].text
    rng = random.Random(4)
    neighbours = [dict(model="m32", prompt=_ids(rng.randint(1, 60), seed=100 + i), max_tokens=rng.randint(4, 40),
                       temperature=rng.choice([0, 0.7, 1.2]), stream=bool(i % 3 == 0)) for i in range(16)]
    batch_steps_before = _metric(ep, "lutserve_batch_size_count")
    small_before = _metric(ep, 'lutserve_batch_size_bucket{le="4.0"}')

    def call(kw: dict):
        out = client.completions.create(**kw)
        return "".join(c.choices[0].text for c in out) if kw.get("stream") else out.choices[0]

    with ThreadPoolExecutor(18) as pool:
        futures = [pool.submit(call, kw) for kw in neighbours[:8] + [target, seeded] + neighbours[8:]]
        results = [f.result() for f in futures]
    batched, batched_seeded = results[8], results[9].text
    assert batched.text == alone.text
    assert batched_seeded == alone_seeded
    delta = max(abs(a - b) for a, b in zip(alone.logprobs.token_logprobs, batched.logprobs.token_logprobs))
    print(f"max |alone - batched| log-prob of the greedy tokens: {delta:.3g}")
    assert delta < LOGPROB_TOL
    # they really shared decode steps: some steps had more than 4 rows
    steps = _metric(ep, "lutserve_batch_size_count") - batch_steps_before
    small = _metric(ep, 'lutserve_batch_size_bucket{le="4.0"}') - small_before
    assert steps > small


def _running(ep: Endpoint) -> float:
    return _metric(ep, "lutserve_running_requests")


def test_cancelled_stream_frees_its_slot(setup) -> None:
    ep = setup["endpoint"]
    generated_before = _metric(ep, "lutserve_generation_tokens_total")
    cancelled_before = _metric(ep, 'lutserve_requests_total{status="cancelled"}')
    url = urlparse(ep.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": _ids(5, 1), "max_tokens": 240, "temperature": 0.8,
                                                        "stream": True}), {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: {")           # the first token arrived: the request has a slot
    conn.close()                                             # the client goes away
    deadline = time.monotonic() + 10
    while _running(ep) > 0 or _metric(ep, 'lutserve_requests_total{status="cancelled"}') == cancelled_before:
        assert time.monotonic() < deadline, "the cancelled request still holds its slot"
        time.sleep(0.05)
    assert _metric(ep, "lutserve_generation_tokens_total") - generated_before < 240   # it stopped early


def _in_process_text(remote, prompt: str, max_tokens: int) -> str:
    """What inference.generate gives greedily for the prompt, as completion text."""
    tok = remote.backbone.tokenizer
    ids = tok.encode(prompt).ids
    out = generate(remote.backbone.model, remote.source, [ids], max_tokens, eos_id=remote.backbone.args.eos_token_id)
    return tok.decode(ids + out.tokens[0])[len(tok.decode(ids)):]


# (body, status, the parameter named, code): each gets an OpenAI-shaped error, none a 500
BAD_REQUESTS = [
    ({"prompt": _ids(CONTEXT + 1, 1), "max_tokens": 0, "echo": True}, 400, "prompt", "context_length_exceeded"),
    ({"prompt": _ids(CONTEXT, 1)}, 400, "prompt", "context_length_exceeded"),
    ({"prompt": _ids(250, 1), "max_tokens": 10}, 400, "max_tokens", "context_length_exceeded"),
    ({"prompt": "the", "max_tokens": 10**30}, 400, "max_tokens", "context_length_exceeded"),
    ({"prompt": "the", "max_tokens": -1}, 400, "max_tokens", None),
    ({"prompt": "the", "temperature": -1}, 400, "temperature", None),
    ({"prompt": "the", "temperature": 2.5}, 400, "temperature", None),
    (b'{"prompt": "the", "temperature": NaN}', 400, "temperature", None),      # Python's json reads these
    (b'{"prompt": "the", "temperature": Infinity}', 400, "temperature", None),
    (b'{"prompt": "the", "top_p": NaN}', 400, "top_p", None),
    (b'{"prompt": "the", "top_p": -Infinity}', 400, "top_p", None),
    ({"prompt": "the", "top_p": 0}, 400, "top_p", None),
    ({"prompt": "the", "top_p": 1.5}, 400, "top_p", None),
    ({"prompt": "the", "logprobs": 21}, 400, "logprobs", None),
    ({"prompt": "the", "logprobs": -1}, 400, "logprobs", None),
    ({"prompt": "the", "n": 2}, 400, "n", None),
    ({"prompt": "the", "n": 0}, 400, "n", None),
    ({"prompt": "the", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"prompt": "the", "stop": "x" * 300}, 400, "stop", None),
    ({"prompt": "the", "bogus": 1}, 400, "bogus", None),
    ({"prompt": [5, 999]}, 400, "prompt", None),
    ({"prompt": [5, -1]}, 400, "prompt", None),
    ({"prompt": [[5], [VOCAB]]}, 400, "prompt", None),
    ({"prompt": [5, 1.5]}, 400, "prompt", None),
    ({"prompt": []}, 400, "prompt", None),
    ({"prompt": ""}, 400, "prompt", None),
    ({"prompt": ["the", ""]}, 400, "prompt", None),
    ({"prompt": [[]]}, 400, "prompt", None),
    ({"prompt": [[5]] * 1025}, 400, "prompt", None),                          # more than --max-queue can hold
    ({"max_tokens": 4}, 400, "prompt", None),
    ({"prompt": "the", "model": "gpt-9"}, 404, "model", "model_not_found"),
    (b"{not json", 400, None, None),
    (b"[1, 2]", 400, None, None),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, None),   # json.loads: RecursionError
    (b'{"prompt": "the", "max_tokens": 1' + b"0" * 5000 + b"}", 400, None, None),  # past Python's int digit limit
    (json.dumps({"prompt": "the", "user": "x" * (1 << 20)}).encode(), 413, None, "request_too_large"),
]


def test_errors_are_openai_shaped_and_others_keep_going(setup) -> None:
    """A burst of bad requests, and hostile but valid ones, while a stream runs: each bad one gets an
    OpenAI-shaped 4xx naming its parameter, the valid ones answer, the stream is untouched, and then a
    normal request still equals the in-process generate (the engine thread survived)."""
    ep, remote = setup["endpoint"], setup["remote"]
    client = _client(ep)
    running = iter(client.completions.create(model="m32", prompt="the water", max_tokens=200, temperature=0,
                                             stream=True))
    pieces = [next(running).choices[0].text]                  # it has a slot and is decoding
    # valid, if odd: top_k past the vocabulary (no cut; 10**30 overflowed the engine's tensor), a temperature
    # so small it divided to inf (greedy now), a negative seed
    greedy = client.completions.create(model="m32", prompt="the", max_tokens=6, temperature=0).choices[0].text
    for extra in ({"top_k": 10**30, "temperature": 1.0}, {"temperature": 1e-300}, {"seed": -1, "temperature": 0.5}):
        status, body = _post(ep, "/v1/completions", {"prompt": "the", "max_tokens": 6, **extra})
        assert status == 200, (extra, body)
        if extra.get("temperature") == 1e-300:
            assert body["choices"][0]["text"] == greedy
    for body, status, param, code in BAD_REQUESTS:
        got, answer = _post(ep, "/v1/completions", body)
        assert got == status, (body if isinstance(body, bytes) else json.dumps(body)[:200], answer)
        _assert_openai_error(got, answer, status, param, code)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="m32", prompt="the", max_tokens=CONTEXT)
    # a route this server does not have is an OpenAI-shaped 404 too
    got, answer = _post(ep, "/v1/embeddings", {"model": "m32", "input": "hi"})
    assert got == 404 and answer["error"]["type"] == "invalid_request_error", answer
    text = "".join(pieces + [c.choices[0].text for c in running])
    assert text == client.completions.create(model="m32", prompt="the water", max_tokens=200,
                                             temperature=0).choices[0].text
    assert client.completions.create(model="m32", prompt="the water is", max_tokens=30,
                                     temperature=0).choices[0].text == _in_process_text(remote, "the water is", 30)


def test_chat_completions_use_the_models_chat_template(setup, long_daemon, tight) -> None:
    """/v1/chat/completions on a model whose tokenizer has a chat template: the messages rendered as
    transformers' apply_chat_template renders them, then what inference.generate gives for that
    prompt (greedy), streamed or not, through the openai client; the template's own refusal is a 400."""
    transformers = pytest.importorskip("transformers")
    folder = setup["root"] / "ckpt-long"
    messages = [{"role": "system", "content": "you are the water"},
                {"role": "user", "content": [{"type": "text", "text": "is the water hot"}]}]
    flat = [messages[0], {"role": "user", "content": "is the water hot"}]
    text = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        flat, add_generation_prompt=True, tokenize=False)
    remote = open_remote(long_daemon.address, "long")
    try:
        tok = remote.backbone.tokenizer
        ids = tok.encode(text, add_special_tokens=False).ids
        eos = tok.token_to_id("</s>")                     # the template's eos_token ends the turn
        out = generate(remote.backbone.model, remote.source, [ids], 12, eos_id=eos)
    finally:
        remote.close()
    content = [t for t in out.tokens[0] if t != eos]
    want = tok.decode(ids + content)[len(tok.decode(ids)):]
    assert len(content) > 3, want                         # a real answer to compare (fixed weights, greedy)
    client = _client(tight)
    got = client.chat.completions.create(model="long", messages=messages, max_tokens=12, temperature=0)
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(out.tokens[0])
    assert got.choices[0].finish_reason == ("stop" if eos in out.tokens[0] else "length")
    chunks = list(client.chat.completions.create(model="long", messages=messages, max_completion_tokens=12,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason
    with pytest.raises(openai.BadRequestError, match="roles are system, user and assistant, not robot"):
        client.chat.completions.create(model="long", messages=[{"role": "robot", "content": "hi"}], max_tokens=2)


def test_chat_template_forms(tmp_path) -> None:
    """Where a checkpoint keeps its template: tokenizer_config.json's string, its list of named
    templates ("default" used), or chat_template.jinja; none at all is None; tojson keeps
    non-ASCII and HTML characters as they are (as transformers)."""
    from inference.chat_template import ChatTemplate

    def folder(config: dict, jinja: str | None = None):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}, **config}))
        if jinja is not None:
            (d / "chat_template.jinja").write_text(jinja)
        return d

    say = "{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}{{ eos_token }}"
    msgs = [{"role": "user", "content": "<é>"}]
    assert ChatTemplate.from_folder(folder({"chat_template": say})).render(msgs) == '"<é>"</s>'
    named = [{"name": "tool_use", "template": "no"}, {"name": "default", "template": say}]
    assert ChatTemplate.from_folder(folder({"chat_template": named})).render(msgs) == '"<é>"</s>'
    assert ChatTemplate.from_folder(folder({}, jinja=say)).render(msgs) == '"<é>"</s>'
    assert ChatTemplate.from_folder(folder({})) is None


def test_chat_without_a_chat_template_says_to_use_completions(setup) -> None:
    """The m32 model's tokenizer has no chat template: an OpenAI-shaped 400 that says so and names
    /v1/completions (not a bare 404)."""
    with pytest.raises(openai.BadRequestError) as caught:
        _client(setup["endpoint"]).chat.completions.create(model="m32", messages=[{"role": "user", "content": "hi"}])
    error = caught.value.body
    assert "has no chat template" in error["message"] and "/v1/completions" in error["message"], error
    assert error["code"] == "no_chat_template" and error["type"] == "invalid_request_error", error


def test_unsupported_sampling_fields_say_what_they_must_be(setup) -> None:
    """n, best_of and the penalties exist only at their default: the error says so, never a bound
    ("Input should be <= 0") that reads as if other values were allowed; the default itself is served."""
    client = _client(setup["endpoint"])
    for param, value, must in (("frequency_penalty", 0.5, 0), ("frequency_penalty", -0.5, 0),
                               ("presence_penalty", 1.0, 0), ("presence_penalty", -2, 0), ("n", 2, 1),
                               ("best_of", 3, 1)):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="m32", prompt="the", max_tokens=2, **{param: value})
        error = caught.value.body
        assert error["message"] == f"{param} is not supported (must be {must})", (param, value, error)
        assert error["param"] == param
    ok = client.completions.create(model="m32", prompt="the", max_tokens=2, temperature=0, n=1, best_of=1,
                                   frequency_penalty=0, presence_penalty=0.0)
    assert ok.usage.completion_tokens >= 1


def _queue(ep: Endpoint) -> float:
    return _metric(ep, "lutserve_queue_length")


def _cancelled(ep: Endpoint) -> float:
    return _metric(ep, 'lutserve_requests_total{status="cancelled"}')


def test_a_non_streamed_request_whose_client_leaves_frees_its_slot(tight) -> None:
    """The known bug: a non-streamed completion went on to max_tokens after its client left, holding
    the slot. With one slot and one queue place: a long request takes the slot, a second waits, one
    more gets 429 + Retry-After; the first client leaves -> its request is cancelled at once and the
    second gets the slot; a third waits and leaves -> its queue place frees; the second leaves -> the
    slot is free."""
    ep = tight
    generated_before, cancelled_before = _metric(ep, "lutserve_generation_tokens_total"), _cancelled(ep)
    long = {"prompt": _ids(5, 1), "max_tokens": LONG_RUN, "temperature": 0.8}
    first = _send(ep, long)
    _wait_for("the first request has the slot", lambda: _running(ep) == 1)
    second = _send(ep, {**long, "prompt": _ids(5, 2)})
    _wait_for("the second request waits for the slot", lambda: _queue(ep) == 1)
    status, headers, body = _raw(ep, json.dumps({**long, "max_tokens": 4}).encode())
    _assert_openai_error(status, body, 429, code="queue_full")
    assert int(headers["retry-after"]) >= 1
    first.close()                                               # the first client goes away, unanswered
    _wait_for("the first request cancelled, the second in the slot",
              lambda: _cancelled(ep) == cancelled_before + 1 and _queue(ep) == 0 and _running(ep) == 1, 10)
    third = _send(ep, {**long, "prompt": _ids(5, 3)})        # a waiting client that leaves frees its queue place
    _wait_for("the third request waits for the slot", lambda: _queue(ep) == 1)
    third.close()
    _wait_for("the third request cancelled", lambda: _cancelled(ep) == cancelled_before + 2 and _queue(ep) == 0, 10)
    second.close()
    _wait_for("the slot free", lambda: _cancelled(ep) == cancelled_before + 3 and _running(ep) == 0, 10)
    assert _metric(ep, "lutserve_generation_tokens_total") - generated_before < LONG_RUN   # both stopped early
    ok = _client(ep).completions.create(model="long", prompt=_ids(5, 3), max_tokens=4, temperature=0)
    assert ok.usage.completion_tokens == 4


def test_a_body_over_the_limit_gets_413(tight) -> None:
    """--max-body-bytes 4096: over it 413, with a Content-Length or chunked (read only up to the limit);
    a body just under it, chunked or not, is served."""
    small = {"prompt": "the water", "max_tokens": 2, "temperature": 0}
    over = json.dumps({**small, "user": "x" * TIGHT_BODY}).encode()
    for body in (over, [over[:1000], over[1000:]]):
        status, _, answer = _raw(tight, body)
        _assert_openai_error(status, answer, 413, code="request_too_large")
        assert "--max-body-bytes" in answer["error"]["message"]
    under = json.dumps({**small, "user": "x" * (TIGHT_BODY - 100)}).encode()
    assert len(under) <= TIGHT_BODY
    for body in (under, [under[:1000], under[1000:]]):
        status, _, answer = _raw(tight, body)
        assert status == 200 and answer["usage"]["completion_tokens"] == 2, answer


def test_a_second_ctrl_c_ends_open_streams_with_an_error(setup, long_daemon) -> None:
    """Ctrl-C while three streams run: one line says what the stop waits for; a second Ctrl-C ends
    every stream with an error event (the openai client raises it), one more line, exit 130, no
    traceback. (--shutdown-grace 600: the wait is the second Ctrl-C's, never the grace's.)"""
    ep = Endpoint(long_daemon.address, "--shutdown-grace", "600", env=setup["env"])
    try:
        client = _client(ep)
        streams = [iter(client.completions.create(model="long", prompt=_ids(5, i), max_tokens=LONG_RUN,
                                                  temperature=0.8, stream=True)) for i in range(3)]
        for s in streams:
            next(s)                                      # each has a slot and is decoding
        served = len(ep.output)
        ep.proc.send_signal(signal.SIGINT)
        _wait_for("the stop is announced", lambda: len(ep.output) > served)
        ep.proc.send_signal(signal.SIGINT)
        for s in streams:
            with pytest.raises(openai.APIError, match="the server is shutting down"):
                for _ in s:
                    pass
        assert ep.proc.wait(60) == 130
        _wait_for("its output read to the end", lambda: "interrupted" in "".join(ep.output))
    finally:
        ep.stop(strict=False)
    assert [line.rstrip() for line in ep.output[served:]] == [
        "serve: stopping; waiting up to 600 s for 3 open request(s) (Ctrl-C again ends them now)",
        "serve: interrupted; 3 open request(s) ended with an error"], "".join(ep.output)


def test_uvicorns_lines_are_in_the_projects_log_format(setup) -> None:
    """With -v the access log is on: its lines come as every other log line of the project
    ("DATE TIME LEVEL logger: message"), not in uvicorn's own format ("INFO:     127.0.0.1 ...")."""
    ep = Endpoint(setup["daemon"].address, "-v", env=setup["env"])
    try:
        assert _get(ep, "/health")[0] == 200
        _wait_for("the access log line", lambda: any("uvicorn.access" in line for line in ep.output))
    finally:
        ep.stop()
    access = [line for line in ep.output if "GET /health" in line]
    assert access and all(re.match(r"\d{4}-\d\d-\d\d [\d:,]+ INFO uvicorn\.access: ", line) for line in access), access
    assert not any(line.startswith("INFO:") for line in ep.output), ep.output


def test_an_unreachable_daemon_is_said_at_once(setup) -> None:
    """--lut-addr where nothing listens: a `connecting to ... (retrying for N s)` line while it still
    retries (as generate and evaluate), not silence for the whole retry budget and then an error."""
    with socket.socket() as s:                     # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "inference.serve", "--lut-addr", f"127.0.0.1:{port}",
                             "--retry-seconds", "60", "--port", "0"], cwd=REPO, env={**os.environ, **setup["env"]},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        running = proc.poll() is None              # the line came before the 60 s of retries ended (it comes at once)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert first.startswith(f"serve: connecting to 127.0.0.1:{port} (") and "retrying for 60 s)" in first, first
    assert running, f"the line came only when it gave up: {first}"


def test_health_metrics_and_auth_and_a_dead_daemon(setup, tmp_path) -> None:
    """A second endpoint with an API key and no row cache (every step fetches) on its own daemon,
    which dies and comes back: while /health says the daemon is down, completions get their 503 at
    once (not after the retry budget, retry_s here), one log line each, no traceback; once the daemon
    is back (same port), they are served again without a restart."""
    retry_s = 240
    daemon = start_server(setup["db"])
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    ep = Endpoint(daemon.address, "--api-key-file", str(key_file), "--lut-cache-mb", "0", "--retry-seconds",
                  str(retry_s), env=setup["env"])
    auth = {"authorization": "Bearer s3cret"}
    try:
        assert _get(ep, "/health")[0] == 200
        _assert_openai_error(*_post(ep, "/v1/completions", {"prompt": "the"}), 401, code="invalid_api_key")
        _assert_openai_error(*_post(ep, "/v1/completions", {"prompt": "the"}, {"authorization": "Bearer nope"}), 401)
        with pytest.raises(openai.AuthenticationError):
            _client(ep, "wrong").completions.create(model="m32", prompt="the", max_tokens=2)
        ok = _client(ep, "s3cret").completions.create(model="m32", prompt="the water", max_tokens=4, temperature=0)
        assert ok.choices[0].finish_reason in ("length", "stop")
        metrics = _get(ep, "/metrics")[1]
        for name in ("lutserve_requests_total", "lutserve_generation_tokens_total", "lutserve_queue_length",
                     "lutserve_batch_size_bucket", "lutserve_time_to_first_token_seconds_bucket",
                     "lutserve_inter_token_latency_seconds_bucket", "lutserve_row_cache_hit_rate"):
            assert name in metrics
        port = daemon.port
        daemon.proc.kill()               # dies (a graceful stop would wait for the endpoint's open session)
        daemon.proc.wait()
        _wait_for("/health says the daemon is down", lambda: _get(ep, "/health")[0] == 503)
        logged = len("".join(ep.output).splitlines())
        for _ in range(3):
            # a probe with no retries answers at once (a refused connection); a bound far under the retry
            # budget that a loaded machine still meets: the request does not wait for the budget
            try:
                status, body = _post(ep, "/v1/completions", {"prompt": "the water", "max_tokens": 4}, auth,
                                     timeout=retry_s / 4)
            except TimeoutError:
                pytest.fail(f"no answer within {retry_s / 4:g}s: the request waits for the retry budget")
            _assert_openai_error(status, body, 503, code="lut_unavailable")
            assert "daemon" in body["error"]["message"] and "Connection refused" in body["error"]["message"], body
        assert _client(ep, "s3cret").models.list().data[0].id == "m32"      # still serving
        restarted = start_server(setup["db"], "--port", str(port))           # the daemon is back, same address
        try:
            def served() -> bool:
                status, body = _post(ep, "/v1/completions", {"prompt": "the water", "max_tokens": 4,
                                                             "temperature": 0}, auth)
                assert status in (200, 503), body
                return status == 200
            _wait_for("completions served again", served, 60)
            assert _get(ep, "/health")[0] == 200
        finally:
            restarted.stop()
    finally:
        stopped = ep.stop(strict=False)
        daemon.stop()
    log = "".join(ep.output)
    assert stopped == 0, log
    assert "Traceback" not in log, log
    # the refused requests: one line each at most (none at the default level), the outage said once
    assert len(log.splitlines()) - logged <= 3 + 2, log
