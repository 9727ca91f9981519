"""NF4 rows in torch: dequantise on the model's device, and an in-process NF4 table.

A row's NF4 payload is L pieces of codec.RowFormat.nf4_layer_bytes (P) bytes, one per layer
(fp16 block scales, then packed 4-bit codes; see lutstore/nf4.py and the .proto), so a table
or cache can keep rows as uint8 [n, L, P] and dequantise, per layer, only the rows a step needs:

    pieces = rows_u8[:, l].index_select(0, slots)            # [m, P] uint8, any device
    values = dequantize_nf4(pieces, fmt)                      # [m, N, D] float32 (or dtype)

dequantize_nf4 is device-agnostic (CPU and CUDA tensors): one gather of a 256-entry table of
byte -> (low-nibble value, high-nibble value) and one multiply by the block scales. On the CPU in
float32 it is lutstore.nf4.decode, the numpy decoder every client shares: its gather of one int64
word per byte was 2-2.5x faster than torch's index_select at 1-8 rows (18/92/373 vs 41/196/523 us
per 160M-16E layer for 1/8/32 rows), and gives the same bits (the same float32 products).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lutstore.formats import nf4
from lutstore.formats.codec import Encoding, RowFormat
from inference.lut import InProcessTable

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


class Nf4Table(InProcessTable):
    """The whole NF4 table in memory as uint8 [V, L, P] (0.27x of fp16's bytes): rows(idx) gives
    LayerRows whose layer(l) gathers layer l's pieces of idx and dequantises only those, on the
    table's device: the in-process ceiling an NF4 RemoteTable is compared with (like with like)."""

    def __init__(self, packed: Tensor, fmt: RowFormat, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if fmt.encoding is not Encoding.NF4:
            raise ValueError(f"Nf4Table needs an nf4 format, not {fmt.encoding.value}")
        if packed.dtype != torch.uint8 or packed.ndim != 3 or tuple(packed.shape[1:]) != (fmt.num_layers, fmt.nf4_layer_bytes):
            raise ValueError(f"packed must be uint8 [V, {fmt.num_layers}, {fmt.nf4_layer_bytes}], got "
                             f"{packed.dtype} {tuple(packed.shape)}")
        self.table, self.fmt, self.dtype = packed.to(device), fmt, dtype
        self.vocab_size = packed.shape[0]
        self.num_layers, self.num_experts, self.hidden_size = fmt.shape

    def rows(self, idx: Tensor) -> _Nf4Layers:
        return _Nf4Layers(self, idx)

    def gather(self, idx: Tensor) -> Tensor:
        return _Nf4Layers(self, idx).all()

    @classmethod
    def from_client(cls, client, table: str, version: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> Nf4Table:
        """Download every row of a served nf4 table, kept packed; layers dequantise to dtype."""
        info = client.info(table, version)
        fmt = client.row_format(info)
        step = max(1, min(int(info.max_batch_rows) or 1024, (64 << 20) // max(1, int(info.row_bytes))))
        packed = torch.empty((int(info.vocab_size), fmt.num_layers, fmt.nf4_layer_bytes), dtype=torch.uint8)
        for s in range(0, info.vocab_size, step):
            ids, payloads = client.get_payloads(table, range(s, min(s + step, info.vocab_size)), info.version)
            packed[s:s + len(ids)] = torch.from_numpy(payloads).view(len(ids), fmt.num_layers, fmt.nf4_layer_bytes)
        return cls(packed, fmt, device, dtype)


class _Nf4Layers:
    """LayerRows of an Nf4Table: layer l = its pieces of the rows idx names, dequantised."""

    def __init__(self, table: Nf4Table, idx: Tensor) -> None:
        self.t, self.shape = table, tuple(idx.shape)
        self.flat = idx.reshape(-1).to(table.table.device)

    def layer(self, l: int) -> Tensor:
        pieces = self.t.table[:, l].index_select(0, self.flat)
        return dequantize_nf4(pieces, self.t.fmt, self.t.dtype).view(*self.shape, self.t.num_experts, self.t.hidden_size)

    def all(self) -> Tensor:
        return torch.stack([self.layer(l) for l in range(self.t.num_layers)], dim=len(self.shape))
