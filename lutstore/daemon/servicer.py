"""`lutstore serve`: the gRPC daemon.

The servicer validates each request and delegates: table lookups to
`lutstore.store.Store` (opened as a RocksDB secondary, so `lutstore ingest`
can add tables while we serve), row bytes to `RowSource` (lutstore/rows.py:
hot-row LRU in front of RocksDB multi-gets, checksum checked once per row). Rows travel in
their stored encoding; the client decodes.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import threading
import time
from concurrent import futures
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lutstore import alloc

from lutstore.formats import codec, wire
from lutstore.daemon import guard, health, logs, shm_server as shm
from lutstore import security
from lutstore.daemon.cache import ByteLRU
from lutstore.errors import UserError
from lutstore.daemon.metrics import Metrics
from lutstore.storage.backends import open_store
from lutstore.daemon.rows import Catalog, Refresher, RowSource
from lutstore.storage.api import TableStore
from lutstore.storage.model import DatabaseDamaged, StoreError, TableMeta, TableNotFound, VersionGone, is_utf8
from lutstore.formats.protocol import ENCODING_TO_PB, SERVICE_NAME, is_loopback_host
from lutstore.daemon.read_status import abort_on_read_errors
from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 10.0
MESSAGE_TARGET_BYTES = 4 << 20  # rows per BatchGetResponse: a few MiB, well below the limit
PREFETCH_THREADS = 8  # calls whose next message is read ahead at once; more wait their turn
SLICED_BLOCK_BYTES = 32 << 20  # layer-sliced BatchGet: rows read (and held) at once per block
RESPONSE_BUDGET_BYTES = 64 << 20  # default of --max-response-mb
SERVER_MALLOC_ARENAS = 2  # with alloc.py's thresholds each arena keeps freed memory: few arenas, a bound that holds
ZSTD_FRAME_SLACK = 64  # a zstd frame of incompressible data is at most a few bytes longer
REQUEST_SLACK_BYTES = 64 << 10  # a request's table name, layer_ends, ... beyond its token ids
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name



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


class LutStoreServicer(pb_grpc.LutStoreServicer):
    def __init__(self, catalog: Catalog, rows: RowSource, max_batch_rows: int, max_message_bytes: int,
                 prefetch_threads: int = PREFETCH_THREADS, max_sessions: int = 8,
                 shared_memory: shm.SegmentRegistry | None = None, budget: guard.ByteBudget | None = None):
        """shared_memory: the segments clients hand over for BatchGetShared (None: the RPC is refused);
        budget: bytes of responses being built or sent at once, all calls together."""
        self.catalog = catalog
        self.budget = budget or guard.ByteBudget(RESPONSE_BUDGET_BYTES)
        self.shared_memory = shared_memory
        self.max_sessions = max_sessions
        self._open_sessions = 0
        self._sessions_lock = threading.Lock()
        # Reads the next message of multi-message BatchGets ahead; one task in flight per such call.
        self.prefetch = futures.ThreadPoolExecutor(max_workers=prefetch_threads, thread_name_prefix="lutstore-prefetch")
        self.rows = rows
        self.max_batch_rows = max_batch_rows
        self.max_message_bytes = max_message_bytes
        self.message_target = max(1, min(MESSAGE_TARGET_BYTES, max_message_bytes // 2))

    # ---- helpers -------------------------------------------------------

    def _resolve(self, name: str, version: int, context: grpc.ServicerContext) -> TableMeta:
        if not name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request names no table")
        try:
            with abort_on_read_errors(context):   # a cluster node down: UNAVAILABLE, may succeed later
                return self.catalog.resolve(name, version)
        except TableNotFound as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except VersionGone as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except DatabaseDamaged as e:  # the table list went unreadable: the detail names files, so log it
            log.error("%s", e)
            context.abort(grpc.StatusCode.DATA_LOSS, "the server's database is damaged (its table list cannot be "
                                                     "read); the server log says where")
        except StoreError as e:
            context.abort(grpc.StatusCode.INTERNAL, str(e))
        raise AssertionError("unreachable")  # context.abort always raises

    def table_info(self, meta: TableMeta) -> pb.TableInfo:
        fmt = meta.row_format()
        live = [m.version for m in self.catalog.store.tables() if m.name == meta.name]
        return pb.TableInfo(
            name=meta.name, version=meta.version, vocab_size=meta.vocab_size,
            num_layers=meta.num_layers, num_experts=meta.num_experts, hidden_size=meta.hidden_size,
            encoding=ENCODING_TO_PB[fmt.encoding],
            compression=pb.COMPRESSION_ZSTD if meta.zstd else pb.COMPRESSION_NONE,
            fingerprint=meta.fingerprint,
            artifacts=[pb.ArtifactInfo(name=a.name, size=a.size, sha256=a.sha256) for a in meta.artifacts],
            row_bytes=fmt.payload_bytes, stored_bytes=meta.stored_bytes, live_versions=live,
            created_unix_ms=meta.created_unix_ms, source_form=meta.source_form,
            max_batch_rows=self.max_batch_rows, block_size=fmt.block_size,
            shared_memory_socket=str(self.shared_memory.path) if self.shared_memory else "")

    def _row_bound(self, meta: TableMeta) -> int:
        fmt = meta.row_format()
        return fmt.stored_bytes or fmt.payload_bytes + ZSTD_FRAME_SLACK + codec.CRC_BYTES

    def _message(self, meta: TableMeta, group: list[int]) -> bytes:
        # One copy of the rows into the message; protobuf objects would cost three (see wire.py).
        return wire.encode_response(group, self.rows.rows(meta, group), meta.version)

    # ---- RPCs ------------------------------------------------------------

    def ListTables(self, request: pb.ListTablesRequest, context: grpc.ServicerContext) -> pb.ListTablesResponse:
        latest: dict[str, TableMeta] = {}
        for meta in self.catalog.store.tables():  # sorted by (name, version): the last one wins
            latest[meta.name] = meta
        # A name stored before names were checked may not be valid UTF-8 (a lone surrogate): no gRPC
        # string can carry it, and one such table made every ListTables fail. Leave it out, say why.
        for name in [n for n in latest if not is_utf8(n)]:
            log.warning("table %r is left out of ListTables: its name is not valid UTF-8; `lutstore drop` it "
                        "(or re-ingest under a new --name)", name)
            del latest[name]
        return pb.ListTablesResponse(tables=[self.table_info(m) for m in latest.values()])

    def GetTableInfo(self, request: pb.GetTableInfoRequest, context: grpc.ServicerContext) -> pb.TableInfo:
        return self.table_info(self._resolve(request.table, request.version, context))

    def checked_ids(self, token_ids, meta: TableMeta, context: grpc.ServicerContext) -> list[int]:
        """The distinct requested ids, ascending; INVALID_ARGUMENT naming the limit for an empty or
        oversized batch or an id outside the vocabulary (BatchGet and BatchGetShared alike)."""
        n = len(token_ids)
        if n == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty batch: give at least one token id")
        if n > self.max_batch_rows:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"batch of {n} token ids exceeds max_batch_rows={self.max_batch_rows}; split it")
        ids = sorted(set(token_ids))
        if ids[-1] >= meta.vocab_size:
            bad = next(t for t in token_ids if t >= meta.vocab_size)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"token id {bad} out of range: table {meta.name!r} v{meta.version} has vocab_size "
                          f"{meta.vocab_size} (valid ids 0..{meta.vocab_size - 1})")
        return ids

    def BatchGet(self, request: pb.BatchGetRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Yields serialised BatchGetResponse messages (see add_servicer: no protobuf objects for rows)."""
        started = time.perf_counter()
        meta = self._resolve(request.table, request.version, context)
        ids = self.checked_ids(request.token_ids, meta, context)
        row_bound = self._row_bound(meta)
        if row_bound + 1024 > self.max_message_bytes:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"one row of {meta.name!r} ({row_bound} bytes) does not fit this server's "
                          f"--max-message-mb ({self.max_message_bytes} bytes)")
        if request.layer_ends:
            yield from self._sliced(meta, ids, list(request.layer_ends), context)
        else:
            yield from self._whole(meta, ids, row_bound, context)
        log.debug("BatchGet %s v%d: %d ids (%d distinct)%s in %.2f ms", meta.name, meta.version, len(request.token_ids),
                  len(ids), f" layer_ends {list(request.layer_ends)}" if request.layer_ends else "",
                  1000 * (time.perf_counter() - started))

    def _whole(self, meta: TableMeta, ids: list[int], row_bound: int, context: grpc.ServicerContext) -> Iterator[bytes]:
        """BatchGet's answer in whole stored rows, messages of a few MiB. Each message costs three times
        its bytes of the response budget (the rows read, the joined message, gRPC's copy while it sends)
        until it has been sent."""
        per_message = max(1, self.message_target // row_bound)
        groups = [ids[start : start + per_message] for start in range(0, len(ids), per_message)]
        budget = self.budget
        cost = [3 * len(group) * row_bound for group in groups]
        pending: futures.Future[bytes] | None = None
        held = pending_held = 0
        try:
            with abort_on_read_errors(context):   # a damaged row: DATA_LOSS; a node down: UNAVAILABLE
                held = self._take(cost[0], context)
                message = self._message(meta, groups[0])
                for k in range(len(groups)):
                    # Read and encode message k+1 while gRPC sends message k (the multi-get and the CRC
                    # checks release the GIL), when the budget has room for it now.
                    if k + 1 < len(groups):
                        pending_held = budget.try_take(cost[k + 1]) or 0
                        pending = self.prefetch.submit(self._message, meta, groups[k + 1]) if pending_held else None
                    yield message
                    budget.give(held)
                    held = 0
                    if k + 1 < len(groups):
                        if pending is not None:
                            message, held, pending, pending_held = pending.result(), pending_held, None, 0
                        else:
                            held = self._take(cost[k + 1], context)
                            message = self._message(meta, groups[k + 1])
        finally:
            budget.give(held)
            if pending is not None:   # abandoned mid-way: its bytes are free once it has finished
                pending.add_done_callback(lambda _f, n=pending_held: budget.give(n))

    def _take(self, n: int, context: grpc.ServicerContext) -> int:
        try:
            return self.budget.take(n)
        except guard.BudgetExhausted as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry later")
            raise AssertionError("unreachable")

    def BatchGetStream(self, requests: Iterator[pb.BatchGetRequest], context: grpc.ServicerContext) -> Iterator[bytes]:
        """BatchGet for each request of the session, in order (serialised messages, as BatchGet's).
        An open session holds a server thread, so at most max_sessions are open at once: one more
        is refused at once (RESOURCE_EXHAUSTED) rather than starving every other RPC."""
        with self._sessions_lock:
            full = self._open_sessions >= self.max_sessions
            if not full:
                self._open_sessions += 1
        if full:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"all {self.max_sessions} BatchGetStream sessions are in use (--max-sessions); use BatchGet")
        try:
            for request in requests:
                yield from self.BatchGet(request, context)
        finally:
            with self._sessions_lock:
                self._open_sessions -= 1

    def _sliced(self, meta: TableMeta, ids: list[int], layer_ends: list[int],
                context: grpc.ServicerContext) -> Iterator[bytes]:
        """BatchGet's layer-sliced answer (BatchGetRequest.layer_ends): per block of rows, every row's
        slice of layer group 0, then of group 1, ...; each slice carries its own CRC-32. The first
        message (the first layers of every row) leaves as soon as the block is read, so the client's
        first layers can run while the later slices are still on their way."""
        fmt = meta.row_format()
        try:
            groups = codec.check_layer_ends(fmt, layer_ends)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{e} (table {meta.name!r} has {fmt.num_layers} layers)")
        block_rows = max(1, SLICED_BLOCK_BYTES // fmt.payload_bytes)
        for start in range(0, len(ids), block_rows):
            block = ids[start : start + block_rows]
            # The block's stored values and payloads, and a message with gRPC's copy of it: one take.
            held = self._take(2 * len(block) * self._row_bound(meta) + 2 * self.message_target, context)
            try:
                yield from self._sliced_block(meta, fmt, block, groups, context)
            finally:
                self.budget.give(held)

    def _sliced_block(self, meta: TableMeta, fmt, block: list[int], groups, context) -> Iterator[bytes]:
        """One block of _sliced: its rows' slices, layer group by layer group."""
        with abort_on_read_errors(context):
            values = self.rows.rows(meta, block)
        # RowSource hands out checked rows only; payload_of just strips the CRC (and unzips).
        payloads = [codec.payload_of(fmt, v, verify=False) for v in values]
        for begin, end in groups:
            size = codec.slice_payload_bytes(fmt, begin, end) + codec.CRC_BYTES
            per_message = max(1, self.message_target // size)
            trailer = wire.response_trailer(meta.version, begin, end)
            for first in range(0, len(block), per_message):
                parts: list = []
                for token, payload in zip(block[first : first + per_message], payloads[first : first + per_message]):
                    pieces = codec.slice_parts(fmt, payload, begin, end)
                    parts.append(wire.row_header(token, size))
                    parts += pieces
                    parts.append(codec.crc_of_parts(pieces))
                parts.append(trailer)
                yield b"".join(parts)

    def GetArtifact(self, request: pb.GetArtifactRequest, context: grpc.ServicerContext) -> Iterator[pb.ArtifactChunk]:
        meta = self._resolve(request.table, request.version, context)
        try:
            meta.artifact(request.name)
        except KeyError:
            names = ", ".join(a.name for a in meta.artifacts) or "none"
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"table {meta.name!r} v{meta.version} has no artifact {request.name!r} (artifacts: {names})")
        piece = self.message_target
        offset = 0
        try:
            with abort_on_read_errors(context):   # a cluster node down: UNAVAILABLE
                for chunk in self.catalog.store.iter_artifact(meta, request.name):
                    view = memoryview(chunk)
                    for start in range(0, max(len(view), 1), piece):
                        data = view[start : start + piece]
                        held = self._take(3 * len(data), context)   # the chunk's bytes, the message, gRPC's copy
                        try:
                            yield pb.ArtifactChunk(offset=offset, data=bytes(data))
                        finally:
                            self.budget.give(held)
                        offset += len(data)
        except StoreError as e:   # a damaged or missing chunk
            context.abort(grpc.StatusCode.DATA_LOSS, str(e))


def add_servicer(servicer: LutStoreServicer, server: grpc.Server) -> None:
    """Register the LutStore service like the generated add_LutStoreServicer_to_server, except that
    BatchGet's responses are already serialised bytes (response_serializer=None); the wire format is
    unchanged, so generated stubs in any language parse them as BatchGetResponse."""
    handlers = {
        "ListTables": grpc.unary_unary_rpc_method_handler(
            servicer.ListTables, request_deserializer=pb.ListTablesRequest.FromString,
            response_serializer=pb.ListTablesResponse.SerializeToString),
        "GetTableInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetTableInfo, request_deserializer=pb.GetTableInfoRequest.FromString,
            response_serializer=pb.TableInfo.SerializeToString),
        "BatchGet": grpc.unary_stream_rpc_method_handler(
            servicer.BatchGet, request_deserializer=pb.BatchGetRequest.FromString, response_serializer=None),
        "BatchGetStream": grpc.stream_stream_rpc_method_handler(
            servicer.BatchGetStream, request_deserializer=pb.BatchGetRequest.FromString, response_serializer=None),
        "GetArtifact": grpc.unary_stream_rpc_method_handler(
            servicer.GetArtifact, request_deserializer=pb.GetArtifactRequest.FromString,
            response_serializer=pb.ArtifactChunk.SerializeToString),
        # Same-host fast path (lutstore/shm.py); refuses with FAILED_PRECONDITION unless --allow-shared-memory.
        "BatchGetShared": shm.method_handler(shm.SharedMemoryRows(
            servicer.shared_memory, resolve=servicer._resolve, checked_ids=servicer.checked_ids,
            rows=servicer.rows.rows, row_bound=servicer._row_bound, prefetch=servicer.prefetch,
            budget=servicer.budget)),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _validate(args: argparse.Namespace) -> None:
    if args.max_batch_rows < 1:
        raise UserError(f"--max-batch-rows must be >= 1, got {args.max_batch_rows}")
    if args.max_message_mb <= 0:
        raise UserError(f"--max-message-mb must be > 0, got {args.max_message_mb}")
    if args.cache_mb < 0:
        raise UserError(f"--cache-mb must be >= 0, got {args.cache_mb}")
    if args.workers < 1 or args.max_concurrent_streams < 1:
        raise UserError("--workers and --max-concurrent-streams must be >= 1")
    if args.refresh_seconds <= 0:
        raise UserError(f"--refresh-seconds must be > 0, got {args.refresh_seconds}")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if args.metrics_port is not None and not 0 <= args.metrics_port < 65536:
        raise UserError(f"--metrics-port must be in 0..65535, got {args.metrics_port}")
    if getattr(args, "max_sessions", None) is not None and not 0 <= args.max_sessions < args.workers:
        raise UserError(f"--max-sessions must be 0..{args.workers - 1} (below --workers: each open session holds "
                        f"a server thread), got {args.max_sessions}")
    if args.max_concurrent_rpcs < 1:
        raise UserError(f"--max-concurrent-rpcs must be >= 1, got {args.max_concurrent_rpcs}")
    if getattr(args, "max_response_mb", 64) <= 0:
        raise UserError(f"--max-response-mb must be > 0, got {args.max_response_mb}")
    if getattr(args, "stalled_send_seconds", guard.STALLED_SEND_SECONDS) <= 0:
        raise UserError(f"--stalled-send-seconds must be > 0, got {args.stalled_send_seconds}")
    if getattr(args, "allow_shared_memory", False) and not is_loopback_host(args.host):
        raise UserError(f"--allow-shared-memory serves same-host clients only: it needs a loopback --host, "
                        f"not {args.host}")


def _warn_if_exposed(args: argparse.Namespace, tls: bool, token: str | None) -> None:
    """Off loopback, say plainly what is unprotected (the flags stay the user's choice)."""
    if is_loopback_host(args.host):
        return
    if not tls:
        log.warning("serving on %s without TLS: rows%s travel in plaintext (use --tls-cert/--tls-key)",
                    args.host, " and the bearer token" if token else "")
    if not token:
        log.warning("serving on %s without --auth-token: anyone who can reach the port can read every table",
                    args.host)


def _warn_if_metrics_exposed(args: argparse.Namespace) -> None:
    """/metrics has no auth and names every table: off loopback, say so as for --host."""
    if args.metrics_port is not None and not is_loopback_host(args.metrics_host):
        log.warning("metrics on %s without any auth: anyone who can reach port %d can read them, and they name "
                    "every table (keep --metrics-host on loopback, or firewall the port)",
                    args.metrics_host, args.metrics_port)


def receive_limit(max_batch_rows: int, max_message: int) -> int:
    """The largest request the server reads: max_batch_rows token ids (a varint is at most 5 bytes)
    plus slack for the rest, so a request that would be refused anyway cannot take memory first."""
    return min(max_message, 5 * max_batch_rows + REQUEST_SLACK_BYTES)


def known_methods() -> list[str]:
    """Every method this server answers (metrics label the rest "unknown")."""
    services = [pb.DESCRIPTOR.services_by_name["LutStore"], health_pb2.DESCRIPTOR.services_by_name["Health"]]
    names = [f"{s.full_name}/{m.name}" for s in services for m in s.methods]
    return names + [f"{reflection.SERVICE_NAME}/ServerReflectionInfo"]


def main(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then stop gracefully and return 0."""
    _validate(args)
    logs.use_format(args.log_format)
    # Read credentials before opening anything, so a bad path is a one-line error.
    credentials = security.server_credentials(args.tls_cert, args.tls_key)
    token = security.read_token(args.auth_token, args.auth_token_file)
    store = open_store(args.db, "secondary")
    try:
        return _serve(args, store, credentials, token)
    finally:
        store.close()


def _serve(args: argparse.Namespace, store: TableStore, credentials: grpc.ServerCredentials | None,
           token: str | None) -> int:
    alloc.limit_arenas(SERVER_MALLOC_ARENAS)   # before the worker threads exist (alloc.py)
    max_message = int(args.max_message_mb * (1 << 20))
    cache = ByteLRU(int(args.cache_mb * (1 << 20)))
    catalog = Catalog(store, cache)
    max_sessions = args.max_sessions if getattr(args, "max_sessions", None) is not None else max(1, args.workers // 2)
    shared_memory = shm.SegmentRegistry() if getattr(args, "allow_shared_memory", False) else None
    try:
        return _serve_with(args, store, credentials, token, cache, catalog, shared_memory, max_message, max_sessions)
    finally:
        if shared_memory is not None:
            shared_memory.close()


def _serve_with(args: argparse.Namespace, store: TableStore, credentials: grpc.ServerCredentials | None,
                token: str | None, cache: ByteLRU, catalog: Catalog, shared_memory: shm.SegmentRegistry | None,
                max_message: int, max_sessions: int) -> int:
    metrics = Metrics(known_methods())
    rows = RowSource(store, cache, on_corrupt=lambda meta, ids: metrics.corrupt_rows.labels(meta.name).inc(len(ids)))
    servicer = LutStoreServicer(catalog, rows, args.max_batch_rows, max_message,
                                max_sessions=max_sessions, shared_memory=shared_memory,
                                budget=guard.ByteBudget(int(getattr(args, "max_response_mb", 64) * (1 << 20))))
    metrics.track_cache(cache.stats)
    # Interceptors cover every handler however it is registered; metrics is outermost so that
    # rejected calls are counted too; the stream guard comes before the token check because
    # health Watch needs no token.
    interceptors: list[grpc.ServerInterceptor] = [
        metrics.interceptor(),
        guard.StreamGuard(guard.held_slots_for(args.workers),
                          getattr(args, "stalled_send_seconds", guard.STALLED_SEND_SECONDS))]
    if token:
        interceptors.append(security.BearerTokenInterceptor(token))
    _warn_if_exposed(args, credentials is not None, token)
    _warn_if_metrics_exposed(args)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="lutstore-rpc"),
        interceptors=interceptors,
        maximum_concurrent_rpcs=args.max_concurrent_rpcs,  # beyond it: RESOURCE_EXHAUSTED, not an unbounded queue
        options=[
            ("grpc.max_send_message_length", max_message),
            ("grpc.max_receive_message_length", receive_limit(args.max_batch_rows, max_message)),
            ("grpc.max_concurrent_streams", args.max_concurrent_streams),
            ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
            # No BDP probing of what callers send: it grows our receive windows to megabytes, so 40 clients
            # sending 7.6 MB requests (refused for their size anyway) had ~100 MiB buffered in the daemon.
            # Requests are at most tens of KB (receive_limit); responses follow the client's windows.
            ("grpc.http2.bdp_probe", 0),
        ],
    )
    add_servicer(servicer, server)
    # Watches hold no thread and no RPC slot (health.py); at most --max-concurrent-rpcs of them.
    health_servicer = health.HealthServicer(["", SERVICE_NAME], max_watches=args.max_concurrent_rpcs)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME], server)

    address = f"{args.host}:{args.port}"
    check_can_listen(args.host, args.port)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        raise UserError(f"cannot listen on {address} (port in use, or not an address of this host)") from None
    if port == 0:
        raise UserError(f"cannot listen on {address} (in use, or not an address of this host)")

    stop = threading.Event()

    def on_signal(signum: int, _frame) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    metrics_http = None
    if args.metrics_port is not None:
        try:
            metrics_http = metrics.serve_http(args.metrics_host, args.metrics_port)
        except OSError as e:
            raise UserError(f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {e.strerror}") from None
        print(f"lutstore: metrics on http://{args.metrics_host}:{metrics_http.server_address[1]}/metrics", flush=True)

    refresher = Refresher(catalog, args.refresh_seconds)
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    refresher.start()
    tables = store.tables()
    log.info("%d table versions: %s", len(tables), ", ".join(f"{m.name} v{m.version}" for m in tables) or "none")
    log.info("listening on %s:%d (tls=%s, auth=%s, metrics=%s)", args.host, port, credentials is not None,
             token is not None, metrics_http.server_address[1] if metrics_http else "off",
             extra={"event": "serving", "port": port})
    print(f"lutstore: serving {args.db} on {args.host}:{port}", flush=True)

    while not stop.wait(0.5):
        pass
    health_servicer.enter_graceful_shutdown()  # NOT_SERVING, so balancers move away first
    # New RPCs are refused from here on; in-flight ones (streams included) get the grace period.
    server.stop(SHUTDOWN_GRACE_SECONDS).wait()
    servicer.prefetch.shutdown(wait=True)
    refresher.stopped.set()
    refresher.join()
    if metrics_http is not None:
        metrics_http.shutdown()
    s = cache.stats()
    log.info("stopped; cache %d hits, %d misses, %d entries, %d bytes; response budget peak %d of %d bytes",
             s.hits, s.misses, s.entries, s.bytes, servicer.budget.peak, servicer.budget.limit)
    return 0

