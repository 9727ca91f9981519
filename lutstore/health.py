"""grpc.health.v1.Health for the daemon: Check and Watch for the services it has, nothing else.

grpcio-health-checking's HealthServicer keeps a dict entry for every service
name ever watched (never removed: unique names grew a daemon by hundreds of
MiB) and its Watch holds a server thread for as long as the client likes once
an interceptor wraps it. Here the known names are fixed at construction
(unknown ones are NOT_FOUND and stored nowhere), and a Watch answers the
current status, then each change, and ends with OK after `watch_seconds`
(the client watches again), so no thread is held without bound. How many
Watches may be open at once is guard.StreamGuard's business.
"""

from __future__ import annotations

import threading
import time
from typing import Iterable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WATCH_SECONDS = 60.0
MAX_NAME_CHARS = 200   # an unknown name is quoted back this long at most


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self, services: Iterable[str], watch_seconds: float = WATCH_SECONDS):
        self._status = {name: NOT_SERVING for name in services}   # fixed keys: never grows
        self._changed = threading.Condition()
        self._shutting_down = False
        self.watch_seconds = watch_seconds

    def set(self, service: str, status: int) -> None:
        with self._changed:
            if service not in self._status:
                raise KeyError(f"unknown health service {service!r}")
            if not self._shutting_down:
                self._status[service] = status
                self._changed.notify_all()

    def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for every service from now on (balancers move away before the port closes)."""
        with self._changed:
            self._shutting_down = True
            for name in self._status:
                self._status[name] = NOT_SERVING
            self._changed.notify_all()

    def service_count(self) -> int:
        return len(self._status)

    def _known(self, service: str, context: grpc.ServicerContext) -> int:
        status = self._status.get(service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"unknown service {service[:MAX_NAME_CHARS]!r} (this server has: "
                          f"{', '.join(repr(s) for s in self._status)})")
        return status

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext):
        return health_pb2.HealthCheckResponse(status=self._known(request.service, context))

    def Watch(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext) -> Iterator[health_pb2.HealthCheckResponse]:
        last = self._known(request.service, context)
        yield health_pb2.HealthCheckResponse(status=last)
        ends = time.monotonic() + self.watch_seconds
        context.add_callback(self._wake)   # a cancelled Watch frees its thread at once
        while context.is_active():
            with self._changed:
                left = ends - time.monotonic()
                if left <= 0:
                    return
                status = self._status[request.service]
                if status == last:
                    self._changed.wait(left)
                    status = self._status[request.service]
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)

    def _wake(self) -> None:
        with self._changed:
            self._changed.notify_all()
