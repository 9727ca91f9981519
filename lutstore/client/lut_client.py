"""LutClient: the Python client of a lutstore daemon (or several replicas).

    client = LutClient("127.0.0.1:50051")          # or "h1:p,h2:p": round robin, dead replicas skipped
    rows = client.get_rows("mole-160m", [17, 4, 17])  # float32 [3, L, N, D], in the order asked

Rows arrive in their stored encoding and are decoded with numpy straight
from the received bytes. Calls have deadlines; UNAVAILABLE is retried with
backoff within a budget, then reported as LutError naming the address
(lutstore.client.retry.RetryPolicy, shared with sessions and shared memory).

A decoding model fetches through client.fetcher(...) (lutstore.client.fetch): one way
to fetch rows, behind which a session, a call or shared memory is picked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import socket
import tempfile
import threading
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterable

import grpc
import numpy as np

from lutstore.formats import codec, protocol

from lutstore import security

from lutstore.client.shm_segment import Segment
from lutstore.client.address import parse_addresses
from lutstore.client.answer import AnswerError, OnGroup, RowsAnswer, read_message, row_payload
from lutstore.client.retry import RetryPolicy
from lutstore.errors import LutError
from lutstore.client.fetch import RowFetcher
from lutstore.client.session import RowSession
from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SHARED_CALL_BYTES = 64 << 20  # rows per BatchGetShared call: bounds the segment (max_batch_rows rows can be 1 GB)
# on_row(layer_begin, layer_end, token, data): one row (or layer slice) as received; (0, 0) for whole rows
OnRow = Callable[[int, int, int, memoryview], None]


def channel_target(address: str) -> tuple[str, bool]:
    """gRPC target for "host:port" or "h1:p1,h2:p2"; True when it is a replica list."""
    parts = [a.strip() for a in address.split(",") if a.strip()]
    if not parts:
        raise ValueError("empty lutstore address")
    if len(parts) == 1:
        return parts[0], False
    resolved = []
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"bad replica address {part!r}: expected host:port")
        resolved.append(f"{socket.gethostbyname(host)}:{port}")  # ipv4: targets need literal addresses
    return "ipv4:" + ",".join(resolved), True


class LutClient:
    def __init__(self, address: str, timeout: float = 30.0, retries: int = 5, retry_seconds: float = 10.0,
                 verify: bool = True, prefetch_workers: int = 2, tls_ca: str | Path | None = None,
                 auth_token: str | None = None, shared_memory: bool | str = False):
        """timeout: deadline of each call (s); retries / retry_seconds: how many times and for how long an
        UNAVAILABLE call is retried; verify: check each row's CRC-32 on arrival; tls_ca: PEM file of the CA
        that signed the server's certificate (TLS; None: plaintext); auth_token: sent as
        `authorization: Bearer <token>` with every call. shared_memory: fetch rows through the same-host
        BatchGetShared RPC (a memfd segment handed to the server, no socket carries rows; the server needs
        --allow-shared-memory): True always (errors are raised), "auto" only for a loopback address and
        silently back to BatchGet when the server refuses, False never."""
        parse_addresses(address)  # a malformed address is one clear AddressError now, not 10 s of retries
        if shared_memory not in (True, False, "auto"):
            raise ValueError(f"shared_memory must be True, False or 'auto', got {shared_memory!r}")
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.retry_seconds = retry_seconds
        self.retry = RetryPolicy(address, retries, retry_seconds)   # the one retry policy of every transport
        self.verify = verify
        target, replicated = channel_target(address)
        config: dict = {"loadBalancingConfig": [{"round_robin": {}}],
                        "healthCheckConfig": {"serviceName": protocol.SERVICE_NAME}} if replicated else {}
        options = [
            ("grpc.max_receive_message_length", 1 << 30),
            ("grpc.max_send_message_length", 64 << 20),
            # Reconnect soon after a replica comes back, well within the retry budget.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            # Drive streaming calls in the calling thread: no helper thread per BatchGet (halves a one-row
            # call's client CPU, ~0.5 -> ~0.25 ms; see benchmarks/PERFORMANCE.md).
            ("SingleThreadedUnaryStream", 1),  # grpc.experimental.ChannelOptions.SingleThreadedUnaryStream
        ]
        if config:
            options.append(("grpc.service_config", json.dumps(config)))
        credentials = security.channel_credentials(Path(tls_ca) if tls_ca else None)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            if replicated:  # an ipv4: list has no host name to check the certificate against: use the first one's
                options.append(("grpc.ssl_target_name_override", address.split(",")[0].strip().rpartition(":")[0]))
            self._channel = grpc.secure_channel(target, credentials, options=options)
        # Every call goes through `calls` (it adds the token); self._channel is only for close().
        calls: grpc.Channel = self._channel
        if auth_token:
            calls = grpc.intercept_channel(self._channel, security.TokenClientInterceptor(auth_token))
        self._stub = pb_grpc.LutStoreStub(calls)
        # The row RPCs hand back each response as the received bytes (parsed by lutstore.formats.wire without
        # copies) instead of a protobuf message (which would copy every row once more).
        self._batch_get = calls.unary_stream(
            protocol.BATCH_GET, request_serializer=pb.BatchGetRequest.SerializeToString,
            response_deserializer=None, _registered_method=True)
        self._batch_get_stream = calls.stream_stream(
            protocol.BATCH_GET_STREAM, request_serializer=pb.BatchGetRequest.SerializeToString,
            response_deserializer=None, _registered_method=True)
        self._batch_get_shared = calls.unary_unary(
            protocol.BATCH_GET_SHARED, request_serializer=pb.BatchGetSharedRequest.SerializeToString,
            response_deserializer=pb.BatchGetSharedResponse.FromString, _registered_method=True)
        self._infos: dict[tuple[str, int], pb.TableInfo] = {}  # pinned versions are immutable
        self._prefetch_workers = prefetch_workers
        self._pool: futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        auto_ok = shared_memory != "auto" or _is_loopback(address)
        self._shared_memory: bool | str = shared_memory if auto_ok else False
        self._segments: list[Segment] = []       # every segment this client created (unlinked at close)
        self._free_segments: list[Segment] = []  # one per concurrent call, reused

    @property
    def shared_memory(self) -> bool:
        """True while rows come through BatchGetShared (False from the moment an "auto" client was refused)."""
        return bool(self._shared_memory)

    # ---- tables ----------------------------------------------------------

    def tables(self) -> list[pb.TableInfo]:
        """Every table with its latest version."""
        resp = self.retry.run(lambda: self._stub.ListTables(pb.ListTablesRequest(), timeout=self.timeout))
        return list(resp.tables)

    def info(self, name: str, version: int = 0) -> pb.TableInfo:
        """Shape, encoding and artifacts of one version (0: the latest, asked each time)."""
        cached = self._infos.get((name, version))
        if cached is not None:
            return cached
        _check_version(version)
        req = pb.GetTableInfoRequest(table=name, version=version)
        info = self.retry.run(lambda: self._stub.GetTableInfo(req, timeout=self.timeout))
        self._infos[(name, info.version)] = info
        return info

    @staticmethod
    def row_format(info: pb.TableInfo) -> codec.RowFormat:
        return protocol.row_format(info)

    # ---- rows: the one way for a decoding model ---------------------------------

    def fetcher(self, name: str, version: int = 0, layer_ends: list[int] | None = None,
                session: bool = True, threads: int = 2) -> RowFetcher:
        """A RowFetcher of one table version: fetch(ids, on_group, on_error, on_done) returns at once
        and hands the rows over layer group by layer group, over a session, a call or shared memory
        (it picks, and falls back; see lutstore.client.fetch)."""
        info = self.info(name, version)
        return RowFetcher(self, info, layer_ends or [], session, threads)

    def session(self, name: str, version: int = 0, layer_ends: list[int] | None = None) -> RowSession:
        """A RowSession: many BatchGets of one table version on one open stream (BatchGetStream),
        answers handed over layer group by layer group on a reader thread (lutstore.client.session)."""
        info = self.info(name, version)
        return RowSession(self._batch_get_stream, info, self.row_format(info), layer_ends, self.retry, self.verify)

    # ---- rows: one call --------------------------------------------------------

    def call_rows(self, name: str, ids: list[int], version: int, on_row: OnRow, stable: bool = False,
                  layer_ends: list[int] | None = None) -> pb.TableInfo:
        """Distinct ascending ids in calls of at most the server's max_batch_rows, on_row(begin, end,
        id, data) once per row (layer slice) as messages arrive (our work on one message overlaps the
        transfer of the next); data is the stored value (or slice) as received: a memoryview into the
        received message, or into shared memory. Version 0 is resolved first (one small call; pin a
        version to skip it), so every row comes from the one version `info` describes. A retried call
        skips the rows already delivered. stable: data must stay valid after on_row returns (shared
        memory is reused, so its rows are then copied). With layer_ends the rows come layer-sliced
        (see the proto), else whole (begin, end = 0, 0); whole rows go through shared memory when the
        client uses it."""
        if self._shared_memory and not layer_ends:
            info = self._call_shared(name, ids, version, on_row, stable)
            if info is not None:
                return info
        info = self.info(name, version)
        limit = max(1, info.max_batch_rows)
        delivered: set[tuple[int, int]] = set()   # (layer_begin, id): a retried call skips what arrived
        groups = codec.check_layer_ends(self.row_format(info), layer_ends) if layer_ends else None

        def attempt(req: pb.BatchGetRequest) -> None:
            for message in self._batch_get(req, timeout=self.timeout):
                try:
                    begin, end, rows = read_message(message, name, info.version, groups)
                except AnswerError as e:
                    raise e.named(self.address) from None
                for token, data in rows:
                    if (begin, token) not in delivered:
                        delivered.add((begin, token))
                        on_row(begin, end, token, data)

        for start in range(0, len(ids), limit):
            req = pb.BatchGetRequest(table=name, version=info.version, token_ids=ids[start : start + limit],
                                     layer_ends=layer_ends or [])
            self.retry.run(lambda: attempt(req))
        return info

    def _call_shared(self, name: str, ids: list[int], version: int, on_row: OnRow,
                     stable: bool) -> pb.TableInfo | None:
        """call_rows over BatchGetShared: the server writes the rows into our memfd segment and we
        read them there. None (nothing delivered) when "auto" and the server refuses shared memory."""
        info = self.info(name, version)
        fmt = self.row_format(info)
        bound = fmt.stored_bytes or fmt.payload_bytes + fmt.payload_bytes // 128 + 1024  # zstd: a frame may grow
        per_call = max(1, min(info.max_batch_rows or 1, SHARED_CALL_BYTES // bound))
        try:
            if not info.shared_memory_socket:
                raise LutError(grpc.StatusCode.FAILED_PRECONDITION, f"shared memory: disabled on the server at "
                               f"{self.address} (start it with --allow-shared-memory); use BatchGet")
            segment = self._take_segment(min(len(ids), per_call) * bound, info.shared_memory_socket)
        except (LutError, OSError) as e:
            if self._shared_memory == "auto":
                log.info("lutstore at %s refused shared memory (%s); using BatchGet", self.address, e)
                self._shared_memory = False
                return None
            if isinstance(e, OSError):
                raise LutError(grpc.StatusCode.FAILED_PRECONDITION, f"shared memory: {e}") from None
            raise
        try:
            for start in range(0, len(ids), per_call):
                batch = ids[start : start + per_call]
                segment.reserve(len(batch) * bound)
                req = pb.BatchGetSharedRequest(table=name, version=info.version, token_ids=batch,
                                               segment_handle=segment.handle, segment_bytes=segment.size)
                try:
                    resp = self.retry.run(lambda: self._batch_get_shared(req, timeout=self.timeout))
                except LutError as e:
                    refused = e.code == grpc.StatusCode.UNIMPLEMENTED or (
                        e.code == grpc.StatusCode.FAILED_PRECONDITION and e.message.startswith("shared memory:"))
                    if self._shared_memory == "auto" and refused and start == 0:
                        log.info("lutstore at %s refused shared memory (%s); using BatchGet", self.address, e.message)
                        self._shared_memory = False
                        return None
                    raise
                if resp.version != info.version or list(resp.token_ids) != batch \
                        or not len(resp.offsets) == len(resp.lengths) == len(batch):
                    raise LutError(grpc.StatusCode.INTERNAL, f"malformed BatchGetShared response from {self.address}")
                view = segment.view
                for token, offset, length in zip(batch, resp.offsets, resp.lengths):
                    if offset + length > segment.size:
                        raise LutError(grpc.StatusCode.INTERNAL, f"BatchGetShared row {token} lies outside the segment")
                    data = view[offset : offset + length]
                    on_row(0, 0, token, memoryview(bytes(data)) if stable else data)
        finally:
            with self._pool_lock:
                self._free_segments.append(segment)
        return info

    def _take_segment(self, size: int, socket_path: str) -> Segment:
        """A segment no other call is using (one per concurrent call), at least size bytes."""
        with self._pool_lock:
            if self._free_segments:
                segment = self._free_segments.pop()
                segment.reserve(size)
                return segment
        segment = Segment(size, socket_path)
        with self._pool_lock:
            self._segments.append(segment)
        return segment

    def call_groups(self, info: pb.TableInfo, ids: list[int], layer_ends: list[int], on_group: OnGroup,
                    views: bool = False) -> None:
        """One request's rows (distinct, ascending) by call_rows, assembled and checked by a RowsAnswer:
        on_group(begin, end, ids, payloads) per layer group in layer order, payloads as a session
        hands them over (uint8 [n, bytes], or with views a list of memoryviews)."""
        try:
            answer = RowsAnswer(self.row_format(info), ids, list(layer_ends), on_group, self.verify, views)
        except ValueError as e:
            raise LutError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        try:
            self.call_rows(info.name, ids, info.version, answer.add, stable=views, layer_ends=list(layer_ends))
        except AnswerError as e:
            raise e.named(self.address) from None
        if not answer.complete:
            raise LutError(grpc.StatusCode.INTERNAL, f"asked {info.name!r} for {len(ids)} rows"
                                                     f"{' layer-sliced' if layer_ends else ''}, "
                                                     f"{answer.slices_received} {'slices' if layer_ends else 'rows'} arrived")

    # ---- rows: convenience --------------------------------------------------------

    def get_raw(self, name: str, ids: Iterable[int], version: int = 0) -> dict[int, memoryview]:
        """Distinct ids -> stored value (body || crc32) as the server sent it: a read-only bytes-like
        memoryview into the received message (no copy; it compares equal to the bytes; bytes(v) copies)."""
        out: dict[int, memoryview] = {}
        self.call_rows(name, _distinct(ids), version, lambda _b, _e, t, data: out.__setitem__(t, data), stable=True)
        return out

    def get_payloads(self, name: str, ids: Iterable[int], version: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(distinct ascending ids, int64 [n]; their payloads, uint8 [n, row_bytes]): rows in their
        stored encoding, checked (when verify) and decompressed, copied once from the received bytes.
        For a model that decodes on its own device: an fp16/bf16 payload is the row tensor's bytes."""
        ids = _distinct(ids)
        info = self.info(name, version)
        got: list[np.ndarray] = [np.empty((0, self.row_format(info).payload_bytes), dtype=np.uint8)]
        if ids:   # the answer's buffer is the result: each row copied once, into it
            self.call_groups(info, ids, [], lambda _b, _e, _ids, payloads: got.__setitem__(0, payloads))
        return np.array(ids, dtype=np.int64), got[0]

    def get_slices(self, name: str, ids: Iterable[int], version: int, layer_ends: list[int],
                   on_slices: OnGroup) -> None:
        """Rows layer-sliced (BatchGetRequest.layer_ends), for a model that runs its first layers
        while later ones are on the wire: on_slices(begin, end, ids, payloads) is called with every
        distinct id's slice of layers [begin, end) (ids int64 [n], ascending; payloads uint8
        [n, slice bytes]: the table's payload encoding restricted to those layers, see the proto),
        group by group in layer order, as soon as the group has arrived whole; each slice is
        CRC-checked when verify. Uses the gRPC stream (never shared memory); for many small
        batches, a RowSession (session()) saves a call's setup per batch."""
        ids = _distinct(ids)
        if ids:
            self.call_groups(self.info(name, version), ids, list(layer_ends), on_slices)

    def get_rows(self, name: str, ids: Iterable[int], version: int = 0) -> np.ndarray:
        """float32 [len(ids), L, N, D], row i for ids[i] (duplicates allowed)."""
        ids = list(_as_ids(ids))
        positions: dict[int, list[int]] = {}
        for i, t in enumerate(ids):
            positions.setdefault(t, []).append(i)
        info = self.info(name, version)  # version 0: ask once, then pin, so format and rows agree
        fmt = self.row_format(info)
        out = np.empty((len(ids), *fmt.shape), dtype=np.float32)
        received = 0

        def on_row(_b: int, _e: int, token: int, data: memoryview) -> None:
            nonlocal received
            first, *rest = positions[token]
            try:
                payload = row_payload(fmt, token, data, self.verify)
            except AnswerError as e:
                raise e.named(self.address) from None
            received += 1
            # np.frombuffer on the received message: the decode is the only pass over the row
            codec.decode_payload(fmt, payload, out=out[first])
            for j in rest:
                out[j] = out[first]

        if ids:
            self.call_rows(name, sorted(positions), info.version, on_row)
        if received != len(positions):
            raise LutError(grpc.StatusCode.INTERNAL, f"asked {name!r} for {len(positions)} rows, got {received}")
        return out

    def prefetch(self, name: str, ids: Iterable[int], version: int = 0) -> futures.Future:
        """get_rows in the background; returns a Future of the array."""
        ids = list(_as_ids(ids))
        with self._pool_lock:
            if self._pool is None:
                self._pool = futures.ThreadPoolExecutor(self._prefetch_workers, thread_name_prefix="lutclient-prefetch")
        return self._pool.submit(self.get_rows, name, ids, version)

    # ---- artifacts -------------------------------------------------------

    def fetch_artifacts(self, name: str, dest_dir: str | Path, version: int = 0) -> Path:
        """Download every artifact of a table version into dest_dir, each checked
        against its sha256 and written atomically (temp file + rename)."""
        info = self.info(name, version)
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for art in info.artifacts:
            target = (dest / art.name).resolve()
            if dest.resolve() not in target.parents:
                raise LutError(grpc.StatusCode.INVALID_ARGUMENT, f"artifact name {art.name!r} escapes {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            req = pb.GetArtifactRequest(table=name, version=info.version, name=art.name)
            self.retry.run(lambda: self._download(req, art, target))
        return dest

    def _download(self, req: pb.GetArtifactRequest, art: pb.ArtifactInfo, target: Path) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as f:
                for chunk in self._stub.GetArtifact(req, timeout=max(self.timeout, 600.0)):
                    if chunk.offset != size:
                        raise LutError(grpc.StatusCode.DATA_LOSS, f"artifact {art.name!r}: chunk at {chunk.offset}, expected {size}")
                    f.write(chunk.data)
                    digest.update(chunk.data)
                    size += len(chunk.data)
            if size != art.size or digest.hexdigest() != art.sha256:
                raise LutError(grpc.StatusCode.DATA_LOSS,
                               f"artifact {art.name!r}: got {size} bytes with sha256 {digest.hexdigest()}, "
                               f"expected {art.size} bytes with sha256 {art.sha256}")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ---- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._pool_lock:
            for segment in self._segments:
                segment.close()
            self._segments, self._free_segments = [], []
        self._channel.close()

    def __enter__(self) -> LutClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_loopback(address: str) -> bool:
    """True for one "host:port" whose host is a loopback address (shared memory "auto")."""
    if "," in address:
        return False
    return protocol.is_loopback_host(address.strip().rpartition(":")[0])


def _check_version(version: int) -> None:
    """protobuf would raise a bare ValueError ("Value out of range") from the request's constructor."""
    try:
        ok = not isinstance(version, bool) and 0 <= operator.index(version) < 2**32
    except TypeError:
        ok = False
    if not ok:
        raise LutError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"table version must be an integer in 0..2^32-1 (0: the latest), got {version!r}")


def _as_ids(ids: Iterable[int]) -> Iterable[int]:
    arr = np.asarray(ids if not hasattr(ids, "tolist") else ids.tolist())
    if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= 2**32):
        raise LutError(grpc.StatusCode.INVALID_ARGUMENT, "token ids must be integers in 0..2^32-1")
    return arr.reshape(-1).tolist()


def _distinct(ids: Iterable[int]) -> list[int]:
    return sorted(set(_as_ids(ids)))
