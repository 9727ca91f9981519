"""Row encodings: how one token's [L, N, D] expert outputs become bytes.

The byte layout is the wire contract (see the top of
proto/lutstore/v1/lutstore.proto):  data = body || crc32-LE(body), where body
is the payload, optionally inside one zstd frame. Encoders work on a whole
chunk of rows at once (vectorised), decoders on one stored value or a batch.

Each encoding is one entry of ENCODINGS (an EncodingSpec: payload size, encode, decode, layer
slices, what ingest accepts with it); the rest of this module, the protocol's enum names
(lutstore.formats.protocol) and `lutstore ingest --encoding` read that table, never the encoding.
A new encoding: an Encoding member, its entry here, the proto enum value, the device form
(inference.dequantize.DEVICE_FORMS), the Node codec, the docs.

Error bounds (relative to max|x| of each layer x expert vector, per value):
  fp32: exact; fp16: 2^-11 relative to |x| (plus subnormal floor 2^-24);
  bf16: 2^-8 relative to |x|; int8: 0.5/127 of the vector's max|x|;
  nf4: half the widest code book gap (0.152) of the block's absmax (see lutstore/formats/nf4.py).
"""

from __future__ import annotations

import enum
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Callable
try:  # the same CRC-32, ~10x faster (ISA-L); rows are checked on every read from RocksDB
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; keep working without it
    from zlib import crc32
from dataclasses import dataclass

import numpy as np
import zstandard

from lutstore.formats import nf4

CRC_BYTES = 4
_CRC = struct.Struct("<I")


class ChecksumError(ValueError):
    """A stored row's bytes do not match their checksum."""


class Encoding(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    NF4 = "nf4"


@dataclass(frozen=True)
class RowFormat:
    """Everything needed to encode or decode the rows of one table.

    block_size: values per NF4 block (one scale each); 0 for the other encodings (set so
    whatever was passed), nf4.DEFAULT_BLOCK_SIZE when an NF4 format is made without one."""

    num_layers: int
    num_experts: int
    hidden_size: int
    encoding: Encoding = Encoding.FP16
    zstd: bool = False
    block_size: int = 0

    def __post_init__(self) -> None:
        spec = ENCODINGS[self.encoding]
        if spec.check_block_size is None:
            object.__setattr__(self, "block_size", 0)
            return
        block = self.block_size or spec.default_block_size
        object.__setattr__(self, "block_size", block)
        spec.check_block_size(block, self.hidden_size)

    @property
    def spec(self) -> EncodingSpec:
        return ENCODINGS[self.encoding]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_layers, self.num_experts, self.hidden_size)

    @property
    def values(self) -> int:
        return self.num_layers * self.num_experts * self.hidden_size

    @property
    def vectors(self) -> int:
        return self.num_layers * self.num_experts

    @cached_property
    def payload_bytes(self) -> int:
        """Bytes of one row's payload before compression and checksum."""
        return ENCODINGS[self.encoding].payload_bytes(self)

    @property
    def nf4_layer_bytes(self) -> int:
        """NF4: bytes of one layer's piece of a payload (its fp16 block scales, then its nibbles)."""
        return nf4.layer_bytes(self.num_experts * self.hidden_size, self.block_size)

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
    return ENCODINGS[fmt.encoding].encode(fmt, rows)


def _finite_float32(rows: np.ndarray) -> np.ndarray:
    rows32 = rows.astype(np.float32, copy=False)
    if not np.isfinite(rows32).all():
        raise ValueError("rows contain NaN or infinity; refusing to store them")
    return rows32


def _encode_fp32(fmt: RowFormat, rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(_finite_float32(rows)).reshape(len(rows), -1).view(np.uint8)


def _encode_fp16(fmt: RowFormat, rows: np.ndarray) -> np.ndarray:
    n = rows.shape[0]
    if rows.dtype == np.float16:
        # fp16 in, fp16 out (an official rep checkpoint): no round trip through fp32.
        if not np.isfinite(rows).all():
            raise ValueError("rows contain NaN or infinity; refusing to store them")
        return np.ascontiguousarray(rows, dtype="<f2").reshape(n, -1).view(np.uint8)
    rows32 = _finite_float32(rows)
    if np.abs(rows32).max(initial=0.0) > 65504.0:
        raise ValueError("rows exceed the fp16 range (65504); use --encoding fp32, bf16 or int8")
    return rows32.astype("<f2").reshape(n, -1).view(np.uint8)


def _encode_bf16(fmt: RowFormat, rows: np.ndarray) -> np.ndarray:
    return _bf16_bits(_finite_float32(rows)).astype("<u2").reshape(len(rows), -1).view(np.uint8)


def _encode_nf4(fmt: RowFormat, rows: np.ndarray) -> np.ndarray:
    # fp16 or fp32 in, block by block in cache-sized pieces (nf4.encode checks finiteness)
    return _in_parallel(lambda part: nf4.encode(part.reshape(len(part), fmt.num_layers, -1),
                                                fmt.block_size).reshape(len(part), -1), rows)


def _encode_int8_rows(fmt: RowFormat, rows: np.ndarray) -> np.ndarray:
    return _in_parallel(lambda part: _encode_int8(fmt, part), rows)


ENCODE_THREADS = min(2, os.cpu_count() or 1)
PARALLEL_MIN_VALUES = 1 << 20   # below this a chunk is encoded in the calling thread
_pool: ThreadPoolExecutor | None = None


def _in_parallel(encode: Callable[[np.ndarray], np.ndarray], rows: np.ndarray) -> np.ndarray:
    """encode(rows) with the rows split over ENCODE_THREADS threads: int8 and nf4 encoding are
    numpy/torch passes that release the GIL, and on an idle 2-core host ingest is bound by them."""
    global _pool
    if ENCODE_THREADS < 2 or rows.size < PARALLEL_MIN_VALUES or len(rows) < 2:
        return encode(rows)
    if _pool is None:
        _pool = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="lutstore-encode")
    parts = np.array_split(np.arange(len(rows)), ENCODE_THREADS)
    futures = [_pool.submit(encode, rows[p[0]:p[-1] + 1]) for p in parts if len(p)]
    return np.concatenate([f.result() for f in futures])


INT8_PIECE_VALUES = 1 << 16  # values encoded per step: the temporaries stay in the CPU's cache


def _encode_int8(fmt: RowFormat, rows: np.ndarray) -> np.ndarray:
    """int8: one symmetric scale per (layer, expert) vector (max|x| / 127), stored before the values;
    q = rint(x / scale). Worked on a few vectors at a time: each numpy pass then stays in cache
    (2x the MB/s of whole-chunk passes, which went to DRAM once per temporary)."""
    n, vectors, d = rows.shape[0], fmt.vectors, fmt.hidden_size
    out = np.empty((n, fmt.payload_bytes), dtype=np.uint8)
    scales = out[:, :4 * vectors].view("<f4")                          # [n, vectors]
    values = out[:, 4 * vectors:].view(np.int8).reshape(n, vectors, d)  # a view: splits one axis
    vecs = rows.reshape(n, vectors, d)
    # pieces: whole rows when a row is small, else a few vectors of one row
    rows_per_piece = max(1, INT8_PIECE_VALUES // (vectors * d))
    vecs_per_piece = vectors if vectors * d <= INT8_PIECE_VALUES else max(1, INT8_PIECE_VALUES // d)
    for r in range(0, n, rows_per_piece):
        for v in range(0, vectors, vecs_per_piece):
            piece = (slice(r, r + rows_per_piece), slice(v, v + vecs_per_piece))
            x = vecs[piece].astype(np.float32, copy=False)
            top = np.maximum(x.max(axis=2), -x.min(axis=2))
            top += np.float32(0.0)            # -0.0 (all -0s) -> +0.0, as np.abs gave
            if not np.isfinite(top).all():
                raise ValueError("rows contain NaN or infinity; refusing to store them")
            scale = top / np.float32(127.0)
            scales[piece] = scale
            scale[scale == 0] = 1.0           # an all-zero vector: q = 0, stored scale 0
            q = x / scale[:, :, None]
            np.rint(q, out=q)
            np.clip(q, -127, 127, out=q)      # rounding of top / 127 can put |q| a hair above 127
            values[piece] = q
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
    ENCODINGS[fmt.encoding].decode(fmt, payload, out)
    return out


def _decode_fp32(fmt: RowFormat, payload: bytes | memoryview, out: np.ndarray) -> None:
    out[...] = np.frombuffer(payload, dtype="<f4").reshape(fmt.shape)


def _decode_fp16(fmt: RowFormat, payload: bytes | memoryview, out: np.ndarray) -> None:
    out[...] = np.frombuffer(payload, dtype="<f2").reshape(fmt.shape)


def _decode_bf16(fmt: RowFormat, payload: bytes | memoryview, out: np.ndarray) -> None:
    bits = np.frombuffer(payload, dtype="<u2").astype(np.uint32) << 16
    out[...] = bits.view(np.float32).reshape(fmt.shape)


def _decode_int8(fmt: RowFormat, payload: bytes | memoryview, out: np.ndarray) -> None:
    scales = np.frombuffer(payload, dtype="<f4", count=fmt.vectors)
    q = np.frombuffer(payload, dtype=np.int8, offset=4 * fmt.vectors)
    np.multiply(q.reshape(fmt.vectors, fmt.hidden_size), scales[:, None], out=out.reshape(fmt.vectors, fmt.hidden_size))


def _decode_nf4(fmt: RowFormat, payload: bytes | memoryview, out: np.ndarray) -> None:
    layers = np.frombuffer(payload, dtype=np.uint8).reshape(fmt.num_layers, fmt.nf4_layer_bytes)
    nf4.decode(layers, fmt.block_size, out=out.reshape(fmt.num_layers, -1))


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
    return ENCODINGS[fmt.encoding].slice_parts(fmt, payload, begin, end)


def _layer_major_slice(value_bytes: int) -> Callable[[RowFormat, memoryview, int, int], list[memoryview]]:
    """Slices of a payload that is the values in [L, N, D] order, value_bytes each."""
    def parts(fmt: RowFormat, payload: memoryview, begin: int, end: int) -> list[memoryview]:
        per_layer = value_bytes * fmt.num_experts * fmt.hidden_size
        return [payload[begin * per_layer : end * per_layer]]
    return parts


def _int8_slice(fmt: RowFormat, payload: memoryview, begin: int, end: int) -> list[memoryview]:
    per_layer = fmt.num_experts * fmt.hidden_size
    scales = 4 * fmt.vectors
    return [payload[4 * begin * fmt.num_experts : 4 * end * fmt.num_experts],
            payload[scales + begin * per_layer : scales + end * per_layer]]


def _nf4_slice(fmt: RowFormat, payload: memoryview, begin: int, end: int) -> list[memoryview]:
    # each layer's scales and nibbles are one piece
    return [payload[begin * fmt.nf4_layer_bytes : end * fmt.nf4_layer_bytes]]


def crc_of_parts(parts: list[memoryview]) -> bytes:
    """The CRC-32 trailer (4 bytes LE) of the concatenation of parts."""
    value = 0
    for part in parts:
        value = crc32(part, value)
    return _CRC.pack(value)


# ---- the encodings ------------------------------------------------------------------------

@dataclass(frozen=True)
class EncodingSpec:
    """One row encoding: everything the codec, the protocol and ingest need to know of it."""

    about: str                                                       # for --help, where the name says too little
    payload_bytes: Callable[[RowFormat], int]                        # one row's payload, uncompressed
    encode: Callable[[RowFormat, np.ndarray], np.ndarray]            # rows [n, L, N, D] -> uint8 [n, payload_bytes]
    decode: Callable[[RowFormat, bytes | memoryview, np.ndarray], None]   # one payload -> out float32 [L, N, D]
    slice_parts: Callable[[RowFormat, memoryview, int, int], list[memoryview]]   # layers [begin, end) of a payload
    compressible: bool = True             # ingest accepts --zstd with it
    # blocks of values with a scale each: checks a block size against hidden_size (ValueError), or None
    check_block_size: Callable[[int, int], None] | None = None
    default_block_size: int = 0


ENCODINGS: dict[Encoding, EncodingSpec] = {
    Encoding.FP32: EncodingSpec("", lambda f: 4 * f.values, _encode_fp32, _decode_fp32, _layer_major_slice(4)),
    Encoding.FP16: EncodingSpec("", lambda f: 2 * f.values, _encode_fp16, _decode_fp16, _layer_major_slice(2)),
    Encoding.BF16: EncodingSpec("", lambda f: 2 * f.values, _encode_bf16, _decode_bf16, _layer_major_slice(2)),
    Encoding.INT8: EncodingSpec("", lambda f: 4 * f.vectors + f.values,   # scales, then values
                                _encode_int8_rows, _decode_int8, _int8_slice),
    # Measured (zstd level 3, per row): 0.1% of the demo model's nf4 rows, 2.5% of Gaussian ones; the
    # code book's 16 bins are about equally likely for normal-looking values, so a code carries close
    # to 4 bits. Not worth a decompression per row read, nor a 2nd format.
    Encoding.NF4: EncodingSpec("4-bit NormalFloat codes + one fp16 scale per block, 0.27x of fp16's bytes",
                               lambda f: f.num_layers * f.nf4_layer_bytes, _encode_nf4, _decode_nf4, _nf4_slice,
                               compressible=False, check_block_size=nf4.check_block_size,
                               default_block_size=nf4.DEFAULT_BLOCK_SIZE),
}
