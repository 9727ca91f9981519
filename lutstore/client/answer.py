"""The client's rules for an answer, in one place for every transport (a BatchGet call, a
BatchGetStream session, BatchGetShared through shared memory); when to ask again is
lutstore.client.retry's.

  - read_message: decode one BatchGet answer message (lutstore.formats.wire) and check it answers
    the version and layer groups asked for.
  - row_payload: a row's payload, its CRC-32 checked.
  - RowsAnswer: one request's answer assembled layer group by layer group.

A broken contract raises AnswerError (a status code and a reason); each transport turns it
into a LutError that names the server.
"""

from __future__ import annotations

from typing import Callable

import grpc
import numpy as np

from lutstore.formats import codec, wire
from lutstore.errors import LutError

# on_group(begin, end, ids, payloads): every distinct id's part of layers [begin, end)
OnGroup = Callable[[int, int, np.ndarray, "np.ndarray | list[memoryview]"], None]


class AnswerError(Exception):
    """An answer that breaks the contract (rows not asked for, wrong sizes, corrupt bytes)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        super().__init__(message)

    def named(self, address: str) -> LutError:
        return LutError(self.code, f"{self} (from {address})")


# ---- one message ------------------------------------------------------------------------------

def read_message(message: bytes, name: str, version: int, groups: list[tuple[int, int]] | None = None
                 ) -> tuple[int, int, list[tuple[int, memoryview]]]:
    """(layer_begin, layer_end, [(token_id, data)]) of one BatchGet answer message, data a view
    into it. groups: the layer groups asked for (layer-sliced rows), None for whole rows."""
    try:
        got_version, begin, end, rows = wire.decode_sliced_response(message)
    except wire.WireError as e:
        raise AnswerError(grpc.StatusCode.INTERNAL, f"malformed BatchGet response: {e}") from None
    if got_version != version:
        raise AnswerError(grpc.StatusCode.INTERNAL, f"asked {name!r} v{version}, got rows of v{got_version}")
    asked = begin in {b for b, _ in groups} and end > begin if groups else begin == 0
    if not asked:
        raise AnswerError(grpc.StatusCode.INTERNAL, f"answered layers [{begin}, {end}), not asked for")
    return begin, end, rows


def row_payload(fmt: codec.RowFormat, token: int, data: memoryview, verify: bool = True) -> memoryview:
    """The payload of a whole row as received (a view when uncompressed), its CRC checked when verify."""
    try:
        return codec.payload_of(fmt, data, verify=verify)
    except codec.ChecksumError as e:
        raise AnswerError(grpc.StatusCode.DATA_LOSS, f"row {token} arrived corrupt: {e}") from None


# ---- one request's answer ------------------------------------------------------------------------

def check_request_ids(ids: list[int]) -> None:
    """ValueError for a request no answer can complete: no ids, or an id asked twice (the daemon
    sends each distinct id once, so the answer would wait forever for the repeat). Callers with
    repeats deduplicate first (LutClient.get_rows does, and fans the rows back out)."""
    if len(ids) == 0:
        raise ValueError("no token ids: give at least one")
    if len(set(ids)) != len(ids):
        seen: set[int] = set()
        repeat = next(t for t in ids if t in seen or seen.add(t))
        raise ValueError(f"token id {repeat} is asked for more than once: a request's ids must be distinct "
                         f"(LutClient.get_rows accepts repeats)")


class RowsAnswer:
    """One BatchGet answer being assembled: on_group(begin, end, ids, payloads) is called once per
    layer group, in layer order, as soon as every distinct id's part of it has arrived (ids int64
    [n] ascending; payloads uint8 [n, bytes]: whole rows' payloads (decompressed) when layer_ends
    is empty, else each row's slice of layers [begin, end), see the proto). views=True: payloads
    is instead a list of n read-only memoryviews into the received messages (checked, not copied),
    for a consumer that copies each row straight to where it goes."""

    def __init__(self, fmt: codec.RowFormat, ids: list[int], layer_ends: list[int], on_group: OnGroup,
                 verify: bool = True, views: bool = False) -> None:
        self.fmt, self.ids, self.layer_ends, self.on_group, self.verify = fmt, ids, layer_ends, on_group, verify
        self.views = views
        check_request_ids(ids)
        self.groups = codec.check_layer_ends(fmt, layer_ends) if layer_ends else [(0, fmt.num_layers)]
        self._index = {t: i for i, t in enumerate(ids)}
        self._ids = np.array(ids, dtype=np.int64)
        self._sizes = {b: codec.slice_payload_bytes(fmt, b, e) for b, e in self.groups}
        self._bufs: dict[int, np.ndarray | list] = {
            b: [None] * len(ids) if views else np.empty((len(ids), self._sizes[b]), dtype=np.uint8) for b, _ in self.groups}
        self._got: dict[int, set[int]] = {b: set() for b, _ in self.groups}
        self._delivered = 0

    @property
    def complete(self) -> bool:
        return self._delivered == len(self.groups)

    @property
    def slices_received(self) -> int:
        return sum(len(s) for s in self._got.values())

    def add(self, begin: int, end: int, token: int, data: memoryview) -> None:
        """One row's (slice's) bytes as received; a repeat of one already received is ignored."""
        got = self._got.get(begin)
        row = self._index.get(token)
        if got is None or row is None or (self.layer_ends and (begin, end) not in self.groups):
            raise AnswerError(grpc.StatusCode.INTERNAL, f"received row {token} layers [{begin}, {end}), not asked for")
        if row in got:
            return
        if self.layer_ends:
            try:
                body = codec.check(data) if self.verify else data[: -codec.CRC_BYTES]
            except codec.ChecksumError as e:
                raise AnswerError(grpc.StatusCode.DATA_LOSS, f"row {token} arrived corrupt: {e}") from None
        else:
            body = row_payload(self.fmt, token, data, self.verify)
        if len(body) != self._sizes[begin]:
            raise AnswerError(grpc.StatusCode.INTERNAL, f"row {token} layers [{begin}, {end}) is {len(body)} bytes, "
                                                        f"expected {self._sizes[begin]}")
        if self.views:
            self._bufs[begin][row] = body
        else:
            self._bufs[begin][row] = np.frombuffer(body, dtype=np.uint8)
        got.add(row)
        while self._delivered < len(self.groups):
            b, e = self.groups[self._delivered]
            if len(self._got[b]) < len(self.ids):
                break
            self._delivered += 1
            self.on_group(b, e, self._ids, self._bufs[b])
