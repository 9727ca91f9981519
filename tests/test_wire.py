"""lutstore.formats.wire must stay byte-compatible with protobuf's BatchGetResponse."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from lutstore.formats import codec, wire
from lutstore.client import LutClient
from lutstore.formats.codec import Encoding, RowFormat
from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

from conftest import write_table

CASES = [
    # (token ids, data lengths, version): zeros (left out by proto3), multi-byte varints, big rows
    ([0], [8], 0),
    ([0, 1, 127, 128, 300, 16383, 16384, 2**32 - 1], [4, 0, 1, 127, 128, 16384, 70_000, 5], 1),
    ([5, 9], [295_000, 295_000], 2**31 + 7),
    ([], [], 3),
]


def _rows(ids: list[int], lengths: list[int], seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(n) for n in lengths]


@pytest.mark.parametrize("ids,lengths,version", CASES)
def test_encoder_output_is_what_protobuf_serialises_and_parses(ids, lengths, version) -> None:
    values = _rows(ids, lengths)
    ours = wire.encode_response(ids, values, version)
    reference = pb.BatchGetResponse(rows=[pb.Row(token_id=t, data=v) for t, v in zip(ids, values)], version=version)
    assert ours == reference.SerializeToString()
    parsed = pb.BatchGetResponse.FromString(ours)
    assert parsed.version == version
    assert [(r.token_id, r.data) for r in parsed.rows] == list(zip(ids, values))


@pytest.mark.parametrize("ids,lengths,version", CASES)
def test_decoder_reads_protobuf_output_without_copies(ids, lengths, version) -> None:
    values = _rows(ids, lengths, seed=1)
    message = pb.BatchGetResponse(rows=[pb.Row(token_id=t, data=v) for t, v in zip(ids, values)],
                                  version=version).SerializeToString()
    got_version, rows = wire.decode_response(message)
    assert got_version == version
    assert [(t, bytes(d)) for t, d in rows] == list(zip(ids, values))
    for _, data in rows:
        assert data.obj is message  # a view into the received bytes, not a copy


def test_decoder_accepts_any_valid_encoding() -> None:
    """Field order, unknown fields of every wire type, repeated scalars (last wins), as protobuf does."""
    row = pb.Row(token_id=42, data=b"payload")
    unknown = (b"\x18\x96\x01"              # field 3 varint
               b"\x21" + b"\x00" * 8 +      # field 4 fixed64
               b"\x2a\x03abc" +             # field 5 bytes
               b"\x35" + b"\x00" * 4)       # field 6 fixed32
    # data before token_id, an unknown field inside the row, token_id given twice
    odd_row = b"\x12\x07payload" + unknown + b"\x08\x07\x08\x2a"
    message = (b"\x10\x05" + unknown + b"\x0a" + wire.varint(len(odd_row)) + odd_row + b"\x10\x09"
               + b"\x0a" + wire.varint(row.ByteSize()) + row.SerializeToString())
    reference = pb.BatchGetResponse.FromString(message)
    version, rows = wire.decode_response(message)
    assert version == reference.version == 9
    assert [(t, bytes(d)) for t, d in rows] == [(r.token_id, r.data) for r in reference.rows] == [(42, b"payload")] * 2


@pytest.mark.parametrize("bad", [
    b"\x0a",                      # row tag without a length
    b"\x0a\x05\x08\x01",          # row shorter than its length
    b"\x0a\x04\x12\x09abc",       # data longer than its row
    b"\x10",                      # version without a value
    b"\x10" + b"\xff" * 11,       # varint too long
    b"\x1b",                      # group start (wire type 3)
    b"\x2a\x05ab",                # unknown bytes field cut short
])
def test_decoder_rejects_truncated_or_malformed_bytes(bad: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_response(bad)


# ---- against a real daemon: the pre-serialised BatchGet path end to end ----------------------

@pytest.mark.parametrize("encoding", [Encoding.FP16, Encoding.INT8])
def test_served_bytes_parse_the_same_with_protobuf_and_with_wire(db_path: Path, serve, encoding: Encoding) -> None:
    fmt = RowFormat(2, 3, 64, encoding)
    meta, _, values = write_table(db_path, "w", fmt, vocab_size=80, seed=3)
    server = serve(db_path, "--max-message-mb", "0.002")  # ~1 KiB per message: rows spread over several
    ids = [79, 0, 5, 5, 64, 1, 33]
    request = pb.BatchGetRequest(table="w", token_ids=ids)
    with grpc.insecure_channel(server.address) as channel:
        stock = pb_grpc.LutStoreStub(channel)  # generated code, protobuf parsing: what other languages do
        by_protobuf = [(r.token_id, r.data, m.version) for m in stock.BatchGet(request) for r in m.rows]
        raw_call = channel.unary_stream("/lutstore.v1.LutStore/BatchGet",
                                        request_serializer=pb.BatchGetRequest.SerializeToString,
                                        response_deserializer=None)
        messages = list(raw_call(request))
    assert len(messages) > 1
    by_wire = [(t, bytes(d), v) for m in messages for v, rows in [wire.decode_response(m)] for t, d in rows]
    expected = [(t, values[t], meta.version) for t in sorted(set(ids))]
    assert by_protobuf == by_wire == expected

    with LutClient(server.address) as client:
        raw = client.get_raw("w", ids)
        assert raw == {t: values[t] for t in ids}  # memoryviews compare equal to the stored bytes
        got_ids, payloads = client.get_payloads("w", ids)
        assert got_ids.tolist() == sorted(set(ids)) and payloads.dtype == np.uint8
        assert payloads.shape == (len(got_ids), fmt.payload_bytes)
        for t, payload in zip(got_ids.tolist(), payloads):
            assert payload.tobytes() == values[t][: -codec.CRC_BYTES]
            np.testing.assert_array_equal(codec.decode_payload(fmt, payload), codec.decode_row(fmt, values[t]))
        empty_ids, empty = client.get_payloads("w", [])
        assert empty_ids.shape == (0,) and empty.shape == (0, fmt.payload_bytes)


def test_get_payloads_decompresses_zstd_rows(db_path: Path, serve) -> None:
    fmt = RowFormat(2, 2, 16, Encoding.BF16, zstd=True)
    _, _, values = write_table(db_path, "z", fmt, vocab_size=20, seed=4)
    server = serve(db_path)
    with LutClient(server.address) as client:
        ids, payloads = client.get_payloads("z", [7, 2])
        assert ids.tolist() == [2, 7]
        for t, payload in zip(ids.tolist(), payloads):
            assert payload.tobytes() == bytes(codec.payload_of(fmt, values[t]))


@pytest.mark.parametrize("version,begin,end", [(1, 0, 1), (7, 3, 12), (300, 0, 0)])
def test_layer_range_fields_round_trip_with_protobuf(version: int, begin: int, end: int) -> None:
    ids, datas = [0, 5, 70000], [b"", b"ab", bytes(range(200))]
    parts = [p for t, d in zip(ids, datas) for p in (wire.row_header(t, len(d)), d)]
    ours = b"".join(parts + [wire.response_trailer(version, begin, end)])
    theirs = pb.BatchGetResponse(rows=[pb.Row(token_id=t, data=d) for t, d in zip(ids, datas)], version=version,
                                 layer_begin=begin, layer_end=end)
    assert ours == theirs.SerializeToString()
    got_version, got_begin, got_end, rows = wire.decode_sliced_response(theirs.SerializeToString())
    assert (got_version, got_begin, got_end) == (version, begin, end)
    assert [(t, bytes(d)) for t, d in rows] == list(zip(ids, datas))
