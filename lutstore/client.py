"""LutClient: the Python client of a lutstore daemon (or several replicas).

    client = LutClient("127.0.0.1:50051")          # or "h1:p,h2:p": round robin, dead replicas skipped
    rows = client.get_rows("mole-160m", [17, 4, 17])  # float32 [3, L, N, D], in the order asked

Rows arrive in their stored encoding and are decoded with numpy straight
from the received bytes. Calls have deadlines; UNAVAILABLE is retried with
backoff within a budget, then reported as LutError naming the address.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import grpc
import numpy as np

from lutstore import codec, security
from lutstore import alloc, shm_segment, wire
from lutstore.address import parse_addresses
from lutstore.errors import LutError
from lutstore.session import AnswerError, RowSession, RowsAnswer
from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
SERVICE_NAME = "lutstore.v1.LutStore"
BATCH_GET_METHOD = f"/{SERVICE_NAME}/BatchGet"
BATCH_GET_SHARED_METHOD = f"/{SERVICE_NAME}/BatchGetShared"
SHARED_CALL_BYTES = 64 << 20  # rows per BatchGetShared call: bounds the segment (max_batch_rows rows can be 1 GB)
LOOPBACK_HOSTS = ("localhost", "::1", "[::1]")
ENCODINGS = {
    pb.ENCODING_FP32: codec.Encoding.FP32,
    pb.ENCODING_FP16: codec.Encoding.FP16,
    pb.ENCODING_BF16: codec.Encoding.BF16,
    pb.ENCODING_INT8: codec.Encoding.INT8,
    pb.ENCODING_NF4: codec.Encoding.NF4,
}


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
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.retry_seconds = retry_seconds
        self.verify = verify
        target, replicated = channel_target(address)
        config: dict = {"loadBalancingConfig": [{"round_robin": {}}],
                        "healthCheckConfig": {"serviceName": SERVICE_NAME}} if replicated else {}
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
        # Make every call on self._calls (it adds the token); self._channel is only for close().
        self._calls: grpc.Channel = self._channel
        if auth_token:
            self._calls = grpc.intercept_channel(self._channel, security.TokenClientInterceptor(auth_token))
        self._stub = pb_grpc.LutStoreStub(self._calls)
        self._infos: dict[tuple[str, int], pb.TableInfo] = {}  # pinned versions are immutable
        self._prefetch_workers = prefetch_workers
        self._pool: futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        if shared_memory not in (True, False, "auto"):
            raise ValueError(f"shared_memory must be True, False or 'auto', got {shared_memory!r}")
        self._shared_memory: bool | str = shared_memory if shared_memory != "auto" or _is_loopback(address) else False
        self._segments: list[shm_segment.Segment] = []       # every segment this client created (unlinked at close)
        self._free_segments: list[shm_segment.Segment] = []  # one per concurrent call, reused

    # ---- plumbing ------------------------------------------------------

    def _with_retries(self, attempt: Callable[[], T]) -> T:
        """Run attempt(); retry on UNAVAILABLE with exponential backoff within the budget."""
        started = time.monotonic()
        delay = 0.05
        for tries in range(1, self.retries + 2):
            try:
                return attempt()
            except grpc.RpcError as e:
                code = e.code()
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise LutError(code, e.details() or code.name) from None
                elapsed = time.monotonic() - started
                if tries > self.retries or elapsed + delay > self.retry_seconds:
                    raise LutError(code, f"lutstore at {self.address} unavailable after {tries} attempts in "
                                         f"{elapsed:.1f}s (retry budget: {self.retries} retries, "
                                         f"{self.retry_seconds:g}s): {e.details()}") from None
                log.debug("lutstore at %s unavailable (%s); retry %d in %.2fs", self.address, e.details(), tries, delay)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")

    # ---- tables ----------------------------------------------------------

    def tables(self) -> list[pb.TableInfo]:
        """Every table with its latest version."""
        resp = self._with_retries(lambda: self._stub.ListTables(pb.ListTablesRequest(), timeout=self.timeout))
        return list(resp.tables)

    def info(self, name: str, version: int = 0) -> pb.TableInfo:
        """Shape, encoding and artifacts of one version (0: the latest, asked each time)."""
        cached = self._infos.get((name, version))
        if cached is not None:
            return cached
        req = pb.GetTableInfoRequest(table=name, version=version)
        info = self._with_retries(lambda: self._stub.GetTableInfo(req, timeout=self.timeout))
        self._infos[(name, info.version)] = info
        return info

    @staticmethod
    def row_format(info: pb.TableInfo) -> codec.RowFormat:
        return codec.RowFormat(info.num_layers, info.num_experts, info.hidden_size, ENCODINGS[info.encoding],
                               info.compression == pb.COMPRESSION_ZSTD, info.block_size)

    # ---- rows --------------------------------------------------------------

    def _batch_get(self) -> grpc.UnaryStreamMultiCallable:
        """BatchGet returning each response as the received bytes (parsed by lutstore.wire without
        copies) instead of a protobuf message (which would copy every row once more)."""
        call = self.__dict__.get("_raw_batch_get")
        if call is None:
            alloc.keep_freed_memory()  # else every received message faults its pages in afresh (see alloc.py)
            channel = getattr(self, "_calls", self._channel)  # the channel that adds credentials, if any
            call = channel.unary_stream(BATCH_GET_METHOD, request_serializer=pb.BatchGetRequest.SerializeToString,
                                        response_deserializer=None, _registered_method=True)
            self._raw_batch_get = call
        return call

    def _fetch(self, name: str, ids: list[int], version: int,
               on_row: Callable[[pb.TableInfo, int, memoryview], None], stable: bool = False,
               layer_ends: list[int] | None = None,
               on_slice: Callable[[int, int, int, memoryview], None] | None = None) -> pb.TableInfo:
        """BatchGet distinct ascending ids in batches of the server's max_batch_rows, calling
        on_row(info, id, data) once per id as messages arrive (our work on one message overlaps the
        transfer of the next); data is a memoryview into the received message. Version 0 is
        resolved first (one small call; pin a version to skip it), so every row comes from the one
        version `info` describes. A retried batch skips the rows already delivered. stable: data
        must stay valid after on_row returns (else it may be reused shared memory). With layer_ends
        the rows come layer-sliced (see the proto) and on_slice(begin, end, id, data) is called once
        per (layer group, id) instead of on_row."""
        if self._shared_memory and not layer_ends:
            info = self._fetch_shared(name, ids, version, on_row, stable)
            if info is not None:
                return info
        info = self.info(name, version)
        limit = max(1, info.max_batch_rows)
        batch_get = self._batch_get()
        delivered: set[tuple[int, int]] = set()   # (layer_begin, id): a retried batch skips what arrived
        groups = {begin for begin, _end in codec.check_layer_ends(self.row_format(info), layer_ends)} \
            if layer_ends else {0}

        def attempt(req: pb.BatchGetRequest) -> None:
            for message in batch_get(req, timeout=self.timeout):
                try:
                    got_version, begin, end, rows = wire.decode_sliced_response(message)
                except wire.WireError as e:
                    raise LutError(grpc.StatusCode.INTERNAL,
                                   f"malformed BatchGet response from {self.address}: {e}") from None
                if got_version != info.version:
                    raise LutError(grpc.StatusCode.INTERNAL,
                                   f"asked {name!r} v{info.version}, got rows of v{got_version}")
                if begin not in groups or (layer_ends and end <= begin):
                    raise LutError(grpc.StatusCode.INTERNAL, f"BatchGet from {self.address} answered layers "
                                                             f"[{begin}, {end}), not asked for")
                for token, data in rows:
                    if (begin, token) not in delivered:
                        delivered.add((begin, token))
                        if on_slice is None:
                            on_row(info, token, data)
                        else:
                            on_slice(begin, end, token, data)

        for start in range(0, len(ids), limit):
            req = pb.BatchGetRequest(table=name, version=info.version, token_ids=ids[start : start + limit],
                                     layer_ends=layer_ends or [])
            self._with_retries(lambda: attempt(req))
        return info

    def get_raw(self, name: str, ids: Iterable[int], version: int = 0) -> dict[int, memoryview]:
        """Distinct ids -> stored value (body || crc32) as the server sent it: a read-only bytes-like
        memoryview into the received message (no copy; it compares equal to the bytes; bytes(v) copies)."""
        out: dict[int, memoryview] = {}
        self._fetch(name, _distinct(ids), version, lambda _info, t, data: out.__setitem__(t, data), stable=True)
        return out

    def _fetch_shared(self, name: str, ids: list[int], version: int,
                      on_row: Callable[[pb.TableInfo, int, memoryview], None], stable: bool) -> pb.TableInfo | None:
        """_fetch over BatchGetShared: the server writes the rows into our memfd segment and we
        read them there. None (nothing delivered) when "auto" and the server refuses shared memory."""
        info = self.info(name, version)
        fmt = self.row_format(info)
        bound = fmt.stored_bytes or fmt.payload_bytes + fmt.payload_bytes // 128 + 1024  # zstd: a frame may grow
        per_call = max(1, min(info.max_batch_rows or 1, SHARED_CALL_BYTES // bound))
        call = self.__dict__.get("_batch_get_shared")
        if call is None:
            call = self._batch_get_shared = self._calls.unary_unary(
                BATCH_GET_SHARED_METHOD, request_serializer=pb.BatchGetSharedRequest.SerializeToString,
                response_deserializer=pb.BatchGetSharedResponse.FromString, _registered_method=True)
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
                    resp = self._with_retries(lambda: call(req, timeout=self.timeout))
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
                    on_row(info, token, bytes(data) if stable else data)
        finally:
            with self._pool_lock:
                self._free_segments.append(segment)
        return info

    def _take_segment(self, size: int, socket_path: str) -> shm_segment.Segment:
        """A segment no other call is using (one per concurrent call), at least size bytes."""
        with self._pool_lock:
            if self._free_segments:
                segment = self._free_segments.pop()
                segment.reserve(size)
                return segment
        segment = shm_segment.Segment(size, socket_path)
        with self._pool_lock:
            self._segments.append(segment)
        return segment

    def get_payloads(self, name: str, ids: Iterable[int], version: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(distinct ascending ids, int64 [n]; their payloads, uint8 [n, row_bytes]): rows in their
        stored encoding, checked (when verify) and decompressed, copied once from the received bytes.
        For a model that decodes on its own device: an fp16/bf16 payload is the row tensor's bytes."""
        ids = _distinct(ids)
        info = self.info(name, version)
        fmt = self.row_format(info)
        index = {t: i for i, t in enumerate(ids)}
        out = np.empty((len(ids), fmt.payload_bytes), dtype=np.uint8)
        received = 0

        def on_row(_info: pb.TableInfo, token: int, data: memoryview) -> None:
            nonlocal received
            received += 1
            out[index[token]] = np.frombuffer(self._payload(fmt, name, token, data), dtype=np.uint8)

        if ids:
            self._fetch(name, ids, info.version, on_row)
        if received != len(ids):
            raise LutError(grpc.StatusCode.INTERNAL, f"asked {name!r} for {len(ids)} rows, got {received}")
        return np.array(ids, dtype=np.int64), out

    def get_slices(self, name: str, ids: Iterable[int], version: int, layer_ends: list[int],
                   on_slices: Callable[[int, int, np.ndarray, np.ndarray], None]) -> None:
        """Rows layer-sliced (BatchGetRequest.layer_ends), for a model that runs its first layers
        while later ones are on the wire: on_slices(begin, end, ids, payloads) is called with every
        distinct id's slice of layers [begin, end) (ids int64 [n], ascending; payloads uint8
        [n, slice bytes]: the table's payload encoding restricted to those layers, see the proto),
        group by group in layer order, as soon as the group has arrived whole; each slice is
        CRC-checked when verify. Uses the gRPC stream (never shared memory); for many small
        batches, a RowSession (session()) saves a call's setup per batch."""
        ids = _distinct(ids)
        if not ids:
            return
        info = self.info(name, version)
        try:
            answer = RowsAnswer(self.row_format(info), ids, list(layer_ends), on_slices, self.verify)
        except ValueError as e:
            raise LutError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        try:
            self._fetch(name, ids, info.version, on_row=lambda *_: None, layer_ends=list(layer_ends), on_slice=answer.add)
        except AnswerError as e:
            raise LutError(e.code, f"{e} (from {self.address})") from None
        if not answer.complete:
            raise LutError(grpc.StatusCode.INTERNAL, f"asked {name!r} for {len(ids)} rows layer-sliced, "
                                                     f"{answer.slices_received} slices arrived")

    def session(self, name: str, version: int = 0, layer_ends: list[int] | None = None) -> RowSession:
        """A RowSession: many BatchGets of one table version on one open stream (BatchGetStream),
        answers handed over layer group by layer group on a reader thread (lutstore.session)."""
        return RowSession(self, name, version, layer_ends)

    def _payload(self, fmt: codec.RowFormat, name: str, token: int, data: memoryview) -> memoryview:
        """The row's payload (a view when uncompressed), its CRC checked when self.verify."""
        try:
            return codec.payload_of(fmt, data, verify=self.verify)
        except codec.ChecksumError as e:
            raise LutError(grpc.StatusCode.DATA_LOSS, f"row {token} of {name!r} arrived corrupt: {e}") from None

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

        def on_row(_info: pb.TableInfo, token: int, data: memoryview) -> None:
            nonlocal received
            received += 1
            first, *rest = positions[token]
            # np.frombuffer on the received message: the decode is the only pass over the row
            codec.decode_payload(fmt, self._payload(fmt, name, token, data), out=out[first])
            for j in rest:
                out[j] = out[first]

        if ids:
            self._fetch(name, sorted(positions), info.version, on_row)
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
            self._with_retries(lambda: self._download(req, art, target))
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
    host = address.strip().rpartition(":")[0]
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def _as_ids(ids: Iterable[int]) -> Iterable[int]:
    arr = np.asarray(ids if not hasattr(ids, "tolist") else ids.tolist())
    if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= 2**32):
        raise LutError(grpc.StatusCode.INVALID_ARGUMENT, "token ids must be integers in 0..2^32-1")
    return arr.reshape(-1).tolist()


def _distinct(ids: Iterable[int]) -> list[int]:
    return sorted(set(_as_ids(ids)))
