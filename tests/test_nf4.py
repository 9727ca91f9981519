"""NF4 rows: the byte layout documented in the .proto and docs/writing-a-client.md, the nearest-code
rule, determinism, the torch dequantisation, and NF4 tables served whole and layer-sliced by a real
daemon (with a stored row of the wrong length answered DATA_LOSS)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from rocksdict import Options, Rdict

from conftest import write_table
from inference.lut import InProcessTable
from inference.dequantize import dequantize_nf4
from inference.lut import PackedTable
from lutstore.formats import nf4
from lutstore.cli import main as cli_main
from lutstore.client import LutClient
from lutstore.formats.codec import (CRC_BYTES, Encoding, RowFormat, decode_row, decode_rows, encode_payloads, encode_rows,
                            seal, slice_parts)
from lutstore.errors import LutError
from lutstore.storage.rocksdb import row_key

# The code book as issue 14 (and bitsandbytes) gives it.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230850219727, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


def test_code_book_is_bitsandbytes_nf4() -> None:
    assert nf4.CODE.dtype == np.float32 and nf4.CODE.tolist() == np.float32(BNB_NF4).tolist()


def test_worked_example_of_the_docs() -> None:
    """docs/writing-a-client.md, NF4: L=2, N=1, D=4, B=4, byte for byte."""
    fmt = RowFormat(2, 1, 4, Encoding.NF4, block_size=4)
    row = np.array([[[[1.0, -2.0, 0.5, 0.0]], [[0.0, 0.0, 0.0, 0.0]]]], np.float32)
    (value,) = encode_rows(fmt, row)
    assert value[:-CRC_BYTES].hex(" ") == "00 40 0c 7a 00 00 77 77"
    assert value.hex(" ") == "00 40 0c 7a 00 00 77 77 " + value[-CRC_BYTES:].hex(" ")
    got = decode_row(fmt, value)
    assert got.ravel().tolist() == np.float32([0.44070982933044434 * 2, -2.0, 0.24611230850219727 * 2, 0.0,
                                               0, 0, 0, 0]).tolist()
    assert fmt.payload_bytes == 8 and fmt.nf4_layer_bytes == 4


def _codes(fmt: RowFormat, payload: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scales float32 [L, blocks], codes [L, N*D]) of one payload, read per the documented layout."""
    layers = payload.reshape(fmt.num_layers, fmt.nf4_layer_bytes)
    nblocks = fmt.num_experts * fmt.hidden_size // fmt.block_size
    scales = np.ascontiguousarray(layers[:, :2 * nblocks]).view("<f2").astype(np.float32)
    packed = layers[:, 2 * nblocks:]
    return scales, np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(fmt.num_layers, -1)


def test_nearest_code_ties_to_the_lower_one() -> None:
    rng = np.random.default_rng(1)
    mids = nf4.MIDPOINTS
    y = np.concatenate([rng.uniform(-1, 1, 20_000), mids, np.nextafter(mids, 2), np.nextafter(mids, -2),
                        nf4.CODE]).astype(np.float32)
    y = y[: len(y) // 62 * 62].reshape(-1, 62)
    # each block of 64: 62 test values in [-1, 1] and a +1 that makes the absmax (scale) exactly 1
    blocks = np.concatenate([y, np.ones((len(y), 1), np.float32), np.zeros((len(y), 1), np.float32)], axis=1)
    fmt = RowFormat(1, 1, blocks.size, Encoding.NF4)
    scales, q = _codes(fmt, encode_payloads(fmt, blocks.reshape(1, 1, 1, -1))[0])
    assert (scales == 1).all()
    v = blocks.ravel()
    # the documented rule: q = how many float32 midpoints are < y (so y on a midpoint: the lower code)
    assert np.array_equal(q[0], (v[:, None] > mids[None, :]).sum(axis=1))
    on_mid = np.isin(v, mids)
    assert on_mid.sum() >= 15 and np.array_equal(q[0][on_mid], np.searchsorted(mids, v[on_mid]))
    # which is the nearest code wherever y is not within rounding of a midpoint
    clear = np.abs(v[:, None].astype(np.float64) - mids[None, :]).min(axis=1) > 1e-6
    nearest = np.argmin(np.abs(v[:, None].astype(np.float64) - nf4.CODE[None, :]), axis=1)
    assert clear.sum() > 20_000 and np.array_equal(q[0][clear], nearest[clear])


def test_deterministic_fp16_in_as_fp32_in_and_zero_blocks() -> None:
    fmt = RowFormat(2, 3, 64, Encoding.NF4, block_size=16)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((5, *fmt.shape)) * 0.05).astype(np.float16)
    x[1, 0, 2, :16] = 0                  # a block of zeros
    x[2, 1, 1, 16:32] = -0.0             # a block of negative zeros: stored as +0 scale, zeros back
    a, b = encode_rows(fmt, x), encode_rows(fmt, x)
    assert a == b == encode_rows(fmt, x.astype(np.float32))
    y = decode_rows(fmt, a)
    assert (y[1, 0, 2, :16] == 0).all() and (y[2, 1, 1, 16:32] == 0).all()
    scales, _ = _codes(fmt, np.frombuffer(a[2][:-CRC_BYTES], np.uint8))
    assert np.signbit(scales).sum() == 0
    err = np.abs(y - x.astype(np.float32)).reshape(-1, 16)
    assert (err <= np.abs(x.astype(np.float32)).reshape(-1, 16).max(1, keepdims=True) * nf4.ERROR_BOUND).all()


def test_bad_formats_and_values_are_one_line_errors() -> None:
    assert RowFormat(1, 2, 128, Encoding.NF4).block_size == 64          # the default
    assert RowFormat(1, 2, 128, Encoding.FP16, block_size=32).block_size == 0
    for block in (48, 7, 0 - 2, 256):
        with pytest.raises(ValueError, match="must be a positive even number that divides hidden_size 128") as e:
            RowFormat(1, 2, 128, Encoding.NF4, block_size=block)
        assert "\n" not in str(e.value)
    fmt = RowFormat(1, 1, 8, Encoding.NF4, block_size=4)
    with pytest.raises(ValueError, match="NaN"):
        encode_rows(fmt, np.float32([[[[1, 2, np.nan, 0, 1, 1, 1, 1]]]]))
    with pytest.raises(ValueError, match="NaN or infinity"):
        encode_rows(fmt, np.float32([[[[1, 2, 3, 0, 1, 1, 1, -np.inf]]]]))
    with pytest.raises(ValueError, match="fp16 range"):
        encode_rows(fmt, np.float32([[[[1, 2, 3, 0, 1, 1, 1, 1e6]]]]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_torch_dequantize_equals_numpy_decode(device: str) -> None:
    fmt = RowFormat(3, 4, 32, Encoding.NF4, block_size=8)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, *fmt.shape)).astype(np.float32) * np.float32(3.0)
    payloads = encode_payloads(fmt, x)
    want = decode_rows(fmt, encode_rows(fmt, x))
    pieces = torch.from_numpy(payloads).view(6, fmt.num_layers, fmt.nf4_layer_bytes).to(device)
    for l in range(fmt.num_layers):
        got = dequantize_nf4(pieces[:, l], fmt)
        assert got.device.type == device and got.dtype == torch.float32 and got.shape == (6, 4, 32)
        assert torch.equal(got.cpu(), torch.from_numpy(want[:, l]))
        half = dequantize_nf4(pieces[:, l], fmt, torch.float16)
        torch.testing.assert_close(half.float().cpu(), torch.from_numpy(want[:, l]), rtol=2e-3, atol=1e-6)
    # leading dims are kept, and no rows is no values (the CPU float32 path goes through numpy)
    lead = dequantize_nf4(pieces[:, 1].reshape(2, 3, -1), fmt)
    assert lead.shape == (2, 3, 4, 32) and torch.equal(lead.reshape(6, 4, 32).cpu(), torch.from_numpy(want[:, 1]))
    assert dequantize_nf4(pieces[:0, 0], fmt).shape == (0, 4, 32)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_nf4(pieces[:, 0, :-1], fmt)


def test_served_nf4_rows_whole_sliced_and_in_process(db_path, serve) -> None:
    fmt = RowFormat(4, 2, 16, Encoding.NF4, block_size=8)
    meta, _rows, values = write_table(db_path, "q", fmt, vocab_size=40)
    assert meta.block_size == 8
    server = serve(db_path, "--max-batch-rows", "16")
    ids = [3, 39, 0, 3, 17]
    with LutClient(server.address) as client:
        info = client.info("q")
        assert info.block_size == 8 and info.row_bytes == fmt.payload_bytes == 4 * (2 * 4 + 16)
        assert client.row_format(info) == fmt
        np.testing.assert_array_equal(client.get_rows("q", ids), decode_rows(fmt, [values[i] for i in ids]))
        # layer-sliced: each slice is one contiguous range of the payload, and decodes to those layers
        seen = []
        client.get_slices("q", ids, 0, [1, 3, 4], lambda b, e, got, p: seen.append((b, e, got.tolist(), p.copy())))
        assert [(b, e) for b, e, _, _ in seen] == [(0, 1), (1, 3), (3, 4)]
        for b, e, got, pieces in seen:
            for i, token in enumerate(got):
                payload = memoryview(values[token][:-CRC_BYTES])
                parts = slice_parts(fmt, payload, b, e)
                assert len(parts) == 1 and pieces[i].tobytes() == bytes(payload[b * 24:e * 24])
                layers = nf4.decode(pieces[i].reshape(e - b, -1), 8)
                np.testing.assert_array_equal(layers.reshape(e - b, 2, 16), decode_row(fmt, values[token])[b:e])
        # the in-process table keeps nf4 packed (InProcessTable.from_client without a dtype) and gives
        # the same floats, per layer and whole
        table = InProcessTable.from_client(client, "q")
        assert isinstance(table, PackedTable) and table.table.dtype == torch.uint8
        idx = torch.tensor([[3, 39], [0, 17]])
        want = torch.from_numpy(client.get_rows("q", idx.ravel().tolist())).view(2, 2, *fmt.shape)
        assert torch.equal(table.gather(idx), want)
        assert torch.equal(table.rows(idx).layer(2), want[:, :, 2])
        dense = InProcessTable.from_client(client, "q", dtype=torch.float32)
        assert torch.equal(dense.gather(idx), want)


def test_nf4_row_of_the_wrong_length_is_data_loss(db_path, serve, capsys) -> None:
    fmt = RowFormat(2, 2, 16, Encoding.NF4, block_size=16)
    meta, _rows, values = write_table(db_path, "q", fmt, vocab_size=16)
    db = Rdict(str(db_path), Options(raw_mode=True))
    db[row_key(meta.table_id, 5)] = seal(values[5][:-CRC_BYTES - 2])    # cut short, with a valid CRC
    db.close()
    assert cli_main(["verify", "--db", str(db_path)]) == 1
    assert "token 5" in capsys.readouterr().err
    server = serve(db_path)
    with LutClient(server.address) as client:
        for call in (lambda: client.get_rows("q", [4, 5]),
                     lambda: client.get_slices("q", [5], 0, [1, 2], lambda *a: None)):
            with pytest.raises(LutError) as err:
                call()
            assert err.value.code == grpc.StatusCode.DATA_LOSS and "row 5" in str(err.value)
            assert "stored row is 42 bytes, expected 44" in str(err.value) and "\n" not in str(err.value)
        np.testing.assert_array_equal(client.get_rows("q", [4, 6]), decode_rows(fmt, [values[4], values[6]]))


@pytest.mark.parametrize("encoding", [Encoding.NF4, Encoding.INT8])
def test_threaded_encoding_gives_the_same_bytes(encoding: Encoding, monkeypatch) -> None:
    """A chunk big enough to be split over threads encodes to the bytes of one thread."""
    from lutstore.formats import codec

    fmt = RowFormat(4, 8, 128, encoding)
    x = (np.random.default_rng(5).standard_normal((300, *fmt.shape)) * 0.02).astype(np.float16)
    assert x.size >= codec.PARALLEL_MIN_VALUES
    monkeypatch.setattr(codec, "ENCODE_THREADS", 2)
    threaded = encode_payloads(fmt, x)
    monkeypatch.setattr(codec, "ENCODE_THREADS", 1)
    assert np.array_equal(threaded, encode_payloads(fmt, x))
