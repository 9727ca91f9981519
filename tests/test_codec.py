"""Row codec round trips, with the error bounds stated in lutstore/formats/codec.py."""

import numpy as np
import pytest

from lutstore.formats import nf4
from lutstore.formats.codec import (CRC_BYTES, ChecksumError, Encoding, RowFormat, check, decode_row, decode_rows,
                            encode_rows)

SHAPE = (3, 4, 16)


def _rows(n: int = 7, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    x[0, 1, 2] = 0.0  # an all-zero vector: int8 scale 0 must decode to zeros
    return x


@pytest.mark.parametrize("zstd", [False, True])
@pytest.mark.parametrize("encoding", list(Encoding))
def test_round_trip_within_bounds(encoding: Encoding, zstd: bool) -> None:
    fmt = RowFormat(*SHAPE, encoding=encoding, zstd=zstd, block_size=8)   # block_size: nf4 only
    x = _rows()
    values = encode_rows(fmt, x)
    y = decode_rows(fmt, values)
    assert y.shape == x.shape and y.dtype == np.float32
    if not zstd:
        assert all(len(v) == fmt.payload_bytes + CRC_BYTES for v in values)
    err = np.abs(y - x)
    if encoding is Encoding.FP32:
        assert np.array_equal(y, x)
    elif encoding is Encoding.FP16:
        assert (err <= np.abs(x) * 2.0**-11 + 2.0**-24).all()
    elif encoding is Encoding.BF16:
        assert (err <= np.abs(x) * 2.0**-8).all()
    elif encoding is Encoding.NF4:
        block_max = np.abs(x.reshape(-1, 8)).max(axis=1, keepdims=True)
        assert (err.reshape(-1, 8) <= block_max * nf4.ERROR_BOUND).all()
        assert np.array_equal(y[0, 1, 2], np.zeros(SHAPE[2], np.float32))
    else:
        vec_max = np.abs(x).max(axis=3, keepdims=True)
        assert (err <= vec_max * (0.5 / 127) * (1 + 1e-6) + 1e-12).all()
        assert np.array_equal(y[0, 1, 2], np.zeros(SHAPE[2], np.float32))


def test_int8_payload_layout_is_scales_then_values() -> None:
    fmt = RowFormat(*SHAPE, encoding=Encoding.INT8)
    x = _rows(1)
    value = encode_rows(fmt, x)[0]
    scales = np.frombuffer(value, "<f4", count=SHAPE[0] * SHAPE[1])
    np.testing.assert_allclose(scales, np.abs(x[0]).max(axis=2).ravel() / 127, rtol=1e-6)
    q = np.frombuffer(value, np.int8, offset=4 * scales.size, count=int(np.prod(SHAPE)))
    assert q.min() >= -127 and q.max() == 127


def test_checksum_detects_a_flipped_bit() -> None:
    fmt = RowFormat(*SHAPE)
    value = bytearray(encode_rows(fmt, _rows(1))[0])
    check(bytes(value))
    value[10] ^= 0x04
    with pytest.raises(ChecksumError):
        decode_row(fmt, bytes(value))
    with pytest.raises(ChecksumError):
        check(b"\x00\x01")


def test_refuses_bad_shapes_and_non_finite() -> None:
    fmt = RowFormat(*SHAPE)
    with pytest.raises(ValueError, match="shape"):
        encode_rows(fmt, np.zeros((2, 3, 4, 15), np.float32))
    bad = _rows(1)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        encode_rows(fmt, bad)
    with pytest.raises(ValueError, match="fp16 range"):
        encode_rows(fmt, np.full((1, *SHAPE), 1e6, np.float32))


def test_every_encoding_has_its_entries():
    """An encoding is its codec entry, the proto's enum value and a device form: none may be missing,
    and `lutstore ingest --encoding` offers exactly the codec's encodings."""
    from inference.dequantize import DEVICE_FORMS
    from lutstore.cli import build_parser
    from lutstore.formats.codec import ENCODINGS
    from lutstore.formats.protocol import ENCODING_FROM_PB, ENCODING_TO_PB

    assert set(ENCODINGS) == set(Encoding) == set(ENCODING_TO_PB) == set(DEVICE_FORMS)
    assert len(set(ENCODING_TO_PB.values())) == len(Encoding) and set(ENCODING_FROM_PB.values()) == set(Encoding)
    ingest = build_parser()._subparsers._group_actions[0].choices["ingest"]
    (encoding,) = [a for a in ingest._actions if a.dest == "encoding"]
    assert encoding.choices == [e.value for e in Encoding]
