"""NF4 (4-bit NormalFloat, QLoRA) rows in numpy: the code book, encode and decode.

Payload of one row (the wire contract, see proto/lutstore/v1/lutstore.proto):
for each layer l in order, one piece of layer_bytes(N*D, B) bytes:
    N*D/B  x float16 LE   block scales: absmax of each block of B consecutive values
                          (blocks in the row's flat order expert, hidden), rounded to fp16
    N*D/2  x uint8        the 4-bit codes, two per byte: value 2k in the LOW nibble,
                          value 2k+1 in the HIGH nibble
    value = CODE[q] * scale
so a slice of layers [b, e) is the one contiguous byte range [b, e) * layer_bytes.

Encoding (deterministic): s = fp16(absmax) of the block; y = x / s in float32 (s = 0: y = 0, so
a block of zeros stays zeros, and decodes to zeros); q = the number of code book midpoints
(CODE[k] + CODE[k+1]) / 2, computed in float32, that are < y: the nearest code, a tie (y exactly
on a midpoint) going to the LOWER code. |y| may exceed 1 by fp16's rounding of absmax: it maps to
code 0 or 15, still the nearest. Blocks whose absmax is below fp16's normal range (6.1e-5) get a
coarser (subnormal) scale, and below 3e-8 scale 0 (zeros back): ERROR_BOUND holds above that range.

Speed: a midpoint binary search (np.searchsorted) ran at 40 ns a value. Instead a uniform grid of
GRID cells over [-1, 1] (each cell narrower than the closest two midpoints, so it holds at most
one) gives, per cell, the code at its left edge and the midpoint inside it: q = low[cell] +
(y > mid[cell]), two small-table gathers. Each chunk is encoded PIECE_VALUES (whole layers) at a
time: 2^18 values (1 MB of float32 per temporary) measured 539 MB/s on one thread and 659 MB/s on
codec's two encode threads, against 351 and 240 MB/s at 2^15 (per-pass overhead, and the two
threads contending for the GIL between many small passes); torch does the fp16 -> fp32
conversion and block absmax (numpy's are 4x slower), numpy the rest (torch's gathers were slower).
"""

from __future__ import annotations

import warnings

import numpy as np

DEFAULT_BLOCK_SIZE = 64
# bitsandbytes' NF4 code book (QLoRA, Dettmers et al. 2023), ascending.
CODE = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230850219727, 0.33791524171829224,
                 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
MIDPOINTS = ((CODE[1:] + CODE[:-1]) / np.float32(2)).astype(np.float32)   # 15, ascending
# Largest |x - decode(encode(x))| relative to the block's absmax: half the widest code gap
# (between -1 and -0.696), plus fp16's rounding of the scale.
ERROR_BOUND = float((CODE[1] - CODE[0]) / 2) * (1 + 2.0**-10)

GRID = 1024
PIECE_VALUES = 1 << 18
_EDGES = (-1.0 + 2.0 * np.arange(GRID + 1) / GRID).astype(np.float32)          # cell c = [edge c, edge c+1)
_LOW = np.searchsorted(MIDPOINTS, _EDGES, side="left").astype(np.uint8)      # code of the cell's left edge
_CELL_MID = np.append(MIDPOINTS, np.float32(np.inf)).astype(np.float32)[_LOW]  # the midpoint in the cell (or inf)
assert np.all(np.diff(MIDPOINTS) > 2.0 / GRID), "a grid cell must hold at most one midpoint"
# Byte -> its two values (low nibble first), for decoding one gather per byte; seen as one int64 word
# a byte, so that gather is np.take of 8-byte words indexed by the uint8 codes as they are (2-2.5x
# faster than fancy indexing of the [256, 2] table or torch's index_select, and the same values).
_PAIRS = np.stack([CODE[np.arange(256) & 0xF], CODE[np.arange(256) >> 4]], axis=1).astype(np.float32)
_PAIR_WORDS = _PAIRS.view(np.int64).reshape(256)


def check_block_size(block: int, hidden_size: int) -> None:
    """ValueError (one line) unless block is a positive even number dividing hidden_size."""
    if block <= 0 or block % 2 or hidden_size % block:
        raise ValueError(f"nf4 block size {block} must be a positive even number that divides "
                         f"hidden_size {hidden_size}")


def layer_bytes(layer_values: int, block: int) -> int:
    """Bytes of one layer's piece: its fp16 scales, then its packed codes."""
    return 2 * (layer_values // block) + layer_values // 2


def encode(rows: np.ndarray, block: int) -> np.ndarray:
    """rows [n, L, V] (V = N*D values of a layer; float16/32/64) -> payloads uint8 [n, L, layer_bytes].
    ValueError for non-finite values or a block absmax beyond fp16's 65504."""
    n, num_layers, v = rows.shape
    nblocks = v // block
    out = np.empty((n * num_layers, layer_bytes(v, block)), dtype=np.uint8)
    scales = out[:, :2 * nblocks].view("<f2")                          # [n*L, nblocks]
    codes = out[:, 2 * nblocks:]                                       # [n*L, V/2]
    import torch  # only ingest encodes; the server and clients decode with numpy and need no torch

    layers = _as_tensor(rows.reshape(n * num_layers, v))
    step = max(1, PIECE_VALUES // v)                                   # layers per piece
    half_grid = np.float32(GRID / 2)
    for first in range(0, len(layers), step):
        # torch for the fp16 -> fp32 conversion and the block absmax (vectorised: 4x numpy's)
        x = layers[first:first + step].float().view(-1, block)
        top = x.abs().amax(dim=1)                                      # -0.0 blocks give +0.0
        largest = float(top.max())                                     # NaN if any value is NaN
        if not np.isfinite(largest):
            raise ValueError("rows contain NaN or infinity; refusing to store them")
        if largest > 65504.0:
            raise ValueError("a block's absmax exceeds the fp16 range (65504) of nf4 scales; "
                             "use --encoding fp32 or bf16")
        s16 = top.half()
        scales[first:first + step] = s16.numpy().reshape(-1, nblocks)
        s = s16.float()
        s[s == 0] = 1.0                                                # zeros (or below fp16) -> y = 0 exactly
        y = (x / s[:, None]).numpy().reshape(-1)
        cell = y * half_grid
        cell += half_grid
        cell = cell.astype(np.intp)
        # mode="clip": |y| > 1 (fp16 rounded absmax down) lands in cell 0 or GRID, whose codes are 0 and 15
        q = np.take(_LOW, cell, mode="clip")
        q += y > np.take(_CELL_MID, cell, mode="clip")
        pairs = q.reshape(-1, 2)
        packed = pairs[:, 1] << 4
        packed |= pairs[:, 0]
        codes[first:first + step] = packed.reshape(-1, v // 2)
    return out.reshape(n, num_layers, -1)


def _as_tensor(a: np.ndarray) -> "torch.Tensor":
    """A torch view of a (possibly read-only: never written) array."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # "the given NumPy array is not writable"
        return torch.from_numpy(np.ascontiguousarray(a))


def decode(layers: np.ndarray, block: int, out: np.ndarray | None = None) -> np.ndarray:
    """Pieces uint8 [..., layer_bytes] -> float32 [..., V] (into out when given)."""
    size = layers.shape[-1]
    v = size * 2 * block // (4 + block)            # layer_bytes = V (2 / B + 1 / 2)
    nblocks = v // block
    lead = layers.shape[:-1]
    flat = layers.reshape(-1, size)
    scales = np.ascontiguousarray(flat[:, :2 * nblocks]).view("<f2").astype(np.float32)   # [m, nblocks]
    values = np.take(_PAIR_WORDS, flat[:, 2 * nblocks:]).view(np.float32).reshape(-1, nblocks, block)
    if out is None:
        values *= scales[:, :, None]
        return values.reshape(*lead, v)
    np.multiply(values, scales[:, :, None], out=out.reshape(-1, nblocks, block))
    return out
