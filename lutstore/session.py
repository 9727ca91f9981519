"""Rows for a decoding model: answers assembled layer group by layer group, and BatchGet
sessions (BatchGetStream) that skip a call's setup per batch.

    session = RowSession(client, "mole-160m", version=3, layer_ends=[1, 2, 4, 8, 12])
    session.submit([17, 4], on_group=lambda begin, end, ids, payloads: ..., on_error=...)

A decoding model asks for a few rows ~100-1000 times a second, each time the
moment a token is sampled, and its first layer needs them ~0.2 ms later. On
loopback a BatchGet call's setup costs ~0.4 ms of gRPC Python on each side;
a message on an open stream costs about half (see benchmarks/PERFORMANCE.md).
So one stream stays open: submit() queues a request and returns at once; one
reader thread takes the answers in order and hands each complete layer group
to the request's callback (layer 0 first, while later layers are on the wire).

Failures: an answer that does not come within the client's timeout fails with
DEADLINE_EXCEEDED; a broken stream (UNAVAILABLE: the daemon restarted, or a
replica died) is reopened within the client's retry budget and the unanswered
requests are sent again (slices already received are not delivered twice);
any other status fails the oldest unanswered request with it (the requests
behind it are sent again on a new stream).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Callable

import grpc
import numpy as np

from lutstore import alloc, codec, wire
from lutstore.errors import LutError
from lutstore.v1 import lutstore_pb2 as pb

log = logging.getLogger(__name__)

OnGroup = Callable[[int, int, np.ndarray, np.ndarray], None]
BATCH_GET_STREAM_METHOD = "/lutstore.v1.LutStore/BatchGetStream"


class AnswerError(Exception):
    """An answer that breaks the contract (rows not asked for, wrong sizes, corrupt bytes)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        super().__init__(message)


class RowsAnswer:
    """One BatchGet answer being assembled: on_group(begin, end, ids, payloads) is called once per
    layer group, in layer order, as soon as every distinct id's part of it has arrived (ids int64
    [n] ascending; payloads uint8 [n, bytes]: whole rows' payloads (decompressed) when layer_ends
    is empty, else each row's slice of layers [begin, end), see the proto). views=True: payloads
    is instead a list of n read-only memoryviews into the received messages (checked, not copied),
    for a consumer that copies each row straight to where it goes."""

    def __init__(self, fmt: codec.RowFormat, ids: list[int], layer_ends: list[int], on_group: OnGroup,
                 verify: bool = True, views: bool = False) -> None:
        self.fmt, self.ids, self.layer_ends, self.on_group, self.verify = fmt, ids, layer_ends, on_group, verify
        self.views = views
        self.groups = codec.check_layer_ends(fmt, layer_ends) if layer_ends else [(0, fmt.num_layers)]
        self._index = {t: i for i, t in enumerate(ids)}
        self._ids = np.array(ids, dtype=np.int64)
        self._sizes = {b: codec.slice_payload_bytes(fmt, b, e) for b, e in self.groups}
        self._bufs: dict[int, np.ndarray | list] = {
            b: [None] * len(ids) if views else np.empty((len(ids), self._sizes[b]), dtype=np.uint8) for b, _ in self.groups}
        self._got: dict[int, set[int]] = {b: set() for b, _ in self.groups}
        self._delivered = 0

    @property
    def complete(self) -> bool:
        return self._delivered == len(self.groups)

    @property
    def slices_received(self) -> int:
        return sum(len(s) for s in self._got.values())

    def add(self, begin: int, end: int, token: int, data: memoryview) -> None:
        """One row's (slice's) bytes as received; a repeat of one already received is ignored."""
        got = self._got.get(begin)
        row = self._index.get(token)
        if got is None or row is None or (self.layer_ends and (begin, end) not in self.groups):
            raise AnswerError(grpc.StatusCode.INTERNAL, f"received row {token} layers [{begin}, {end}), not asked for")
        if row in got:
            return
        try:
            if self.layer_ends:
                body = codec.check(data) if self.verify else data[: -codec.CRC_BYTES]
            else:
                body = codec.payload_of(self.fmt, data, verify=self.verify)
        except codec.ChecksumError as e:
            raise AnswerError(grpc.StatusCode.DATA_LOSS, f"row {token} arrived corrupt: {e}") from None
        if len(body) != self._sizes[begin]:
            raise AnswerError(grpc.StatusCode.INTERNAL, f"row {token} layers [{begin}, {end}) is {len(body)} bytes, "
                                                        f"expected {self._sizes[begin]}")
        if self.views:
            self._bufs[begin][row] = body
        else:
            self._bufs[begin][row] = np.frombuffer(body, dtype=np.uint8)
        got.add(row)
        while self._delivered < len(self.groups):
            b, e = self.groups[self._delivered]
            if len(self._got[b]) < len(self.ids):
                break
            self._delivered += 1
            self.on_group(b, e, self._ids, self._bufs[b])


class _Request:
    def __init__(self, message: pb.BatchGetRequest, answer: RowsAnswer, on_error: Callable[[BaseException], None],
                 on_done: Callable[[], None] | None) -> None:
        self.message, self.answer, self.on_error, self.on_done = message, answer, on_error, on_done


class RowSession:
    """BatchGets of one table version over one BatchGetStream (see the module docstring).
    Callbacks run on the session's reader thread; keep them short."""

    def __init__(self, client, table: str, version: int = 0, layer_ends: list[int] | None = None) -> None:
        self.client = client
        self.info = client.info(table, version)
        self.name, self.version = self.info.name, int(self.info.version)
        self.fmt = client.row_format(self.info)
        self.layer_ends = list(layer_ends or [])
        if self.layer_ends:
            codec.check_layer_ends(self.fmt, self.layer_ends)
        alloc.keep_freed_memory()  # else every received message and answer buffer faults its pages in afresh
        self._method = client._calls.stream_stream(BATCH_GET_STREAM_METHOD,
                                                   request_serializer=pb.BatchGetRequest.SerializeToString,
                                                   response_deserializer=None, _registered_method=True)
        self._lock = threading.Lock()
        self._inflight: collections.deque[_Request] = collections.deque()   # sent, not fully answered, in order
        self._outbox: queue.SimpleQueue | None = None
        self._call = None
        self._closed = False
        self._reader: threading.Thread | None = None
        self._failing_since: float | None = None    # first failure since the last answer (retry budget)
        self._tries, self._delay = 0, 0.05

    # ---- public ---------------------------------------------------------------

    def submit(self, ids: list[int], on_group: OnGroup, on_error: Callable[[BaseException], None],
               on_done: Callable[[], None] | None = None, views: bool = False) -> None:
        """Ask for the rows of ids (distinct, ascending, at most max_batch_rows); returns at once.
        on_group gets each layer group as it completes (as arrays, or memoryviews: RowsAnswer),
        on_done() follows the last one; on_error(e) (a LutError) replaces them if the request fails."""
        message = pb.BatchGetRequest(table=self.name, version=self.version, token_ids=ids, layer_ends=self.layer_ends)
        request = _Request(message, RowsAnswer(self.fmt, ids, self.layer_ends, on_group, self.client.verify, views),
                           on_error, on_done)
        with self._lock:
            if self._closed:
                raise LutError(grpc.StatusCode.CANCELLED, "the row session is closed")
            if self._call is None:
                self._open()
            self._inflight.append(request)
            self._outbox.put(message)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            call, outbox, reader = self._call, self._outbox, self._reader
        if outbox is not None:
            outbox.put(None)   # half-close: the server answers what it has and ends the stream with OK
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=1.0)
        if call is not None and reader is not None and reader.is_alive():
            call.cancel()      # a server that does not finish (hung, or a long answer): stop waiting for it
            if reader is not threading.current_thread():
                reader.join(timeout=5)
        self._fail_all(LutError(grpc.StatusCode.CANCELLED, "the row session was closed"))

    # ---- the stream -------------------------------------------------------------

    def _open(self) -> None:
        """A new stream (under the lock); requests already in flight are sent on it first."""
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        for request in self._inflight:
            outbox.put(request.message)

        def requests():
            while True:
                message = outbox.get()
                if message is None:
                    return
                yield message

        self._outbox = outbox
        self._call = self._method(requests())   # no deadline: the stream lives as long as the session
        self._reader = threading.Thread(target=self._read, args=(self._call,), name="lut-session", daemon=True)
        self._reader.start()

    def _read(self, call) -> None:
        try:
            for message in call:
                self._dispatch(message)
            error: BaseException = LutError(grpc.StatusCode.UNAVAILABLE, "the server ended the row stream")
        except grpc.RpcError as e:
            error = e
        except AnswerError as e:
            error = LutError(e.code, f"{e} (from {self.client.address})")
            call.cancel()
        except BaseException as e:   # a callback failed: the request it was for fails with it
            error = e
            call.cancel()
        self._broken(call, error)

    def _dispatch(self, message: bytes) -> None:
        try:
            version, begin, end, rows = wire.decode_sliced_response(message)
        except wire.WireError as e:
            raise AnswerError(grpc.StatusCode.INTERNAL, f"malformed BatchGet response: {e}") from None
        if version != self.version:
            raise AnswerError(grpc.StatusCode.INTERNAL, f"asked {self.name!r} v{self.version}, got rows of v{version}")
        with self._lock:
            request = self._inflight[0] if self._inflight else None
        if request is None:
            raise AnswerError(grpc.StatusCode.INTERNAL, "rows arrived that no request asked for")
        self._failing_since = None   # the stream works: a later failure gets the whole retry budget
        for token, data in rows:
            request.answer.add(begin, end, token, data)
        if request.answer.complete:
            with self._lock:
                self._inflight.popleft()
            if request.on_done is not None:
                request.on_done()

    def _broken(self, call, error: BaseException) -> None:
        """The stream ended: reopen it and send what is unanswered again (UNAVAILABLE, within the
        client's retry budget, backing off as LutClient does), or fail the oldest request."""
        code = error.code() if isinstance(error, grpc.RpcError) else getattr(error, "code", None)
        details = error.details() if isinstance(error, grpc.RpcError) else str(error)
        with self._lock:
            if self._closed or call is not self._call:
                return
            self._call = None
            self._outbox.put(None)
            if not self._inflight:
                return   # nothing waiting: the next submit opens a new stream
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since, self._tries, self._delay = now, 0, 0.05
            self._tries += 1
            elapsed = now - self._failing_since
            retry = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) and \
                self._tries <= self.client.retries and elapsed + self._delay <= self.client.retry_seconds
            failed = None if retry else self._inflight.popleft()
            if failed is not None and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                error = LutError(grpc.StatusCode.UNAVAILABLE,
                                       f"lutstore at {self.client.address} unavailable after {self._tries} attempts "
                                       f"in {elapsed:.1f}s (retry budget: {self.client.retries} retries, "
                                       f"{self.client.retry_seconds:g}s): {details}")
                self._failing_since = None
            delay = self._delay
            self._delay = min(2 * self._delay, 1.0)
        if failed is not None:
            log.info("row session request failed: %s", details)
            failed.on_error(error if isinstance(error, LutError) else
                            LutError(code or grpc.StatusCode.UNKNOWN, f"{details} (from {self.client.address})"))
        else:
            log.debug("row stream to %s broke (%s); retry in %.2fs", self.client.address, details, delay)
            time.sleep(delay)   # a restarting daemon or a dead replica: let the channel reconnect / fail over
        with self._lock:
            if self._inflight and not self._closed and self._call is None:
                self._open()

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            pending, self._inflight = list(self._inflight), collections.deque()
        for request in pending:
            request.on_error(error)
