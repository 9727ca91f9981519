"""Layer-sliced BatchGet (BatchGetRequest.layer_ends), BatchGetStream sessions, and RemoteTable
fetching through them, against a real daemon."""

from __future__ import annotations

import threading
import time
import zlib

import grpc
import numpy as np
import pytest
import torch
from rocksdict import Options, Rdict

from inference.lut import InProcessTable, RemoteTable, layer_ends_for
from lutstore.formats import codec
from lutstore.client import LutClient, LutError
from lutstore.formats.codec import Encoding, RowFormat
from lutstore.storage.rocksdb import row_key
from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

from conftest import write_table

ENCODINGS = [RowFormat(5, 3, 64, e) for e in Encoding] + [RowFormat(5, 3, 64, Encoding.FP16, zstd=True)]


def expected_slice(fmt: RowFormat, stored: bytes, begin: int, end: int) -> bytes:
    payload = codec.payload_of(fmt, stored)
    return b"".join(bytes(p) for p in codec.slice_parts(fmt, payload, begin, end))


@pytest.mark.parametrize("fmt", ENCODINGS, ids=lambda f: f"{f.encoding.value}{'-zstd' if f.zstd else ''}")
def test_sliced_batch_get_on_the_wire(db_path, serve, fmt: RowFormat) -> None:
    """Every distinct id's slice of every group exactly once, group by group, each slice its own
    CRC-32, as generated protobuf code (any language) parses it; small messages force several per group."""
    _, rows, values = write_table(db_path, "t", fmt, vocab_size=40, seed=3)
    server = serve(db_path, "--max-message-mb", "0.01")   # ~5 KiB per message: several for a group of wide slices
    ids = [31, 2, 7, 2, 19, 0]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LutStoreStub(channel)
        messages = list(stub.BatchGet(pb.BatchGetRequest(table="t", token_ids=ids, layer_ends=[1, 2, 5]), timeout=10))
    assert len(messages) > 3 if fmt.encoding not in (Encoding.INT8, Encoding.NF4) else len(messages) == 3  # small rows
    groups = [(m.layer_begin, m.layer_end) for m in messages]
    assert groups == sorted(groups) and set(groups) == {(0, 1), (1, 2), (2, 5)}   # layer order, no interleaving
    got: dict[tuple[int, int], bytes] = {}
    for m in messages:
        for row in m.rows:
            key = (m.layer_begin, row.token_id)
            assert key not in got
            body, crc = row.data[:-4], row.data[-4:]
            assert zlib.crc32(body).to_bytes(4, "little") == crc
            got[key] = body
    assert sorted(got) == sorted((b, t) for b in (0, 1, 2) for t in set(ids))
    for (begin, token), body in got.items():
        end = {0: 1, 1: 2, 2: 5}[begin]
        assert body == expected_slice(fmt, values[token], begin, end)
    # get_slices hands over whole groups in layer order; decoded, they are the rows' layers.
    seen = []
    with LutClient(server.address) as client:
        client.get_slices("t", ids, 0, [2, 5], lambda b, e, i, p: seen.append((b, e, i.tolist(), p.copy())))
        whole_ids, payloads = client.get_payloads("t", ids)
    assert [(b, e) for b, e, _, _ in seen] == [(0, 2), (2, 5)]
    for b, e, got_ids, p in seen:
        assert got_ids == whole_ids.tolist() == sorted(set(ids))
        for i in range(len(got_ids)):
            assert p[i].tobytes() == b"".join(bytes(x) for x in codec.slice_parts(fmt, memoryview(payloads[i]), b, e))


def test_sliced_batch_get_errors(db_path, serve) -> None:
    meta, _, values = write_table(db_path, "t", RowFormat(4, 2, 8, Encoding.FP16), vocab_size=16)
    bad = bytearray(values[5])
    bad[3] ^= 0xFF
    db = Rdict(str(db_path), Options(raw_mode=True))
    db[row_key(meta.table_id, 5)] = bytes(bad)
    db.close()
    server = serve(db_path)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LutStoreStub(channel)
        for ends, why in (([2, 2, 4], "strictly increase"), ([1, 3], "end at num_layers=4"), ([0, 4], "strictly increase"),
                          ([2, 5], "end at num_layers=4")):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.BatchGet(pb.BatchGetRequest(table="t", token_ids=[1], layer_ends=ends), timeout=10))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in err.value.details(), ends
        with pytest.raises(grpc.RpcError) as err:
            list(stub.BatchGet(pb.BatchGetRequest(table="t", token_ids=[4, 5], layer_ends=[1, 4]), timeout=10))
        assert err.value.code() == grpc.StatusCode.DATA_LOSS and "row 5" in err.value.details()
    with LutClient(server.address) as client:
        with pytest.raises(LutError) as err:
            client.get_slices("t", [1], 0, [3, 3, 4], lambda *a: None)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(LutError) as err:
            client.get_slices("t", [5], 0, [1, 4], lambda *a: None)
        assert err.value.code == grpc.StatusCode.DATA_LOSS
        assert client.get_raw("t", [4]) == {4: values[4]}   # still serving


class Collector:
    """on_group / on_error / on_done of one session request."""

    def __init__(self) -> None:
        self.groups: list[tuple[int, int, list[int], np.ndarray]] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def on_group(self, b: int, e: int, ids: np.ndarray, payloads: np.ndarray) -> None:
        self.groups.append((b, e, ids.tolist(), payloads.copy()))

    def on_error(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def kwargs(self) -> dict:
        return {"on_group": self.on_group, "on_error": self.on_error, "on_done": self.done.set}


def test_session_answers_in_order_and_survives_a_bad_request(db_path, serve) -> None:
    fmt = RowFormat(4, 2, 8, Encoding.BF16)
    _, _, values = write_table(db_path, "t", fmt, vocab_size=32, seed=5)
    server = serve(db_path, verbose=2)
    with LutClient(server.address) as client:
        session = client.session("t", 0, [1, 4])
        batches = [[1, 2], [3], [30, 31], [40], [5, 6]]   # 40 is outside the vocabulary
        collectors = [Collector() for _ in batches]
        for ids, c in zip(batches, collectors):
            session.submit(ids, **c.kwargs())
        for c in collectors:
            assert c.done.wait(10)
        session.close()
    for ids, c in zip(batches, collectors):
        if 40 in ids:
            assert isinstance(c.error, LutError) and c.error.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "token id 40" in c.error.message and not c.groups
            continue
        assert c.error is None and [(b, e) for b, e, _, _ in c.groups] == [(0, 1), (1, 4)]
        for b, e, got, payloads in c.groups:
            assert got == ids
            for i, t in enumerate(ids):
                assert payloads[i].tobytes() == expected_slice(fmt, values[t], b, e)
    # Two streams: the bad request ended the first; the requests behind it went on a second. The daemon
    # logs a stream when it ends, and its output is drained by a thread: wait for the second line.
    deadline = time.monotonic() + 10
    while sum("LutStore/BatchGetStream" in line for line in server.output) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum("LutStore/BatchGetStream" in line for line in server.output) == 2


def test_session_of_whole_rows_and_a_closed_session(db_path, serve) -> None:
    fmt = RowFormat(3, 2, 8, Encoding.FP16, zstd=True)
    _, _, values = write_table(db_path, "t", fmt, vocab_size=16, seed=2)
    server = serve(db_path)
    with LutClient(server.address) as client:
        session = client.session("t")
        c = Collector()
        session.submit([3, 9], **c.kwargs())
        assert c.done.wait(10) and c.error is None
        [(b, e, ids, payloads)] = c.groups
        assert (b, e, ids) == (0, 3, [3, 9])
        assert [payloads[i].tobytes() for i in range(2)] == [bytes(codec.payload_of(fmt, values[t])) for t in (3, 9)]
        session.close()
        with pytest.raises(LutError) as err:
            session.submit([1], **Collector().kwargs())
        assert err.value.code == grpc.StatusCode.CANCELLED


class Boom(Exception):
    """What a consumer's callback raises in the tests."""


@pytest.mark.parametrize("entry", ["session", "fetcher", "fetcher-calls"])
def test_no_bad_call_poisons_a_session_or_a_fetcher(db_path, serve, entry: str) -> None:
    """A repeated id or no ids is refused at once (ValueError naming the repeat) and sends nothing; an id
    outside the vocabulary, or a callback that raises, fails only its own call (on_error). Every good call
    around them, sent right behind without waiting, gets its own rows."""
    fmt = RowFormat(4, 2, 8, Encoding.FP16)
    _, _, values = write_table(db_path, "t", fmt, vocab_size=32, seed=7)
    server = serve(db_path)
    with LutClient(server.address) as client:
        if entry == "session":
            runner = client.session("t", 0, [1, 4])
            submit = lambda ids, c: runner.submit(ids, **c.kwargs())                  # noqa: E731
        else:
            runner = client.fetcher("t", 0, [1, 4], session=entry == "fetcher")
            submit = lambda ids, c: runner.fetch(ids, **c.kwargs())                   # noqa: E731
        for ids, repeat in (([3, 4, 3], 3), ([9, 9], 9), ([], None)):
            with pytest.raises(ValueError, match=f"token id {repeat} is asked for more than once" if repeat is not None
                               else "no token ids"):
                submit(ids, Collector())

        class RaisesInGroup(Collector):
            def on_group(self, *args) -> None:
                raise Boom("on_group")

        raises_done = Collector()

        def done_then_raise() -> None:
            raises_done.done.set()
            raise Boom("on_done")

        calls: list[tuple[list[int], Collector, str]] = []   # (ids, collector, what it must get)
        for ids, c, outcome in (([7, 8], Collector(), "rows"), ([40], Collector(), "out of range"),
                                ([1, 2], Collector(), "rows"), ([5], RaisesInGroup(), "on_group"),
                                ([6, 30], Collector(), "rows"), ([11], raises_done, "rows"),
                                ([12, 13], Collector(), "rows")):
            kwargs = c.kwargs()
            if c is raises_done:
                kwargs["on_done"] = done_then_raise
            (runner.submit if entry == "session" else runner.fetch)(ids, **kwargs)
            calls.append((ids, c, outcome))
        submit([7, 8], after := Collector())   # after every bad call: still served
        calls.append(([7, 8], after, "rows"))
        for ids, c, outcome in calls:
            assert c.done.wait(20), (ids, outcome)
        runner.close()
    assert isinstance(raises_done.error, Boom) and str(raises_done.error) == "on_done"   # told, after its rows
    for ids, c, outcome in calls:
        if outcome == "out of range":
            assert isinstance(c.error, LutError) and c.error.code == grpc.StatusCode.INVALID_ARGUMENT, c.error
            assert "token id 40" in c.error.message and not c.groups
        elif outcome == "on_group":
            assert isinstance(c.error, Boom) and str(c.error) == "on_group", c.error
        else:
            assert c.error is None or c is raises_done, (ids, c.error)
            assert [(b, e) for b, e, _, _ in c.groups] == [(0, 1), (1, 4)], ids
            for b, e, got, payloads in c.groups:
                assert got == ids
                for i, t in enumerate(ids):
                    assert bytes(payloads[i]) == expected_slice(fmt, values[t], b, e)


def _decode_steps_equal(source: RemoteTable, reference: InProcessTable, steps: int, vocab: int, batch: int,
                        widths: int, seed: int, exact: bool) -> None:
    """Decode-like steps of random ids (1..widths tokens each) through source: every layer's rows equal
    the reference's (bit for bit when exact)."""
    rng = np.random.default_rng(seed)
    tolerance = {"rtol": 0, "atol": 0} if exact else {}
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, vocab, (batch, 1 + step % widths)))
        source.request(idx)
        got, want = source.rows(idx), reference.gather(idx)
        for layer in range(source.num_layers):
            torch.testing.assert_close(got.layer(layer).float().cpu(), want[:, :, layer].float(), **tolerance)


@pytest.mark.parametrize("encoding", [Encoding.FP16, Encoding.INT8, Encoding.NF4])
@pytest.mark.parametrize("how", ["sliced-session", "whole-session", "sliced-calls", "whole-calls"])
def test_remote_table_rows_equal_in_process_every_way(db_path, serve, encoding: Encoding, how: str) -> None:
    """nf4: rows stay packed in the cache and a layer is dequantised when gathered; they must equal the
    in-process nf4 table's (PackedTable) bit for bit."""
    fmt = RowFormat(6, 3, 8, encoding, block_size=8 if encoding is Encoding.NF4 else 0)
    write_table(db_path, "t", fmt, vocab_size=50, seed=9)
    server = serve(db_path)
    split = "auto" if how.startswith("sliced") else "none"
    with LutClient(server.address) as client:
        reference = InProcessTable.from_client(client, "t")
        with RemoteTable(client, "t", cache_bytes=1 << 20, layer_split=split, session=how.endswith("session")) as source:
            assert source.layer_ends == ([1, 2, 4, 6] if split == "auto" else [])
            _decode_steps_equal(source, reference, steps=12, vocab=50, batch=3, widths=3, seed=0,
                                exact=encoding is Encoding.NF4)
            assert source.stats().misses > 0 and source.stats().hits > 0
            if encoding is Encoding.NF4:   # packed in the cache: L * P bytes a row, 0.27x of fp16 at B = 64
                assert source.row_device_bytes == fmt.num_layers * fmt.nf4_layer_bytes


def test_remote_table_pass_that_stops_early_leaves_no_half_rows(db_path, serve) -> None:
    """A forward pass that raises after layer 0 (its later layer groups never copied into the cache):
    the next pass still sees whole, correct rows."""
    write_table(db_path, "t", RowFormat(8, 2, 4, Encoding.FP32), vocab_size=20, seed=4)
    server = serve(db_path)
    with LutClient(server.address) as client:
        reference = InProcessTable.from_client(client, "t")
        with RemoteTable(client, "t", cache_bytes=1 << 20) as source:
            first = torch.tensor([[3, 4, 5]])
            source.rows(first).layer(0)            # ... and the pass stops here
            again = torch.tensor([[5, 3], [6, 4]])
            torch.testing.assert_close(source.gather(again), reference.gather(again))
            assert source.stats().misses == 4


def test_remote_table_fetch_fails_clearly_when_the_daemon_dies(db_path, serve) -> None:
    write_table(db_path, "t", RowFormat(2, 2, 4, Encoding.FP16), vocab_size=20)
    server = serve(db_path)
    with LutClient(server.address, retries=2, retry_seconds=0.5) as client:
        with RemoteTable(client, "t") as source:
            source.gather(torch.tensor([[1]]))
            server.proc.kill()
            server.proc.wait()
            with pytest.raises(LutError) as err:
                source.gather(torch.tensor([[2, 3]]))
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and "unavailable after" in err.value.message
            with pytest.raises(LutError):       # the failed rows are not left in the cache as garbage
                source.gather(torch.tensor([[2]]))
        with pytest.raises(RuntimeError, match="closed"):
            source.gather(torch.tensor([[1]]))
        assert source.stats().cache_bytes == 0   # close gave the cache's memory back


def test_layer_groups_double() -> None:
    assert layer_ends_for(1) == [1]
    assert layer_ends_for(4) == [1, 2, 4]
    assert layer_ends_for(12) == [1, 2, 4, 8, 12]
    assert layer_ends_for(24) == [1, 2, 4, 8, 16, 24]


def test_sessions_beyond_max_sessions_are_refused_and_tables_fall_back_to_calls(db_path, serve) -> None:
    """Each open session holds a daemon thread: past --max-sessions a session is refused at once
    (RESOURCE_EXHAUSTED), and a RemoteTable then fetches with one BatchGet per fetch."""
    write_table(db_path, "t", RowFormat(3, 2, 8, Encoding.FP16), vocab_size=40, seed=6)
    server = serve(db_path, "--max-sessions", "1", verbose=2)
    with LutClient(server.address) as client:
        reference = InProcessTable.from_client(client, "t")
        with RemoteTable(client, "t") as first, RemoteTable(client, "t") as second:
            idx = torch.tensor([[1, 5, 9]])
            torch.testing.assert_close(first.gather(idx).float(), reference.gather(idx))    # holds the only session
            for step in range(3):                                                    # refused, then calls
                idx = torch.tensor([[2 + step, 30 - step]])
                torch.testing.assert_close(second.gather(idx).float(), reference.gather(idx))
            assert second.transport == "calls" and first.transport == "session"
        refused = [line for line in server.output if "BatchGetStream RESOURCE_EXHAUSTED" in line]
        assert refused and sum("LutStore/BatchGet OK" in line for line in server.output) >= 3


def test_max_sessions_must_leave_threads_for_other_rpcs(db_path) -> None:
    from lutstore.cli import main as cli_main

    write_table(db_path, "t", vocab_size=8)
    assert cli_main(["serve", "--db", str(db_path), "--port", "0", "--workers", "4", "--max-sessions", "4"]) == 2


STAGED_DEVICES = ["cpu-staged", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the staged path runs on the CPU only"))]


@pytest.mark.parametrize("device", STAGED_DEVICES)
@pytest.mark.parametrize("encoding", list(Encoding))
@pytest.mark.parametrize("split", ["none", "auto"])
def test_staged_rows_equal_in_process_through_evictions(db_path, serve, device: str, encoding: Encoding,
                                                        split: str) -> None:
    """The device path (rows staged in one host buffer per layer group, uploaded, scattered into the
    slab byte for byte): forced on the CPU here, real on a GPU. A cache of 6 rows under batches of up
    to 8 distinct ids evicts all the time and takes the temporary-batch path, so a staging buffer
    reused or freed before its copy finished would show up as wrong rows."""
    fmt = RowFormat(4, 3, 16, encoding, block_size=8 if encoding is Encoding.NF4 else 0)
    write_table(db_path, "t", fmt, vocab_size=40, seed=11)
    server = serve(db_path)
    with LutClient(server.address) as client:
        reference = InProcessTable.from_client(client, "t")
        target = "cuda" if device == "cuda" else "cpu"
        probe = RemoteTable(client, "t", device=target, cache_bytes=0, session=False)
        row_bytes = probe.row_device_bytes
        probe.close()
        with RemoteTable(client, "t", device=target, cache_bytes=6 * row_bytes, layer_split=split) as source:
            source._stage = True     # the device path, also on the CPU
            _decode_steps_equal(source, reference, steps=20, vocab=40, batch=2, widths=4, seed=3, exact=True)
            assert source.capacity == 6 and source.stats().misses > 6
