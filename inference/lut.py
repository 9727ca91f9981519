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

from lutstore.codec import CRC_BYTES, Encoding, RowFormat

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass
class LutStats:
    hits: int = 0            # rows a forward pass needed that were already on the device when requested
    misses: int = 0          # rows fetched from the daemon (each distinct id of a pass counts once)
    bytes_fetched: int = 0   # row bytes received (payload + checksum; uncompressed size for zstd tables)
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
        """Download every row of a served table (for comparisons and benchmarks), kept in dtype
        (default float32)."""
        table_name = table
        info = client.info(table, version)
        row_bytes = max(1, int(info.row_bytes))
        # calls of at most ~64 MiB, so each finishes well within the client's deadline
        step = max(1, min(int(info.max_batch_rows) or 1024, (64 << 20) // row_bytes))
        # filled chunk by chunk in the target dtype: a float32 copy of a 15 GB fp16 table would not fit
        shape = (int(info.vocab_size), int(info.num_layers), int(info.num_experts), int(info.hidden_size))
        table = torch.empty(shape, dtype=dtype or torch.float32)
        for s in range(0, info.vocab_size, step):
            ids = list(range(s, min(s + step, info.vocab_size)))
            table[s:s + len(ids)] = torch.from_numpy(client.get_rows(table_name, ids, info.version))
        return cls(table, device)


def _storage(fmt: RowFormat) -> tuple[np.dtype, torch.dtype]:
    """How rows are kept in the cache: the stored precision where torch has it (no
    inflation of fp16/bf16 rows); int8 rows stay int8 (+ one fp32 scale per vector)
    and are dequantised on the device, only for the rows a step gathers."""
    if fmt.encoding is Encoding.FP16:
        return np.dtype("<f2"), torch.float16
    if fmt.encoding is Encoding.BF16:
        return np.dtype("<u2"), torch.bfloat16     # bit patterns; viewed as bfloat16 in torch
    if fmt.encoding is Encoding.INT8:
        return np.dtype(np.int8), torch.int8
    return np.dtype("<f4"), torch.float32


class _RowParts:
    """Rows as the cache keeps them: `values` [n, L, N, D] in the storage dtype, and for int8
    `scales` [n, L, N] float32. All methods work on both parts at once."""

    def __init__(self, values: Tensor, scales: Tensor | None) -> None:
        self.values, self.scales = values, scales

    def __len__(self) -> int:
        return len(self.values)

    @property
    def nbytes(self) -> int:
        n = self.values.numel() * self.values.element_size()
        return n + (0 if self.scales is None else self.scales.numel() * 4)

    def index(self, i: Tensor | int | slice) -> _RowParts:
        return _RowParts(self.values[i], None if self.scales is None else self.scales[i])

    def assign(self, i: Tensor | slice, src: _RowParts) -> None:
        self.values[i] = src.values
        if self.scales is not None:
            self.scales[i] = src.scales

    def to(self, device: torch.device) -> _RowParts:
        nb = device.type == "cuda"
        return _RowParts(self.values.to(device, non_blocking=nb),
                         None if self.scales is None else self.scales.to(device, non_blocking=nb))

    def pin(self) -> _RowParts:
        return _RowParts(self.values.pin_memory(), None if self.scales is None else self.scales.pin_memory())

    def dense(self) -> Tensor:
        """The rows as the model mixes them: int8 dequantised (q * scale, in fp32, as codec does)."""
        if self.scales is None:
            return self.values
        return self.values.float() * self.scales.unsqueeze(-1)

    @staticmethod
    def empty(n: int, fmt: RowFormat, dtype: torch.dtype, device: torch.device) -> _RowParts:
        scales = torch.empty((n, fmt.num_layers, fmt.num_experts), dtype=torch.float32, device=device) \
            if fmt.encoding is Encoding.INT8 else None
        return _RowParts(torch.empty((n, *fmt.shape), dtype=dtype, device=device), scales)

    @staticmethod
    def cat(parts: list[_RowParts]) -> _RowParts:
        if len(parts) == 1:
            return parts[0]
        scales = None if parts[0].scales is None else torch.cat([p.scales for p in parts])
        return _RowParts(torch.cat([p.values for p in parts]), scales)


class _Fetched:
    """Rows of one fetch: ids -> index into CPU row parts."""

    def __init__(self, ids: list[int], rows: _RowParts) -> None:
        self.ids = ids
        self.index = {t: i for i, t in enumerate(ids)}
        self.rows = rows


class RemoteTable(LutSource):
    """Rows from a lutstore daemon with prefetch, de-duplication and a device-side LRU.

    The cache is a slab [capacity, L, N, D] on the device (capacity =
    budget // row bytes, capped at the vocabulary) that grows by doubling as
    rows arrive; a dict maps token id -> slot in LRU order. A batch is one
    gather from the slab. A batch with more distinct ids than the slab holds
    is served from a temporary tensor and leaves the cache as it was.

    Rows are kept in their stored precision: fp16/bf16 as is, int8 as int8
    plus per-vector scales (a quarter of float32's bytes), dequantised on the
    device for the rows a step uses. Announced ids (request) are fetched on a
    background thread; a fetch that has not started when its rows are needed
    is run in the calling thread instead (no thread hop on the critical path).
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
        self.verify = verify        # kept for callers; CRCs are checked by the client (LutClient(verify=...))
        self._np_dtype, self.dtype = _storage(self.fmt)
        self._int8 = self.fmt.encoding is Encoding.INT8
        self.row_device_bytes = (self.fmt.values * torch.tensor([], dtype=self.dtype).element_size()
                                 + (4 * self.fmt.vectors if self._int8 else 0))
        self.capacity = min(self.vocab_size, max(0, int(cache_bytes)) // self.row_device_bytes)
        self._budget = int(cache_bytes)
        self._slab = _RowParts.empty(0, self.fmt, self.dtype, self.device)
        self._slots: OrderedDict[int, int] = OrderedDict()   # token id -> slab slot, least recent first
        self._free: list[int] = []
        self._pending: dict[int, Future[_Fetched]] = {}       # token id -> fetch that brings it
        self._chunks: dict[Future, list[int]] = {}            # fetch -> its ids (to run it here if not started)
        self._announced: set[int] = set()                     # requested since their last gather
        self._lock = threading.Lock()                         # counters are updated from fetch threads
        self._stats = LutStats(cache_budget=self._budget)
        self._pool = ThreadPoolExecutor(max_workers=fetch_threads, thread_name_prefix="lut-fetch")
        self._pin = self.device.type == "cuda"

    # -- the interface ---------------------------------------------------------------------
    def request(self, ids: Tensor | np.ndarray | Iterable[int]) -> None:
        for chunk in self._announce(_as_id_list(ids)):
            future = self._pool.submit(self._fetch, chunk)
            self._chunks[future] = chunk
            self._pending.update(dict.fromkeys(chunk, future))

    def rows(self, idx: Tensor) -> _DeferredRows:
        self.request(idx)   # ids nobody announced start now, overlapping layer 0; announced ones are not asked twice
        return _DeferredRows(self, idx)

    def stats(self) -> LutStats:
        with self._lock:
            s = LutStats(**vars(self._stats))
        s.cache_bytes = self._slab.nbytes
        return s

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- fetching ---------------------------------------------------------------------------
    def _announce(self, wanted: list[int]) -> list[list[int]]:
        """Count hits for ids in the cache; return the others not yet in flight, in batches."""
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
        return [missing[s:s + self.max_batch_rows] for s in range(0, len(missing), self.max_batch_rows)]

    def _check_ids(self, ids: list[int]) -> None:
        if ids and (ids[0] < 0 or ids[-1] >= self.vocab_size):
            raise ValueError(f"token id {ids[0] if ids[0] < 0 else ids[-1]} outside the table's vocabulary 0..{self.vocab_size - 1}")

    def _fetch(self, ids: list[int]) -> _Fetched:
        """One BatchGet through LutClient.get_payloads: each row checked and copied once from the
        received message into one array; no decode here (int8 stays int8, fp16 stays fp16)."""
        got_ids, payloads = self.client.get_payloads(self.name, ids, self.version)
        n, fmt = len(got_ids), self.fmt
        if self._int8:
            scales = torch.from_numpy(np.ascontiguousarray(payloads[:, : 4 * fmt.vectors]).view("<f4"))
            values = torch.from_numpy(payloads[:, 4 * fmt.vectors:].view(np.int8))   # strided view, no copy
            rows = _RowParts(values.view(n, *fmt.shape), scales.view(n, fmt.num_layers, fmt.num_experts))
        else:
            values = torch.from_numpy(payloads.view(self._np_dtype))
            if self.dtype is torch.bfloat16:
                values = values.view(torch.int16).view(torch.bfloat16)
            rows = _RowParts(values.view(n, *fmt.shape), None)
        if self._pin:
            rows = rows.pin()
        with self._lock:
            self._stats.misses += n
            self._stats.bytes_fetched += n * (fmt.payload_bytes + CRC_BYTES)
        return _Fetched(got_ids.tolist(), rows)

    def _collect(self, ids: list[int]) -> dict[int, _RowParts]:
        """CPU rows of ids that are not on the device: from fetches in flight, or fetched here
        when their fetch has not started yet (or never was: evicted since announced)."""
        found: dict[int, _RowParts] = {}
        orphans = []
        for t in ids:
            if t in found:
                continue
            future = self._pending.pop(t, None)
            if future is None:
                orphans.append(t)
                continue
            chunk = self._chunks.pop(future, None)
            if chunk is not None and future.cancel():      # still queued: run it on this thread now
                fetched = self._fetch(chunk)
                for u in chunk:
                    self._pending.pop(u, None)
            else:
                fetched = future.result()
            for u in fetched.ids:
                if u not in found:
                    found[u] = fetched.rows.index(fetched.index[u])
        for start in range(0, len(orphans), self.max_batch_rows):
            fetched = self._fetch(orphans[start:start + self.max_batch_rows])
            for u in fetched.ids:
                found[u] = fetched.rows.index(fetched.index[u])
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
        slab = _RowParts.empty(new_cap, self.fmt, self.dtype, self.device)
        slab.assign(slice(0, len(self._slab)), self._slab)
        self._free.extend(range(new_cap - 1, len(self._slab) - 1, -1))
        self._slab = slab

    def gather(self, idx: Tensor) -> Tensor:
        """Rows [B, T, L, N, D] for idx, on the device (blocks on fetches still running);
        int8 tables give float32 rows, other encodings their stored dtype. The result may be a
        view of the cache: use it before the next gather."""
        flat = idx.reshape(-1).to("cpu", torch.int64)
        distinct, inverse = torch.unique(flat, return_inverse=True)
        ids = distinct.tolist()
        self._announced.difference_update(ids)
        absent = [t for t in ids if t not in self._slots]
        new_rows = self._collect(absent)
        shape = (*idx.shape, *self.fmt.shape)
        if len(ids) > self.capacity:       # more than the cache holds: serve from a temporary tensor
            batch = _RowParts.empty(len(ids), self.fmt, self.dtype, self.device)
            for i, t in enumerate(ids):
                src = self._slab.index(self._slots[t]) if t in self._slots else new_rows[t].to(self.device)
                batch.assign(i, src)
            return batch.index(inverse.to(self.device)).dense().view(shape)
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
            stacked = _RowParts.cat([new_rows[t].index(None) for t in absent])
            self._slab.assign(torch.tensor(slots, device=self.device), stacked.to(self.device))
        if len(ids) == 1:                  # batch 1 decode: a view, no index tensor
            slot = self._slots[ids[0]]
            return self._slab.index(slice(slot, slot + 1)).dense().expand(len(flat), *self.fmt.shape).reshape(shape)
        slot_of = torch.tensor([self._slots[t] for t in ids], device=self.device)
        return self._slab.index(slot_of[inverse.to(self.device)]).dense().view(shape)


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
