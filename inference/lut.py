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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

import grpc
import numpy as np
import torch
from torch import Tensor

from lutstore.codec import CRC_BYTES, Encoding, RowFormat, check_layer_ends
from lutstore.errors import LutError

log = logging.getLogger(__name__)

MiB = 1 << 20
# Fetches of at least this many bytes (a prefill chunk) go through shared memory when the client
# uses it: 3.5-4x the session's GB/s; smaller ones (decode steps) stay on the session, whose
# round trip is shorter (benchmarks/PERFORMANCE_DECODE.md).
SHARED_MEMORY_MIN_BYTES = 4 * MiB
# A fetch asks for at most this many bytes of rows, so that its buffers stay below glibc's mmap
# threshold (32 MiB, lutstore/alloc.py) and reuse freed memory instead of faulting fresh pages in.
FETCH_CHUNK_BYTES = 24 * MiB
# A CPU slab's first bytes are written when the table opens, so the slots handed out first (slot 0
# up) do not fault their pages in during a step; bounded so a big budget costs no more at start.
PREFAULT_BYTES = 512 * MiB


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

    def rows(self, idx: Tensor) -> _TableLayers:
        """LayerRows: layer l's rows gathered when layer l runs (as RemoteTable does): a whole-row
        gather of a 256-token prefill chunk moved 75 MB at once and was slower than per layer."""
        return _TableLayers(self.table, idx)

    def gather(self, idx: Tensor) -> Tensor:
        """Rows [B, T, L, N, D] for idx in one gather."""
        return _TableLayers(self.table, idx).all()

    @classmethod
    def from_client(cls, client, table: str, version: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> InProcessTable:
        """Download every row of a served table (for comparisons and benchmarks), kept in dtype
        (default float32; an nf4 table without a dtype stays nf4: inference.nf4.Nf4Table)."""
        table_name = table
        info = client.info(table, version)
        if dtype is None and client.row_format(info).encoding is Encoding.NF4:
            from inference.nf4 import Nf4Table   # (imports this module)
            return Nf4Table.from_client(client, table, int(info.version), device)
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

    @staticmethod
    def empty(n: int, fmt: RowFormat, dtype: torch.dtype, device: torch.device) -> _RowParts:
        scales = torch.empty((n, fmt.num_layers, fmt.num_experts), dtype=torch.float32, device=device) \
            if fmt.encoding is Encoding.INT8 else None
        return _RowParts(torch.empty((n, *fmt.shape), dtype=dtype, device=device), scales)


class _Fetch:
    """One fetch of rows, arriving layer group by layer group: group g holds layers
    groups[g] = [begin, end) of every row, as _RowParts [n, end - begin, N, D]; a fetch of
    whole rows is one group [0, L). Filled by a fetch thread; waited on by the model."""

    def __init__(self, ids: list[int], groups: list[tuple[int, int]]) -> None:
        self.ids = ids
        self.index = {t: i for i, t in enumerate(ids)}
        self.groups = groups
        self._group_of_layer = [g for g, (b, e) in enumerate(groups) for _ in range(b, e)]
        self.parts: list[_RowParts | None] = [None] * len(groups)
        self._ready = [threading.Event() for _ in groups]
        self.error: BaseException | None = None
        self._claimed = False
        self._claim_lock = threading.Lock()

    def claim(self) -> bool:
        """True for the one caller that runs this fetch (a fetch thread, or the model's thread
        when no fetch thread has started it yet)."""
        with self._claim_lock:
            claimed, self._claimed = self._claimed, True
        return not claimed

    def group_of(self, layer: int) -> int:
        return self._group_of_layer[layer]

    def arrived(self, g: int, parts: _RowParts) -> None:
        self.parts[g] = parts
        self._ready[g].set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        for event in self._ready:
            event.set()

    def wait(self, g: int, timeout: float | None = None) -> _RowParts:
        if not self._ready[g].wait(timeout):
            raise TimeoutError(f"rows {self.ids[:4]}{'...' if len(self.ids) > 4 else ''} did not arrive within {timeout:g} s")
        if self.parts[g] is None:
            raise self.error if self.error is not None else RuntimeError("fetch ended without rows")
        return self.parts[g]


@dataclass
class _Copy:
    """Rows of one fetch that a forward pass puts into the slab, group by group as they arrive."""

    fetch: _Fetch
    rows: Tensor | None           # indices into the fetch's rows (None: all of them, in order)
    slots: Tensor                 # their slab slots (or positions in a temporary batch)
    ids: list[int]
    done: set[int]


@dataclass
class _Plan:
    """One forward pass's rows: where each position's row sits, and the copies still to make."""

    shape: tuple[int, ...]        # [B, T]
    index: Tensor | int           # per position: slab slot (an int: every position the same row)
    copies: list[_Copy]
    table: _RowParts | None = None   # a temporary batch instead of the slab (more ids than the cache holds)


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

    Fetching: ids are fetched the moment they are announced (request), on one
    open BatchGetStream session (lutstore.session.RowSession: no call setup and
    no thread hop per fetch); with session=False, or for fetches of at least
    SHARED_MEMORY_MIN_BYTES when the client uses shared memory, as one call
    each on two fetch threads (a call no thread has started when its rows are
    needed runs in the calling thread). Whole rows by default; with
    layer_split="auto" (BatchGetRequest.layer_ends, doubling groups: see
    layer_ends_for) layer l waits only for its group's slices - measured no
    faster on a 2-core box, where the daemon's extra CPU eats the gain.

    The cache is a slab [capacity, L, N, D] on the device (capacity =
    budget // row bytes, capped at the vocabulary), allocated whole when the
    table opens, and on a CPU its first PREFAULT_BYTES written once so their
    pages are mapped then (as a model's weights are loaded before the first
    token; slots are handed out from 0 up). Growing it by doubling copied it,
    up to 70 ms in the middle of a decode step, and peaked at 2.5x the budget;
    fresh pages cost ~70 page faults per 295 KB row inside the step. A dict
    maps token id -> slot in LRU order; a layer of a batch is one index_select
    from the slab. A batch with more distinct ids than the slab holds is
    served from a temporary tensor and leaves the cache as it was.

    Rows are kept in their stored precision: fp16/bf16 as is, int8 as int8
    plus per-vector scales (a quarter of float32's bytes), dequantised on the
    device for the rows a step uses.
    """

    def __init__(self, client, table: str, version: int = 0, device: str | torch.device = "cpu",
                 cache_bytes: int = 256 * MiB, verify: bool = True, fetch_threads: int = 2,
                 layer_split: str | list[int] = "none", session: bool = True) -> None:
        self.client = client
        self.info = client.info(table, version)
        self.name, self.version = self.info.name, int(self.info.version)   # pin: rows never change under us
        self.fmt: RowFormat = client.row_format(self.info)
        if self.fmt.encoding is Encoding.NF4:   # to come: keep nf4 rows in the slab, inference.nf4.dequantize_nf4 per layer
            raise ValueError(f"RemoteTable does not read nf4 tables yet ({table!r}); use InProcessTable.from_client")
        self.vocab_size = int(self.info.vocab_size)
        self.num_layers, self.num_experts, self.hidden_size = self.fmt.shape
        self.max_batch_rows = int(self.info.max_batch_rows) or 4096
        self._fetch_rows = max(1, min(self.max_batch_rows, FETCH_CHUNK_BYTES // self.fmt.payload_bytes))
        self.device = torch.device(device)
        self.verify = verify        # kept for callers; CRCs are checked by the client (LutClient(verify=...))
        self._np_dtype, self.dtype = _storage(self.fmt)
        self._int8 = self.fmt.encoding is Encoding.INT8
        self.row_device_bytes = (self.fmt.values * torch.tensor([], dtype=self.dtype).element_size()
                                 + (4 * self.fmt.vectors if self._int8 else 0))
        self.capacity = min(self.vocab_size, max(0, int(cache_bytes)) // self.row_device_bytes)
        self._budget = int(cache_bytes)
        # The client may fetch through /dev/shm (same host): whole rows, one call each.
        self._shared = bool(getattr(client, "_shared_memory", False))
        if layer_split == "auto":
            self.layer_ends = layer_ends_for(self.num_layers) if self.num_layers > 1 else []
        elif layer_split == "none":
            self.layer_ends = []
        else:
            self.layer_ends = list(layer_split)
        self._groups = [(0, self.num_layers)]
        if self.layer_ends:
            self._groups = check_layer_ends(self.fmt, self.layer_ends)
        self._free: list[int] = []                            # slab slots holding no row
        self._closed = False
        self._allocate()
        self._slots: OrderedDict[int, int] = OrderedDict()   # token id -> slab slot, least recent first
        self._pending: dict[int, _Fetch] = {}                 # token id -> fetch that brings it
        self._announced: set[int] = set()                     # requested since their last gather
        self._unfinished: _Plan | None = None                 # a pass whose slab copies are not all made
        self._lock = threading.Lock()                         # counters are updated from fetch threads
        self._stats = LutStats(cache_budget=self._budget)
        self._pool = ThreadPoolExecutor(max_workers=fetch_threads, thread_name_prefix="lut-fetch")
        self._pin = self.device.type == "cuda"
        # One open BatchGetStream for the fetches (no call setup, no thread hop per fetch); one call
        # per fetch on the fetch threads when off, for big fetches when the client uses shared memory
        # (SHARED_MEMORY_MIN_BYTES), or when the server has no sessions (an older daemon: UNIMPLEMENTED).
        self._session = client.session(self.name, self.version, self.layer_ends) if session else None
        # A fetch may take one call's deadline after the retries of an unreachable daemon.
        self._timeout = float(getattr(client, "timeout", 30.0)) + float(getattr(client, "retry_seconds", 0.0))

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
        int8 tables give float32 rows, other encodings their stored dtype."""
        return _DeferredRows(self, idx).all()

    def stats(self) -> LutStats:
        with self._lock:
            s = LutStats(**vars(self._stats))
        s.cache_bytes = self._slab.nbytes
        return s

    def close(self) -> None:
        """Stop fetching and give the cache's memory back (the table serves no rows after this)."""
        if self._session is not None:
            self._session.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._slab = _RowParts.empty(0, self.fmt, self.dtype, self.device)
        self._slots.clear()
        self._free = []
        self._closed = True

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
        step = self._fetch_rows
        return [missing[s:s + step] for s in range(0, len(missing), step)]

    def _check_ids(self, ids: list[int]) -> None:
        if ids and (ids[0] < 0 or ids[-1] >= self.vocab_size):
            raise ValueError(f"token id {ids[0] if ids[0] < 0 else ids[-1]} outside the table's vocabulary 0..{self.vocab_size - 1}")

    def _start(self, ids: list[int]) -> _Fetch:
        bulk = self._shared and not self.layer_ends and len(ids) * self.fmt.payload_bytes >= SHARED_MEMORY_MIN_BYTES
        fetch = _Fetch(ids, self._groups)
        self._pending.update(dict.fromkeys(ids, fetch))
        session = self._session
        if session is not None and not bulk:
            fetch.claim()
            try:
                session.submit(ids, on_group=lambda b, e, got, payloads: self._arrived(fetch, b, e, got, payloads),
                               on_error=lambda error: self._session_failed(fetch, error),
                               on_done=lambda: self._count(fetch), views=self.device.type == "cpu")
            except LutError:   # closed meanwhile by the switch to calls (_session_failed)
                self._pool.submit(self._call, fetch)
        else:
            self._pool.submit(self._run, fetch)
        return fetch

    def _session_failed(self, fetch: _Fetch, error: BaseException) -> None:
        """Session reader thread: a fetch failed. An older daemon without sessions (UNIMPLEMENTED) or
        one whose session slots are all taken (RESOURCE_EXHAUSTED): from now on one BatchGet call per
        fetch, this one and every one the session still held included."""
        switched = self._session is None    # only ever reset here: the session was switched off before
        if switched or getattr(error, "code", None) in (grpc.StatusCode.UNIMPLEMENTED,
                                                        grpc.StatusCode.RESOURCE_EXHAUSTED):
            if not switched:
                log.info("no row session from %s (%s): one BatchGet per fetch instead", self.client.address, error)
                session, self._session = self._session, None
                threading.Thread(target=session.close, name="lut-session-close", daemon=True).start()
            self._pool.submit(self._call, fetch)
        else:
            fetch.fail(error)

    def _count(self, fetch: _Fetch) -> None:
        with self._lock:
            self._stats.misses += len(fetch.ids)
            self._stats.bytes_fetched += len(fetch.ids) * (self.fmt.payload_bytes + CRC_BYTES)

    def _run(self, fetch: _Fetch) -> None:
        """Fetch thread (or the model's thread, see _wait), unless the fetch is already under way."""
        if fetch.claim():
            self._call(fetch)

    def _call(self, fetch: _Fetch) -> None:
        """One BatchGet call; each row checked by the client and copied once from the received
        message; no decode (int8 stays int8)."""
        try:
            if self.layer_ends:
                self.client.get_slices(self.name, fetch.ids, self.version, self.layer_ends,
                                       lambda b, e, ids, payloads: self._arrived(fetch, b, e, ids, payloads))
            else:
                ids, payloads = self.client.get_payloads(self.name, fetch.ids, self.version)
                self._arrived(fetch, 0, self.num_layers, ids, payloads)
        except BaseException as e:  # handed to the model's thread, which raises it
            fetch.fail(e)
            return
        self._count(fetch)

    def _arrived(self, fetch: _Fetch, begin: int, end: int, ids: np.ndarray, payloads: np.ndarray | list) -> None:
        if ids.tolist() != fetch.ids:
            raise RuntimeError(f"asked rows {fetch.ids[:4]}..., got {ids[:4].tolist()}...")
        if isinstance(payloads, list):     # memoryviews into the received messages: _fill copies each once
            fetch.arrived(fetch.groups.index((begin, end)), payloads)
            return
        n, k, fmt = len(ids), end - begin, self.fmt
        if self._int8:
            nscale = 4 * k * fmt.num_experts
            scales = torch.from_numpy(np.ascontiguousarray(payloads[:, :nscale]).view("<f4"))
            values = torch.from_numpy(payloads[:, nscale:].view(np.int8))   # strided view, no copy
            rows = _RowParts(values.view(n, k, fmt.num_experts, fmt.hidden_size), scales.view(n, k, fmt.num_experts))
        else:
            values = torch.from_numpy(payloads.view(self._np_dtype))
            if self.dtype is torch.bfloat16:
                values = values.view(torch.int16).view(torch.bfloat16)
            rows = _RowParts(values.view(n, k, fmt.num_experts, fmt.hidden_size), None)
        if self._pin:
            rows = rows.pin()
        fetch.arrived(fetch.groups.index((begin, end)), rows)

    def _wait(self, fetch: _Fetch, g: int) -> _RowParts:
        """Group g of a fetch; a fetch no thread has started yet is run here (no thread hop)."""
        self._run(fetch)
        return fetch.wait(g, self._timeout)

    # -- the device cache (main thread only) ------------------------------------------------
    def _slot_for_new_row(self, keep: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        for victim in self._slots:          # least recently used first
            if victim not in keep:
                return self._slots.pop(victim)
        return None

    def _allocate(self) -> None:
        self._slab = _RowParts.empty(self.capacity, self.fmt, self.dtype, self.device)
        if self.device.type == "cpu":   # map the first slots' pages now, not inside a decode step
            flat = self._slab.values.view(torch.uint8).view(-1)
            flat[:PREFAULT_BYTES].fill_(0)
        self._free = list(range(self.capacity - 1, -1, -1))   # popped from the end: slot 0 first

    def _plan(self, idx: Tensor) -> _Plan:
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
        absent = [t for t in ids if t not in self._slots]
        orphans = [t for t in absent if t not in self._pending]    # evicted since announced, or never announced
        for start in range(0, len(orphans), self._fetch_rows):
            self._start(orphans[start:start + self._fetch_rows])
        by_fetch: dict[int, tuple[_Fetch, list[int]]] = {}
        for t in absent:
            fetch = self._pending.pop(t)
            by_fetch.setdefault(id(fetch), (fetch, []))[1].append(t)
        shape = tuple(idx.shape)
        if len(ids) > self.capacity:       # more than the cache holds: a temporary batch
            table = _RowParts.empty(len(ids), self.fmt, self.dtype, self.device)
            position = {t: i for i, t in enumerate(ids)}
            present = [t for t in ids if t in self._slots]
            if present:
                table.assign(torch.tensor([position[t] for t in present], device=self.device),
                             self._slab.index(torch.tensor([self._slots[t] for t in present], device=self.device)))
            copies = [_Copy(f, torch.tensor([f.index[t] for t in ts]),
                            torch.tensor([position[t] for t in ts], device=self.device), [], set())
                      for f, ts in by_fetch.values()]
            return _Plan(shape, torch.tensor([position[t] for t in flat], device=self.device), copies, table)
        keep = set(ids)
        for t in ids:
            if t in self._slots:
                self._slots.move_to_end(t)
        copies = []
        for fetch, ts in by_fetch.values():
            slots = []
            for t in ts:
                slot = self._slot_for_new_row(keep)
                self._slots[t] = slot
                slots.append(slot)
            rows = None if ts == fetch.ids else torch.tensor([fetch.index[t] for t in ts])
            copies.append(_Copy(fetch, rows, torch.tensor(slots, device=self.device), ts, set()))
        if len(ids) == 1:                  # batch 1 decode: a view per layer, no index tensor
            index: Tensor | int = self._slots[ids[0]]
        else:
            slots = self._slots
            index = torch.tensor([slots[t] for t in flat], device=self.device)
        plan = _Plan(shape, index, copies)
        if copies:
            self._unfinished = plan
        return plan

    def _fill(self, plan: _Plan, layer: int) -> None:
        """Make sure layer's rows of every fetch of the pass are in place (waiting for them)."""
        target = plan.table if plan.table is not None else self._slab
        for copy in plan.copies:
            g = copy.fetch.group_of(layer)
            if g in copy.done:
                continue
            try:
                parts = self._wait(copy.fetch, g)
            except BaseException:
                self._forget(plan)
                raise
            begin, end = copy.fetch.groups[g]
            if isinstance(parts, list):
                self._copy_views(target, parts, copy, begin, end)
                copy.done.add(g)
                continue
            src = (parts if copy.rows is None else parts.index(copy.rows)).to(self.device)
            if self.device.type == "cpu":
                # one memcpy per row: index_put (target[slots, b:e] = ...) went element by element, 3x slower
                for i, slot in enumerate(copy.slots.tolist()):
                    target.values[slot, begin:end].copy_(src.values[i])
                    if target.scales is not None:
                        target.scales[slot, begin:end].copy_(src.scales[i])
            else:   # one kernel for all rows
                target.values[copy.slots, begin:end] = src.values
                if target.scales is not None:
                    target.scales[copy.slots, begin:end] = src.scales
            copy.done.add(g)
        if plan is self._unfinished and all(len(c.done) == len(c.fetch.groups) for c in plan.copies):
            self._unfinished = None

    def _copy_views(self, target: _RowParts, views: list, copy: _Copy, begin: int, end: int) -> None:
        """Rows straight from the received messages into their slots (CPU): one copy per row."""
        values = target.values.view(len(target), -1).view(torch.uint8).numpy()     # bytes of each slot's row
        per_layer = values.shape[1] // self.num_layers
        scales = per_scale = None
        if target.scales is not None:
            scales = target.scales.view(len(target), -1).view(torch.uint8).numpy()
            per_scale = scales.shape[1] // self.num_layers
        rows = range(len(views)) if copy.rows is None else copy.rows.tolist()
        for slot, i in zip(copy.slots.tolist(), rows):
            view = views[i]
            if scales is None:
                values[slot, begin * per_layer:end * per_layer] = np.frombuffer(view, np.uint8)
            else:   # int8: the layers' scales, then their values
                n = (end - begin) * per_scale
                scales[slot, begin * per_scale:end * per_scale] = np.frombuffer(view, np.uint8, count=n)
                values[slot, begin * per_layer:end * per_layer] = np.frombuffer(view, np.uint8, offset=n)

    def _forget(self, plan: _Plan) -> None:
        """A fetch failed: its rows never arrive, so their slots go back (the error is raised)."""
        for copy in plan.copies:
            for t in copy.ids:
                slot = self._slots.pop(t, None)
                if slot is not None:
                    self._free.append(slot)
        if self._unfinished is plan:
            self._unfinished = None

    def _layer(self, plan: _Plan, layer: int) -> Tensor:
        """Rows [B, T, N, D] of one layer for the pass (int8: dequantised to float32)."""
        self._fill(plan, layer)
        b, t = plan.shape
        if plan.table is not None:
            src, index = plan.table, plan.index
        elif isinstance(plan.index, int):
            src, index = self._slab, slice(plan.index, plan.index + 1)
        else:
            src, index = self._slab, plan.index
        if isinstance(index, slice):
            values = src.values[index, layer]
            scales = None if src.scales is None else src.scales[index, layer]
        else:   # index_select of the layer's view copies N x D blocks; values[index, layer] went element by element
            values = src.values[:, layer].index_select(0, index)
            scales = None if src.scales is None else src.scales[:, layer].index_select(0, index)
        if scales is not None:
            values = values.float() * scales.unsqueeze(-1)
        if isinstance(index, slice):
            return values.expand(b * t, self.num_experts, self.hidden_size).reshape(b, t, self.num_experts, self.hidden_size)
        return values.view(b, t, self.num_experts, self.hidden_size)


class _DeferredRows:
    """LayerRows for one forward pass: nothing blocks until layer 0's rows are needed (after its
    attention has been launched), and layer l waits only for the slices of layer l's group."""

    def __init__(self, source: RemoteTable, idx: Tensor) -> None:
        self.source, self.idx = source, idx
        self._plan: _Plan | None = None

    def layer(self, l: int) -> Tensor:
        if self._plan is None:
            self._plan = self.source._plan(self.idx)
        return self.source._layer(self._plan, l)

    def all(self) -> Tensor:
        """Every layer's rows [B, T, L, N, D]."""
        return torch.stack([self.layer(l) for l in range(self.source.num_layers)], dim=2)
