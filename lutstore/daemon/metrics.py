"""Prometheus metrics of the daemon (served on --metrics-port when given).

Measured around the servicer, never inside it: `RpcInterceptor` wraps every
handler (whatever way it is registered) to count calls by status code, time
them and count the rows and bytes BatchGet streams; the row cache is read
through `ByteLRU.stats()` when /metrics is scraped. The hot path stays as it is.

The same interceptor turns a request that does not parse into
INVALID_ARGUMENT (gRPC Python would answer INTERNAL) and writes one access
log record per RPC at DEBUG level.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Iterable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lutstore.daemon.cache import CacheStats

log = logging.getLogger(__name__)
access_log = logging.getLogger("lutstore.access")

# Buckets from 100 us to 10 s: a hot one-row BatchGet is sub-millisecond.
UNKNOWN_METHOD = "unknown"  # the label of every method the server does not have (one series, whatever the name)
_LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class DaemonMetrics:
    """One registry per server, so several servers in one process don't collide. known_methods: the
    "service/method" names the server has; any other name (a caller's typo, or 3,000 made-up 4 KB
    names) is counted as UNKNOWN_METHOD, so /metrics cannot grow without bound. None: every name."""

    def __init__(self, known_methods: Iterable[str] | None = None) -> None:
        self.known_methods = frozenset(m.lstrip("/") for m in known_methods) if known_methods is not None else None
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lutstore_requests", "RPCs answered, by method and status code", ["method", "code"],
                                registry=r)
        self.latency = Histogram("lutstore_request_seconds", "RPC latency (streams: until the last message), by method",
                                 ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("lutstore_requests_in_flight", "RPCs being handled now", registry=r)
        self._running: collections.Counter[str] = collections.Counter()   # in_flight by method, for a draining server
        self._running_lock = threading.Lock()
        self.rows = Counter("lutstore_rows_served", "Rows sent by BatchGet, by table", ["table"], registry=r)
        self.bytes = Counter("lutstore_bytes_served", "Row bytes (stored values) sent by BatchGet, by table", ["table"],
                             registry=r)
        self.auth_rejects = Counter("lutstore_auth_rejected", "RPCs rejected for a missing or wrong token", registry=r)
        self.corrupt_rows = Counter("lutstore_corrupt_rows", "Damaged rows met by reads (CRC mismatch, missing, or "
                                    "an unreadable RocksDB block), by table", ["table"], registry=r)

    def started(self, method: str) -> None:
        self.in_flight.inc()
        with self._running_lock:
            self._running[method] += 1

    def finished(self, method: str) -> None:
        self.in_flight.dec()
        with self._running_lock:
            self._running[method] -= 1

    def running(self) -> dict[str, int]:
        """RPCs being handled now, by method ("service/method")."""
        with self._running_lock:
            return {m: n for m, n in self._running.items() if n > 0}

    def track_cache(self, stats: Callable[[], CacheStats]) -> None:
        """Report the row cache's own counters at every scrape."""
        self.registry.register(_CacheCollector(stats))

    def interceptor(self) -> RpcInterceptor:
        return RpcInterceptor(self)

    def serve_http(self, host: str, port: int):
        """Expose /metrics in a background thread; returns the HTTP server (`.server_address`, `.shutdown()`)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, server.server_address[1])
        return server


class _CacheCollector:
    def __init__(self, stats: Callable[[], CacheStats]) -> None:
        self._stats = stats

    def collect(self):
        s = self._stats()
        yield CounterMetricFamily("lutstore_cache_hits", "Row lookups answered from the RAM cache", value=s.hits)
        yield CounterMetricFamily("lutstore_cache_misses", "Row lookups that went to RocksDB", value=s.misses)
        yield CounterMetricFamily("lutstore_cache_evictions", "Rows evicted from the RAM cache", value=s.evictions)
        yield GaugeMetricFamily("lutstore_cache_hit_ratio", "Cache hits / lookups since start", value=s.hit_rate)
        yield GaugeMetricFamily("lutstore_cache_bytes", "Bytes held by the RAM row cache", value=s.bytes)
        yield GaugeMetricFamily("lutstore_cache_entries", "Rows held by the RAM row cache", value=s.entries)
        yield GaugeMetricFamily("lutstore_cache_budget_bytes", "The RAM row cache's budget (--cache-mb)",
                                value=s.budget_bytes)

    def describe(self):
        return []  # collected lazily: no describe-time call into the cache


class _Unparsable:
    """Stands in for a request whose bytes are not a valid message."""


_UNPARSABLE = _Unparsable()


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception:
            return _UNPARSABLE
    return deserialize


def _reject_unparsable(context: grpc.ServicerContext, method: str) -> None:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request to {method} is not a valid protobuf message")


class RpcInterceptor(grpc.ServerInterceptor):
    """Counts, times and logs every RPC; answers unparsable requests with INVALID_ARGUMENT."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        self.m = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return None
        method = handler_call_details.method.lstrip("/")
        if self.m.known_methods is not None and method not in self.m.known_methods:
            method = UNKNOWN_METHOD
        deser, ser = _tolerant(handler.request_deserializer), handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(method, handler.unary_unary), deser, ser)
        if handler.unary_stream and getattr(handler.unary_stream, "experimental_non_blocking", False):
            return grpc.unary_stream_rpc_method_handler(self._non_blocking(method, handler.unary_stream), deser, ser)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._unary_stream(method, handler.unary_stream), deser, ser)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._stream_unary(method, handler.stream_unary), deser, ser)
        return grpc.stream_stream_rpc_method_handler(self._stream_stream(method, handler.stream_stream), deser, ser)

    # ---- bookkeeping ------------------------------------------------------

    def _finish(self, method: str, context: grpc.ServicerContext, started: float, failed: BaseException | None) -> str:
        code = context.code()
        if code is None:
            if isinstance(failed, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
            elif failed is not None:
                code = grpc.StatusCode.UNKNOWN
            else:
                code = grpc.StatusCode.OK
        seconds = time.perf_counter() - started
        self.m.finished(method)
        self.m.requests.labels(method, code.name).inc()
        self.m.latency.labels(method).observe(seconds)
        if code is grpc.StatusCode.UNAUTHENTICATED:
            self.m.auth_rejects.inc()
        if access_log.isEnabledFor(logging.DEBUG):
            access_log.debug("%s %s %.2f ms from %s", method, code.name, 1000 * seconds, context.peer(),
                             extra={"rpc_method": method, "code": code.name, "ms": round(1000 * seconds, 3),
                                    "peer": context.peer()})
        return code.name

    def _unary(self, method, behavior):
        def handle(request, context):
            started, failed = time.perf_counter(), None
            self.m.started(method)
            try:
                if request is _UNPARSABLE:
                    _reject_unparsable(context, method)
                return behavior(request, context)
            except BaseException as e:
                failed = e
                raise
            finally:
                self._finish(method, context, started, failed)
        return handle

    def _non_blocking(self, method, behavior):
        """A handler that returns its thread at once and answers later (health Watch): counted when the
        RPC ends, and kept non-blocking (a wrapping generator would hold a thread per stream)."""
        def handle(request, context, send_response_callback):
            started = time.perf_counter()
            self.m.started(method)
            context.add_callback(lambda: self._finish(method, context, started, None))
            if request is _UNPARSABLE:
                _reject_unparsable(context, method)
            return behavior(request, context, send_response_callback)
        handle.experimental_non_blocking = True
        return handle

    def _unary_stream(self, method, behavior, seen: list | None = None):
        def handle(request, context):
            started, failed = time.perf_counter(), None
            self.m.started(method)
            rows = nbytes = 0
            counted = False
            try:
                if request is _UNPARSABLE:
                    _reject_unparsable(context, method)
                for response in behavior(request, context):
                    got = getattr(response, "rows", None)
                    if got is not None:
                        counted = True
                        rows += len(got)
                        nbytes += sum(len(r.data) for r in got)
                    elif isinstance(response, (bytes, bytearray, memoryview)):  # pre-serialised responses
                        nbytes += len(response)
                    yield response
            except BaseException as e:
                failed = e
                raise
            finally:
                code = self._finish(method, context, started, failed)
                asked = seen if seen is not None else [request]   # a session: every request it carried
                tables = {getattr(r, "table", None) for r in asked}
                if len(tables) == 1 and None not in tables and code == "OK" and (rows or nbytes):
                    if not counted:  # pre-serialised: every distinct id was answered once
                        rows = sum(len(set(r.token_ids)) for r in asked)
                    table = tables.pop()
                    self.m.rows.labels(table).inc(rows)
                    self.m.bytes.labels(table).inc(nbytes)
        return handle

    def _checked(self, requests: Iterator, context, method):
        for request in requests:
            if request is _UNPARSABLE:
                _reject_unparsable(context, method)
            yield request

    # Client-streaming RPCs (reflection's) get the same accounting: their request iterator is
    # checked message by message, and the unary / server-streaming wrappers do the rest.
    def _stream_unary(self, method, behavior):
        return self._unary(method, lambda requests, context: behavior(self._checked(requests, context, method), context))

    def _stream_stream(self, method, behavior):
        def handle(requests, context):
            seen: list = []   # the session's requests, for the rows / bytes counters (BatchGetStream)

            def remembered():
                for request in self._checked(requests, context, method):
                    seen.append(request)
                    yield request
            return self._unary_stream(method, lambda _requests, ctx: behavior(remembered(), ctx), seen)(requests, context)
        return handle
