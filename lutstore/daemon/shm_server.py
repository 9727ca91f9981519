"""BatchGetShared, the same-host fast path of BatchGet (see lutstore.proto): the server's side.

A client creates a shared-memory segment (a memfd) and hands its file
descriptor to the server over a Unix-domain socket (SCM_RIGHTS); the server
keeps the descriptor while that socket stays open and answers an unguessable
handle. BatchGetShared names the handle; the server writes the stored values
of the requested rows into the segment back to back and answers with
offsets. No socket carries the rows and gRPC copies nothing: one kernel copy
here (pwritev), one on the client. Off unless `lutstore serve
--allow-shared-memory` (loopback hosts only).

Who may have the server write: only a caller who holds a writable descriptor
of the segment, that is, who could write it itself. The server never opens a
path by name (it did, /dev/shm/NAME, and checked only the file's owner: any
local user could have a root daemon write into a root-only file). A handed
descriptor must be open for writing (F_GETFL) and a memfd or tmpfs file (F_GET_SEALS answers
only for those): a file on another file system, FUSE above all, could make the server's writes
block for as long as its owner likes, holding a worker each time;
segment_bytes must lie within its size at the time of the call, and every
row's bytes are checked to fit in segment_bytes before anything is written.
Rows come from the daemon's RowReader, so the hot-row LRU, the checksum
checks and the response budget stay in one place.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import os
import secrets
import selectors
import shutil
import socket
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from lutstore.daemon.read_status import abort_on_read_errors
from lutstore.daemon.requests import RequestChecks
from lutstore.daemon.row_reader import RowReader, row_bound
from lutstore.formats.protocol import SEGMENT_HELLO
from lutstore.v1 import lutstore_pb2 as pb

log = logging.getLogger(__name__)

SOCKET_NAME = "segments.sock"
DIR_PREFIX = "lutstore-shm-"
ROWS_PER_READ_BYTES = 4 << 20  # rows read from the RowSource at a time: bounds the memory a big call holds
IOV_BATCH = 512  # buffers per pwritev call (the kernel's IOV_MAX is 1024)
MAX_SEGMENTS = 1024            # descriptors held at once, all clients together
MAX_SEGMENTS_PER_UID = 64      # ... and per peer uid (SO_PEERCRED), so one user cannot take them all
MAX_FDS_PER_MESSAGE = 4        # more in one message are closed unread


@dataclass
class _Held:
    fd: int
    uid: int
    pid: int
    handle: str = ""


class SegmentRegistry:
    """The segments clients handed over on the Unix socket: handle -> descriptor, for as long as
    the client's connection stays open. One thread multiplexes every connection (selectors), so
    handing segments over takes no gRPC worker."""

    def __init__(self, parent: Path | None = None):
        remove_stale_dirs(Path(parent or tempfile.gettempdir()))
        # A directory only we can write (0755): nobody can plant a socket of their own in our place.
        self.dir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=parent))
        os.chmod(self.dir, 0o755)
        self.path = self.dir / SOCKET_NAME
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        os.chmod(self.path, 0o666)  # any local user may hand over a segment they can write
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._lock = threading.Lock()
        self._by_handle: dict[str, _Held] = {}
        self._conns: dict[socket.socket, _Held] = {}
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="lutstore-shm", daemon=True)
        self._thread.start()

    # ---- for BatchGetShared -------------------------------------------------------------------

    def open(self, handle: str) -> int | None:
        """A duplicate of the handle's descriptor (the caller closes it; the client may hang up
        meanwhile), or None for an unknown handle."""
        with self._lock:
            held = self._by_handle.get(handle)
            return os.dup(held.fd) if held is not None else None

    def count(self) -> int:
        with self._lock:
            return len(self._conns)

    def close(self) -> None:
        self._stopped = True
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        for conn in list(self._conns):
            self._drop(conn)
        self._selector.close()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- the socket -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped:
            for key, _ in self._selector.select():
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj == self._wake_r:
                    continue
                else:
                    try:
                        self._readable(key.fileobj)
                    except Exception:  # one client's trouble must not stop the others
                        log.exception("shared memory: handling a client connection failed")
                        self._drop(key.fileobj)

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
        with self._lock:
            total = len(self._conns)
            mine = sum(1 for h in self._conns.values() if h.uid == uid)
        if total >= MAX_SEGMENTS or mine >= MAX_SEGMENTS_PER_UID:
            limit = "MAX_SEGMENTS" if total >= MAX_SEGMENTS else "MAX_SEGMENTS_PER_UID"
            log.warning("shared memory: refused a segment from pid %d uid %d (%s reached)", pid, uid, limit)
            _reply(conn, f"ERR too many segments held ({limit}); close some or use BatchGet")
            conn.close()
            return
        conn.setblocking(False)
        with self._lock:
            self._conns[conn] = _Held(fd=-1, uid=uid, pid=pid)
        self._selector.register(conn, selectors.EVENT_READ)

    def _readable(self, conn: socket.socket) -> None:
        held = self._conns[conn]
        if held.handle:  # anything after the hand-over (EOF included) ends it
            self._drop(conn)
            return
        try:
            data, fds = _recv_fds(conn)
        except (BlockingIOError, InterruptedError):
            return
        if not data and not fds:
            self._drop(conn)
            return
        problem = _check(data, fds)
        if problem:
            for fd in fds:
                os.close(fd)
            log.warning("shared memory: refused a segment from pid %d uid %d: %s", held.pid, held.uid, problem)
            _reply(conn, f"ERR {problem}")
            self._drop(conn)
            return
        handle = secrets.token_hex(16)
        with self._lock:
            held.fd, held.handle = fds[0], handle
            self._by_handle[handle] = held
        log.info("shared memory: segment of %d bytes from pid %d uid %d", os.fstat(held.fd).st_size, held.pid, held.uid)
        _reply(conn, f"OK {handle}")

    def _drop(self, conn) -> None:
        with self._lock:
            held = self._conns.pop(conn, None)
            if held is not None and held.handle:
                self._by_handle.pop(held.handle, None)
        try:
            self._selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()
        if held is not None and held.fd >= 0:
            os.close(held.fd)


def remove_stale_dirs(parent: Path) -> list[Path]:
    """Remove the socket directories of daemons that died without cleaning up (SIGKILL): ours (same
    uid) whose socket nobody listens on any more. The removed ones."""
    removed = []
    for folder in parent.glob(DIR_PREFIX + "*"):
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.geteuid():
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                probe.connect(str(folder / SOCKET_NAME))
        except (ConnectionRefusedError, FileNotFoundError):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        except OSError:
            continue   # alive, or not ours to judge
    if removed:
        log.info("removed %d stale shared-memory socket directories: %s", len(removed), removed)
    return removed


def _recv_fds(conn: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    data, ancdata, _flags, _addr = conn.recvmsg(len(SEGMENT_HELLO) + 16, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * fds.itemsize),
                                                socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def _check(data: bytes, fds: list[int]) -> str | None:
    """Why a hand-over is refused, or None."""
    if data != SEGMENT_HELLO:
        return f"expected {SEGMENT_HELLO!r} with the descriptor"
    if len(fds) != 1:
        return f"expected one file descriptor, got {len(fds)}"
    mode = fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_ACCMODE
    if mode not in (os.O_RDWR, os.O_WRONLY):
        return "the descriptor is not open for writing"
    if not stat.S_ISREG(os.fstat(fds[0]).st_mode):
        return "the descriptor is not a regular file or memfd"
    try:
        fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
    except OSError:
        return "the descriptor is not a memfd or a tmpfs file (shared memory only)"
    return None


def _reply(conn: socket.socket, line: str) -> None:
    try:
        conn.setblocking(True)
        conn.settimeout(1.0)
        conn.sendall(line.encode() + b"\n")
        conn.setblocking(False)
    except OSError:
        pass


class SharedMemoryRows:
    """The BatchGetShared handler: checks the request as BatchGet does and reads the rows through the
    same RowReader (response budget, read-ahead); the segments come from the registry."""

    def __init__(self, registry: SegmentRegistry | None, checks: RequestChecks, reader: RowReader):
        self.registry = registry   # None: --allow-shared-memory not given
        self.checks = checks
        self.reader = reader

    def BatchGetShared(self, request: pb.BatchGetSharedRequest,
                       context: grpc.ServicerContext) -> pb.BatchGetSharedResponse:
        if self.registry is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "shared memory: disabled on this server (start it with --allow-shared-memory); "
                          "use BatchGet")
        if request.segment_name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "shared memory: segment_name is no longer accepted (the server opens no file by name); "
                          "hand the segment's descriptor to TableInfo.shared_memory_socket and send segment_handle")
        meta = self.checks.table(request.table, request.version, context)
        ids = self.checks.ids(request.token_ids, meta, context)
        if request.segment_bytes == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "shared memory: segment_bytes is 0")
        fd = self.registry.open(request.segment_handle) if request.segment_handle else None
        if fd is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "shared memory: no segment with this segment_handle (its socket closed, or it never "
                          "existed); hand the segment over again or use BatchGet")
        try:
            size = os.fstat(fd).st_size
            if request.segment_bytes > size:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"shared memory: segment_bytes {request.segment_bytes} exceeds the segment's size "
                              f"({size} bytes)")
            return self._write_rows(meta, ids, fd, request.segment_bytes, context)
        finally:
            os.close(fd)

    # ---- the copy -----------------------------------------------------------

    def _write_rows(self, meta, ids: list[int], fd: int, size: int,
                    context: grpc.ServicerContext) -> pb.BatchGetSharedResponse:
        fixed = meta.row_format().stored_bytes  # 0 for zstd: lengths vary
        if fixed and len(ids) * fixed > size:
            self._too_small(meta, len(ids), len(ids) * fixed, size, context)
        offsets: list[int] = []
        lengths: list[int] = []
        bound = row_bound(meta)
        per_read = max(1, ROWS_PER_READ_BYTES // bound)
        position = 0
        starts = range(0, len(ids), per_read)
        rows = self.reader.rows.rows
        # The next group is read while this one is written (multi-get, CRC and pwritev release the GIL).
        groups = self.reader.in_parts(meta, [ids[start : start + per_read] for start in starts],
                                      lambda group: len(group) * bound, rows, context)
        try:
            # a damaged row: DATA_LOSS; a node down: UNAVAILABLE; the budget given back however it ends
            with contextlib.closing(groups), abort_on_read_errors(context):
                for start, values in zip(starts, groups):
                    group_bytes = sum(len(v) for v in values)
                    if position + group_bytes > size:  # zstd rows only: count what the whole batch needs, then refuse
                        need = position + group_bytes + sum(len(v) for s in range(start + per_read, len(ids), per_read)
                                                            for v in rows(meta, ids[s : s + per_read]))
                        self._too_small(meta, len(ids), need, size, context)
                    for value in values:
                        offsets.append(position)
                        lengths.append(len(value))
                        position += len(value)
                    _pwrite_all(fd, values, offsets[start])
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
