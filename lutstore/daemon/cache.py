"""A byte-budgeted, thread-safe LRU of hot rows.

The server keeps verified stored values keyed by (table_id, token_id), so a
hot row (token frequencies are Zipf-like) is neither read from RocksDB nor
checksummed again. Table ids are never reused (see store.py), so an entry
can never go stale; dropped tables' rows simply age out or are evicted.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    budget_bytes: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ByteLRU:
    """Least-recently-used map of bytes values whose total size stays within
    budget_bytes (a value larger than the whole budget is never kept)."""

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self._misses += 1
                return None
            self._items.move_to_end(key)
            self._hits += 1
            return value

    def get_many(self, keys: Iterable[Hashable]) -> list[bytes | None]:
        """get() of each key under one lock acquisition."""
        out: list[bytes | None] = []
        with self._lock:
            for key in keys:
                value = self._items.get(key)
                if value is None:
                    self._misses += 1
                else:
                    self._items.move_to_end(key)
                    self._hits += 1
                out.append(value)
        return out

    def put(self, key: Hashable, value: bytes) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: Iterable[tuple[Hashable, bytes]]) -> None:
        with self._lock:
            for key, value in items:
                size = len(value)
                if size > self.budget_bytes:
                    continue
                old = self._items.pop(key, None)
                if old is not None:
                    self._bytes -= len(old)
                self._items[key] = value
                self._bytes += size
            while self._bytes > self.budget_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)
                self._evictions += 1

    def evict_where(self, predicate: Callable[[Hashable], bool]) -> int:
        """Remove every entry whose key matches (e.g. a dropped table's rows)."""
        with self._lock:
            doomed = [k for k in self._items if predicate(k)]
            for k in doomed:
                self._bytes -= len(self._items.pop(k))
            return len(doomed)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, len(self._items), self._bytes,
                              self.budget_bytes)

    def __len__(self) -> int:
        return len(self._items)
