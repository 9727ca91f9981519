"""RowFetcher: the one way a decoding model gets rows from a daemon.

    fetcher = client.fetcher("mole-160m", version=3, layer_ends=[1, 2, 4, 8, 12])
    job = fetcher.fetch(ids, on_group, on_error, on_done)   # returns at once
    fetcher.help(job)                                       # optional: run it here if no thread has

on_group(begin, end, ids, payloads) is called once per layer group, in layer
order (one group [0, L) for whole rows): ids int64 [n] ascending, payloads a
list of n read-only memoryviews, each row's payload (or slice) checked and
valid for as long as it is referenced (RowsAnswer with views=True). Then
on_done(); or on_error(e) instead if the fetch fails. The callbacks run on a
session's reader thread, a fetch thread, or the thread that called help().

Behind it the fetcher picks the transport, and falls back:
  - a RowSession (one open BatchGetStream: no call setup and no thread hop per
    fetch), the default;
  - one call per fetch on `threads` fetch threads (BatchGet; BatchGetShared when
    the client uses shared memory): with session=False, for fetches of at least
    SHARED_MEMORY_MIN_BYTES of whole rows when the client uses shared memory,
    and for good once the daemon refuses sessions (UNIMPLEMENTED: an older
    daemon; RESOURCE_EXHAUSTED: its --max-sessions are taken), the fetches the
    session still held included.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Protocol

import grpc

from lutstore.formats import codec
from lutstore.client.answer import OnGroup, check_request_ids
from lutstore.client.session import RowSession
from lutstore.errors import LutError
from lutstore.v1 import lutstore_pb2 as pb

log = logging.getLogger(__name__)

MiB = 1 << 20
# Fetches of at least this many bytes (a prefill chunk) go through shared memory when the client
# uses it: 3.5-4x the session's GB/s; smaller ones (decode steps) stay on the session, whose
# round trip is shorter (benchmarks/PERFORMANCE_DECODE.md).
SHARED_MEMORY_MIN_BYTES = 4 * MiB
# The daemon cannot give this table a session: one call per fetch from then on.
NO_SESSION_CODES = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED)


class RowCalls(Protocol):
    """What a fetcher needs of its client (LutClient, which builds fetchers, is one)."""

    address: str
    shared_memory: bool

    def row_format(self, info: pb.TableInfo) -> codec.RowFormat: ...
    def session(self, name: str, version: int = 0, layer_ends: list[int] | None = None) -> RowSession: ...
    def call_groups(self, info: pb.TableInfo, ids: list[int], layer_ends: list[int], on_group: OnGroup,
                    views: bool = False) -> None: ...


class FetchJob:
    """One fetch: its ids (distinct, ascending) and where its rows go."""

    def __init__(self, ids: list[int], on_group: OnGroup, on_error: Callable[[BaseException], None],
                 on_done: Callable[[], None] | None) -> None:
        self.ids, self.on_group, self.on_error, self.on_done = ids, on_group, on_error, on_done
        self._claimed = False
        self._claim_lock = threading.Lock()

    def claim(self) -> bool:
        """True for the one caller that runs this fetch (a fetch thread, the session, or help())."""
        with self._claim_lock:
            claimed, self._claimed = self._claimed, True
        return not claimed


class RowFetcher:
    """Fetches of one table version (see the module docstring). Not for use after close()."""

    def __init__(self, client: RowCalls, info: pb.TableInfo, layer_ends: list[int], session: bool = True,
                 threads: int = 2) -> None:
        self.client, self.info = client, info
        self.name, self.version = info.name, int(info.version)
        self.fmt: codec.RowFormat = client.row_format(info)
        self.layer_ends = list(layer_ends)
        self.groups = codec.check_layer_ends(self.fmt, self.layer_ends) if self.layer_ends \
            else [(0, self.fmt.num_layers)]
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lut-fetch")
        self._session = client.session(self.name, self.version, self.layer_ends) if session else None

    @property
    def transport(self) -> str:
        """"session" while fetches go on the row session, else "calls"."""
        return "calls" if self._session is None else "session"

    def fetch(self, ids: list[int], on_group: OnGroup, on_error: Callable[[BaseException], None],
              on_done: Callable[[], None] | None = None) -> FetchJob:
        """Start fetching ids (distinct, ascending, at most the table's max_batch_rows); returns at once.
        No ids, or a repeated id: ValueError here, on every transport."""
        check_request_ids(ids)
        job = FetchJob(ids, on_group, on_error, on_done)
        bulk = self.client.shared_memory and not self.layer_ends \
            and len(ids) * self.fmt.payload_bytes >= SHARED_MEMORY_MIN_BYTES
        session = self._session
        if session is not None and not bulk:
            job.claim()
            try:
                session.submit(ids, on_group=on_group, on_error=lambda error: self._session_failed(job, error),
                               on_done=on_done, views=True)
            except LutError:   # closed meanwhile by the switch to calls (_session_failed)
                self._pool.submit(self._call, job)
        else:
            self._pool.submit(self.help, job)
        return job

    def help(self, job: FetchJob) -> None:
        """Run the fetch in this thread unless it is already under way (a caller about to wait for
        its rows saves the hop to a fetch thread)."""
        if job.claim():
            self._call(job)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _call(self, job: FetchJob) -> None:
        """One call (BatchGet, or BatchGetShared), rows checked and handed over as the session does."""
        try:
            self.client.call_groups(self.info, job.ids, self.layer_ends, job.on_group, views=True)
            if job.on_done is not None:
                job.on_done()
        except BaseException as e:  # handed to the consumer (as a session does), which raises it in its own thread
            job.on_error(e)

    def _session_failed(self, job: FetchJob, error: BaseException) -> None:
        """Session reader thread: a fetch failed. If the daemon cannot give us a session: one call per
        fetch from now on, this one and every one the session still held included."""
        switched = self._session is None    # only ever reset here: the session was switched off before
        if switched or getattr(error, "code", None) in NO_SESSION_CODES:   # error: any exception
            if not switched:
                log.info("no row session from %s (%s): one BatchGet per fetch instead", self.client.address, error)
                session, self._session = self._session, None
                threading.Thread(target=session.close, name="lut-session-close", daemon=True).start()
            self._pool.submit(self._call, job)
        else:
            job.on_error(error)
