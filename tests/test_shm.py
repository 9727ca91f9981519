"""BatchGetShared, the same-host shared-memory fast path, against a real daemon."""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from rocksdict import Options, Rdict

from conftest import REPO, write_table
from lutstore.client import LutClient, LutError
from lutstore.formats.codec import Encoding, RowFormat
from lutstore.client.shm_segment import Segment, SegmentRefused
from lutstore.formats.protocol import SEGMENT_HELLO
from lutstore.storage.rocksdb import row_key
from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

SENTINEL = 0xAB


def socket_of(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.LutStoreStub(channel).GetTableInfo(pb.GetTableInfoRequest(table="t"), timeout=10).shared_memory_socket


@pytest.fixture
def segment():
    """Factory: segment(server, size) -> a Segment handed to the server, filled with SENTINEL; closed at teardown."""
    made: list[Segment] = []

    def make(server, size: int) -> Segment:
        seg = Segment(size, socket_of(server.address))
        seg.view[:] = bytes([SENTINEL]) * seg.size
        made.append(seg)
        return seg

    yield make
    for seg in made:
        seg.close()


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


def held_segments(pid: int) -> int:
    """memfd segments the daemon holds open (its /proc/PID/fd links)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:lutstore-segment")
        except OSError:
            pass
    return count


def hand_over(path: str, data: bytes, fds: list[int]) -> str:
    """One raw hand-over on the server's socket; its reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(path)
        socket.send_fds(conn, [data], fds)
        return conn.recv(512).decode()


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
        segment = fast._segments[0]
        assert held_segments(server.pid) == 1   # the daemon holds the descriptor the client handed over
    assert segment.released
    deadline = time.monotonic() + 10
    while held_segments(server.pid):          # ... and lets it go once the client's socket closes
        assert time.monotonic() < deadline, "the daemon kept the segment after the client closed it"
        time.sleep(0.05)


def test_server_writes_exactly_the_rows_and_nothing_past_segment_bytes(db_path: Path, serve, segment) -> None:
    fmt = RowFormat(2, 4, 16, Encoding.FP16, zstd=True)  # rows of different lengths
    meta, _, values = write_table(db_path, "t", fmt, vocab_size=32, seed=6)
    server = serve(db_path, "--allow-shared-memory")
    ids = [9, 2, 30, 2]
    need = sum(len(values[t]) for t in set(ids))
    seg = segment(server, need + 100)

    code, message = status_of(server.address, table="t", token_ids=ids, segment_handle=seg.handle,
                              segment_bytes=need - 1)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"need {need} bytes" in message, message
    assert bytes(seg.view) == bytes([SENTINEL]) * seg.size  # refused before writing anything

    resp = shared_call(server.address, pb.BatchGetSharedRequest(table="t", token_ids=ids, segment_handle=seg.handle,
                                                                segment_bytes=need))
    data = bytes(seg.view)
    assert resp.version == meta.version and list(resp.token_ids) == [2, 9, 30] and resp.bytes_written == need
    assert list(resp.offsets) == [0, len(values[2]), len(values[2]) + len(values[9])]
    for t, offset, length in zip(resp.token_ids, resp.offsets, resp.lengths):
        assert data[offset : offset + length] == values[t]
    assert data[need:] == bytes([SENTINEL]) * (seg.size - need)


def test_fixed_size_rows_one_byte_short_names_the_size(db_path: Path, serve, segment) -> None:
    fmt = RowFormat(2, 4, 16, Encoding.FP16)
    write_table(db_path, "t", fmt, vocab_size=16)
    server = serve(db_path, "--allow-shared-memory")
    need = 3 * fmt.stored_bytes
    seg = segment(server, need)
    code, message = status_of(server.address, table="t", token_ids=[1, 2, 3], segment_handle=seg.handle,
                              segment_bytes=need - 1)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"need {need} bytes" in message
    assert bytes(seg.view) == bytes([SENTINEL]) * seg.size


def test_disabled_by_default_and_auto_falls_back(db_path: Path, serve) -> None:
    _, _, values = write_table(db_path, "t", vocab_size=16)
    server = serve(db_path)  # no --allow-shared-memory
    assert socket_of(server.address) == ""   # nothing to hand a segment to
    code, message = status_of(server.address, table="t", token_ids=[1], segment_handle="0" * 32, segment_bytes=1 << 16)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "--allow-shared-memory" in message

    with LutClient(server.address, shared_memory="auto") as client:
        assert client.get_raw("t", [4, 1]) == {1: values[1], 4: values[4]}
        assert client._shared_memory is False  # refused once: BatchGet from then on
        assert client.get_raw("t", [5]) == {5: values[5]}
        assert not client._segments
    with LutClient(server.address, shared_memory=True) as client:
        with pytest.raises(LutError) as err:
            client.get_raw("t", [1])
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "--allow-shared-memory" in err.value.message
    with LutClient("10.0.0.1:1", shared_memory="auto") as remote:
        assert remote._shared_memory is False  # auto: loopback addresses only


def test_bad_segments_are_refused(db_path: Path, serve, segment, tmp_path: Path) -> None:
    write_table(db_path, "t", vocab_size=16)
    server = serve(db_path, "--allow-shared-memory")
    seg = segment(server, 4096)
    base = dict(table="t", token_ids=[1])
    # The server opens nothing by name any more, whatever the name.
    victim = tmp_path / "victim"
    victim.write_bytes(b"\0" * 4096)
    for name in (victim.name, str(victim), "../" + victim.name, "x"):
        code, message = status_of(server.address, **base, segment_name=name, segment_bytes=4096)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "segment_name is no longer accepted" in message
    assert victim.read_bytes() == b"\0" * 4096
    code, message = status_of(server.address, **base, segment_handle=seg.handle, segment_bytes=0)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "segment_bytes is 0" in message
    code, message = status_of(server.address, **base, segment_handle=seg.handle, segment_bytes=seg.size + 1)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"{seg.size} bytes" in message
    for handle in ("", "0" * 32, seg.handle + "0", seg.handle[:-1]):
        code, message = status_of(server.address, **base, segment_handle=handle, segment_bytes=4096)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "no segment with this segment_handle" in message

    # What the socket refuses: no descriptor, a read-only one, one that is not a file, two, a wrong greeting.
    path = socket_of(server.address)
    with open(victim, "rb") as read_only:
        assert hand_over(path, SEGMENT_HELLO, [read_only.fileno()]).startswith("ERR the descriptor is not open for writing")
    r, w = os.pipe()
    try:
        assert hand_over(path, SEGMENT_HELLO, [w]).startswith("ERR the descriptor is not a regular file")
        assert hand_over(path, SEGMENT_HELLO, []).startswith("ERR expected one file descriptor")
        with open(victim, "r+b") as f:
            assert hand_over(path, SEGMENT_HELLO, [f.fileno(), f.fileno()]).startswith("ERR expected one file descriptor")
            assert hand_over(path, b"hello\n", [f.fileno()]).startswith("ERR expected")
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(SegmentRefused):
        _refused_segment(path)
    assert victim.read_bytes() == b"\0" * 4096
    # A closed segment's handle is gone.
    handle = seg.handle
    seg.close()
    deadline = time.monotonic() + 10
    while True:
        code, message = status_of(server.address, **base, segment_handle=handle, segment_bytes=4096)
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            break
        assert time.monotonic() < deadline, (code, message)
        time.sleep(0.05)


def _on_shared_memory(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GET_SEALS)   # answers for memfd and tmpfs files only
        return True
    except OSError:
        return False


def test_a_file_on_disk_is_not_a_segment(db_path: Path, serve, tmp_path: Path) -> None:
    """A writable file on a disk (or FUSE) file system is refused: the server's writes to it could
    block for as long as its owner likes (FUSE), holding a worker each time."""
    write_table(db_path, "t", vocab_size=16)
    server = serve(db_path, "--allow-shared-memory")
    for folder in (tmp_path, db_path.parent, REPO):
        with tempfile.NamedTemporaryFile(dir=folder) as f:
            f.write(b"\0" * 4096)
            f.flush()
            if _on_shared_memory(f.fileno()):
                continue
            assert hand_over(socket_of(server.address), SEGMENT_HELLO, [f.fileno()]).startswith(
                "ERR the descriptor is not a memfd or a tmpfs file")
            return
    pytest.skip("no folder off tmpfs to make a file in")


def _refused_segment(path: str) -> None:
    """A segment whose greeting the server does not accept raises SegmentRefused naming the reason."""
    import lutstore.client.shm_segment as seg_mod
    saved = seg_mod.SEGMENT_HELLO
    seg_mod.SEGMENT_HELLO = b"lutstore-segment v0\n"
    try:
        Segment(4096, path)
    finally:
        seg_mod.SEGMENT_HELLO = saved


def test_batch_get_errors_apply_to_the_shared_path(db_path: Path, serve, segment) -> None:
    write_table(db_path, "t", vocab_size=16)
    server = serve(db_path, "--allow-shared-memory", "--max-batch-rows", "4")
    seg = segment(server, 1 << 16)
    fields = dict(segment_handle=seg.handle, segment_bytes=1 << 16)
    code, _ = status_of(server.address, table="nope", token_ids=[1], **fields)
    assert code == grpc.StatusCode.NOT_FOUND
    code, message = status_of(server.address, table="t", token_ids=[], **fields)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty batch" in message
    code, message = status_of(server.address, table="t", token_ids=[1, 2, 3, 4, 5], **fields)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_batch_rows=4" in message
    code, message = status_of(server.address, table="t", token_ids=[16], **fields)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "vocab_size 16" in message
    code, _ = status_of(server.address, table="t", version=9, token_ids=[1], **fields)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    # The client splits at max_batch_rows as it does for BatchGet.
    with LutClient(server.address, shared_memory=True) as client:
        assert sorted(client.get_raw("t", range(16))) == list(range(16))


def test_corrupt_row_is_data_loss(db_path: Path, serve, segment) -> None:
    fmt = RowFormat(2, 4, 16, Encoding.FP16)
    meta, _, values = write_table(db_path, "t", fmt, vocab_size=8)
    bad = bytearray(values[3])
    bad[0] ^= 0xFF
    db = Rdict(str(db_path), Options(raw_mode=True))
    db[row_key(meta.table_id, 3)] = bytes(bad)
    db.close()
    server = serve(db_path, "--allow-shared-memory")
    seg = segment(server, 1 << 16)
    code, message = status_of(server.address, table="t", token_ids=[3], segment_handle=seg.handle,
                              segment_bytes=1 << 16)
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


def test_garbage_and_random_requests_are_refused_cleanly(db_path: Path, serve, segment) -> None:
    """Unparsable bytes -> INVALID_ARGUMENT; random fields -> a contract status, never UNKNOWN/INTERNAL;
    the daemon stays up and writes nothing into a segment it was not asked to."""
    import random

    write_table(db_path, "t", vocab_size=16)
    server = serve(db_path, "--allow-shared-memory")
    never = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    rng = random.Random(7)
    bystander = segment(server, 4096)
    good = segment(server, 1 << 16)
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary("/lutstore.v1.LutStore/BatchGetShared")
        for blob in (b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x1a\x05\x01", bytes([0x0b]) * 9):
            with pytest.raises(grpc.RpcError) as err:
                raw(blob, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for _ in range(60):
            fields = dict(table=rng.choice(["t", "", "x"]), version=rng.choice([0, 1, 2, 2**32 - 1]),
                          token_ids=[rng.choice([0, 5, 15, 16, 2**32 - 1]) for _ in range(rng.randint(0, 5))],
                          segment_handle=rng.choice([good.handle, "", "..", "a/b", "nope", good.handle + "x"]),
                          segment_name=rng.choice(["", "", "", bystander.handle, "x"]),
                          segment_bytes=rng.choice([0, 1, 100, 1 << 16, (1 << 16) + 1, 2**64 - 1]))
            try:
                shared_call(server.address, pb.BatchGetSharedRequest(**fields))
            except grpc.RpcError as e:
                assert e.code() not in never, (fields, e.code(), e.details())
    assert bytes(bystander.view) == bytes([SENTINEL]) * bystander.size
    assert server.proc.poll() is None


def test_a_killed_daemons_socket_directory_is_removed_at_the_next_start(db_path: Path, serve) -> None:
    import signal

    write_table(db_path, "t", vocab_size=8)
    first = serve(db_path, "--allow-shared-memory")
    folder = Path(socket_of(first.address)).parent
    os.kill(first.pid, signal.SIGKILL)
    first.proc.wait(10)
    assert folder.is_dir()          # SIGKILL: no clean-up
    second = serve(db_path, "--allow-shared-memory")
    assert not folder.exists()
    live = Path(socket_of(second.address)).parent
    assert live.is_dir() and live.stat().st_mode & 0o777 == 0o755
    assert second.stop() == 0 and not live.exists()   # a clean stop removes its own
