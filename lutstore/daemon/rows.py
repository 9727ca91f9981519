"""The daemon's row source and table catalog: what `lutstore serve` reads, kept apart from the
gRPC servicer so the hot path can be read (and swapped) on its own.

`RowSource` hands out checksum-verified stored values (hot-row LRU in front of RocksDB
multi-gets); a row that fails its CRC, is missing, or sits in a block RocksDB cannot read is
`CorruptRow`, which names the table, version and exactly the damaged token ids, never a file
(the RocksDB detail goes to the log). `Catalog` resolves table names with a refresh on a miss;
`Refresher` catches up with the writer in the background.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from lutstore.storage.model import StoreUnavailable
from lutstore.formats import codec
from lutstore.daemon.cache import ByteLRU
from lutstore.storage.api import TableStore
from lutstore.storage.model import RowsUnreadable, TableMeta, TableNotFound, VersionGone

log = logging.getLogger(__name__)


def _ids(token_ids: list[int], most: int = 16) -> str:
    shown = ", ".join(map(str, token_ids[:most]))
    return shown + (f" and {len(token_ids) - most} more" if len(token_ids) > most else "")


class CorruptRow(Exception):
    """Rows that cannot be served as stored: `token_ids` (ascending), `token_id` the first. The
    message names the table, version and ids and is meant for clients (no paths)."""

    def __init__(self, meta: TableMeta, token_ids: int | list[int], reason: str):
        self.token_ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        self.token_id = self.token_ids[0]
        self.table = meta.name
        self.version = meta.version
        rows = f"row {self.token_id}" if len(self.token_ids) == 1 else f"rows {_ids(self.token_ids)}"
        super().__init__(f"{rows} of table {meta.name!r} v{meta.version} is corrupt ({reason}); "
                         f"run `lutstore verify` on the server")


class RowSource:
    """Verified stored values of rows: the hot path, kept in one place so it
    can be swapped for a faster one (pre-serialised responses, ...).

    `on_corrupt(meta, token_ids)` is called for every damaged row met (metrics)."""

    def __init__(self, store: TableStore, cache: ByteLRU,
                 on_corrupt: Callable[[TableMeta, list[int]], None] | None = None):
        self.store = store
        self.cache = cache
        self.on_corrupt = on_corrupt

    def _corrupt(self, meta: TableMeta, token_ids: list[int], reason: str) -> CorruptRow:
        if self.on_corrupt is not None:
            self.on_corrupt(meta, token_ids)
        return CorruptRow(meta, token_ids, reason)

    def rows(self, meta: TableMeta, token_ids: list[int]) -> list[bytes]:
        """Stored values of token_ids (ascending, distinct), each checksum-verified."""
        tid = meta.table_id
        values = self.cache.get_many([(tid, t) for t in token_ids])
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            try:
                fetched = self.store.get_values(meta, [token_ids[i] for i in missing])
            except RowsUnreadable as e:
                # File and offset to the log only; the client learns which rows and why.
                log.error("table %r v%d rows %s unreadable: %s", meta.name, meta.version, _ids(e.token_ids), e.detail)
                raise self._corrupt(meta, e.token_ids, e.reason) from None
            fixed = meta.row_format().stored_bytes   # None for zstd rows (their length varies)
            verified = []
            bad: dict[int, str] = {}
            for i, value in zip(missing, fetched):
                token = token_ids[i]
                if value is None:
                    bad[token] = "missing from the database"
                    continue
                try:
                    codec.check(value)
                    if fixed is not None and len(value) != fixed:   # a row with a valid CRC but cut or padded
                        raise codec.ChecksumError(f"stored row is {len(value)} bytes, expected {fixed}")
                except codec.ChecksumError as e:
                    bad[token] = str(e)
                    continue
                values[i] = value
                verified.append(((tid, token), value))
            self.cache.put_many(verified)
            if bad:
                raise self._corrupt(meta, sorted(bad), bad[min(bad)])
        return values  # type: ignore[return-value]


class Catalog:
    """Table lookups with a refresh on a miss, so a just-ingested table or
    version is found without waiting for the periodic refresh."""

    def __init__(self, store: TableStore, cache: ByteLRU):
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
            except StoreUnavailable as e:   # a cluster node down: one line, no traceback every round
                log.warning("refresh failed: %s", e)
            except Exception:  # keep serving what we have; the next round may succeed
                log.exception("refresh failed")
