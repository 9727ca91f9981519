"""BatchGet sessions (BatchGetStream) that skip a call's setup per batch; each answer is
assembled and checked layer group by layer group by a lutstore.client.answer.RowsAnswer.

    session = client.session("mole-160m", version=3, layer_ends=[1, 2, 4, 8, 12])   # a RowSession
    session.submit([17, 4], on_group=lambda begin, end, ids, payloads: ..., on_error=...)

A decoding model asks for a few rows ~100-1000 times a second, each time the
moment a token is sampled, and its first layer needs them ~0.2 ms later. On
loopback a BatchGet call's setup costs ~0.4 ms of gRPC Python on each side;
a message on an open stream costs about half (see benchmarks/PERFORMANCE.md).
So one stream stays open: submit() queues a request and returns at once; one
reader thread takes the answers in order and hands each complete layer group
to the request's callback (layer 0 first, while later layers are on the wire).

Failures: a broken stream (UNAVAILABLE: the daemon restarted, or a replica
died) is reopened within the client's retry budget (lutstore.client.retry.RetryPolicy)
and the unanswered requests are sent again (slices already received are not
delivered twice); any other status fails the oldest unanswered request with it
(the requests behind it are sent again on a new stream); so does a callback that
raises (its request gets the exception through on_error). A request no answer
can complete (no ids, a repeated id) is refused by submit() before it is sent.
The stream has no
deadline (it lives as long as the session), so a server that accepts a request
and never answers it is not detected here: a caller that must not wait forever
bounds its own wait (RemoteTable waits at most the client's timeout plus its
retry budget for a fetch, then raises TimeoutError).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Callable

import grpc

from lutstore.formats import codec
from lutstore.client.answer import AnswerError, OnGroup, RowsAnswer, read_message
from lutstore.client.retry import RetryBudget, RetryPolicy
from lutstore.errors import LutError
from lutstore.v1 import lutstore_pb2 as pb

log = logging.getLogger(__name__)

# A stream that ends with these is reopened within the retry budget (CANCELLED: the channel
# cancelled it under us, e.g. a replica going away).
RETRIED_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class _Request:
    def __init__(self, message: pb.BatchGetRequest, answer: RowsAnswer, on_error: Callable[[BaseException], None],
                 on_done: Callable[[], None] | None) -> None:
        self.message, self.answer, self.on_error, self.on_done = message, answer, on_error, on_done


class RowSession:
    """BatchGets of one table version over one BatchGetStream (see the module docstring).
    Callbacks run on the session's reader thread; keep them short."""

    def __init__(self, method: grpc.StreamStreamMultiCallable, info: pb.TableInfo, fmt: codec.RowFormat,
                 layer_ends: list[int] | None, retry: RetryPolicy, verify: bool = True) -> None:
        """method: BatchGetStream with raw (unparsed) responses, on the channel that adds credentials
        (LutClient.session builds it); info, fmt: the pinned table version; verify: check CRCs."""
        self.info, self.fmt, self.retry, self.verify = info, fmt, retry, verify
        self.name, self.version = info.name, int(info.version)
        self.layer_ends = list(layer_ends or [])
        self._groups = codec.check_layer_ends(self.fmt, self.layer_ends) if self.layer_ends else None
        self._method = method
        self._lock = threading.Lock()
        self._inflight: collections.deque[_Request] = collections.deque()   # sent, not fully answered, in order
        self._outbox: queue.SimpleQueue | None = None
        self._call = None
        self._closed = False
        self._reader: threading.Thread | None = None
        self._failures: RetryBudget | None = None    # failures since the last answer

    # ---- public ---------------------------------------------------------------

    def submit(self, ids: list[int], on_group: OnGroup, on_error: Callable[[BaseException], None],
               on_done: Callable[[], None] | None = None, views: bool = False) -> None:
        """Ask for the rows of ids (distinct, ascending, at most max_batch_rows); returns at once.
        on_group gets each layer group as it completes (as arrays, or memoryviews: RowsAnswer),
        on_done() follows the last one; on_error(e) replaces them if the request fails (a LutError, or
        what on_group or on_done raised). No ids, or a repeated id: ValueError here, nothing sent."""
        answer = RowsAnswer(self.fmt, ids, self.layer_ends, on_group, self.verify, views)
        message = pb.BatchGetRequest(table=self.name, version=self.version, token_ids=ids, layer_ends=self.layer_ends)
        request = _Request(message, answer, on_error, on_done)
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
            error = e.named(self.retry.address)
            call.cancel()
        except BaseException as e:   # a callback failed: the request it was for fails with it
            error = e
            call.cancel()
        self._broken(call, error)

    def _dispatch(self, message: bytes) -> None:
        begin, end, rows = read_message(message, self.name, self.version, self._groups)
        with self._lock:
            request = self._inflight[0] if self._inflight else None
        if request is None:
            raise AnswerError(grpc.StatusCode.INTERNAL, "rows arrived that no request asked for")
        self._failures = None   # the stream works: a later failure gets the whole retry budget
        for token, data in rows:
            request.answer.add(begin, end, token, data)
        if request.answer.complete:
            with self._lock:
                self._inflight.popleft()
            if request.on_done is not None:
                try:
                    request.on_done()
                except Exception as e:   # its rows are all in: the stream and the requests behind go on
                    _report(request, e)

    def _broken(self, call, error: BaseException) -> None:
        """The stream ended: reopen it and send what is unanswered again (UNAVAILABLE, within the
        client's retry budget), or fail the oldest request."""
        code = error.code() if isinstance(error, grpc.RpcError) else getattr(error, "code", None)  # any exception
        details = error.details() if isinstance(error, grpc.RpcError) else str(error)
        delay = 0.0
        with self._lock:
            if self._closed or call is not self._call:
                return
            self._call = None
            self._outbox.put(None)
            if not self._inflight:
                return   # nothing waiting: the next submit opens a new stream
            failed = None
            if code in RETRIED_CODES:
                if self._failures is None:
                    self._failures = self.retry.budget()
                try:
                    delay = self._failures.next_delay(details)
                except LutError as spent:
                    failed, error, self._failures = self._inflight.popleft(), spent, None
            else:
                failed = self._inflight.popleft()
        if failed is not None:
            log.info("row session request failed: %s", details)
            if isinstance(error, grpc.RpcError):
                error = LutError(code or grpc.StatusCode.UNKNOWN, f"{details} (from {self.retry.address})")
            _report(failed, error)   # a callback's own exception is handed back as it is
        else:
            log.debug("row stream to %s broke (%s); retry in %.2fs", self.retry.address, details, delay)
            time.sleep(delay)   # a restarting daemon or a dead replica: let the channel reconnect / fail over
        with self._lock:
            if self._inflight and not self._closed and self._call is None:
                self._open()

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            pending, self._inflight = list(self._inflight), collections.deque()
        for request in pending:
            _report(request, error)


def _report(request: _Request, error: BaseException) -> None:
    """request.on_error(error); an on_error that raises is logged, so the reader thread goes on
    serving the requests behind it."""
    try:
        request.on_error(error)
    except Exception:
        log.exception("on_error of a row session request raised")
