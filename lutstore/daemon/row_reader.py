"""How the daemon reads the rows of an answer: under the response budget, the next part read ahead.

BatchGet (whole rows or layer slices) and BatchGetShared read through one RowReader. Each part
of an answer (a message, a block of rows) takes what it will cost from the response budget
before its rows are read, and gives it back once the caller has sent or written it, so the
daemon's memory stays bounded under any load; while the caller sends part k, part k+1 is read
on a read-ahead thread (the multi-get and the CRC checks release the GIL) when the budget has
room for it then. A part that cannot get its bytes within the budget's wait ends the call
RESOURCE_EXHAUSTED. Read errors are the caller's to map (read_status.abort_on_read_errors).
"""

from __future__ import annotations

from concurrent import futures
from typing import Callable, Iterator, TypeVar

import grpc

from lutstore.daemon.budget import BudgetExhausted, ByteBudget
from lutstore.daemon.rows import RowSource
from lutstore.formats import codec, wire
from lutstore.storage.model import TableMeta

T = TypeVar("T")

READ_AHEAD_THREADS = 8   # calls whose next part is read ahead at once; more wait their turn
MESSAGE_TARGET_BYTES = 4 << 20   # rows per BatchGetResponse: a few MiB, well below the limit
SLICED_BLOCK_BYTES = 32 << 20    # layer-sliced BatchGet: rows read (and held) at once per block
ZSTD_FRAME_SLACK = 64            # a zstd frame of incompressible data is at most a few bytes longer


def row_bound(meta: TableMeta) -> int:
    """The most bytes one stored row of the table takes."""
    fmt = meta.row_format()
    return fmt.stored_bytes or fmt.payload_bytes + ZSTD_FRAME_SLACK + codec.CRC_BYTES


class RowReader:
    def __init__(self, rows: RowSource, budget: ByteBudget, max_message_bytes: int,
                 read_ahead_threads: int = READ_AHEAD_THREADS) -> None:
        self.rows = rows
        self.budget = budget
        self.message_target = max(1, min(MESSAGE_TARGET_BYTES, max_message_bytes // 2))
        self._read_ahead = futures.ThreadPoolExecutor(max_workers=read_ahead_threads,
                                                      thread_name_prefix="lutstore-prefetch")

    def take(self, n: int, context: grpc.ServicerContext) -> int:
        """n bytes of the budget (waiting for them), or the call ends RESOURCE_EXHAUSTED."""
        try:
            return self.budget.take(n)
        except BudgetExhausted as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry later")
            raise AssertionError("unreachable")

    def in_parts(self, meta: TableMeta, parts: list[list[int]], cost: Callable[[list[int]], int],
                 read: Callable[[TableMeta, list[int]], T], context: grpc.ServicerContext) -> Iterator[T]:
        """read(meta, part) of each part of ids in order, each holding cost(part) bytes of the budget
        from before it is read until the caller asks for the next one (or stops); part k+1 is read
        ahead while the caller uses part k, when the budget has room for it then."""
        budget = self.budget
        pending: futures.Future | None = None
        held = pending_held = 0
        try:
            held = self.take(cost(parts[0]), context)
            got = read(meta, parts[0])
            for k in range(len(parts)):
                if k + 1 < len(parts):
                    pending_held = budget.try_take(cost(parts[k + 1])) or 0
                    pending = self._read_ahead.submit(read, meta, parts[k + 1]) if pending_held else None
                yield got
                budget.give(held)
                held = 0
                if k + 1 < len(parts):
                    if pending is not None:
                        got, held, pending, pending_held = pending.result(), pending_held, None, 0
                    else:
                        held = self.take(cost(parts[k + 1]), context)
                        got = read(meta, parts[k + 1])
        finally:
            budget.give(held)
            if pending is not None:   # abandoned mid-way: its bytes are free once it has finished
                pending.add_done_callback(lambda _f, n=pending_held: budget.give(n))

    def whole_rows(self, meta: TableMeta, ids: list[int], context: grpc.ServicerContext) -> Iterator[bytes]:
        """BatchGet's answer in whole stored rows, messages of a few MiB. Each message costs three
        times its bytes (the rows read, the joined message, gRPC's copy while it sends)."""
        bound = row_bound(meta)
        per_message = max(1, self.message_target // bound)
        parts = [ids[start : start + per_message] for start in range(0, len(ids), per_message)]
        yield from self.in_parts(meta, parts, lambda part: 3 * len(part) * bound, self._message, context)

    def _message(self, meta: TableMeta, ids: list[int]) -> bytes:
        # One copy of the rows into the message; protobuf objects would cost three (see wire.py).
        return wire.encode_response(ids, self.rows.rows(meta, ids), meta.version)

    def layer_slices(self, meta: TableMeta, ids: list[int], groups: list[tuple[int, int]],
                     context: grpc.ServicerContext) -> Iterator[bytes]:
        """BatchGet's layer-sliced answer: per block of rows, every row's slice of layer group 0, then
        of group 1, ... (wire.sliced_responses). The first message (the first layers of every row)
        leaves as soon as the block is read, so the client's first layers can run while the later
        slices are still on their way. A block holds its stored values and payloads, and a message
        with gRPC's copy of it."""
        fmt = meta.row_format()
        block_rows = max(1, SLICED_BLOCK_BYTES // fmt.payload_bytes)
        for start in range(0, len(ids), block_rows):
            block = ids[start : start + block_rows]
            held = self.take(2 * len(block) * row_bound(meta) + 2 * self.message_target, context)
            try:
                values = self.rows.rows(meta, block)
                # RowSource hands out checked rows only; payload_of just strips the CRC (and unzips).
                payloads = [codec.payload_of(fmt, v, verify=False) for v in values]
                yield from wire.sliced_responses(fmt, meta.version, block, payloads, groups, self.message_target)
            finally:
                self.budget.give(held)

    def close(self) -> None:
        self._read_ahead.shutdown(wait=True)
