"""RemoteTable's row cache: the device slab with its LRU, the rows of a fetch as they arrive,
and the per-pass plan of which rows go where.

    slab = RowSlab(fmt, capacity, device)     # [capacity, L, N, D] in the stored precision
    slab.slots                                # token id -> slot, least recently used first
    write_rows(target, arrived, rows, slots, begin, end)   # one layer group of a fetch into slots

Rows are kept in their stored precision (fp16/bf16 as is, int8 as int8 plus
one fp32 scale per vector, nf4 packed as uint8 per layer) and written byte for byte: a layer group of a row
is its payload slice (int8: the group's scales, then its values, see the
proto), copied into the slot's bytes of those layers.

Copies to a GPU: the
rows of a layer group are gathered on the fetch's thread into one pinned host
buffer (stage_rows), copied to the device with non_blocking=True on the model
thread's current stream, then scattered into the slab by a kernel on that same
stream. A pinned buffer is never written after it is filled, and DeviceStaging
keeps a reference to it, with a CUDA event recorded right after its copy, until
that event has completed: the buffer cannot be freed or reused (by us or by
torch's pinned-memory cache) while the copy that reads it may still run. The
slab is only read and written by kernels of that one stream, so a slot evicted
and refilled is ordered after the gathers that read its old row.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from inference.dequantize import device_form
from lutstore.formats.codec import RowFormat

MiB = 1 << 20
# A CPU slab's first bytes are written when the table opens, so the slots handed out first (slot 0
# up) do not fault their pages in during a step; bounded so a big budget costs no more at start.
PREFAULT_BYTES = 512 * MiB


def cached_row_bytes(fmt: RowFormat) -> int:
    """Device bytes one cached row takes (values, and int8's scales)."""
    return RowParts.empty(1, fmt, torch.device("meta")).nbytes


class RowParts:
    """Rows as the cache keeps them: `values` [n, L, N, D] in the storage dtype (nf4: uint8
    [n, L, P]), and for int8 `scales` [n, L, N] float32."""

    def __init__(self, values: Tensor, scales: Tensor | None) -> None:
        self.values, self.scales = values, scales

    def __len__(self) -> int:
        return len(self.values)

    @property
    def nbytes(self) -> int:
        n = self.values.numel() * self.values.element_size()
        return n + (0 if self.scales is None else self.scales.numel() * 4)

    def index(self, i: Tensor) -> RowParts:
        return RowParts(self.values[i], None if self.scales is None else self.scales[i])

    def assign(self, i: Tensor, src: RowParts) -> None:
        self.values[i] = src.values
        if self.scales is not None:
            self.scales[i] = src.scales

    def byte_views(self) -> tuple[Tensor, Tensor | None]:
        """uint8 views [n, L * bytes per layer] of the values and the scales (no copies)."""
        values = self.values.flatten(1).view(torch.uint8)
        return values, None if self.scales is None else self.scales.flatten(1).view(torch.uint8)

    @staticmethod
    def empty(n: int, fmt: RowFormat, device: torch.device) -> RowParts:
        """n rows as the cache keeps them: in the stored precision where torch has it (no inflation of
        fp16/bf16 rows), int8 with its scales, nf4 packed (inference.dequantize.DEVICE_FORMS)."""
        form = device_form(fmt)
        scales = torch.empty((n, fmt.num_layers, fmt.num_experts), dtype=torch.float32, device=device) \
            if form.scaled else None
        return RowParts(torch.empty((n, *form.value_shape(fmt)), dtype=form.dtype, device=device), scales)


class RowSlab:
    """The cache: a slab [capacity, L, N, D] allocated whole when the table opens, and an LRU of
    token id -> slot. Main (model) thread only."""

    def __init__(self, fmt: RowFormat, capacity: int, device: torch.device) -> None:
        self.fmt, self.capacity, self.device = fmt, capacity, device
        self.parts = RowParts.empty(capacity, fmt, device)
        if device.type == "cpu":   # map the first slots' pages now, not inside a decode step
            self.parts.values.view(torch.uint8).view(-1)[:PREFAULT_BYTES].fill_(0)
        self.slots: OrderedDict[int, int] = OrderedDict()   # token id -> slot, least recent first
        self._free = list(range(capacity - 1, -1, -1))       # popped from the end: slot 0 first

    def take_slot(self, keep: set[int]) -> int | None:
        """A slot for a new row: a free one, else the least recently used row's not in keep."""
        if self._free:
            return self._free.pop()
        for victim in self.slots:          # least recently used first
            if victim not in keep:
                return self.slots.pop(victim)
        return None

    def forget(self, ids: list[int]) -> None:
        """These rows never arrived: their slots go back."""
        for t in ids:
            slot = self.slots.pop(t, None)
            if slot is not None:
                self._free.append(slot)

    def release(self) -> None:
        """Give the memory back (the table is closed)."""
        self.parts = RowParts.empty(0, self.fmt, self.device)
        self.slots.clear()
        self._free = []


class ArrivingRows:
    """The rows of one fetch, arriving layer group by layer group: group g holds layers
    groups[g] = [begin, end) of every row. Filled by the fetch's thread (arrived / fail), waited
    on by the model's (wait). A group's rows are a list of memoryviews (CPU) or one staged
    uint8 tensor [n, bytes] (stage_rows)."""

    def __init__(self, ids: list[int], groups: list[tuple[int, int]]) -> None:
        self.ids = ids
        self.index = {t: i for i, t in enumerate(ids)}
        self.groups = groups
        self.group_index = {group: g for g, group in enumerate(groups)}
        self._group_of_layer = [g for g, (b, e) in enumerate(groups) for _ in range(b, e)]
        self.rows: list[list[memoryview] | Tensor | None] = [None] * len(groups)
        self.uploaded: dict[int, Tensor] = {}     # group -> its staged rows on the device (model thread)
        self._ready = [threading.Event() for _ in groups]
        self.error: BaseException | None = None
        self.job = None                            # the fetcher's FetchJob

    def group_of(self, layer: int) -> int:
        return self._group_of_layer[layer]

    def arrived(self, g: int, rows: list[memoryview] | Tensor) -> None:
        self.rows[g] = rows
        self._ready[g].set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        for event in self._ready:
            event.set()

    def wait(self, g: int, timeout: float | None = None) -> list[memoryview] | Tensor:
        if not self._ready[g].wait(timeout):
            raise TimeoutError(f"rows {self.ids[:4]}{'...' if len(self.ids) > 4 else ''} did not arrive within {timeout:g} s")
        rows = self.rows[g]
        if rows is None:
            raise self.error if self.error is not None else RuntimeError("fetch ended without rows")
        return rows


@dataclass
class Copy:
    """Rows of one fetch that a forward pass puts into the slab, group by group as they arrive."""

    fetch: ArrivingRows
    rows: Tensor | None           # indices into the fetch's rows (None: all of them, in order)
    slots: Tensor                 # their slab slots (or positions in a temporary batch)
    ids: list[int]
    done: set[int] = field(default_factory=set)


@dataclass
class Plan:
    """One forward pass's rows: where each position's row sits, and the copies still to make."""

    shape: tuple[int, ...]        # [B, T]
    index: Tensor | int           # per position: slab slot (an int: every position the same row)
    copies: list[Copy]
    table: RowParts | None = None   # a temporary batch instead of the slab (more ids than the cache holds)


def stage_rows(views: list[memoryview], nbytes: int, pin: bool) -> Tensor:
    """The rows' bytes in one host tensor [n, nbytes], pinned when pin (for an asynchronous copy to a
    GPU). Runs on the fetch's thread; the buffer is never written again once returned."""
    staged = torch.empty((len(views), nbytes), dtype=torch.uint8, pin_memory=pin)
    out = staged.numpy()
    for i, view in enumerate(views):
        out[i] = np.frombuffer(view, np.uint8)
    return staged


class DeviceStaging:
    """Uploads staged rows to the device and keeps each pinned host buffer alive until the copy that
    reads it has completed (a CUDA event recorded after the copy, on the same stream)."""

    def __init__(self, device: torch.device, non_blocking: bool = True) -> None:
        self.device = device
        # non_blocking=False: every upload waits for its copy (the reference the cuda tests compare with)
        self.non_blocking = non_blocking
        self._in_flight: deque[tuple[torch.cuda.Event, Tensor]] = deque()

    def upload(self, staged: Tensor) -> Tensor:
        if self.device.type != "cuda" or not self.non_blocking:
            return staged.to(self.device)
        while self._in_flight and self._in_flight[0][0].query():   # copies done: their buffers may go
            self._in_flight.popleft()
        on_device = staged.to(self.device, non_blocking=True)
        done = torch.cuda.Event()
        done.record()                      # the current stream: the one the copy was queued on
        self._in_flight.append((done, staged))
        return on_device

    def drain(self) -> None:
        """Wait for every copy in flight (before the buffers are dropped at close)."""
        for done, _ in self._in_flight:
            done.synchronize()
        self._in_flight.clear()


def write_views(target: RowParts, views: list[memoryview], rows: list[int] | range, slots: list[int],
                begin: int, end: int, num_layers: int) -> None:
    """CPU: rows straight from the received messages into their slots, one copy per row (index_put
    on the slab went element by element, 3x slower)."""
    values, scales = (t.numpy() if t is not None else None for t in target.byte_views())
    per_layer = values.shape[1] // num_layers
    per_scale = scales.shape[1] // num_layers if scales is not None else 0
    for slot, i in zip(slots, rows):
        view = views[i]
        if scales is None:
            values[slot, begin * per_layer:end * per_layer] = np.frombuffer(view, np.uint8)
        else:   # int8: the layers' scales, then their values
            n = (end - begin) * per_scale
            scales[slot, begin * per_scale:end * per_scale] = np.frombuffer(view, np.uint8, count=n)
            values[slot, begin * per_layer:end * per_layer] = np.frombuffer(view, np.uint8, offset=n)


def write_staged(target: RowParts, rows: Tensor, slots: Tensor, begin: int, end: int, num_layers: int) -> None:
    """Device: rows [n, bytes] (already on the target's device) into their slots, one kernel per part."""
    values, scales = target.byte_views()
    per_layer = values.shape[1] // num_layers
    if scales is None:
        values[slots, begin * per_layer:end * per_layer] = rows
        return
    per_scale = scales.shape[1] // num_layers
    n = (end - begin) * per_scale
    scales[slots, begin * per_scale:end * per_scale] = rows[:, :n]
    values[slots, begin * per_layer:end * per_layer] = rows[:, n:]
