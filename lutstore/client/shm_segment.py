"""A client's shared-memory segment for BatchGetShared (the server's side is lutstore/daemon/shm_server.py).

The segment is a memfd: it has no name anyone could open, and nothing is left
in /dev/shm if the client dies. Its descriptor is handed to the server over
the server's Unix socket (TableInfo.shared_memory_socket); the server answers
a handle that BatchGetShared requests name, and keeps the descriptor until
that socket closes (close(), or the client's exit).
"""

from __future__ import annotations

import mmap
import os
import socket
import weakref

from lutstore.formats.protocol import SEGMENT_HELLO

HANDSHAKE_SECONDS = 10.0


class SegmentRefused(OSError):
    """The server's socket refused the segment (its reason is the message)."""


class Segment:
    """A memfd of at least `size` bytes, handed to the server at socket_path; reused across calls,
    grown when a call needs more; close() (or garbage collection / exit) releases it."""

    def __init__(self, size: int, socket_path: str):
        fd = os.memfd_create("lutstore-segment", os.MFD_CLOEXEC)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._finalizer = weakref.finalize(self, _release, fd, conn)
        self._fd = fd
        self.size = 0
        self.view: memoryview | None = None
        self.reserve(size)
        conn.settimeout(HANDSHAKE_SECONDS)
        conn.connect(socket_path)
        socket.send_fds(conn, [SEGMENT_HELLO], [fd])
        reply = b""
        while not reply.endswith(b"\n"):
            got = conn.recv(256)
            if not got:
                break
            reply += got
        status, _, rest = reply.decode(errors="replace").strip().partition(" ")
        if status != "OK" or not rest:
            self.close()
            raise SegmentRefused(f"the server's shared-memory socket {socket_path} refused the segment: "
                                 f"{rest or 'no answer'}")
        self.handle = rest

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

    @property
    def released(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        self.view = None
        self._finalizer()


def _release(fd: int, conn: socket.socket) -> None:
    try:
        conn.close()   # the server drops its descriptor and the handle
    finally:
        os.close(fd)
