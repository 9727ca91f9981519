"""`lutstore serve`: the gRPC daemon.

The servicer validates each request and delegates: table lookups to
`lutstore.store.Store` (opened as a RocksDB secondary, so `lutstore ingest`
can add tables while we serve), row bytes to `RowSource` (hot-row LRU in
front of RocksDB multi-gets, checksum checked once per row). Rows travel in
their stored encoding; the client decodes.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from concurrent import futures
from typing import Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lutstore import codec, wire
from lutstore import logs, security, shm
from lutstore.cache import ByteLRU
from lutstore.errors import UserError
from lutstore.metrics import Metrics
from lutstore.protocol import ENCODING_TO_PB, SERVICE_NAME, is_loopback_host
from lutstore.store import Store, StoreError, TableMeta, TableNotFound, VersionGone
from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 10.0
MESSAGE_TARGET_BYTES = 4 << 20  # rows per BatchGetResponse: a few MiB, well below the limit
PREFETCH_THREADS = 8  # calls whose next message is read ahead at once; more wait their turn
SLICED_BLOCK_BYTES = 32 << 20  # layer-sliced BatchGet: rows read (and held) at once per block
ZSTD_FRAME_SLACK = 64  # a zstd frame of incompressible data is at most a few bytes longer

class CorruptRow(Exception):
    def __init__(self, meta: TableMeta, token_id: int, reason: str):
        self.token_id = token_id
        super().__init__(f"row {token_id} of table {meta.name!r} v{meta.version} is corrupt ({reason}); "
                         f"run `lutstore verify` on the server")


class RowSource:
    """Verified stored values of rows: the hot path, kept in one place so it
    can be swapped for a faster one (pre-serialised responses, ...)."""

    def __init__(self, store: Store, cache: ByteLRU):
        self.store = store
        self.cache = cache

    def rows(self, meta: TableMeta, token_ids: list[int]) -> list[bytes]:
        """Stored values of token_ids (ascending, distinct), each checksum-verified."""
        tid = meta.table_id
        values = self.cache.get_many([(tid, t) for t in token_ids])
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            fetched = self.store.get_values(meta, [token_ids[i] for i in missing])
            verified = []
            for i, value in zip(missing, fetched):
                token = token_ids[i]
                if value is None:
                    raise CorruptRow(meta, token, "missing from the database")
                try:
                    codec.check(value)
                except codec.ChecksumError as e:
                    raise CorruptRow(meta, token, str(e)) from None
                values[i] = value
                verified.append(((tid, token), value))
            self.cache.put_many(verified)
        return values  # type: ignore[return-value]


class Catalog:
    """Table lookups with a refresh on a miss, so a just-ingested table or
    version is found without waiting for the periodic refresh."""

    def __init__(self, store: Store, cache: ByteLRU):
        self.store = store
        self.cache = cache
        self._lock = threading.Lock()
        self._refreshed_at = 0.0

    def refresh(self) -> None:
        with self._lock:
            before = {m.table_id for m in self.store.tables()}
            self.store.refresh()
            self._refreshed_at = time.monotonic()
            gone = before - {m.table_id for m in self.store.tables()}
        if gone:
            evicted = self.cache.evict_where(lambda key: key[0] in gone)
            log.info("tables %s dropped; evicted %d cached rows", sorted(gone), evicted)

    def resolve(self, name: str, version: int) -> TableMeta:
        asked_at = time.monotonic()
        try:
            return self.store.resolve(name, version)
        except (TableNotFound, VersionGone):
            if self._refreshed_at < asked_at:  # nobody refreshed since we asked: look again
                self.refresh()
            return self.store.resolve(name, version)


class LutStoreServicer(pb_grpc.LutStoreServicer):
    def __init__(self, catalog: Catalog, rows: RowSource, max_batch_rows: int, max_message_bytes: int,
                 prefetch_threads: int = PREFETCH_THREADS, max_sessions: int = 8):
        self.catalog = catalog
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
            return self.catalog.resolve(name, version)
        except TableNotFound as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except VersionGone as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
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
            max_batch_rows=self.max_batch_rows)

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
        """BatchGet's answer in whole stored rows, messages of a few MiB."""
        per_message = max(1, self.message_target // row_bound)
        groups = [ids[start : start + per_message] for start in range(0, len(ids), per_message)]
        pending: futures.Future[bytes] | None = None
        try:
            for k, group in enumerate(groups):
                message = pending.result() if pending is not None else self._message(meta, group)
                # Read and encode message k+1 while gRPC sends message k (the multi-get and the CRC
                # checks release the GIL): the cold path's reads no longer wait for the send.
                pending = self.prefetch.submit(self._message, meta, groups[k + 1]) if k + 1 < len(groups) else None
                yield message
        except CorruptRow as e:
            log.error("%s", e)
            context.abort(grpc.StatusCode.DATA_LOSS, str(e))

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
            try:
                values = self.rows.rows(meta, block)
            except CorruptRow as e:
                log.error("%s", e)
                context.abort(grpc.StatusCode.DATA_LOSS, str(e))
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
            for chunk in self.catalog.store.iter_artifact(meta, request.name):
                view = memoryview(chunk)
                for start in range(0, max(len(view), 1), piece):
                    data = view[start : start + piece]
                    yield pb.ArtifactChunk(offset=offset, data=bytes(data))
                    offset += len(data)
        except StoreError as e:
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
        "BatchGetShared": shm.method_handler(
            shm.SharedMemoryRows(servicer, getattr(servicer, "allow_shared_memory", False))),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class Refresher(threading.Thread):
    """Catches up with the primary every `interval` seconds."""

    def __init__(self, catalog: Catalog, interval: float):
        super().__init__(name="lutstore-refresh", daemon=True)
        self.catalog = catalog
        self.interval = interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.catalog.refresh()
            except Exception:  # keep serving what we have; the next round may succeed
                log.exception("refresh failed")


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


def main(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then stop gracefully and return 0."""
    _validate(args)
    logs.use_format(args.log_format)
    # Read credentials before opening anything, so a bad path is a one-line error.
    credentials = security.server_credentials(args.tls_cert, args.tls_key)
    token = security.read_token(args.auth_token, args.auth_token_file)
    store = Store.open(args.db, "secondary")
    try:
        return _serve(args, store, credentials, token)
    finally:
        store.close()


def _serve(args: argparse.Namespace, store: Store, credentials: grpc.ServerCredentials | None,
           token: str | None) -> int:
    max_message = int(args.max_message_mb * (1 << 20))
    cache = ByteLRU(int(args.cache_mb * (1 << 20)))
    catalog = Catalog(store, cache)
    max_sessions = args.max_sessions if getattr(args, "max_sessions", None) is not None else max(1, args.workers // 2)
    servicer = LutStoreServicer(catalog, RowSource(store, cache), args.max_batch_rows, max_message,
                                max_sessions=max_sessions)
    servicer.allow_shared_memory = getattr(args, "allow_shared_memory", False)
    metrics = Metrics()
    metrics.track_cache(cache.stats)
    # Interceptors cover every handler however it is registered; metrics is outermost so that
    # rejected calls are counted too.
    interceptors: list[grpc.ServerInterceptor] = [metrics.interceptor()]
    if token:
        interceptors.append(security.BearerTokenInterceptor(token))
    _warn_if_exposed(args, credentials is not None, token)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="lutstore-rpc"),
        interceptors=interceptors,
        maximum_concurrent_rpcs=args.max_concurrent_rpcs,  # beyond it: RESOURCE_EXHAUSTED, not an unbounded queue
        options=[
            ("grpc.max_send_message_length", max_message),
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_concurrent_streams", args.max_concurrent_streams),
            ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
        ],
    )
    add_servicer(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)

    address = f"{args.host}:{args.port}"
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
    log.info("stopped; cache %d hits, %d misses, %d entries, %d bytes", s.hits, s.misses, s.entries, s.bytes)
    return 0

