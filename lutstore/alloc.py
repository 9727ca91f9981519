"""Keep big row buffers' memory in the process instead of returning it to the kernel.

Every BatchGet message is a fresh multi-MiB bytes object (gRPC copies each
received message into one; the server joins rows into one). With glibc's
default, dynamic thresholds such blocks are mmap'd, or the heap top is trimmed
once a batch's messages are freed together, so the next batch faults every
4 KiB page in again and the kernel zeroes it: measured here, ~300k page faults
and ~0.8 s of system CPU per GB received, more than the data transfer itself.
Fixed, larger thresholds let the allocator reuse the same memory (a process
keeps up to TRIM_THRESHOLD of free heap instead of giving it back).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 32 << 20   # glibc's largest allowed value on 64-bit; serves messages up to 32 MiB from the heap
TRIM_THRESHOLD_BYTES = 256 << 20  # free heap kept for reuse before any is returned to the kernel

_lock = threading.Lock()
_done = False


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds once per process (True if they were set). A no-op elsewhere
    (other C libraries, other systems) or when MALLOC_* environment variables already choose."""
    global _done
    with _lock:
        if _done:
            return False
        _done = True
        if not sys.platform.startswith("linux"):
            return False
        import os

        if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
            return False  # the user tuned the allocator themselves
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return False  # not glibc (e.g. musl has no mallopt)
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        mallopt.restype = ctypes.c_int
        ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
        log.debug("malloc thresholds: mmap %d, trim %d bytes (%s)", MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES,
                  "set" if ok else "refused")
        return ok


def limit_arenas(arenas: int) -> bool:
    """At most `arenas` malloc arenas (glibc makes up to 8 per core, one per busy thread). Each arena
    keeps up to TRIM_THRESHOLD_BYTES of freed memory, so with a thread per RPC the daemon's memory
    grew with the number of threads, not with what it held (docs/operations.md: memory bound).
    The daemon calls this at start; True if set. A no-op off glibc or when MALLOC_ARENA_MAX chooses."""
    import os

    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_ARENA_MAX, arenas) == 1
