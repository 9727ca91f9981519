"""BatchGetResponse on the wire, by hand: the hot path without protobuf objects.

Building a `pb.BatchGetResponse` of 64 rows of 295 KB copies every row into
the message, serialising copies it again, and parsing on the client copies it
once more. Here the server joins small headers and the stored values into the
message bytes (one copy), and the client slices the received bytes with
memoryviews (no copy) so numpy reads the rows straight from gRPC's buffer.

The bytes are exactly protobuf's encoding of (see lutstore.proto):

    message Row              { uint32 token_id = 1; bytes data = 2; }
    message BatchGetResponse { repeated Row rows = 1; uint32 version = 2;
                               uint32 layer_begin = 3; uint32 layer_end = 4; }

The encoder writes the canonical form (fields in number order, proto3 zeros
left out), so its output equals `SerializeToString()`; the decoder accepts any
valid encoding (any field order, repeated scalars: last wins, unknown fields
skipped), so clients in other languages and protobuf itself interoperate.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from lutstore.formats import codec

# Tags: (field number << 3) | wire type (0 varint, 2 length-delimited).
_RESPONSE_ROW = 0x0A      # BatchGetResponse.rows = 1, LEN
_RESPONSE_VERSION = 0x10  # BatchGetResponse.version = 2, VARINT
_RESPONSE_LAYER_BEGIN = 0x18  # BatchGetResponse.layer_begin = 3, VARINT
_RESPONSE_LAYER_END = 0x20    # BatchGetResponse.layer_end = 4, VARINT
_ROW_TOKEN_ID = 0x08      # Row.token_id = 1, VARINT
_ROW_DATA = 0x12          # Row.data = 2, LEN

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_UINT32 = 0xFFFFFFFF


class WireError(ValueError):
    """Bytes that are not a valid BatchGetResponse."""


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def row_header(token_id: int, data_len: int) -> bytes:
    """The bytes that precede one row's data inside a BatchGetResponse."""
    row = (bytes((_ROW_TOKEN_ID,)) + varint(token_id) if token_id else b"") + bytes((_ROW_DATA,)) + varint(data_len)
    if not data_len:  # proto3 leaves an empty bytes field out
        row = row[: -2]
    return bytes((_RESPONSE_ROW,)) + varint(len(row) + data_len) + row


def response_trailer(version: int, layer_begin: int = 0, layer_end: int = 0) -> bytes:
    """The fields after the rows: version, and the layer range of a layer-sliced message."""
    out = b""
    for tag, value in ((_RESPONSE_VERSION, version), (_RESPONSE_LAYER_BEGIN, layer_begin),
                       (_RESPONSE_LAYER_END, layer_end)):
        if value:
            out += bytes((tag,)) + varint(value)
    return out


def encode_parts(token_ids: Sequence[int], values: Sequence[bytes], version: int) -> list[bytes]:
    """The pieces of one BatchGetResponse, in order; b"".join(them) is the message."""
    parts: list[bytes] = []
    for token_id, value in zip(token_ids, values):
        parts.append(row_header(token_id, len(value)))
        parts.append(value)
    trailer = response_trailer(version)
    if trailer:
        parts.append(trailer)
    return parts


def encode_response(token_ids: Sequence[int], values: Sequence[bytes], version: int) -> bytes:
    """One serialised BatchGetResponse (equal to protobuf's SerializeToString of the same rows)."""
    return b"".join(encode_parts(token_ids, values, version))


def sliced_responses(fmt: codec.RowFormat, version: int, token_ids: Sequence[int], payloads: Sequence[memoryview],
                     groups: Sequence[tuple[int, int]], message_bytes: int) -> Iterator[bytes]:
    """Layer-sliced BatchGetResponses of these rows (BatchGetRequest.layer_ends): for each layer group
    [begin, end) in order, every row's slice of those layers with its own CRC-32, in messages of
    about message_bytes; each message names its group (layer_begin, layer_end)."""
    for begin, end in groups:
        size = codec.slice_payload_bytes(fmt, begin, end) + codec.CRC_BYTES
        per_message = max(1, message_bytes // size)
        trailer = response_trailer(version, begin, end)
        for first in range(0, len(token_ids), per_message):
            parts: list = []
            for token, payload in zip(token_ids[first : first + per_message], payloads[first : first + per_message]):
                pieces = codec.slice_parts(fmt, payload, begin, end)
                parts.append(row_header(token, size))
                parts += pieces
                parts.append(codec.crc_of_parts(pieces))
            parts.append(trailer)
            yield b"".join(parts)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


def _skip(buf: memoryview, wire_type: int, pos: int, end: int) -> int:
    """Position after an unknown field's value."""
    if wire_type == _VARINT:
        return _read_varint(buf, pos, end)[1]
    if wire_type == _I64:
        pos += 8
    elif wire_type == _I32:
        pos += 4
    elif wire_type == _LEN:
        length, pos = _read_varint(buf, pos, end)
        pos += length
    else:
        raise WireError(f"unsupported wire type {wire_type}")
    if pos > end:
        raise WireError("truncated field")
    return pos


def _decode_row(buf: memoryview, pos: int, end: int) -> tuple[int, memoryview]:
    token_id = 0
    data = buf[pos:pos]
    while pos < end:
        tag, pos = _read_varint(buf, pos, end)
        field, wire_type = tag >> 3, tag & 7
        if field == 1 and wire_type == _VARINT:
            token_id, pos = _read_varint(buf, pos, end)
            token_id &= _UINT32  # protobuf truncates an over-long uint32 the same way
        elif field == 2 and wire_type == _LEN:
            length, pos = _read_varint(buf, pos, end)
            if pos + length > end:
                raise WireError("truncated row data")
            data = buf[pos : pos + length]
            pos += length
        else:
            pos = _skip(buf, wire_type, pos, end)
    return token_id, data


def decode_response(message: bytes | bytearray | memoryview) -> tuple[int, list[tuple[int, memoryview]]]:
    """(version, [(token_id, data)]) of one serialised BatchGetResponse; each data is a
    memoryview into `message` (no copy), valid as long as `message` is."""
    version, _begin, _end, rows = decode_sliced_response(message)
    return version, rows


def decode_sliced_response(message: bytes | bytearray | memoryview
                           ) -> tuple[int, int, int, list[tuple[int, memoryview]]]:
    """(version, layer_begin, layer_end, [(token_id, data)]): decode_response plus the layer
    range of a layer-sliced message (0, 0 for whole rows)."""
    buf = memoryview(message).cast("B")
    end = len(buf)
    pos = 0
    version = layer_begin = layer_end = 0
    rows: list[tuple[int, memoryview]] = []
    while pos < end:
        tag, pos = _read_varint(buf, pos, end)
        field, wire_type = tag >> 3, tag & 7
        if field == 1 and wire_type == _LEN:
            length, pos = _read_varint(buf, pos, end)
            if pos + length > end:
                raise WireError("truncated row")
            rows.append(_decode_row(buf, pos, pos + length))
            pos += length
        elif field == 2 and wire_type == _VARINT:
            version, pos = _read_varint(buf, pos, end)
            version &= _UINT32
        elif field == 3 and wire_type == _VARINT:
            layer_begin, pos = _read_varint(buf, pos, end)
            layer_begin &= _UINT32
        elif field == 4 and wire_type == _VARINT:
            layer_end, pos = _read_varint(buf, pos, end)
            layer_end &= _UINT32
        else:
            pos = _skip(buf, wire_type, pos, end)
    return version, layer_begin, layer_end, rows
