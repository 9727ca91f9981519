"""`lutstore serve`: start the daemon from a DaemonConfig, serve until SIGTERM/SIGINT, stop.

serve(config) opens everything it needs (the store as a secondary, the shared-memory registry,
the gRPC server with its limits, health, reflection, metrics, the refresher) and closes all of
it again, in reverse order, however it ends. It prints `lutstore: serving DB on HOST:PORT`
(flushed) once RPCs are accepted; on SIGTERM/SIGINT it goes NOT_SERVING, lets in-flight RPCs
finish (SHUTDOWN_GRACE_SECONDS) and returns 0.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import signal
import socket
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lutstore import alloc, security
from lutstore.daemon import health, logs, stream_guard
from lutstore.daemon.budget import ByteBudget
from lutstore.daemon.cache import ByteLRU
from lutstore.daemon.config import DaemonConfig
from lutstore.daemon.metrics import DaemonMetrics
from lutstore.daemon.requests import RequestChecks
from lutstore.daemon.row_reader import RowReader
from lutstore.daemon.rows import Catalog, Refresher, RowSource
from lutstore.daemon.servicer import LutStoreServicer, add_servicer
from lutstore.daemon.shm_server import SegmentRegistry, SharedMemoryRows
from lutstore.errors import UserError
from lutstore.formats.protocol import SERVICE_NAME, is_loopback_host
from lutstore.storage.backends import open_store
from lutstore.v1 import lutstore_pb2 as pb

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 10.0
DRAIN_QUIET_SECONDS = 0.5   # a drain that takes longer says on stderr what it waits for
SERVER_MALLOC_ARENAS = 2  # with alloc.py's thresholds each arena keeps freed memory: few arenas, a bound that holds
REQUEST_SLACK_BYTES = 64 << 10  # a request's table name, layer_ends, ... beyond its token ids
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def main(args: argparse.Namespace) -> int:
    """`lutstore serve` with its parsed flags."""
    config = DaemonConfig.from_args(args)
    config.check()
    return serve(config)


def serve(config: DaemonConfig) -> int:
    """Serve until SIGTERM/SIGINT, then stop gracefully and return 0."""
    logs.use_format(config.log_format)
    # Read credentials before opening anything, so a bad path is a one-line error.
    credentials = security.server_credentials(config.tls_cert, config.tls_key)
    token = security.read_token(config.auth_token, config.auth_token_file)
    with contextlib.ExitStack() as opened:   # closed in reverse order, however this ends
        store = opened.enter_context(open_store(config.db, "secondary"))
        alloc.limit_arenas(SERVER_MALLOC_ARENAS)   # before the worker threads exist (alloc.py)
        registry = SegmentRegistry() if config.allow_shared_memory else None
        if registry is not None:
            opened.callback(registry.close)
        cache = ByteLRU(config.cache_bytes)
        catalog = Catalog(store, cache)
        metrics = DaemonMetrics(known_methods())
        metrics.track_cache(cache.stats)
        rows = RowSource(store, cache, on_corrupt=lambda meta, ids: metrics.corrupt_rows.labels(meta.name).inc(len(ids)))
        reader = RowReader(rows, ByteBudget(config.response_budget_bytes), config.max_message_bytes)
        opened.callback(reader.close)
        checks = RequestChecks(catalog, config.max_batch_rows)
        servicer = LutStoreServicer(checks, reader, SharedMemoryRows(registry, checks, reader),
                                    config.max_message_bytes, config.sessions)
        server, health_servicer = _grpc_server(config, servicer, metrics, credentials, token)
        port = _listen(server, config, credentials)

        stop = threading.Event()

        def on_signal(signum: int, _frame) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

        metrics_port = None
        if config.metrics_port is not None:
            try:
                metrics_http = metrics.serve_http(config.metrics_host, config.metrics_port)
            except OSError as e:
                raise UserError(f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: "
                                f"{e.strerror}") from None
            opened.callback(metrics_http.shutdown)
            metrics_port = metrics_http.server_address[1]
            print(f"lutstore: metrics on http://{config.metrics_host}:{metrics_port}/metrics", flush=True)

        refresher = Refresher(catalog, config.refresh_seconds)
        server.start()
        for service in ("", SERVICE_NAME):
            health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        refresher.start()
        opened.callback(_stop_refresher, refresher)
        opened.callback(_stop_server, server, servicer, health_servicer, metrics)   # the first thing undone
        tables = store.tables()
        log.info("%d table versions: %s", len(tables), ", ".join(f"{m.name} v{m.version}" for m in tables) or "none")
        log.info("listening on %s:%d (tls=%s, auth=%s, metrics=%s)", config.host, port, credentials is not None,
                 token is not None, metrics_port or "off", extra={"event": "serving", "port": port})
        print(f"lutstore: serving {config.db} on {config.host}:{port}", flush=True)

        while not stop.wait(0.5):
            pass
    s = cache.stats()
    log.info("stopped; cache %d hits, %d misses, %d entries, %d bytes; response budget peak %d of %d bytes",
             s.hits, s.misses, s.entries, s.bytes, reader.budget.peak, reader.budget.limit)
    return 0


def _stop_server(server: grpc.Server, servicer: LutStoreServicer, health_servicer: health.HealthServicer,
                 metrics: DaemonMetrics) -> None:
    health_servicer.enter_graceful_shutdown()  # NOT_SERVING, so balancers move away first
    # New RPCs are refused from here on; in-flight ones (streams included) get the grace period;
    # idle sessions and health Watches, which are no work in flight, end at once.
    stopped = server.stop(SHUTDOWN_GRACE_SECONDS)
    sessions, watches = servicer.end_idle_sessions(), health_servicer.end_watches()
    if sessions or watches:
        log.info("stopping: ended %d idle BatchGetStream session(s) and %d health Watch(es)", sessions, watches)
    if not stopped.wait(DRAIN_QUIET_SECONDS):
        running = {m.rpartition("/")[2]: n for m, n in metrics.running().items()}
        log.warning("stopping: waiting up to %g s for %d call(s) in flight to finish (%s)",
                    SHUTDOWN_GRACE_SECONDS - DRAIN_QUIET_SECONDS, sum(running.values()),
                    ", ".join(f"{m}: {n}" for m, n in sorted(running.items())) or "none left")
        stopped.wait()


def _stop_refresher(refresher: Refresher) -> None:
    refresher.stopped.set()
    refresher.join()


def _grpc_server(config: DaemonConfig, servicer: LutStoreServicer, metrics: DaemonMetrics,
                 credentials: grpc.ServerCredentials | None,
                 token: str | None) -> tuple[grpc.Server, health.HealthServicer]:
    """The gRPC server with every service and limit, not yet listening."""
    # Interceptors cover every handler however it is registered; metrics is outermost so that
    # rejected calls are counted too; the stream guard comes before the token check because
    # health Watch needs no token.
    interceptors: list[grpc.ServerInterceptor] = [
        metrics.interceptor(),
        stream_guard.StreamGuard(stream_guard.held_slots_for(config.workers), config.stalled_send_seconds)]
    if token:
        interceptors.append(security.BearerTokenInterceptor(token))
    _warn_if_exposed(config, credentials is not None, token)
    _warn_if_metrics_exposed(config)
    max_message = config.max_message_bytes
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="lutstore-rpc"),
        interceptors=interceptors,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,  # beyond it: RESOURCE_EXHAUSTED, not an unbounded queue
        options=[
            ("grpc.max_send_message_length", max_message),
            ("grpc.max_receive_message_length", receive_limit(config.max_batch_rows, max_message)),
            ("grpc.max_concurrent_streams", config.max_concurrent_streams),
            ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
            # No BDP probing of what callers send: it grows our receive windows to megabytes, so 40 clients
            # sending 7.6 MB requests (refused for their size anyway) had ~100 MiB buffered in the daemon.
            # Requests are at most tens of KB (receive_limit); responses follow the client's windows.
            ("grpc.http2.bdp_probe", 0),
        ],
    )
    add_servicer(servicer, server)
    # Watches hold no thread and no RPC slot (health.py); at most --max-concurrent-rpcs of them.
    health_servicer = health.HealthServicer(["", SERVICE_NAME], max_watches=config.max_concurrent_rpcs)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
    return server, health_servicer


def _listen(server: grpc.Server, config: DaemonConfig, credentials: grpc.ServerCredentials | None) -> int:
    """Bind --host:--port; the port bound (a free one for --port 0)."""
    address = f"{config.host}:{config.port}"
    check_can_listen(config.host, config.port)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        raise UserError(f"cannot listen on {address} (port in use, or not an address of this host)") from None
    if port == 0:
        raise UserError(f"cannot listen on {address} (in use, or not an address of this host)")
    return port


def check_can_listen(host: str, port: int) -> None:
    """UserError naming the exact reason when host:port cannot be listened on: gRPC's own failure is
    one vague exception after a core log line; a plain bind of the same address says why."""
    if port == 0:
        return
    where = f"cannot listen on {host}:{port}"
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UserError(f"{where}: cannot resolve {host!r} ({e.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as gRPC does: TIME_WAIT is no conflict
        try:
            probe.bind(sockaddr)
        except OSError as e:
            reason = {errno.EADDRINUSE: f"port {port} is in use (another lutstore serve? `ss -ltnp 'sport = :{port}'` "
                                        f"names it; --port 0 picks a free one)",
                      errno.EADDRNOTAVAIL: f"{host} is not an address of this host",
                      errno.EACCES: "permission denied (ports below 1024 need privileges)"}.get(e.errno, e.strerror)
            raise UserError(f"{where}: {reason}") from None


def _warn_if_exposed(config: DaemonConfig, tls: bool, token: str | None) -> None:
    """Off loopback, say plainly what is unprotected (the flags stay the user's choice)."""
    if is_loopback_host(config.host):
        return
    if not tls:
        log.warning("serving on %s without TLS: rows%s travel in plaintext (use --tls-cert/--tls-key)",
                    config.host, " and the bearer token" if token else "")
    if not token:
        log.warning("serving on %s without --auth-token: anyone who can reach the port can read every table",
                    config.host)


def _warn_if_metrics_exposed(config: DaemonConfig) -> None:
    """/metrics has no auth and names every table: off loopback, say so as for --host."""
    if config.metrics_port is not None and not is_loopback_host(config.metrics_host):
        log.warning("metrics on %s without any auth: anyone who can reach port %d can read them, and they name "
                    "every table (keep --metrics-host on loopback, or firewall the port)",
                    config.metrics_host, config.metrics_port)


def receive_limit(max_batch_rows: int, max_message: int) -> int:
    """The largest request the server reads: max_batch_rows token ids (a varint is at most 5 bytes)
    plus slack for the rest, so a request that would be refused anyway cannot take memory first."""
    return min(max_message, 5 * max_batch_rows + REQUEST_SLACK_BYTES)


def known_methods() -> list[str]:
    """Every method this server answers (metrics label the rest "unknown")."""
    services = [pb.DESCRIPTOR.services_by_name["LutStore"], health_pb2.DESCRIPTOR.services_by_name["Health"]]
    names = [f"{s.full_name}/{m.name}" for s in services for m in s.methods]
    return names + [f"{reflection.SERVICE_NAME}/ServerReflectionInfo"]
