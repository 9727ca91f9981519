"""Rows on the model's device, one entry per encoding: how they are kept and turned into values.

    form = device_form(fmt)        # DeviceForm: dtype, scaled (int8), packed (nf4), dequantize
    values = form.dequantize(kept, scales, fmt)   # one layer's kept rows -> values [..., N, D]

fp32/fp16/bf16 rows are kept as they are stored (dequantize returns them unchanged); int8 rows as
int8 plus one float32 scale per (layer, expert) vector; nf4 rows packed, a layer as its payload
piece, dequantised only for the rows a step gathers. RemoteTable's cache (inference.rowcache)
and the in-process tables (inference.lut) ask this table, never the encoding itself.

NF4 in torch:

A row's NF4 payload is L pieces of codec.RowFormat.nf4_layer_bytes (P) bytes, one per layer
(fp16 block scales, then packed 4-bit codes; see lutstore/formats/nf4.py and the .proto), so a table
or cache can keep rows as uint8 [n, L, P] and dequantise, per layer, only the rows a step needs:

    pieces = rows_u8[:, l].index_select(0, slots)            # [m, P] uint8, any device
    values = dequantize_nf4(pieces, fmt)                      # [m, N, D] float32 (or dtype)

dequantize_nf4 is device-agnostic (CPU and CUDA tensors): one gather of a 256-entry table of
byte -> (low-nibble value, high-nibble value) and one multiply by the block scales. On the CPU in
float32 it is lutstore.formats.nf4.decode, the numpy decoder every client shares: its gather of one int64
word per byte was 2-2.5x faster than torch's index_select at 1-8 rows (18/92/373 vs 41/196/523 us
per 160M-16E layer for 1/8/32 rows), and gives the same bits (the same float32 products).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from lutstore.formats import nf4
from lutstore.formats.codec import Encoding, RowFormat

_PAIRS: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _pairs(device: torch.device, dtype: torch.dtype) -> Tensor:
    """[256, 2]: byte b -> (CODE[b & 15], CODE[b >> 4]) in dtype on device (made once per device)."""
    key = (device, dtype)
    table = _PAIRS.get(key)
    if table is None:
        b = np.arange(256)
        pairs = np.stack([nf4.CODE[b & 0xF], nf4.CODE[b >> 4]], axis=1)
        table = _PAIRS[key] = torch.from_numpy(pairs).to(device=device, dtype=dtype)
    return table


def dequantize_nf4(pieces: Tensor, fmt: RowFormat, dtype: torch.dtype = torch.float32) -> Tensor:
    """One layer's NF4 pieces uint8 [..., P] -> values [..., N, D] in dtype, on pieces' device.
    P = fmt.nf4_layer_bytes: N*D/B float16 scales, then N*D/2 bytes of codes (low nibble first)."""
    if fmt.encoding is not Encoding.NF4:
        raise ValueError(f"dequantize_nf4 needs an nf4 table, not {fmt.encoding.value}")
    n, d, block = fmt.num_experts, fmt.hidden_size, fmt.block_size
    nblocks = n * d // block
    if pieces.dtype != torch.uint8 or pieces.shape[-1] != fmt.nf4_layer_bytes:
        raise ValueError(f"expected uint8 [..., {fmt.nf4_layer_bytes}] layer pieces, got {pieces.dtype} "
                         f"{tuple(pieces.shape)}")
    lead = pieces.shape[:-1]
    flat = pieces.reshape(-1, pieces.shape[-1])
    if flat.device.type == "cpu" and dtype == torch.float32:
        return torch.from_numpy(nf4.decode(flat.numpy(), block)).view(*lead, n, d)
    scales = flat[:, :2 * nblocks].contiguous().view(torch.float16).to(dtype)        # [m, nblocks]
    codes = flat[:, 2 * nblocks:].reshape(-1).long()
    values = _pairs(pieces.device, dtype).index_select(0, codes)                      # [m * N*D/2, 2]
    values = values.view(-1, nblocks, block) * scales.unsqueeze(-1)
    return values.view(*lead, n, d)


def _as_stored(values: Tensor, scales: Tensor | None, fmt: RowFormat, dtype: torch.dtype) -> Tensor:
    return values


def _int8_values(values: Tensor, scales: Tensor | None, fmt: RowFormat, dtype: torch.dtype) -> Tensor:
    return values.float() * scales.unsqueeze(-1)


def _nf4_values(values: Tensor, scales: Tensor | None, fmt: RowFormat, dtype: torch.dtype) -> Tensor:
    return dequantize_nf4(values, fmt, dtype)


@dataclass(frozen=True)
class DeviceForm:
    """How the rows of one encoding are kept on the device, and made values of one layer."""

    dtype: torch.dtype      # of the kept values
    # (kept values [..., N, D] or [..., P], their scales or None, fmt, dtype) -> values [..., N, D]: the
    # stored dtype for fp32/fp16/bf16 (as they are), float32 for int8, dtype for nf4
    dequantize: Callable[[Tensor, Tensor | None, RowFormat, torch.dtype], Tensor]
    scaled: bool = False    # one float32 scale per (layer, expert) kept beside the values
    packed: bool = False    # a layer kept as its payload piece (P = fmt.nf4_layer_bytes bytes), not [N, D]

    def value_shape(self, fmt: RowFormat) -> tuple[int, ...]:
        """A kept row's values: [L, N, D], or [L, P] when packed (a layer's piece, byte for byte)."""
        return (fmt.num_layers, fmt.nf4_layer_bytes) if self.packed else fmt.shape


DEVICE_FORMS: dict[Encoding, DeviceForm] = {
    Encoding.FP32: DeviceForm(torch.float32, _as_stored),
    Encoding.FP16: DeviceForm(torch.float16, _as_stored),
    Encoding.BF16: DeviceForm(torch.bfloat16, _as_stored),
    Encoding.INT8: DeviceForm(torch.int8, _int8_values, scaled=True),
    Encoding.NF4: DeviceForm(torch.uint8, _nf4_values, packed=True),
}


def device_form(fmt: RowFormat) -> DeviceForm:
    return DEVICE_FORMS[fmt.encoding]
