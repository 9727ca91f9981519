"""LutClient against real servers: order and duplicates, batching, prefetch,
retries against a dead address, round robin over replicas."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from lutstore.client.lut_client import LutClient, LutError, channel_target
from lutstore.formats.codec import Encoding, RowFormat, decode_rows

from conftest import write_table

FMT = RowFormat(2, 2, 16, Encoding.BF16)


def _free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def table(any_db: Path | str):
    """The same table on each backend (RocksDB, a Valkey Cluster)."""
    meta, _, values = write_table(any_db, "t", FMT, vocab_size=100, seed=7)
    return any_db, meta, values


def test_rows_in_request_order_with_duplicates_and_batches(table, serve) -> None:
    db, meta, values = table
    server = serve(db, "--max-batch-rows", "7")
    ids = np.array([99, 3, 3, 0, 50, 99, 12, 13, 14, 15, 16, 17, 18, 19, 20])  # 12 distinct > 7: two batches
    with LutClient(server.address) as client:
        got = client.get_rows("t", ids)
        np.testing.assert_array_equal(got, decode_rows(FMT, [values[i] for i in ids]))
        assert got.flags.writeable and got.flags.c_contiguous
        pinned = client.get_rows("t", [5], version=1)
        np.testing.assert_array_equal(pinned[0], decode_rows(FMT, [values[5]])[0])
        assert client.get_rows("t", []).shape == (0, 2, 2, 16)
        assert client.get_raw("t", []) == {}
        assert client.row_format(client.info("t")) == FMT
        assert [t.name for t in client.tables()] == ["t"]
        with pytest.raises(LutError) as err:
            client.get_rows("t", [1, -2])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_prefetch_returns_a_future_of_the_rows(table, serve) -> None:
    db, _, values = table
    server = serve(db)
    with LutClient(server.address) as client:
        futures = [client.prefetch("t", [i, i + 1, i]) for i in range(0, 20, 4)]
        for i, future in zip(range(0, 20, 4), futures):
            np.testing.assert_array_equal(future.result(timeout=60), decode_rows(FMT, [values[i], values[i + 1], values[i]]))
        with pytest.raises(LutError):
            client.prefetch("t", [100]).result(timeout=60)


def test_dead_address_retries_then_fails_clearly() -> None:
    address = f"127.0.0.1:{_free_port()}"
    with LutClient(address, timeout=5, retries=3, retry_seconds=3) as client:
        with pytest.raises(LutError) as err:
            client.get_rows("t", [1])
    e = err.value
    assert e.code == grpc.StatusCode.UNAVAILABLE
    assert address in str(e) and "4 attempts" in str(e) and "3 retries" in str(e)


def test_round_robin_skips_a_dead_replica(table, serve) -> None:
    db, _, values = table
    a = serve(db, verbose=2)  # debug logging: one line per BatchGet
    b = serve(db, verbose=2)
    dead = f"127.0.0.1:{_free_port()}"
    target, replicated = channel_target(f"{a.address},{dead},{b.address}")
    assert replicated and target.startswith("ipv4:127.0.0.1:")
    with LutClient(f"{a.address},{dead},{b.address}", retries=10, retry_seconds=20) as client:
        def served_by() -> list[int]:
            return [sum("BatchGet t" in line for line in s.output) for s in (a, b)]

        # Pinned version: after the first call, one RPC (a BatchGet) per get_raw. Both replicas take
        # calls once both are connected (bounded loop: a connection may take a moment on a busy host).
        for i in range(100):
            assert client.get_raw("t", [i], version=1) == {i: values[i]}
            if min(served_by()) >= 1:
                break
            time.sleep(0.05)
        assert min(served_by()) >= 1, served_by()
        assert a.stop() == 0
        for i in range(6):  # only b is left; calls keep succeeding (retrying while the balancer notices)
            assert client.get_raw("t", [i]) == {i: values[i]}


def test_channel_target_forms() -> None:
    assert channel_target("localhost:50051") == ("localhost:50051", False)
    assert channel_target("127.0.0.1:1, 127.0.0.1:2") == ("ipv4:127.0.0.1:1,127.0.0.1:2", True)
    with pytest.raises(ValueError):
        channel_target("127.0.0.1:1,nope")
