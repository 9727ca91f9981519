"""Where a MoLE model's LUT rows come from, behind one small interface.

    source.request(ids)   announce token ids the moment they are known; returns at once
    source.rows(idx)      rows for idx [B, T]: a Tensor [B, T, L, N, D] or a LayerRows
                          whose .layer(l) blocks only when layer l runs
    source.stats()        hits, misses, bytes fetched, cache bytes

Two sources:
  - InProcessTable: the whole table as one tensor on the device (or in RAM).
    No fetch at all: the ceiling a remote table is measured against.
  - RemoteTable: rows from a `lutstore serve` daemon through LutClient.
    Requests are de-duplicated and run on a background thread, so the fetch
    of a sampled token's row overlaps the start of the next forward pass;
    decoded rows live in a byte-budgeted LRU slab on the device, keyed by
    token id (token frequencies are Zipf-like, so hot rows stay).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from lutstore.codec import Encoding, RowFormat, decode_payload, payload_of

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass
class LutStats:
    hits: int = 0            # rows a forward pass needed that were already on the device when requested
    misses: int = 0          # rows fetched from the daemon (each distinct id of a pass counts once)
    bytes_fetched: int = 0   # stored row bytes received (payload + checksum)
    cache_bytes: int = 0     # device bytes held by the row cache now
    cache_budget: int = 0

    @property
    def hit_rate(self) -> float:
        looked_up = self.hits + self.misses
        return self.hits / looked_up if looked_up else 0.0


def _as_id_list(ids: Tensor | np.ndarray | Iterable[int]) -> list[int]:
    if isinstance(ids, Tensor):
        ids = ids.detach().cpu().numpy()
    return np.unique(np.asarray(ids, dtype=np.int64).ravel()).tolist()


class LutSource:
    """The interface the generator and evaluator use."""

    num_layers: int
    num_experts: int
    hidden_size: int
    vocab_size: int

    def request(self, ids: Tensor | np.ndarray | Iterable[int]) -> None:
        """Start getting these ids' rows (no-op where rows are always at hand)."""

    def rows(self, idx: Tensor):  # -> Tensor | LayerRows
        raise NotImplementedError

    def stats(self) -> LutStats:
        return LutStats()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcessTable(LutSource):
    """The whole table [V, L, N, D] as one tensor; rows are one gather."""

    def __init__(self, table: Tensor, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> None:
        if table.ndim != 4:
            raise ValueError(f"table must be [V, L, N, D], got shape {tuple(table.shape)}")
        self.table = table.to(device=device, dtype=dtype or table.dtype)
        self.vocab_size, self.num_layers, self.num_experts, self.hidden_size = self.table.shape

    def rows(self, idx: Tensor) -> Tensor:
        return self.table[idx.to(self.table.device)]

    @classmethod
    def from_client(cls, client, table: str, version: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> InProcessTable:
        """Download every row of a served table (for comparisons and benchmarks)."""
        info = client.info(table, version)
        step = max(1, int(info.max_batch_rows) or 1024)
        parts = [client.get_rows(table, list(range(s, min(s + step, info.vocab_size))), info.version)
                 for s in range(0, info.vocab_size, step)]
        return cls(torch.from_numpy(np.concatenate(parts)), device, dtype)


def _storage(fmt: RowFormat) -> tuple[np.dtype, torch.dtype]:
    """How decoded rows are kept: the stored precision where torch has it (no
    inflation of fp16/bf16 rows), float32 for int8 (dequantised once, on fetch)."""
    if fmt.encoding is Encoding.FP16:
        return np.dtype("<f2"), torch.float16
    if fmt.encoding is Encoding.BF16:
        return np.dtype("<u2"), torch.bfloat16     # bit patterns; viewed as bfloat16 in torch
    return np.dtype("<f4"), torch.float32


class _Fetched:
    """Rows of one background fetch: ids -> index into a CPU tensor [n, L, N, D]."""

    def __init__(self, ids: list[int], rows: Tensor, nbytes: int) -> None:
        self.index = {t: i for i, t in enumerate(ids)}
        self.rows = rows
        self.nbytes = nbytes


class RemoteTable(LutSource):
    """Rows from a lutstore daemon with prefetch, de-duplication and a device-side LRU.

    The cache is a slab [capacity, L, N, D] on the device (capacity =
    budget // row bytes, capped at the vocabulary) that grows by doubling as
    rows arrive; a dict maps token id -> slot in LRU order. A batch is one
    gather from the slab. A batch with more distinct ids than the slab holds
    is served from a temporary tensor and leaves the cache as it was.
    """

    def __init__(self, client, table: str, version: int = 0, device: str | torch.device = "cpu",
                 cache_bytes: int = 256 * MiB, verify: bool = True, fetch_threads: int = 2) -> None:
        self.client = client
        self.info = client.info(table, version)
        self.name, self.version = self.info.name, int(self.info.version)   # pin: rows never change under us
        self.fmt: RowFormat = client.row_format(self.info)
        self.vocab_size = int(self.info.vocab_size)
        self.num_layers, self.num_experts, self.hidden_size = self.fmt.shape
        self.max_batch_rows = int(self.info.max_batch_rows) or 4096
        self.device = torch.device(device)
        self.verify = verify
        self._np_dtype, self.dtype = _storage(self.fmt)
        self.row_device_bytes = self.fmt.values * torch.tensor([], dtype=self.dtype).element_size()
        self.capacity = min(self.vocab_size, max(0, int(cache_bytes)) // self.row_device_bytes)
        self._budget = int(cache_bytes)
        self._slab = torch.empty((0, *self.fmt.shape), dtype=self.dtype, device=self.device)
        self._slots: OrderedDict[int, int] = OrderedDict()   # token id -> slab slot, least recent first
        self._free: list[int] = []
        self._pending: dict[int, Future[_Fetched]] = {}       # token id -> fetch that brings it
        self._announced: set[int] = set()                     # requested since their last gather
        self._lock = threading.Lock()                         # counters are updated from fetch threads
        self._stats = LutStats(cache_budget=self._budget)
        self._pool = ThreadPoolExecutor(max_workers=fetch_threads, thread_name_prefix="lut-fetch")
        self._pin = self.device.type == "cuda"

    # -- the interface ---------------------------------------------------------------------
    def request(self, ids: Tensor | np.ndarray | Iterable[int]) -> None:
        wanted = _as_id_list(ids)
        self._check_ids(wanted)
        missing = []
        for t in wanted:
            if t in self._announced:        # already counted for the coming forward pass
                continue
            self._announced.add(t)
            if t in self._slots:
                self._stats.hits += 1
                self._slots.move_to_end(t)
            elif t not in self._pending:
                missing.append(t)
        for start in range(0, len(missing), self.max_batch_rows):
            chunk = missing[start:start + self.max_batch_rows]
            future = self._pool.submit(self._fetch, chunk)
            self._pending.update(dict.fromkeys(chunk, future))

    def rows(self, idx: Tensor) -> _DeferredRows:
        self.request(idx)   # ids nobody announced are fetched now; announced ones are not asked twice
        return _DeferredRows(self, idx)

    def stats(self) -> LutStats:
        with self._lock:
            s = LutStats(**vars(self._stats))
        s.cache_bytes = self._slab.numel() * self._slab.element_size()
        return s

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- fetching (background threads) ------------------------------------------------------
    def _check_ids(self, ids: list[int]) -> None:
        if ids and (ids[0] < 0 or ids[-1] >= self.vocab_size):
            raise ValueError(f"token id {ids[0] if ids[0] < 0 else ids[-1]} outside the table's vocabulary 0..{self.vocab_size - 1}")

    def _fetch(self, ids: list[int]) -> _Fetched:
        raw = self.client.get_raw(self.name, ids, self.version)
        out = np.empty((len(ids), self.fmt.values), dtype=self._np_dtype)
        nbytes = 0
        for i, t in enumerate(ids):
            value = raw[t]
            nbytes += len(value)
            payload = payload_of(self.fmt, value, self.verify)
            if self.fmt.encoding is Encoding.INT8:
                decode_payload(self.fmt, payload, out=out[i].reshape(self.fmt.shape))
            else:
                out[i] = np.frombuffer(payload, dtype=self._np_dtype)
        rows = torch.from_numpy(out)
        if self.dtype is torch.bfloat16:
            rows = rows.view(torch.int16).view(torch.bfloat16)
        rows = rows.view(len(ids), *self.fmt.shape)
        if self._pin:
            rows = rows.pin_memory()
        with self._lock:
            self._stats.misses += len(ids)
            self._stats.bytes_fetched += nbytes
        return _Fetched(ids, rows, nbytes)

    def _collect(self, ids: list[int]) -> dict[int, Tensor]:
        """CPU rows of ids that are not on the device, waiting for their fetches."""
        found: dict[int, Tensor] = {}
        for t in ids:
            future = self._pending.pop(t, None)
            if future is None:  # evicted between request() and use: fetch again
                future = self._pool.submit(self._fetch, [t])
            fetched = future.result()
            found[t] = fetched.rows[fetched.index[t]]
        return found

    # -- the device cache (main thread only) ------------------------------------------------
    def _slot_for_new_row(self, keep: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        if len(self._slab) < self.capacity:
            self._grow()
            return self._free.pop()
        for victim in self._slots:          # least recently used first
            if victim not in keep:
                return self._slots.pop(victim)
        return None

    def _grow(self) -> None:
        new_cap = min(self.capacity, max(16, 2 * len(self._slab)))
        slab = torch.empty((new_cap, *self.fmt.shape), dtype=self.dtype, device=self.device)
        slab[: len(self._slab)] = self._slab
        self._free.extend(range(new_cap - 1, len(self._slab) - 1, -1))
        self._slab = slab

    def gather(self, idx: Tensor) -> Tensor:
        """Rows [B, T, L, N, D] for idx, on the device (blocks on fetches still running)."""
        flat = idx.reshape(-1).to("cpu", torch.int64)
        distinct, inverse = torch.unique(flat, return_inverse=True)
        ids = distinct.tolist()
        self._announced.difference_update(ids)
        absent = [t for t in ids if t not in self._slots]
        new_rows = self._collect(absent)
        if len(ids) > self.capacity:       # more than the cache holds: serve from a temporary tensor
            batch = torch.empty((len(ids), *self.fmt.shape), dtype=self.dtype, device=self.device)
            for i, t in enumerate(ids):
                batch[i] = self._slab[self._slots[t]] if t in self._slots else new_rows[t].to(self.device, non_blocking=True)
            return batch[inverse.to(self.device)].view(*idx.shape, *self.fmt.shape)
        keep = set(ids)
        for t in ids:
            if t in self._slots:
                self._slots.move_to_end(t)
        if absent:
            slots = []
            for t in absent:
                slot = self._slot_for_new_row(keep)
                self._slots[t] = slot
                slots.append(slot)
            stacked = torch.stack([new_rows[t] for t in absent]).to(self.device, non_blocking=True)
            self._slab[torch.tensor(slots, device=self.device)] = stacked
        slot_of = torch.tensor([self._slots[t] for t in ids], device=self.device)
        return self._slab[slot_of[inverse.to(self.device)]].view(*idx.shape, *self.fmt.shape)


class _DeferredRows:
    """LayerRows for one forward pass: nothing blocks until layer 0's rows are needed
    (after its attention has been launched); then one gather serves every layer."""

    def __init__(self, source: RemoteTable, idx: Tensor) -> None:
        self.source, self.idx = source, idx
        self._rows: Tensor | None = None

    def layer(self, l: int) -> Tensor:
        if self._rows is None:
            self._rows = self.source.gather(self.idx)
        return self._rows[:, :, l]

    def all(self) -> Tensor:
        self.layer(0)
        return self._rows
