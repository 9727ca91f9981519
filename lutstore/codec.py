"""Row encodings: how one token's [L, N, D] expert outputs become bytes.

The byte layout is the wire contract (see the top of
proto/lutstore/v1/lutstore.proto):  data = body || crc32-LE(body), where body
is the payload, optionally inside one zstd frame. Encoders work on a whole
chunk of rows at once (vectorised), decoders on one stored value or a batch.

Error bounds (relative to max|x| of each layer x expert vector, per value):
  fp32: exact; fp16: 2^-11 relative to |x| (plus subnormal floor 2^-24);
  bf16: 2^-8 relative to |x|; int8: 0.5/127 of the vector's max|x|.
"""

from __future__ import annotations

import enum
import struct
try:  # the same CRC-32, ~10x faster (ISA-L); rows are checked on every read from RocksDB
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; keep working without it
    from zlib import crc32
from dataclasses import dataclass

import numpy as np
import zstandard

CRC_BYTES = 4
_CRC = struct.Struct("<I")


class ChecksumError(ValueError):
    """A stored row's bytes do not match their checksum."""


class Encoding(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


@dataclass(frozen=True)
class RowFormat:
    """Everything needed to encode or decode the rows of one table."""

    num_layers: int
    num_experts: int
    hidden_size: int
    encoding: Encoding = Encoding.FP16
    zstd: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_layers, self.num_experts, self.hidden_size)

    @property
    def values(self) -> int:
        return self.num_layers * self.num_experts * self.hidden_size

    @property
    def vectors(self) -> int:
        return self.num_layers * self.num_experts

    @property
    def payload_bytes(self) -> int:
        """Bytes of one row's payload before compression and checksum."""
        if self.encoding is Encoding.FP32:
            return 4 * self.values
        if self.encoding in (Encoding.FP16, Encoding.BF16):
            return 2 * self.values
        return 4 * self.vectors + self.values  # int8: scales, then values

    @property
    def stored_bytes(self) -> int | None:
        """Bytes of one stored row, when fixed (no compression)."""
        return None if self.zstd else self.payload_bytes + CRC_BYTES


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round-to-nearest-even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


def encode_payloads(fmt: RowFormat, rows: np.ndarray) -> np.ndarray:
    """Encode rows [n, L, N, D] (any float dtype) into payloads, uint8 [n, payload_bytes]."""
    rows = np.asarray(rows)
    if rows.ndim != 4 or rows.shape[1:] != fmt.shape:
        raise ValueError(f"rows have shape {rows.shape}, expected [n, {fmt.num_layers}, {fmt.num_experts}, {fmt.hidden_size}]")
    n = rows.shape[0]
    if rows.dtype == np.float16 and fmt.encoding is Encoding.FP16:
        # fp16 in, fp16 out (an official rep checkpoint): no round trip through fp32.
        if not np.isfinite(rows).all():
            raise ValueError("rows contain NaN or infinity; refusing to store them")
        return np.ascontiguousarray(rows, dtype="<f2").reshape(n, -1).view(np.uint8)
    rows32 = rows.astype(np.float32, copy=False)
    if not np.isfinite(rows32).all():
        raise ValueError("rows contain NaN or infinity; refusing to store them")
    if fmt.encoding is Encoding.FP32:
        return np.ascontiguousarray(rows32).reshape(n, -1).view(np.uint8)
    if fmt.encoding is Encoding.FP16:
        if np.abs(rows32).max(initial=0.0) > 65504.0:
            raise ValueError("rows exceed the fp16 range (65504); use --encoding fp32, bf16 or int8")
        return rows32.astype("<f2").reshape(n, -1).view(np.uint8)
    if fmt.encoding is Encoding.BF16:
        return _bf16_bits(rows32).astype("<u2").reshape(n, -1).view(np.uint8)
    # int8: one symmetric scale per (layer, expert) vector, stored before the values.
    vecs = rows32.reshape(n, fmt.vectors, fmt.hidden_size)
    scales = np.abs(vecs).max(axis=2) / 127.0
    safe = np.where(scales > 0, scales, 1.0)
    q = np.clip(np.rint(vecs / safe[:, :, None]), -127, 127).astype(np.int8)
    out = np.empty((n, fmt.payload_bytes), dtype=np.uint8)
    out[:, : 4 * fmt.vectors] = scales.astype("<f4").view(np.uint8)
    out[:, 4 * fmt.vectors :] = q.reshape(n, -1).view(np.uint8)
    return out


def seal(body: bytes) -> bytes:
    """Append the CRC-32 trailer."""
    return body + _CRC.pack(crc32(body))


def encode_rows(fmt: RowFormat, rows: np.ndarray, compressor: zstandard.ZstdCompressor | None = None) -> list[bytes]:
    """Encode rows [n, L, N, D] into stored values (body || crc32), one per row."""
    payloads = encode_payloads(fmt, rows)
    if fmt.zstd:
        compressor = compressor or zstandard.ZstdCompressor(level=3)
        return [seal(compressor.compress(p.tobytes())) for p in payloads]
    # One buffer for the whole chunk, checksums written in place: one copy per row (tobytes).
    n, size = payloads.shape
    sealed = np.empty((n, size + CRC_BYTES), dtype=np.uint8)
    sealed[:, :size] = payloads
    crcs = np.fromiter((crc32(row) for row in sealed[:, :size]), dtype="<u4", count=n)
    sealed[:, size:] = crcs.view(np.uint8).reshape(n, CRC_BYTES)
    return [row.tobytes() for row in sealed]


def check(value: bytes | memoryview) -> memoryview:
    """Verify a stored value's checksum and return its body (no copy)."""
    view = memoryview(value)
    if len(view) < CRC_BYTES:
        raise ChecksumError(f"stored row is {len(view)} bytes, shorter than its checksum")
    body = view[:-CRC_BYTES]
    (expected,) = _CRC.unpack(view[-CRC_BYTES:])
    if crc32(body) != expected:
        raise ChecksumError("row checksum mismatch")
    return body


def payload_of(fmt: RowFormat, value: bytes | memoryview, verify: bool = True) -> memoryview:
    """The uncompressed payload of one stored value."""
    body = check(value) if verify else memoryview(value)[:-CRC_BYTES]
    if fmt.zstd:
        body = memoryview(zstandard.ZstdDecompressor().decompress(body, max_output_size=fmt.payload_bytes))
    if len(body) != fmt.payload_bytes:
        raise ChecksumError(f"row payload is {len(body)} bytes, expected {fmt.payload_bytes}")
    return body


def decode_payload(fmt: RowFormat, payload: bytes | memoryview, out: np.ndarray | None = None) -> np.ndarray:
    """Decode one payload into float32 [L, N, D] (into `out` when given)."""
    if out is None:
        out = np.empty(fmt.shape, dtype=np.float32)
    if fmt.encoding is Encoding.FP32:
        out[...] = np.frombuffer(payload, dtype="<f4").reshape(fmt.shape)
    elif fmt.encoding is Encoding.FP16:
        out[...] = np.frombuffer(payload, dtype="<f2").reshape(fmt.shape)
    elif fmt.encoding is Encoding.BF16:
        bits = np.frombuffer(payload, dtype="<u2").astype(np.uint32) << 16
        out[...] = bits.view(np.float32).reshape(fmt.shape)
    else:
        scales = np.frombuffer(payload, dtype="<f4", count=fmt.vectors)
        q = np.frombuffer(payload, dtype=np.int8, offset=4 * fmt.vectors)
        np.multiply(q.reshape(fmt.vectors, fmt.hidden_size), scales[:, None], out=out.reshape(fmt.vectors, fmt.hidden_size))
    return out


def decode_row(fmt: RowFormat, value: bytes | memoryview, verify: bool = True) -> np.ndarray:
    """Stored value -> float32 [L, N, D]."""
    return decode_payload(fmt, payload_of(fmt, value, verify))


def decode_rows(fmt: RowFormat, values: list[bytes], verify: bool = True) -> np.ndarray:
    """Stored values -> float32 [n, L, N, D]."""
    out = np.empty((len(values), *fmt.shape), dtype=np.float32)
    for i, value in enumerate(values):
        decode_payload(fmt, payload_of(fmt, value, verify), out=out[i])
    return out


# ---- layer slices (BatchGetRequest.layer_ends) -------------------------------------------

def check_layer_ends(fmt: RowFormat, layer_ends: list[int]) -> list[tuple[int, int]]:
    """The layer groups [(begin, end), ...] that layer_ends describe; ValueError naming the rule
    when they do not strictly increase from >= 1 up to exactly num_layers."""
    if not layer_ends:
        raise ValueError("layer_ends is empty")
    if layer_ends[-1] != fmt.num_layers:
        raise ValueError(f"layer_ends must end at num_layers={fmt.num_layers}, got {layer_ends[-1]}")
    groups, begin = [], 0
    for end in layer_ends:
        if end <= begin:
            raise ValueError(f"layer_ends must strictly increase from >= 1, got {list(layer_ends)}")
        groups.append((begin, end))
        begin = end
    return groups


def slice_payload_bytes(fmt: RowFormat, begin: int, end: int) -> int:
    """Bytes of one row's payload restricted to layers [begin, end)."""
    return fmt.payload_bytes * (end - begin) // fmt.num_layers


def slice_parts(fmt: RowFormat, payload: memoryview, begin: int, end: int) -> list[memoryview]:
    """The payload restricted to layers [begin, end), as views into payload whose concatenation
    is the slice (one view; int8: the layers' scales, then their values)."""
    per_layer = fmt.num_experts * fmt.hidden_size
    if fmt.encoding is Encoding.INT8:
        scales = 4 * fmt.vectors
        return [payload[4 * begin * fmt.num_experts : 4 * end * fmt.num_experts],
                payload[scales + begin * per_layer : scales + end * per_layer]]
    size = 4 if fmt.encoding is Encoding.FP32 else 2
    return [payload[size * begin * per_layer : size * end * per_layer]]


def crc_of_parts(parts: list[memoryview]) -> bytes:
    """The CRC-32 trailer (4 bytes LE) of the concatenation of parts."""
    value = 0
    for part in parts:
        value = crc32(part, value)
    return _CRC.pack(value)
