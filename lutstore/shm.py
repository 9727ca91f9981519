"""BatchGetShared: the same-host fast path of BatchGet (see lutstore.proto).

A client on the server's host creates a POSIX shared-memory segment
(/dev/shm/NAME, owned by its uid, which must be the server's) and names it;
the server writes the stored values of the requested rows into it back to
back and answers with offsets. No socket carries the rows and gRPC copies
nothing: one kernel copy here (pwritev), one on the client. Off unless `lutstore serve
--allow-shared-memory` (a same-host, same-uid client could read the rows over
BatchGet anyway; the flag keeps the default surface minimal).

Safety: the name must be a plain file name under /dev/shm (no separators, no
symlink followed), the file a regular file owned by our uid, segment_bytes
within its size; every row's bytes are checked to fit in segment_bytes before
anything is written, so nothing is written outside [0, segment_bytes).
Rows come from the servicer's RowSource, so the hot-row LRU and the checksum
checks stay in one place.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import stat
import weakref
from pathlib import Path

import grpc

from lutstore.v1 import lutstore_pb2 as pb

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
ROWS_PER_READ_BYTES = 4 << 20  # rows read from the RowSource at a time: bounds the memory a big call holds
MAX_NAME_CHARS = 255
IOV_BATCH = 512  # buffers per pwritev call (the kernel's IOV_MAX is 1024)


class SharedMemoryRows:
    """The BatchGetShared handler; validates like BatchGet and delegates row reads to servicer.rows."""

    def __init__(self, servicer, enabled: bool, shm_dir: Path = SHM_DIR):
        self.servicer = servicer  # server.LutStoreServicer: _resolve, rows, max_batch_rows, _row_bound
        self.enabled = enabled
        self.shm_dir = shm_dir

    def BatchGetShared(self, request: pb.BatchGetSharedRequest,
                       context: grpc.ServicerContext) -> pb.BatchGetSharedResponse:
        if not self.enabled:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "shared memory: disabled on this server (start it with --allow-shared-memory); "
                          "use BatchGet")
        from lutstore.server import CorruptRow  # server imports this module

        svc = self.servicer
        meta = svc._resolve(request.table, request.version, context)
        ids = self.servicer.checked_ids(request.token_ids, meta, context)
        fd = self._open_segment(request.segment_name, request.segment_bytes, context)
        try:
            return self._write_rows(meta, ids, fd, request.segment_bytes, context, CorruptRow)
        finally:
            os.close(fd)

    # ---- validation -------------------------------------------------------

    def _open_segment(self, name: str, size: int, context: grpc.ServicerContext) -> int:
        """An O_RDWR descriptor of /dev/shm/name after checking name, owner, type and size."""
        if not name or "/" in name or "\\" in name or "\0" in name or name in (".", "..") \
                or len(name) > MAX_NAME_CHARS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"shared memory: segment_name {name[:64]!r} is not a plain file name under {self.shm_dir} "
                          f"(no path separators, not '.' or '..', at most {MAX_NAME_CHARS} characters)")
        if size == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "shared memory: segment_bytes is 0")
        path = self.shm_dir / name
        try:
            # O_NOFOLLOW: a symlink planted under /dev/shm must not redirect our writes.
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"shared memory: cannot open segment {str(path)!r}: {e.strerror} (the server must run "
                          f"on this host, as the same user; else use BatchGet)")
        try:
            st = os.fstat(fd)
            problem = None
            if not stat.S_ISREG(st.st_mode):
                problem = "not a regular file"
            elif st.st_uid != os.geteuid():
                problem = f"owned by uid {st.st_uid}, not by the server's uid {os.geteuid()}"
            if problem:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"shared memory: segment {str(path)!r} is {problem}; use BatchGet")
            if size > st.st_size:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"shared memory: segment_bytes {size} exceeds the size of segment {str(path)!r} "
                              f"({st.st_size} bytes)")
        except BaseException:
            os.close(fd)
            raise
        return fd

    # ---- the copy -----------------------------------------------------------

    def _write_rows(self, meta, ids: list[int], fd: int, size: int, context: grpc.ServicerContext,
                    corrupt: type[Exception]) -> pb.BatchGetSharedResponse:
        svc = self.servicer
        fixed = meta.row_format().stored_bytes  # 0 for zstd: lengths vary
        if fixed and len(ids) * fixed > size:
            self._too_small(meta, len(ids), len(ids) * fixed, size, context)
        offsets: list[int] = []
        lengths: list[int] = []
        per_read = max(1, ROWS_PER_READ_BYTES // svc._row_bound(meta))
        position = 0
        starts = range(0, len(ids), per_read)
        pending = None
        try:
            for k, start in enumerate(starts):
                group = ids[start : start + per_read]
                values = pending.result() if pending is not None else svc.rows.rows(meta, group)
                # Read the next group while this one is written (multi-get, CRC and pwritev release
                # the GIL), as BatchGet reads message k+1 while gRPC sends message k.
                nxt = start + per_read
                pending = svc.prefetch.submit(svc.rows.rows, meta, ids[nxt : nxt + per_read]) \
                    if k + 1 < len(starts) else None
                group_bytes = sum(len(v) for v in values)
                if position + group_bytes > size:  # zstd rows only: count what the whole batch needs, then refuse
                    need = position + group_bytes + sum(len(v) for s in range(start + per_read, len(ids), per_read)
                                                        for v in svc.rows.rows(meta, ids[s : s + per_read]))
                    self._too_small(meta, len(ids), need, size, context)
                for value in values:
                    offsets.append(position)
                    lengths.append(len(value))
                    position += len(value)
                _pwrite_all(fd, values, offsets[start])
        except corrupt as e:
            log.error("%s", e)
            context.abort(grpc.StatusCode.DATA_LOSS, str(e))
        except OSError as e:  # /dev/shm full, ...
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"shared memory: cannot write the segment: {e.strerror}; use BatchGet")
        return pb.BatchGetSharedResponse(version=meta.version, token_ids=ids, offsets=offsets, lengths=lengths,
                                         bytes_written=position)

    @staticmethod
    def _too_small(meta, n: int, need: int, size: int, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"shared memory: segment_bytes {size} is too small: the {n} distinct rows of {meta.name!r} "
                      f"v{meta.version} need {need} bytes")


def _pwrite_all(fd: int, values: list[bytes], offset: int) -> None:
    """Write values back to back at offset. pwritev, not a memory map: if the client shrinks the
    file meanwhile, a write extends it again (within the bounds checked above) where a mapped
    store would kill the server with SIGBUS; one kernel copy per byte, GIL released."""
    for start in range(0, len(values), IOV_BATCH):
        pending = [memoryview(v) for v in values[start : start + IOV_BATCH]]
        while pending:
            written = os.pwritev(fd, pending, offset)
            if written == 0:
                raise OSError(0, "the segment accepted no bytes")
            offset += written
            while pending and written >= len(pending[0]):  # drop what a short write finished
                written -= len(pending[0])
                pending.pop(0)
            if pending and written:
                pending[0] = pending[0][written:]


def method_handler(rows: SharedMemoryRows) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        rows.BatchGetShared, request_deserializer=pb.BatchGetSharedRequest.FromString,
        response_serializer=pb.BatchGetSharedResponse.SerializeToString)


# ---- the client's side ------------------------------------------------------------------------

class Segment:
    """A client's POSIX shared-memory segment: /dev/shm/lutstore-<pid>-<random>, mode 0600,
    reused across calls, grown when a call needs more, unlinked by close() (or at garbage
    collection / exit if close is never called)."""

    def __init__(self, size: int, shm_dir: Path = SHM_DIR):
        self.name = f"lutstore-{os.getpid()}-{secrets.token_hex(8)}"
        self.path = shm_dir / self.name
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._fd = fd
        self._finalizer = weakref.finalize(self, _unlink, self.path, fd)
        self.size = 0
        self.view: memoryview | None = None
        self.reserve(size)

    def reserve(self, size: int) -> None:
        """Make the segment at least size bytes (doubling, in whole pages); the old view stays
        valid for whoever holds it, a new one is mapped."""
        if size <= self.size:
            return
        size = max(size, 2 * self.size)
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        os.ftruncate(self._fd, size)
        # A fresh mapping; the old one is unmapped once nothing refers to it.
        self.view = memoryview(mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE))
        self.size = size

    def close(self) -> None:
        self.view = None
        self._finalizer()


def _unlink(path: Path, fd: int) -> None:
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)
