"""Stock gRPC tooling against a real daemon: server reflection and health.

Nothing from lutstore's generated stubs is used here: the service is
discovered, described and called through reflection alone (as grpcurl or a
client in another language would), and health through the stock
grpc.health.v1 messages.
"""

from __future__ import annotations

import signal
import threading
import struct
import time
import zlib

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from lutstore.formats.codec import Encoding, RowFormat

from conftest import write_table

SERVICE = "lutstore.v1.LutStore"
HEALTH_SERVICE = "grpc.health.v1.Health"


@pytest.fixture
def daemon(db_path, serve):
    meta, _rows, values = write_table(db_path, "tiny", RowFormat(2, 3, 8, Encoding.INT8), vocab_size=40)
    return serve(db_path), meta, values


def reflected_pool(channel: grpc.Channel) -> tuple[ProtoReflectionDescriptorDatabase, descriptor_pool.DescriptorPool]:
    database = ProtoReflectionDescriptorDatabase(channel)
    return database, descriptor_pool.DescriptorPool(database)


def test_reflection_lists_and_describes_the_service(daemon):
    server, _meta, _values = daemon
    with grpc.insecure_channel(server.address) as channel:
        database, pool = reflected_pool(channel)
        services = set(database.get_services())
        assert {SERVICE, HEALTH_SERVICE} <= services

        service = pool.FindServiceByName(SERVICE)
        methods = {m.name: m for m in service.methods}
        assert set(methods) == {"ListTables", "GetTableInfo", "BatchGet", "BatchGetStream", "BatchGetShared", "GetArtifact"}
        batch_get = methods["BatchGet"]
        assert batch_get.server_streaming and not batch_get.client_streaming
        assert batch_get.input_type.full_name == "lutstore.v1.BatchGetRequest"
        assert batch_get.output_type.full_name == "lutstore.v1.BatchGetResponse"
        assert methods["GetTableInfo"].output_type.full_name == "lutstore.v1.TableInfo"
        # The row layout a client needs is described field by field.
        row = pool.FindMessageTypeByName("lutstore.v1.Row")
        assert {f.name for f in row.fields} == {"token_id", "data"}
        encodings = pool.FindEnumTypeByName("lutstore.v1.Encoding")
        assert {v.name for v in encodings.values} >= {"ENCODING_FP32", "ENCODING_FP16", "ENCODING_BF16", "ENCODING_INT8"}


def test_reflection_alone_is_enough_to_call_the_service(daemon):
    server, meta, values = daemon
    with grpc.insecure_channel(server.address) as channel:
        _database, pool = reflected_pool(channel)

        def message(name: str):
            return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"lutstore.v1.{name}"))

        def method(name: str, request_type, response_type, streaming: bool = False):
            call = channel.unary_stream if streaming else channel.unary_unary
            return call(f"/{SERVICE}/{name}", request_serializer=request_type.SerializeToString,
                        response_deserializer=response_type.FromString)

        list_tables = method("ListTables", message("ListTablesRequest"), message("ListTablesResponse"))
        tables = list_tables(message("ListTablesRequest")(), timeout=10).tables
        info = next(t for t in tables if t.name == "tiny")
        assert (info.vocab_size, info.num_layers, info.num_experts, info.hidden_size) == (40, 2, 3, 8)
        assert pool.FindEnumTypeByName("lutstore.v1.Encoding").values_by_number[info.encoding].name == "ENCODING_INT8"

        batch_get = method("BatchGet", message("BatchGetRequest"), message("BatchGetResponse"), streaming=True)
        request = message("BatchGetRequest")(table="tiny", version=info.version, token_ids=[7, 0, 7, 39])
        rows = [row for response in batch_get(request, timeout=10) for row in response.rows]
        assert [row.token_id for row in rows] == [0, 7, 39]  # distinct ids, ascending
        for row in rows:
            assert row.data == values[row.token_id]
            (crc,) = struct.unpack("<I", row.data[-4:])
            assert zlib.crc32(row.data[:-4]) == crc

        get_info = method("GetTableInfo", message("GetTableInfoRequest"), message("TableInfo"))
        with pytest.raises(grpc.RpcError) as failure:
            get_info(message("GetTableInfoRequest")(table="no-such-table"), timeout=10)
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND


def check(stub: health_pb2_grpc.HealthStub, service: str = "") -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


def test_health_serving_while_up(daemon):
    server, _meta, _values = daemon
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert check(stub) == health_pb2.HealthCheckResponse.SERVING
        assert check(stub, SERVICE) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as failure:
            check(stub, "no.such.Service")
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND


def watch_in_background(stub: health_pb2_grpc.HealthStub, service: str) -> tuple[list[int], threading.Thread]:
    """Start a Watch stream; its statuses are appended to a list as they come."""
    statuses: list[int] = []
    stream = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)

    def read() -> None:
        try:
            for response in stream:
                statuses.append(response.status)
                if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    stream.cancel()  # a balancer would now move away; don't hold the server's grace period
        except grpc.RpcError:
            pass  # the server ends the stream when it stops

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return statuses, reader


def test_health_not_serving_while_stopping(daemon):
    """SIGTERM starts a graceful stop: from then on health must never say
    SERVING again. A Check answers NOT_SERVING during the grace period, or
    is refused once the port is closed; a Watch that was open is told
    NOT_SERVING before its stream ends."""
    server, _meta, _values = daemon
    SERVING = health_pb2.HealthCheckResponse.SERVING
    NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert check(stub, SERVICE) == SERVING
        watched, reader = watch_in_background(stub, SERVICE)
        deadline = time.monotonic() + 10
        while not watched and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watched == [SERVING]

        server.proc.send_signal(signal.SIGTERM)
        seen: list[object] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                seen.append(check(stub, SERVICE))
            except grpc.RpcError as err:
                seen.append(err.code())
                if server.proc.poll() is not None:
                    break
            time.sleep(0.01)
        assert server.proc.wait(20) == 0, "".join(server.output)
        reader.join(10)
    assert watched == [SERVING, NOT_SERVING], watched

    # The signal handler may need a moment to run: SERVING is allowed only
    # before the first sign of stopping, never after it.
    stopping = [i for i, s in enumerate(seen) if s != SERVING]
    assert stopping, f"health kept answering SERVING until the end: {seen}"
    after = seen[stopping[0]:]
    assert SERVING not in after, f"SERVING again after stopping began: {seen}"
    assert set(after) <= {NOT_SERVING, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, seen
