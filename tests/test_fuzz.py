"""Bad input: random and malformed requests against a real daemon. Every request gets
the status the contract names (or OK with exactly the asked rows), within its deadline;
garbage on the wire is refused; the daemon never crashes or hangs. Seeded, bounded."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import grpc
import pytest

from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

from conftest import write_table

VOCAB = 100
MAX_BATCH = 64
MAX_MESSAGE = 50_000  # --max-message-mb 0.05, in bytes (rounded down as the server does)
C = grpc.StatusCode
NEVER = {C.UNKNOWN, C.INTERNAL, C.DEADLINE_EXCEEDED, C.UNAVAILABLE, C.CANCELLED}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from conftest import start_server

    db = tmp_path_factory.mktemp("fuzz") / "db"
    _, _, values = write_table(db, "t", vocab_size=VOCAB, artifacts={"config.json": b"{}"})
    server = start_server(db, "--max-batch-rows", str(MAX_BATCH), "--max-message-mb", "0.05")
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])
    yield server, channel, values
    channel.close()
    assert server.stop() == 0


def random_ids(rng: random.Random) -> list[int]:
    kind = rng.choice(["empty", "valid", "dups", "huge", "negative-looking", "too-many", "enormous", "mixed"])
    if kind == "empty":
        return []
    if kind == "valid":
        return [rng.randrange(VOCAB) for _ in range(rng.randint(1, MAX_BATCH))]
    if kind == "dups":
        return [rng.randrange(3)] * rng.randint(2, MAX_BATCH)
    if kind == "huge":
        return [rng.randrange(VOCAB), 2**32 - 1]
    if kind == "negative-looking":  # -1 .. -2^31 as an int32
        return [rng.randrange(2**31, 2**32) for _ in range(rng.randint(1, 4))]
    if kind == "too-many":
        return [rng.randrange(VOCAB) for _ in range(rng.randint(MAX_BATCH + 1, 4 * MAX_BATCH))]
    if kind == "enormous":  # well past the message size limit
        return [rng.randrange(2**32) for _ in range(rng.randint(20_000, 200_000))]
    return [rng.randrange(VOCAB) for _ in range(5)] + [rng.choice([VOCAB, VOCAB + 1, 2**31])]


def random_name(rng: random.Random) -> str:
    if rng.random() < 0.6:  # mostly the real table, so the id checks get exercised (an unknown name costs a refresh)
        return "t"
    return rng.choice(["", "T", "t ", "t\x00", "../t", "ü" * rng.randint(1, 50), "x" * 5000,
                       "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randint(1, 30)))])


def expected_batch_get(req: pb.BatchGetRequest) -> grpc.StatusCode:
    """The contract of lutstore.proto, in its order: table, version, then the ids."""
    if req.ByteSize() > MAX_MESSAGE:
        return C.RESOURCE_EXHAUSTED
    if not req.table:
        return C.INVALID_ARGUMENT
    if req.table != "t":
        return C.NOT_FOUND
    if req.version not in (0, 1):
        return C.FAILED_PRECONDITION
    ids = req.token_ids
    if not ids or len(ids) > MAX_BATCH or max(ids) >= VOCAB:
        return C.INVALID_ARGUMENT
    return C.OK


def test_random_batch_get_requests_get_the_contract_status(daemon) -> None:
    server, channel, values = daemon
    stub = pb_grpc.LutStoreStub(channel)
    rng = random.Random(20250316)
    seen: dict[str, int] = {}
    for _ in range(200):
        req = pb.BatchGetRequest(table=random_name(rng), version=rng.choice([0, 0, 0, 1, 1, 2, 2**32 - 1]),
                                 token_ids=random_ids(rng))
        want = expected_batch_get(req)
        try:
            got_rows = [(r.token_id, r.data) for m in stub.BatchGet(req, timeout=10) for r in m.rows]
            code = C.OK
        except grpc.RpcError as e:
            code = e.code()
            assert e.details(), f"{code.name} without a reason"
        seen[code.name] = seen.get(code.name, 0) + 1
        assert code == want, (code, want, req.table[:40], req.version, list(req.token_ids)[:10], len(req.token_ids))
        if code == C.OK:
            assert got_rows == [(t, values[t]) for t in sorted(set(req.token_ids))]
    print(seen)
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"} <= seen.keys()
    assert server.proc.poll() is None


def test_random_info_and_artifact_requests(daemon) -> None:
    server, channel, _ = daemon
    stub = pb_grpc.LutStoreStub(channel)
    rng = random.Random(7)
    for _ in range(100):
        name, version = random_name(rng), rng.choice([0, 1, 3, 2**32 - 1])
        try:
            stub.GetTableInfo(pb.GetTableInfoRequest(table=name, version=version), timeout=10)
            code = C.OK
        except grpc.RpcError as e:
            code = e.code()
        ok_table = name == "t" and version in (0, 1)
        assert code == (C.OK if ok_table else C.INVALID_ARGUMENT if not name else
                        C.NOT_FOUND if name != "t" else C.FAILED_PRECONDITION), (name[:40], version, code)
        artifact = rng.choice(["config.json", "", "../config.json", "/etc/passwd", "config.json\x00", "x" * 3000])
        try:
            chunks = list(stub.GetArtifact(pb.GetArtifactRequest(table=name, version=version, name=artifact), timeout=10))
            code = C.OK
        except grpc.RpcError as e:
            code = e.code()
        if ok_table:
            assert code == (C.OK if artifact == "config.json" else C.NOT_FOUND), (artifact, code)
            if code == C.OK:
                assert b"".join(c.data for c in chunks) == b"{}"
        else:
            assert code not in NEVER | {C.OK}, (name[:40], artifact, code)
    assert server.proc.poll() is None


@pytest.mark.parametrize("method,streaming", [("ListTables", False), ("GetTableInfo", False), ("BatchGet", True),
                                              ("GetArtifact", True)])
def test_garbage_request_bytes_are_refused_cleanly(daemon, method: str, streaming: bool) -> None:
    server, channel, _ = daemon
    path = f"/lutstore.v1.LutStore/{method}"
    call = channel.unary_stream(path) if streaming else channel.unary_unary(path)  # raw bytes in and out
    rng = random.Random(method)
    unparsable = [b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x1a\x05\x01", bytes([0x0b]) * 9]  # bad tag, length, group
    blobs = unparsable + [rng.randbytes(rng.randint(1, 3000)) for _ in range(40)]
    for i, blob in enumerate(blobs):
        try:
            result = call(blob, timeout=10)
            if streaming:
                list(result)
            code = C.OK
        except grpc.RpcError as e:
            code = e.code()
        assert code not in NEVER, (blob[:20], code)
        if i < len(unparsable):
            assert code == C.INVALID_ARGUMENT, (blob, code)
    assert server.proc.poll() is None


def test_garbage_on_the_socket_does_not_hurt_the_daemon(daemon) -> None:
    server, channel, _ = daemon
    rng = random.Random(3)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    payloads = [rng.randbytes(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", preface + rng.randbytes(2048),
                preface + b"\x00\xff\xff\x01\x00\x00\x00\x00\x01" + rng.randbytes(512),  # a frame claiming 64 KiB
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(64)]  # a TLS hello to plaintext
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(65536):  # the daemon closes the connection; bounded by the timeout
                    pass
            except (ConnectionResetError, socket.timeout):
                pass
    stub = pb_grpc.LutStoreStub(channel)
    assert [t.name for t in stub.ListTables(pb.ListTablesRequest(), timeout=10).tables] == ["t"]
    assert server.proc.poll() is None
