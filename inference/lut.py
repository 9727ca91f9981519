"""Where a MoLE model's LUT rows come from, behind one small interface.

    source.request(ids)   announce token ids the moment they are known; returns at once
    source.rows(idx)      rows for idx [B, T]: a Tensor [B, T, L, N, D] or a LayerRows
                          whose .layer(l) blocks only when layer l runs
    source.stats()        hits, misses, bytes fetched, cache bytes

Two sources:
  - InProcessTable: the whole table as one tensor on the device (or in RAM).
    No fetch at all: the ceiling a remote table is measured against.
  - RemoteTable: rows from a `lutstore serve` daemon through the client's
    RowFetcher (lutstore.client.fetch: a session, a call or shared memory). Requests
    are de-duplicated and start the moment ids are known, so the fetch of a
    sampled token's row overlaps the start of the next forward pass; rows live
    in a byte-budgeted LRU slab on the device, keyed by token id (token
    frequencies are Zipf-like, so hot rows stay): inference.rowcache.

The model sees only LayerRows (inference.model): .layer(l) gives layer l's
rows [B, T, N, D] when layer l runs.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from inference.dequantize import device_form
from inference.rowcache import (PREFAULT_BYTES, ArrivingRows, Copy, DeviceStaging, Plan, RowParts, RowSlab,
                                cached_row_bytes, stage_rows, write_staged, write_views)
from lutstore.client import LutClient
from lutstore.formats.codec import CRC_BYTES, RowFormat, slice_payload_bytes
from lutstore.client.fetch import SHARED_MEMORY_MIN_BYTES, RowFetcher

log = logging.getLogger(__name__)

__all__ = ["InProcessTable", "LutSource", "LutStats", "MiB", "PackedTable", "RemoteTable", "layer_ends_for",
           "PREFAULT_BYTES", "SHARED_MEMORY_MIN_BYTES"]

MiB = 1 << 20
# A fetch asks for at most this many bytes of rows, so that its buffers stay below glibc's mmap
# threshold (32 MiB, lutstore/alloc.py) and reuse freed memory instead of faulting fresh pages in.
FETCH_CHUNK_BYTES = 24 * MiB


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


def _flat_ids(ids: Tensor | np.ndarray | Iterable[int]) -> list[int]:
    if isinstance(ids, (Tensor, np.ndarray)):
        return ids.reshape(-1).tolist()
    return [int(t) for t in ids]


def _as_id_list(ids: Tensor | np.ndarray | Iterable[int]) -> list[int]:
    """Distinct ids, ascending (a set and a sort: ~10x cheaper than np.unique for a decode step's ids)."""
    return sorted(set(_flat_ids(ids)))


class LutSource:
    """The interface the generator and evaluator use."""

    num_layers: int
    num_experts: int
    hidden_size: int
    vocab_size: int

    def request(self, ids: Tensor | np.ndarray | Iterable[int]) -> None:
        """Start getting these ids' rows (no-op where rows are always at hand)."""

    def rows(self, idx: Tensor):  # -> LayerRows
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

    def rows(self, idx: Tensor) -> _TableLayers:
        """LayerRows: layer l's rows gathered when layer l runs (as RemoteTable does): a whole-row
        gather of a 256-token prefill chunk moved 75 MB at once and was slower than per layer."""
        return _TableLayers(self.table, idx)

    def gather(self, idx: Tensor) -> Tensor:
        """Rows [B, T, L, N, D] for idx in one gather."""
        return _TableLayers(self.table, idx).all()

    @classmethod
    def from_client(cls, client: LutClient, table: str, version: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> InProcessTable:
        """Download every row of a served table (for comparisons and benchmarks), kept in dtype
        (default float32; a packed table (nf4) without a dtype stays packed: PackedTable)."""
        table_name = table
        info = client.info(table, version)
        if dtype is None and device_form(client.row_format(info)).packed:
            return PackedTable.from_client(client, table, int(info.version), device)
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


class _TableLayers:
    """LayerRows of an in-process table: one index_select of layer l's [V, N, D] view per layer."""

    def __init__(self, table: Tensor, idx: Tensor) -> None:
        self.table, self.shape = table, tuple(idx.shape)
        self.flat = idx.reshape(-1).to(table.device)

    def layer(self, l: int) -> Tensor:
        return self.table[:, l].index_select(0, self.flat).view(*self.shape, *self.table.shape[2:])

    def all(self) -> Tensor:
        # index_select copies whole rows; advanced indexing (table[idx]) went element by element, 6x slower
        return self.table.index_select(0, self.flat).view(*self.shape, *self.table.shape[1:])


class PackedTable(InProcessTable):
    """The whole table in memory in its packed stored form (nf4: uint8 [V, L, P], 0.27x of fp16's
    bytes): rows(idx) gives LayerRows whose layer(l) gathers layer l's pieces of idx and dequantises
    only those, on the table's device: the in-process ceiling a packed RemoteTable is compared with."""

    def __init__(self, packed: Tensor, fmt: RowFormat, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        form = device_form(fmt)
        if not form.packed:
            raise ValueError(f"PackedTable needs a packed encoding (nf4), not {fmt.encoding.value}")
        shape = form.value_shape(fmt)
        if packed.dtype != form.dtype or packed.ndim != 3 or tuple(packed.shape[1:]) != shape:
            raise ValueError(f"packed must be {form.dtype} [V, {shape[0]}, {shape[1]}], got "
                             f"{packed.dtype} {tuple(packed.shape)}")
        self.table, self.fmt, self.dtype, self.form = packed.to(device), fmt, dtype, form
        self.vocab_size = packed.shape[0]
        self.num_layers, self.num_experts, self.hidden_size = fmt.shape

    def rows(self, idx: Tensor) -> _PackedLayers:
        return _PackedLayers(self, idx)

    def gather(self, idx: Tensor) -> Tensor:
        return _PackedLayers(self, idx).all()

    @classmethod
    def from_client(cls, client: LutClient, table: str, version: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> PackedTable:
        """Download every row of a served packed table, kept packed; layers dequantise to dtype."""
        info = client.info(table, version)
        fmt = client.row_format(info)
        shape = device_form(fmt).value_shape(fmt)
        step = max(1, min(int(info.max_batch_rows) or 1024, (64 << 20) // max(1, int(info.row_bytes))))
        packed = torch.empty((int(info.vocab_size), *shape), dtype=torch.uint8)
        for s in range(0, info.vocab_size, step):
            ids, payloads = client.get_payloads(table, range(s, min(s + step, info.vocab_size)), info.version)
            packed[s:s + len(ids)] = torch.from_numpy(payloads).view(len(ids), *shape)
        return cls(packed, fmt, device, dtype)


class _PackedLayers:
    """LayerRows of a PackedTable: layer l = its pieces of the rows idx names, dequantised."""

    def __init__(self, table: PackedTable, idx: Tensor) -> None:
        self.t, self.shape = table, tuple(idx.shape)
        self.flat = idx.reshape(-1).to(table.table.device)

    def layer(self, l: int) -> Tensor:
        pieces = self.t.table[:, l].index_select(0, self.flat)
        return self.t.form.dequantize(pieces, None, self.t.fmt, self.t.dtype).view(*self.shape, self.t.num_experts, self.t.hidden_size)

    def all(self) -> Tensor:
        return torch.stack([self.layer(l) for l in range(self.t.num_layers)], dim=len(self.shape))


def layer_ends_for(num_layers: int) -> list[int]:
    """Doubling layer groups [0,1), [1,2), [2,4), [4,8), ...: the first layer's slices arrive after
    the fewest bytes, later groups (needed later) are bigger, and there are ~log2(L) messages."""
    ends, end = [], 1
    while end < num_layers:
        ends.append(end)
        end *= 2
    return ends + [num_layers]


class RemoteTable(LutSource):
    """Rows from a lutstore daemon with prefetch, de-duplication and a device-side LRU.

    Fetching: ids are fetched the moment they are announced (request) by the
    client's RowFetcher, which picks the transport and falls back (lutstore.client.fetch:
    one open BatchGetStream session by default; with session=False, for big
    fetches when the client uses shared memory, or when the daemon has no
    session for us, one call each on `fetch_threads` fetch threads; a call no
    thread has started when its rows are needed runs in the calling thread).
    Whole rows by default; with layer_split="auto" (BatchGetRequest.layer_ends,
    doubling groups: see layer_ends_for) layer l waits only for its group's
    slices - measured no faster on a 2-core box, where the daemon's extra CPU
    eats the gain.

    The cache (inference.rowcache.RowSlab) is a slab [capacity, L, N, D] on the
    device (capacity = budget // row bytes, capped at the vocabulary), allocated
    whole when the table opens, and on a CPU its first PREFAULT_BYTES written
    once so their pages are mapped then (as a model's weights are loaded before
    the first token; slots are handed out from 0 up): a slab that grew would be
    copied in the middle of a decode step (tens of ms) and peak at 2.5x the
    budget, and fresh pages fault ~70 times per 295 KB row inside the step.
    A dict maps token id -> slot in LRU order; a layer of a batch is one
    index_select from the slab. A batch with more distinct ids than the slab
    holds is served from a temporary tensor and leaves the cache as it was.

    Rows are kept in their stored form (inference.dequantize.DEVICE_FORMS: fp16/bf16
    as is, int8 with per-vector scales, nf4 packed) and dequantised on the device
    for the rows a step uses. CRCs are checked by the client (LutClient(verify=...)).
    """

    def __init__(self, client: LutClient, table: str, version: int = 0, device: str | torch.device = "cpu",
                 cache_bytes: int = 256 * MiB, fetch_threads: int = 2,
                 layer_split: str | list[int] = "none", session: bool = True) -> None:
        self.client = client
        self.info = client.info(table, version)
        self.name, self.version = self.info.name, int(self.info.version)   # pin: rows never change under us
        self.fmt: RowFormat = client.row_format(self.info)
        self._form = device_form(self.fmt)   # how the slab keeps rows; a layer is dequantised when gathered
        self.vocab_size = int(self.info.vocab_size)
        self.num_layers, self.num_experts, self.hidden_size = self.fmt.shape
        self.max_batch_rows = int(self.info.max_batch_rows) or 4096
        self._fetch_rows = max(1, min(self.max_batch_rows, FETCH_CHUNK_BYTES // self.fmt.payload_bytes))
        self.device = torch.device(device)
        self.dtype = self._form.dtype
        self.row_device_bytes = cached_row_bytes(self.fmt)
        self.capacity = min(self.vocab_size, max(0, int(cache_bytes)) // self.row_device_bytes)
        self._budget = int(cache_bytes)
        if layer_split == "auto":
            self.layer_ends = layer_ends_for(self.num_layers) if self.num_layers > 1 else []
        elif layer_split == "none":
            self.layer_ends = []
        else:
            self.layer_ends = list(layer_split)
        self._closed = False
        self._slab = RowSlab(self.fmt, self.capacity, self.device)
        self._pending: dict[int, ArrivingRows] = {}           # token id -> fetch that brings it
        self._announced: set[int] = set()                     # requested since their last gather
        self._unfinished: Plan | None = None                  # a pass whose slab copies are not all made
        self._lock = threading.Lock()                         # counters are updated from fetch threads too
        self._stats = LutStats(cache_budget=self._budget)
        # Off the CPU, a fetch's rows are staged in one (pinned) buffer on the fetch's thread and
        # uploaded by the model's (rowcache.DeviceStaging); on the CPU they are copied straight
        # from the received messages into the slab.
        self._stage = self.device.type != "cpu"
        self._staging = DeviceStaging(self.device)
        self._fetcher: RowFetcher = client.fetcher(self.name, self.version, self.layer_ends, session, fetch_threads)
        self._groups = self._fetcher.groups
        # A fetch may take one call's deadline after the retries of an unreachable daemon.
        self._timeout = client.timeout + client.retry_seconds

    # -- the interface ---------------------------------------------------------------------
    def request(self, ids: Tensor | np.ndarray | Iterable[int]) -> None:
        if self._closed:
            raise RuntimeError(f"RemoteTable of {self.name!r} is closed")
        for chunk in self._announce(_as_id_list(ids)):
            self._start(chunk)

    def rows(self, idx: Tensor) -> _DeferredRows:
        self.request(idx)   # ids nobody announced start now, overlapping layer 0; announced ones are not asked twice
        return _DeferredRows(self, idx)

    def gather(self, idx: Tensor) -> Tensor:
        """Rows [B, T, L, N, D] for idx, on the device (blocks on fetches still running);
        int8 and nf4 tables give float32 rows, other encodings their stored dtype."""
        return _DeferredRows(self, idx).all()

    def stats(self) -> LutStats:
        with self._lock:
            s = LutStats(**vars(self._stats))
        s.cache_bytes = self._slab.parts.nbytes
        return s

    @property
    def non_blocking_copies(self) -> bool:
        """Uploads to a GPU queued without waiting (pinned staging, rowcache.DeviceStaging): the
        default; False makes every upload wait for its copy (tests compare the two)."""
        return self._staging.non_blocking

    @non_blocking_copies.setter
    def non_blocking_copies(self, value: bool) -> None:
        self._staging.non_blocking = bool(value)

    @property
    def transport(self) -> str:
        """How fetches go now: "session" or "calls" (lutstore.client.fetch)."""
        return self._fetcher.transport

    def close(self) -> None:
        """Stop fetching and give the cache's memory back (the table serves no rows after this)."""
        self._fetcher.close()
        self._staging.drain()
        self._slab.release()
        self._closed = True

    # -- fetching ---------------------------------------------------------------------------
    def _announce(self, wanted: list[int]) -> list[list[int]]:
        """Count hits for ids in the cache; return the others not yet in flight, in batches."""
        self._check_ids(wanted)
        missing = []
        hits = 0
        slots = self._slab.slots
        for t in wanted:
            if t in self._announced:        # already counted for the coming forward pass
                continue
            self._announced.add(t)
            if t in slots:
                hits += 1
                slots.move_to_end(t)
            elif t not in self._pending:
                missing.append(t)
        if hits:
            with self._lock:
                self._stats.hits += hits
        step = self._fetch_rows
        return [missing[s:s + step] for s in range(0, len(missing), step)]

    def _check_ids(self, ids: list[int]) -> None:
        if ids and (ids[0] < 0 or ids[-1] >= self.vocab_size):
            raise ValueError(f"token id {ids[0] if ids[0] < 0 else ids[-1]} outside the table's vocabulary 0..{self.vocab_size - 1}")

    def _start(self, ids: list[int]) -> ArrivingRows:
        fetch = ArrivingRows(ids, self._groups)
        self._pending.update(dict.fromkeys(ids, fetch))
        fetch.job = self._fetcher.fetch(ids, on_group=lambda b, e, got, views: self._arrived(fetch, b, e, got, views),
                                        on_error=fetch.fail, on_done=lambda: self._count(fetch))
        return fetch

    def _count(self, fetch: ArrivingRows) -> None:
        with self._lock:
            self._stats.misses += len(fetch.ids)
            self._stats.bytes_fetched += len(fetch.ids) * (self.fmt.payload_bytes + CRC_BYTES)

    def _arrived(self, fetch: ArrivingRows, begin: int, end: int, ids: np.ndarray, views: list[memoryview]) -> None:
        """The fetch's thread: a layer group of every row of the fetch, checked (RowsAnswer)."""
        if ids.tolist() != fetch.ids:
            raise RuntimeError(f"asked rows {fetch.ids[:4]}..., got {ids[:4].tolist()}...")
        g = fetch.group_index[(begin, end)]
        if self._stage:   # one buffer to upload; pinned for an asynchronous copy to a GPU
            nbytes = slice_payload_bytes(self.fmt, begin, end)
            fetch.arrived(g, stage_rows(views, nbytes, pin=self.device.type == "cuda"))
        else:             # memoryviews into the received messages: _fill copies each once
            fetch.arrived(g, views)

    def _wait(self, fetch: ArrivingRows, g: int) -> list[memoryview] | Tensor:
        """Group g of a fetch; a fetch no thread has started yet is run here (no thread hop)."""
        self._fetcher.help(fetch.job)
        return fetch.wait(g, self._timeout)

    # -- the plan of a pass (main thread only) ----------------------------------------------
    def _plan(self, idx: Tensor) -> Plan:
        """Slots for a pass's rows: cached ones found, absent ones given slots now (filled from
        their fetches layer group by layer group as the pass reaches them)."""
        if self._closed:
            raise RuntimeError(f"RemoteTable of {self.name!r} is closed")
        if self._unfinished is not None:     # a pass that stopped early: complete its rows first
            plan, self._unfinished = self._unfinished, None
            for layer in range(self.num_layers):
                self._fill(plan, layer)
        flat = _flat_ids(idx.cpu())
        ids = sorted(set(flat))
        self._check_ids(ids)
        self._announced.difference_update(ids)
        slab = self._slab
        absent = [t for t in ids if t not in slab.slots]
        orphans = [t for t in absent if t not in self._pending]    # evicted since announced, or never announced
        for start in range(0, len(orphans), self._fetch_rows):
            self._start(orphans[start:start + self._fetch_rows])
        by_fetch: dict[int, tuple[ArrivingRows, list[int]]] = {}
        for t in absent:
            fetch = self._pending.pop(t)
            by_fetch.setdefault(id(fetch), (fetch, []))[1].append(t)
        shape = tuple(idx.shape)
        if len(ids) > self.capacity:       # more than the cache holds: a temporary batch
            table = RowParts.empty(len(ids), self.fmt, self.device)
            position = {t: i for i, t in enumerate(ids)}
            present = [t for t in ids if t in slab.slots]
            if present:
                table.assign(torch.tensor([position[t] for t in present], device=self.device),
                             slab.parts.index(torch.tensor([slab.slots[t] for t in present], device=self.device)))
            copies = [Copy(f, torch.tensor([f.index[t] for t in ts]),
                           torch.tensor([position[t] for t in ts], device=self.device), [])
                      for f, ts in by_fetch.values()]
            return Plan(shape, torch.tensor([position[t] for t in flat], device=self.device), copies, table)
        keep = set(ids)
        for t in ids:
            if t in slab.slots:
                slab.slots.move_to_end(t)
        copies = []
        for fetch, ts in by_fetch.values():
            slots = []
            for t in ts:
                slot = slab.take_slot(keep)
                slab.slots[t] = slot
                slots.append(slot)
            rows = None if ts == fetch.ids else torch.tensor([fetch.index[t] for t in ts])
            copies.append(Copy(fetch, rows, torch.tensor(slots, device=self.device), ts))
        if len(ids) == 1:                  # batch 1 decode: a view per layer, no index tensor
            index: Tensor | int = slab.slots[ids[0]]
        else:
            index = torch.tensor([slab.slots[t] for t in flat], device=self.device)
        plan = Plan(shape, index, copies)
        if copies:
            self._unfinished = plan
        return plan

    def _fill(self, plan: Plan, layer: int) -> None:
        """Make sure layer's rows of every fetch of the pass are in place (waiting for them)."""
        target = plan.table if plan.table is not None else self._slab.parts
        for copy in plan.copies:
            g = copy.fetch.group_of(layer)
            if g in copy.done:
                continue
            try:
                rows = self._wait(copy.fetch, g)
            except BaseException:
                self._forget(plan)
                raise
            begin, end = copy.fetch.groups[g]
            if self._stage:
                on_device = copy.fetch.uploaded.get(g)
                if on_device is None:
                    on_device = copy.fetch.uploaded[g] = self._staging.upload(rows)
                if copy.rows is not None:
                    on_device = on_device.index_select(0, copy.rows.to(self.device))
                write_staged(target, on_device, copy.slots, begin, end, self.num_layers)
            else:
                which = range(len(rows)) if copy.rows is None else copy.rows.tolist()
                write_views(target, rows, which, copy.slots.tolist(), begin, end, self.num_layers)
            copy.done.add(g)
        if plan is self._unfinished and all(len(c.done) == len(c.fetch.groups) for c in plan.copies):
            self._unfinished = None

    def _forget(self, plan: Plan) -> None:
        """A fetch failed: its rows never arrive, so their slots go back (the error is raised)."""
        for copy in plan.copies:
            self._slab.forget(copy.ids)
        if self._unfinished is plan:
            self._unfinished = None

    def _layer(self, plan: Plan, layer: int) -> Tensor:
        """Rows [B, T, N, D] of one layer for the pass (int8 and nf4: dequantised to float32)."""
        self._fill(plan, layer)
        b, t = plan.shape
        if plan.table is not None:
            src, index = plan.table, plan.index
        elif isinstance(plan.index, int):
            src, index = self._slab.parts, slice(plan.index, plan.index + 1)
        else:
            src, index = self._slab.parts, plan.index
        if isinstance(index, slice):
            values = src.values[index, layer]
            scales = None if src.scales is None else src.scales[index, layer]
        else:   # index_select of the layer's view copies N x D blocks; values[index, layer] went element by element
            values = src.values[:, layer].index_select(0, index)
            scales = None if src.scales is None else src.scales[:, layer].index_select(0, index)
        values = self._form.dequantize(values, scales, self.fmt, torch.float32)   # on the device
        if isinstance(index, slice):
            return values.expand(b * t, self.num_experts, self.hidden_size).reshape(b, t, self.num_experts, self.hidden_size)
        return values.view(b, t, self.num_experts, self.hidden_size)


class _DeferredRows:
    """LayerRows for one forward pass: nothing blocks until layer 0's rows are needed (after its
    attention has been launched), and layer l waits only for the slices of layer l's group."""

    def __init__(self, source: RemoteTable, idx: Tensor) -> None:
        self.source, self.idx = source, idx
        self._plan: Plan | None = None

    def layer(self, l: int) -> Tensor:
        if self._plan is None:
            self._plan = self.source._plan(self.idx)
        return self.source._layer(self._plan, l)

    def all(self) -> Tensor:
        """Every layer's rows [B, T, L, N, D]."""
        return torch.stack([self.layer(l) for l in range(self.source.num_layers)], dim=2)
