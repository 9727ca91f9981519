"""The protocol's names and constants, in one place for the client, its sessions and the server.

The byte layouts are documented at the top of proto/lutstore/v1/lutstore.proto;
this module only names what both sides must spell the same way.
"""

from __future__ import annotations

from lutstore.formats import codec
from lutstore.v1 import lutstore_pb2 as pb

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["LutStore"].full_name   # "lutstore.v1.LutStore"


def method_path(method: str) -> str:
    """The full path gRPC calls a method by: "/lutstore.v1.LutStore/BatchGet"."""
    return f"/{SERVICE_NAME}/{method}"


BATCH_GET = method_path("BatchGet")
BATCH_GET_STREAM = method_path("BatchGetStream")
BATCH_GET_SHARED = method_path("BatchGetShared")

# Row encodings: codec's names <-> the proto's enum values, ENCODING_<NAME> for each of the
# codec's encodings (an encoding the proto lacks fails here, at import).
ENCODING_TO_PB: dict[codec.Encoding, int] = {e: pb.Encoding.Value(f"ENCODING_{e.name}") for e in codec.ENCODINGS}
ENCODING_FROM_PB: dict[int, codec.Encoding] = {v: k for k, v in ENCODING_TO_PB.items()}

# What a client sends with a segment's descriptor over the daemon's Unix socket (BatchGetShared).
SEGMENT_HELLO = b"lutstore-segment v1\n"

# Host names that mean "this machine": the server does not warn about plaintext there, and a
# client's shared_memory="auto" uses /dev/shm only there (any 127.x address counts too).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def is_loopback_host(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def row_format(info: pb.TableInfo) -> codec.RowFormat:
    """The codec's RowFormat of a served table version."""
    return codec.RowFormat(info.num_layers, info.num_experts, info.hidden_size, ENCODING_FROM_PB[info.encoding],
                           info.compression == pb.COMPRESSION_ZSTD, info.block_size)
