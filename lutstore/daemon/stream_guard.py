"""Keep callers from holding the daemon's threads: a bound on long-lived streams, a bound on stalled sends.

gRPC Python's synchronous server runs each RPC on one worker thread for as long
as the RPC lasts. Two ways a caller, careless or hostile, could hold them all:
- Streams the client keeps open at no cost to itself: a reflection stream, a
  BatchGetStream session (any RPC whose requests stream, or that waits for
  news). At most `held_slots` of them run at once (fewer than the workers: the
  rest stay free for short calls such as Check, ListTables, BatchGet); one
  more is refused at once with RESOURCE_EXHAUSTED. Handlers that return their
  thread at once and answer later (health Watch, see health.py) pass through.
- A response stream whose reader stops reading (BatchGet, GetArtifact, every
  stream): once HTTP/2 flow control fills, the worker waits for the send. A
  send that has not completed after `stalled_send_seconds` cancels the call.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import grpc

log = logging.getLogger(__name__)

# Methods that wait for news while holding a thread, unless their handler is non-blocking.
WAITING_METHODS = frozenset({"/grpc.health.v1.Health/Watch"})
WATCHDOG_PERIOD_SECONDS = 0.25


def held_slots_for(workers: int) -> int:
    """Long-lived streams allowed at once: the workers less a reserve of a quarter (at least one)."""
    return max(1, workers - max(1, workers // 4))


class StreamGuard(grpc.ServerInterceptor):
    def __init__(self, held_slots: int, stalled_send_seconds: float):
        self.held_slots = held_slots
        self._free = threading.BoundedSemaphore(held_slots)
        self._watchdog = _SendWatchdog(stalled_send_seconds)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        if getattr(handler.unary_stream, "experimental_non_blocking", False):
            return handler   # holds no thread, sends from elsewhere
        method = handler_call_details.method
        held = handler.request_streaming or method in WAITING_METHODS
        deser, ser = handler.request_deserializer, handler.response_serializer
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._streaming(method, held, handler.unary_stream), deser, ser)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(self._streaming(method, held, handler.stream_stream), deser, ser)
        return grpc.stream_unary_rpc_method_handler(self._held_unary(method, handler.stream_unary), deser, ser)

    def _take(self, method: str, context: grpc.ServicerContext) -> None:
        if not self._free.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"all {self.held_slots} slots for long-lived streams (reflection, BatchGetStream) "
                          f"are in use; the rest of --workers is kept for short calls: retry later, or use a "
                          f"unary call (BatchGet)")

    def _streaming(self, method: str, held: bool, behavior):
        def handle(request_or_iterator, context):
            if held:
                self._take(method, context)
            try:
                responses = behavior(request_or_iterator, context)
                for response in responses:
                    token = self._watchdog.arm(context, method)
                    try:
                        yield response   # gRPC sends it while we are suspended here
                    finally:
                        self._watchdog.disarm(token)
            finally:
                if held:
                    self._free.release()
        return handle

    def _held_unary(self, method: str, behavior):
        def handle(request_iterator, context):
            self._take(method, context)
            try:
                return behavior(request_iterator, context)
            finally:
                self._free.release()
        return handle


class _SendWatchdog:
    """Cancels a call whose current message has waited longer than `seconds` to be sent."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._lock = threading.Lock()
        self._armed: dict[int, tuple[float, grpc.ServicerContext, str]] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, context: grpc.ServicerContext, method: str) -> int:
        token = next(self._tokens)
        with self._lock:
            self._armed[token] = (time.monotonic() + self.seconds, context, method)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lutstore-send-watchdog", daemon=True)
                self._thread.start()
        return token

    def disarm(self, token: int) -> None:
        with self._lock:
            self._armed.pop(token, None)

    def _run(self) -> None:
        while True:
            time.sleep(WATCHDOG_PERIOD_SECONDS)
            now = time.monotonic()
            with self._lock:
                late = [(token, context, method) for token, (due, context, method) in self._armed.items() if due < now]
                for token, _, _ in late:
                    del self._armed[token]
            for _token, context, method in late:
                log.warning("cancelled %s to %s: its reader took no message for %.0f s", method[:100],
                            context.peer(), self.seconds)
                context.cancel()
