"""grpc.health.v1.Health for the daemon: Check and Watch for the services it has, nothing else.

grpcio-health-checking's HealthServicer keeps a dict entry for every service
name ever watched (never removed: unique names grew a daemon by hundreds of
MiB), and once an interceptor wrapped its Watch, each Watch held a server
thread for as long as the client liked (16 of them stopped the daemon).
Here the known names are fixed at construction (unknown ones are NOT_FOUND
and stored nowhere), and Watch is non-blocking: it answers the current
status, returns the thread at once, and later statuses are sent from set().
At most `max_watches` Watches are open at once (gRPC does not count a
non-blocking RPC among --max-concurrent-rpcs once its handler returned); one
more is refused with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MAX_NAME_CHARS = 200   # an unknown name is quoted back this long at most


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self, services: Iterable[str], max_watches: int):
        self._status = {name: NOT_SERVING for name in services}   # fixed keys: never grows
        self._lock = threading.Lock()
        # id -> (service, send_response_callback, its RPC's context)
        self._watchers: dict[int, tuple[str, Callable, grpc.ServicerContext]] = {}
        self._next_id = 0
        self._shutting_down = False
        self.max_watches = max_watches

    def set(self, service: str, status: int) -> None:
        with self._lock:
            if service not in self._status:
                raise KeyError(f"unknown health service {service!r}")
            if self._shutting_down:
                return
            self._status[service] = status
            told = [send for name, send, _context in self._watchers.values() if name == service]
        for send in told:
            _send(send, status)

    def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for every service from now on (balancers move away before the port closes)."""
        with self._lock:
            self._shutting_down = True
            for name in self._status:
                self._status[name] = NOT_SERVING
            told = [send for _name, send, _context in self._watchers.values()]
        for send in told:
            _send(send, NOT_SERVING)

    def end_watches(self) -> int:
        """The server is stopping: end every open Watch (they were told NOT_SERVING), so the drain does
        not wait its whole grace period for streams that never end by themselves. How many ended."""
        with self._lock:
            watches, self._watchers = list(self._watchers.values()), {}
        for _name, _send_response, context in watches:
            context.cancel()
        return len(watches)

    def watch_count(self) -> int:
        with self._lock:
            return len(self._watchers)

    def _known(self, service: str, context: grpc.ServicerContext) -> int:
        status = self._status.get(service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"unknown service {service[:MAX_NAME_CHARS]!r} (this server has: "
                          f"{', '.join(repr(s) for s in self._status)})")
        return status

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext):
        return health_pb2.HealthCheckResponse(status=self._known(request.service, context))

    def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext,
              send_response_callback: Callable | None = None):
        """Non-blocking (gRPC passes send_response_callback and frees the thread when we return)."""
        if send_response_callback is None:
            context.abort(grpc.StatusCode.INTERNAL, "health Watch needs gRPC's non-blocking handler support")
        service = request.service
        with self._lock:
            status = self._known(service, context)
            if len(self._watchers) >= self.max_watches:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"all {self.max_watches} health Watch streams are in use; poll with Check")
            key = self._next_id
            self._next_id += 1
            self._watchers[key] = (service, send_response_callback, context)
        context.add_callback(lambda: self._forget(key))
        _send(send_response_callback, status)

    Watch.experimental_non_blocking = True   # read by grpc._server

    def _forget(self, key: int) -> None:
        with self._lock:
            self._watchers.pop(key, None)


def _send(send_response_callback: Callable, status: int) -> None:
    try:
        send_response_callback(health_pb2.HealthCheckResponse(status=status))
    except Exception:  # the stream ended meanwhile: nothing to tell
        pass
