"""BatchGetShared, the same-host shared-memory fast path, against a real daemon."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import grpc
import numpy as np
import pytest
from rocksdict import Options, Rdict

from conftest import write_table
from lutstore import shm
from lutstore.client import LutClient, LutError
from lutstore.codec import Encoding, RowFormat
from lutstore.store import row_key
from lutstore.v1 import lutstore_pb2 as pb

SENTINEL = 0xAB


@pytest.fixture
def shm_file():
    """Factory: shm_file(size) -> name of a fresh /dev/shm file filled with SENTINEL bytes; removed at teardown."""
    made: list[Path] = []

    def make(size: int) -> str:
        name = f"lutstore-test-{secrets.token_hex(6)}"
        path = shm.SHM_DIR / name
        path.write_bytes(bytes([SENTINEL]) * size)
        made.append(path)
        return name

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def shared_call(address: str, request: pb.BatchGetSharedRequest) -> pb.BatchGetSharedResponse:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/lutstore.v1.LutStore/BatchGetShared",
                                   request_serializer=pb.BatchGetSharedRequest.SerializeToString,
                                   response_deserializer=pb.BatchGetSharedResponse.FromString)
        return call(request, timeout=10)


def status_of(address: str, **fields) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        shared_call(address, pb.BatchGetSharedRequest(**fields))
    return err.value.code(), err.value.details()


@pytest.mark.parametrize("fmt", [RowFormat(2, 4, 16, Encoding.FP16), RowFormat(2, 3, 32, Encoding.INT8),
                                 RowFormat(2, 4, 16, Encoding.FP16, zstd=True)], ids=["fp16", "int8", "zstd"])
def test_rows_over_shared_memory_equal_rows_over_batch_get(db_path: Path, serve, fmt: RowFormat) -> None:
    _, _, values = write_table(db_path, "t", fmt, vocab_size=96, seed=5)
    server = serve(db_path, "--allow-shared-memory")
    ids = [95, 3, 3, 0, 40, 41, 7]
    with LutClient(server.address, shared_memory=True) as fast, LutClient(server.address) as plain:
        raw = fast.get_raw("t", ids)
        assert raw == plain.get_raw("t", ids) == {t: values[t] for t in ids}
        got_ids, payloads = fast.get_payloads("t", ids)
        plain_ids, plain_payloads = plain.get_payloads("t", ids)
        np.testing.assert_array_equal(got_ids, plain_ids)
        np.testing.assert_array_equal(payloads, plain_payloads)
        np.testing.assert_array_equal(fast.get_rows("t", ids), plain.get_rows("t", ids))
        # A bigger call after a smaller one grows the reused segment.
        np.testing.assert_array_equal(fast.get_rows("t", range(96)), plain.get_rows("t", range(96)))
        assert len(fast._segments) == 1 and fast._shared_memory is True
        segment = fast._segments[0].path
        assert segment.exists() and segment.stat().st_mode & 0o777 == 0o600
    assert not segment.exists()  # unlinked at close


def test_server_writes_exactly_the_rows_and_nothing_past_segment_bytes(db_path: Path, serve, shm_file) -> None:
    fmt = RowFormat(2, 4, 16, Encoding.FP16, zstd=True)  # rows of different lengths
    meta, _, values = write_table(db_path, "t", fmt, vocab_size=32, seed=6)
    server = serve(db_path, "--allow-shared-memory")
    ids = [9, 2, 30, 2]
    need = sum(len(values[t]) for t in set(ids))
    name = shm_file(need + 100)
    path = shm.SHM_DIR / name

    code, message = status_of(server.address, table="t", token_ids=ids, segment_name=name, segment_bytes=need - 1)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"need {need} bytes" in message, message
    assert path.read_bytes() == bytes([SENTINEL]) * (need + 100)  # refused before writing anything

    resp = shared_call(server.address, pb.BatchGetSharedRequest(table="t", token_ids=ids, segment_name=name,
                                                                segment_bytes=need))
    data = path.read_bytes()
    assert resp.version == meta.version and list(resp.token_ids) == [2, 9, 30] and resp.bytes_written == need
    assert list(resp.offsets) == [0, len(values[2]), len(values[2]) + len(values[9])]
    for t, offset, length in zip(resp.token_ids, resp.offsets, resp.lengths):
        assert data[offset : offset + length] == values[t]
    assert data[need:] == bytes([SENTINEL]) * 100


def test_fixed_size_rows_one_byte_short_names_the_size(db_path: Path, serve, shm_file) -> None:
    fmt = RowFormat(2, 4, 16, Encoding.FP16)
    write_table(db_path, "t", fmt, vocab_size=16)
    server = serve(db_path, "--allow-shared-memory")
    need = 3 * fmt.stored_bytes
    name = shm_file(need)
    code, message = status_of(server.address, table="t", token_ids=[1, 2, 3], segment_name=name, segment_bytes=need - 1)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"need {need} bytes" in message
    assert (shm.SHM_DIR / name).read_bytes() == bytes([SENTINEL]) * need


def test_disabled_by_default_and_auto_falls_back(db_path: Path, serve, shm_file) -> None:
    _, _, values = write_table(db_path, "t", vocab_size=16)
    server = serve(db_path)  # no --allow-shared-memory
    name = shm_file(1 << 16)
    code, message = status_of(server.address, table="t", token_ids=[1], segment_name=name, segment_bytes=1 << 16)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "--allow-shared-memory" in message
    assert (shm.SHM_DIR / name).read_bytes() == bytes([SENTINEL]) * (1 << 16)

    with LutClient(server.address, shared_memory="auto") as client:
        assert client.get_raw("t", [4, 1]) == {1: values[1], 4: values[4]}
        assert client._shared_memory is False  # refused once: BatchGet from then on
        assert client.get_raw("t", [5]) == {5: values[5]}
        segments = [s.path for s in client._segments]
    assert segments and not any(p.exists() for p in segments)
    with LutClient(server.address, shared_memory=True) as client:
        with pytest.raises(LutError) as err:
            client.get_raw("t", [1])
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with LutClient("10.0.0.1:1", shared_memory="auto") as remote:
        assert remote._shared_memory is False  # auto: loopback addresses only


def test_bad_segments_are_refused(db_path: Path, serve, shm_file, tmp_path: Path) -> None:
    write_table(db_path, "t", vocab_size=16)
    server = serve(db_path, "--allow-shared-memory")
    good = shm_file(4096)
    base = dict(table="t", token_ids=[1])
    for bad in ("", ".", "..", "../" + good, f"sub/{good}", "x" * 300, "a\\b"):
        code, message = status_of(server.address, **base, segment_name=bad, segment_bytes=4096)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "segment_name" in message, (bad, message)
    code, message = status_of(server.address, **base, segment_name=good, segment_bytes=0)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "segment_bytes is 0" in message
    code, message = status_of(server.address, **base, segment_name=good, segment_bytes=4097)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "4096 bytes" in message
    code, message = status_of(server.address, **base, segment_name=f"lutstore-missing-{secrets.token_hex(6)}",
                              segment_bytes=4096)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "cannot open segment" in message

    # A symlink under /dev/shm is not followed, whatever it points at.
    target = tmp_path / "victim"
    target.write_bytes(b"\0" * 4096)
    link = shm.SHM_DIR / f"lutstore-test-link-{secrets.token_hex(6)}"
    link.symlink_to(target)
    try:
        code, message = status_of(server.address, **base, segment_name=link.name, segment_bytes=4096)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert target.read_bytes() == b"\0" * 4096
    finally:
        link.unlink()
    folder = shm.SHM_DIR / f"lutstore-test-dir-{secrets.token_hex(6)}"
    folder.mkdir()
    try:
        code, _ = status_of(server.address, **base, segment_name=folder.name, segment_bytes=4096)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        folder.rmdir()


def test_batch_get_errors_apply_to_the_shared_path(db_path: Path, serve, shm_file) -> None:
    write_table(db_path, "t", vocab_size=16)
    server = serve(db_path, "--allow-shared-memory", "--max-batch-rows", "4")
    name = shm_file(1 << 16)
    seg = dict(segment_name=name, segment_bytes=1 << 16)
    code, _ = status_of(server.address, table="nope", token_ids=[1], **seg)
    assert code == grpc.StatusCode.NOT_FOUND
    code, message = status_of(server.address, table="t", token_ids=[], **seg)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty batch" in message
    code, message = status_of(server.address, table="t", token_ids=[1, 2, 3, 4, 5], **seg)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_batch_rows=4" in message
    code, message = status_of(server.address, table="t", token_ids=[16], **seg)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "vocab_size 16" in message
    code, _ = status_of(server.address, table="t", version=9, token_ids=[1], **seg)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    # The client splits at max_batch_rows as it does for BatchGet.
    with LutClient(server.address, shared_memory=True) as client:
        assert sorted(client.get_raw("t", range(16))) == list(range(16))


def test_corrupt_row_is_data_loss(db_path: Path, serve, shm_file) -> None:
    fmt = RowFormat(2, 4, 16, Encoding.FP16)
    meta, _, values = write_table(db_path, "t", fmt, vocab_size=8)
    bad = bytearray(values[3])
    bad[0] ^= 0xFF
    db = Rdict(str(db_path), Options(raw_mode=True))
    db[row_key(meta.table_id, 3)] = bytes(bad)
    db.close()
    server = serve(db_path, "--allow-shared-memory")
    name = shm_file(1 << 16)
    code, message = status_of(server.address, table="t", token_ids=[3], segment_name=name, segment_bytes=1 << 16)
    assert code == grpc.StatusCode.DATA_LOSS and "row 3" in message


def test_remote_table_runs_over_shared_memory(db_path: Path, serve) -> None:
    """Big fetches (a prefill chunk) through shared memory, small ones (decode steps) on the session."""
    import time

    import torch
    from inference.lut import SHARED_MEMORY_MIN_BYTES, InProcessTable, RemoteTable

    fmt = RowFormat(4, 16, 512, Encoding.FP16)   # 64 KiB rows
    write_table(db_path, "t", fmt, vocab_size=200, seed=2)
    server = serve(db_path, "--allow-shared-memory", verbose=2)
    prompt = torch.arange(0, 2 * SHARED_MEMORY_MIN_BYTES // fmt.payload_bytes).view(1, -1)
    step = torch.tensor([[150], [199]])
    with LutClient(server.address, shared_memory=True) as client:
        table = InProcessTable.from_client(client, "t")
        shared_before = sum("LutStore/BatchGetShared OK" in line for line in server.output)
        with RemoteTable(client, "t") as remote:
            remote.request(prompt)
            torch.testing.assert_close(remote.rows(prompt).all().float(), table.gather(prompt))
            remote.request(step)
            torch.testing.assert_close(remote.rows(step).all().float(), table.gather(step))
        assert client._shared_memory is True and client._segments
    deadline = time.monotonic() + 10
    while not any("LutStore/BatchGetStream OK" in line for line in server.output) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum("LutStore/BatchGetShared OK" in line for line in server.output) > shared_before   # the prompt
    assert any("LutStore/BatchGetStream OK" in line for line in server.output)                   # the step


def test_garbage_and_random_requests_are_refused_cleanly(db_path: Path, serve, shm_file) -> None:
    """Unparsable bytes -> INVALID_ARGUMENT; random fields -> a contract status, never UNKNOWN/INTERNAL;
    the daemon stays up and writes nothing into a segment it was not asked to."""
    import random

    write_table(db_path, "t", vocab_size=16)
    server = serve(db_path, "--allow-shared-memory")
    never = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    rng = random.Random(7)
    bystander = shm_file(4096)
    good = shm_file(1 << 16)
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary("/lutstore.v1.LutStore/BatchGetShared")
        for blob in (b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x1a\x05\x01", bytes([0x0b]) * 9):
            with pytest.raises(grpc.RpcError) as err:
                raw(blob, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for _ in range(60):
            fields = dict(table=rng.choice(["t", "", "x"]), version=rng.choice([0, 1, 2, 2**32 - 1]),
                          token_ids=[rng.choice([0, 5, 15, 16, 2**32 - 1]) for _ in range(rng.randint(0, 5))],
                          segment_name=rng.choice([good, "", "..", "a/b", "nope", good + "x"]),
                          segment_bytes=rng.choice([0, 1, 100, 1 << 16, (1 << 16) + 1, 2**64 - 1]))
            try:
                shared_call(server.address, pb.BatchGetSharedRequest(**fields))
            except grpc.RpcError as e:
                assert e.code() not in never, (fields, e.code(), e.details())
    assert (shm.SHM_DIR / bystander).read_bytes() == bytes([SENTINEL]) * 4096
    assert server.proc.poll() is None
