"""The LutStore gRPC servicer: each RPC checks its request and delegates.

Tables are looked up by the catalog (RequestChecks.table: a miss refreshes the store first),
row bytes are read by the RowReader (hot-row LRU in front of the store, checksums checked once
per row, the response budget, the read-ahead), BatchGetShared by the shared-memory side
(shm_server). Rows travel in their stored encoding; the client decodes. `lutstore serve`'s
wiring (the server, its limits, health, metrics, shutdown) is lutstore.daemon.run.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Iterator

import grpc

from lutstore.daemon.read_status import abort_on_read_errors
from lutstore.daemon.requests import RequestChecks
from lutstore.daemon.row_reader import RowReader, row_bound
from lutstore.daemon.shm_server import SharedMemoryRows
from lutstore.formats import codec
from lutstore.formats.protocol import ENCODING_TO_PB, SERVICE_NAME
from lutstore.storage.model import StoreError, TableMeta, is_utf8
from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class LutStoreServicer(pb_grpc.LutStoreServicer):
    def __init__(self, checks: RequestChecks, reader: RowReader, shared_memory: SharedMemoryRows,
                 max_message_bytes: int, max_sessions: int = 8):
        self.checks, self.reader, self.shared_memory = checks, reader, shared_memory
        self.max_message_bytes, self.max_sessions = max_message_bytes, max_sessions
        self._open_sessions = 0
        self._sessions_lock = threading.Lock()
        self._idle_sessions: set[grpc.ServicerContext] = set()   # open, waiting for their next request
        self._stopping = False

    # ---- RPCs ------------------------------------------------------------

    def ListTables(self, request: pb.ListTablesRequest, context: grpc.ServicerContext) -> pb.ListTablesResponse:
        latest: dict[str, TableMeta] = {}
        for meta in self.checks.catalog.store.tables():  # sorted by (name, version): the last one wins
            latest[meta.name] = meta
        # A name stored before names were checked may not be valid UTF-8 (a lone surrogate): no gRPC
        # string can carry it, and one such table made every ListTables fail. Leave it out, say why.
        for name in [n for n in latest if not is_utf8(n)]:
            log.warning("table %r is left out of ListTables: its name is not valid UTF-8; `lutstore drop` it "
                        "(or re-ingest under a new --name)", name)
            del latest[name]
        return pb.ListTablesResponse(tables=[self.table_info(m) for m in latest.values()])

    def GetTableInfo(self, request: pb.GetTableInfoRequest, context: grpc.ServicerContext) -> pb.TableInfo:
        return self.table_info(self.checks.table(request.table, request.version, context))

    def BatchGet(self, request: pb.BatchGetRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Yields serialised BatchGetResponse messages (see add_servicer: no protobuf objects for rows)."""
        started = time.perf_counter()
        meta = self.checks.table(request.table, request.version, context)
        ids = self.checks.ids(request.token_ids, meta, context)
        if row_bound(meta) + 1024 > self.max_message_bytes:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"one row of {meta.name!r} ({row_bound(meta)} bytes) does not fit this server's "
                          f"--max-message-mb ({self.max_message_bytes} bytes)")
        if request.layer_ends:
            messages = self.reader.layer_slices(meta, ids, self._layer_groups(meta, request.layer_ends, context), context)
        else:
            messages = self.reader.whole_rows(meta, ids, context)
        with abort_on_read_errors(context):   # a damaged row: DATA_LOSS; a node down: UNAVAILABLE
            yield from messages
        log.debug("BatchGet %s v%d: %d ids (%d distinct)%s in %.2f ms", meta.name, meta.version, len(request.token_ids),
                  len(ids), f" layer_ends {list(request.layer_ends)}" if request.layer_ends else "",
                  1000 * (time.perf_counter() - started))

    def BatchGetStream(self, requests: Iterator[pb.BatchGetRequest], context: grpc.ServicerContext) -> Iterator[bytes]:
        """BatchGet for each request of the session, in order (serialised messages, as BatchGet's).
        Once the daemon is stopping, the session ends after its current answer."""
        with self._session(context):
            for request in requests:
                if not self._busy(context, True):
                    return   # the client sends what is unanswered again, on a new stream (another replica)
                yield from self.BatchGet(request, context)
                if not self._busy(context, False):
                    return

    def end_idle_sessions(self) -> int:
        """Stopping: end every session now waiting for a request (an idle stream is no work in flight:
        the drain must not wait for it), and each busy one after its current answer. How many ended now."""
        with self._sessions_lock:
            self._stopping = True
            idle, self._idle_sessions = self._idle_sessions, set()
        for context in idle:
            context.cancel()   # wakes its thread, which waits in the request iterator
        return len(idle)

    def BatchGetShared(self, request: pb.BatchGetSharedRequest,
                       context: grpc.ServicerContext) -> pb.BatchGetSharedResponse:
        return self.shared_memory.BatchGetShared(request, context)

    def GetArtifact(self, request: pb.GetArtifactRequest, context: grpc.ServicerContext) -> Iterator[pb.ArtifactChunk]:
        meta = self.checks.table(request.table, request.version, context)
        try:
            meta.artifact(request.name)
        except KeyError:
            names = ", ".join(a.name for a in meta.artifacts) or "none"
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"table {meta.name!r} v{meta.version} has no artifact {request.name!r} (artifacts: {names})")
        try:
            with abort_on_read_errors(context):   # a cluster node down: UNAVAILABLE
                yield from self._artifact_chunks(meta, request.name, context)
        except StoreError as e:   # a damaged or missing chunk
            context.abort(grpc.StatusCode.DATA_LOSS, str(e))

    # ---- helpers -------------------------------------------------------

    def table_info(self, meta: TableMeta) -> pb.TableInfo:
        fmt = meta.row_format()
        live = [m.version for m in self.checks.catalog.store.tables() if m.name == meta.name]
        socket = self.shared_memory.registry.path if self.shared_memory.registry else ""
        return pb.TableInfo(
            name=meta.name, version=meta.version, vocab_size=meta.vocab_size,
            num_layers=meta.num_layers, num_experts=meta.num_experts, hidden_size=meta.hidden_size,
            encoding=ENCODING_TO_PB[fmt.encoding],
            compression=pb.COMPRESSION_ZSTD if meta.zstd else pb.COMPRESSION_NONE,
            fingerprint=meta.fingerprint,
            artifacts=[pb.ArtifactInfo(name=a.name, size=a.size, sha256=a.sha256) for a in meta.artifacts],
            row_bytes=fmt.payload_bytes, stored_bytes=meta.stored_bytes, live_versions=live,
            created_unix_ms=meta.created_unix_ms, source_form=meta.source_form,
            max_batch_rows=self.checks.max_batch_rows, block_size=fmt.block_size,
            shared_memory_socket=str(socket))

    @staticmethod
    def _layer_groups(meta: TableMeta, layer_ends, context: grpc.ServicerContext) -> list[tuple[int, int]]:
        fmt = meta.row_format()
        try:
            return codec.check_layer_ends(fmt, list(layer_ends))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{e} (table {meta.name!r} has {fmt.num_layers} layers)")
            raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _session(self, context: grpc.ServicerContext) -> Iterator[None]:
        """An open session holds a server thread, so at most max_sessions are open at once: one more
        is refused at once (RESOURCE_EXHAUSTED) rather than starving every other RPC."""
        with self._sessions_lock:
            full = self._open_sessions >= self.max_sessions
            if not full:
                self._open_sessions += 1
        if full:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"all {self.max_sessions} BatchGetStream sessions are in use (--max-sessions); use BatchGet")
        try:
            with self._sessions_lock:
                self._idle_sessions.add(context)
            yield
        finally:
            with self._sessions_lock:
                self._idle_sessions.discard(context)
                self._open_sessions -= 1

    def _busy(self, context: grpc.ServicerContext, busy: bool) -> bool:
        """Mark a session busy (answering) or idle (waiting for a request); False once stopping."""
        with self._sessions_lock:
            if self._stopping:
                return False
            if busy:
                self._idle_sessions.discard(context)
            else:
                self._idle_sessions.add(context)
        return True

    def _artifact_chunks(self, meta: TableMeta, name: str, context: grpc.ServicerContext) -> Iterator[pb.ArtifactChunk]:
        """The artifact in messages of a few MiB, each holding its bytes three times (the chunk, the
        message, gRPC's copy) of the response budget until sent."""
        piece = self.reader.message_target
        offset = 0
        for chunk in self.checks.catalog.store.iter_artifact(meta, name):
            view = memoryview(chunk)
            for start in range(0, max(len(view), 1), piece):
                data = view[start : start + piece]
                held = self.reader.take(3 * len(data), context)
                try:
                    yield pb.ArtifactChunk(offset=offset, data=bytes(data))
                finally:
                    self.reader.budget.give(held)
                offset += len(data)


# BatchGet and BatchGetStream answer bytes they serialised themselves (lutstore.formats.wire): one
# copy of the rows instead of protobuf's three; measured server CPU 0.97 -> 0.58 s/GB and client
# 1.72 -> 0.95 s/GB (benchmarks/PERFORMANCE.md, "Pre-serialised responses"). The wire bytes are the
# same, so generated stubs in any language parse them as BatchGetResponse.
PRESERIALISED = ("BatchGet", "BatchGetStream")


class _Handlers:
    """Stands in for a grpc.Server to keep the handlers the generated registration makes."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers.update(handlers)


def add_servicer(servicer: LutStoreServicer, server: grpc.Server) -> None:
    """Register the service through the generated add_LutStoreServicer_to_server (every method of the
    .proto), the methods in PRESERIALISED without a response serializer."""
    made = _Handlers()
    pb_grpc.add_LutStoreServicer_to_server(servicer, made)
    handlers = made.handlers
    for name in PRESERIALISED:
        h = handlers[name]
        make = grpc.unary_stream_rpc_method_handler if h.unary_stream else grpc.stream_stream_rpc_method_handler
        handlers[name] = make(h.unary_stream or h.stream_stream, request_deserializer=h.request_deserializer,
                              response_serializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
