"""Operations: Prometheus metrics scraped from a real daemon, JSON logs, and a
graceful shutdown that lets an in-flight stream finish."""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lutstore.formats.codec import Encoding, RowFormat
from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

from conftest import Server, write_table

METRICS_LINE = re.compile(r"lutstore: metrics on http://127\.0\.0\.1:(\d+)/metrics")
BATCH_GET = "lutstore.v1.LutStore/BatchGet"


def metrics_port(server: Server) -> int:
    for line in server.output:
        m = METRICS_LINE.search(line)
        if m:
            return int(m.group(1))
    raise AssertionError(f"no metrics line in:\n{''.join(server.output)}")


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_rows_bytes_cache_and_latency(db_path: Path, serve) -> None:
    _, _, values = write_table(db_path, "t", vocab_size=64, seed=1)
    server = serve(db_path, "--metrics-port", "0")
    port = metrics_port(server)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LutStoreStub(channel)
        batches = [[1, 2, 3], [3, 2, 1, 1], [10, 11], [1]]  # distinct ids: 3, 3, 2, 1; hits on the repeats
        for ids in batches:
            assert list(stub.BatchGet(pb.BatchGetRequest(table="t", token_ids=ids), timeout=10))
        for bad in (pb.BatchGetRequest(table="nope", token_ids=[1]), pb.BatchGetRequest(table="t", token_ids=[64])):
            with pytest.raises(grpc.RpcError):
                list(stub.BatchGet(bad, timeout=10))
        stub.ListTables(pb.ListTablesRequest(), timeout=10)
    s = scrape(port)
    print({k: v for k, v in s.items() if k[0].startswith("lutstore")})
    assert value(s, "lutstore_requests_total", method=BATCH_GET, code="OK") == 4
    assert value(s, "lutstore_requests_total", method=BATCH_GET, code="NOT_FOUND") == 1
    assert value(s, "lutstore_requests_total", method=BATCH_GET, code="INVALID_ARGUMENT") == 1
    assert value(s, "lutstore_requests_total", method="lutstore.v1.LutStore/ListTables", code="OK") == 1
    assert value(s, "lutstore_request_seconds_count", method=BATCH_GET) == 6
    assert value(s, "lutstore_request_seconds_bucket", method=BATCH_GET, le="+Inf") == 6
    distinct = [sorted(set(ids)) for ids in batches]
    assert value(s, "lutstore_rows_served_total", table="t") == sum(map(len, distinct))
    row_bytes = sum(len(values[i]) for ids in distinct for i in ids)
    served = value(s, "lutstore_bytes_served_total", table="t")
    assert row_bytes <= served <= row_bytes + 64 * sum(map(len, distinct))  # rows, maybe with message framing
    # Misses: 1,2,3 then 10,11; every other lookup is a hit.
    hits, misses = value(s, "lutstore_cache_hits_total"), value(s, "lutstore_cache_misses_total")
    assert (hits, misses) == (4, 5)
    assert value(s, "lutstore_cache_hit_ratio") == pytest.approx(4 / 9)
    assert value(s, "lutstore_cache_entries") == 5
    assert value(s, "lutstore_cache_budget_bytes") == 1024 * 2**20
    assert value(s, "lutstore_requests_in_flight") == 0


def test_json_logs_one_object_per_line(db_path: Path, serve) -> None:
    write_table(db_path, "t", vocab_size=8)
    server = serve(db_path, "--log-format", "json", verbose=2)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LutStoreStub(channel)
        list(stub.BatchGet(pb.BatchGetRequest(table="t", token_ids=[1]), timeout=10))
        with pytest.raises(grpc.RpcError):
            stub.GetTableInfo(pb.GetTableInfoRequest(table="missing"), timeout=10)
    assert server.stop() == 0
    records = [json.loads(line) for line in server.output if not line.startswith("lutstore: ")]
    assert records and all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    access = [r for r in records if r["logger"] == "lutstore.access"]
    assert {(r["rpc_method"], r["code"]) for r in access} >= {
        (BATCH_GET, "OK"), ("lutstore.v1.LutStore/GetTableInfo", "NOT_FOUND")}
    assert all(r["ms"] >= 0 and r["peer"] for r in access)
    assert any(r.get("event") == "serving" for r in records)
    assert any("stopping" in r["msg"] for r in records)


def test_graceful_shutdown_finishes_an_in_flight_stream(db_path: Path, serve) -> None:
    """SIGTERM while a client is half-way through a large BatchGet stream: the stream still
    delivers every row with status OK, and the daemon exits 0 once it has."""
    # 16 KiB rows; 4096 of them (64 MiB) outrun the transport's flow-control buffers (32 MiB once did not, under load)
    fmt = RowFormat(2, 4, 512, Encoding.FP32)
    _, _, values = write_table(db_path, "big", fmt, vocab_size=4096)
    server = serve(db_path, "--cache-mb", "0", "--max-batch-rows", "4096")
    ids = list(range(4096))
    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.LutStoreStub(channel)
        stream = stub.BatchGet(pb.BatchGetRequest(table="big", token_ids=ids), timeout=60)
        first = next(stream)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while not any("stopping" in line for line in server.output):
            assert time.monotonic() < deadline, "the daemon did not start stopping"
            time.sleep(0.02)
        # The server is now shutting down, with our stream still open.
        assert server.proc.poll() is None, "the daemon exited before the in-flight stream was finished"
        received = [first] + list(stream)
        assert stream.code() == grpc.StatusCode.OK
    got = {r.token_id: r.data for msg in received for r in msg.rows}
    assert got.keys() == set(ids) and all(got[i] == values[i] for i in ids)
    assert server.proc.wait(timeout=20) == 0


def test_metrics_count_the_rows_of_a_batch_get_stream_session(db_path: Path, serve) -> None:
    _, _, values = write_table(db_path, "t", vocab_size=64, seed=1)
    server = serve(db_path, "--metrics-port", "0")
    port = metrics_port(server)
    batches = [[1, 2, 3], [3, 3], [10, 11]]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LutStoreStub(channel)
        answers = list(stub.BatchGetStream(iter([pb.BatchGetRequest(table="t", token_ids=ids) for ids in batches]),
                                           timeout=10))
    assert [r.token_id for a in answers for r in a.rows] == [1, 2, 3, 3, 10, 11]
    s = scrape(port)
    assert value(s, "lutstore_requests_total", method=BATCH_GET + "Stream", code="OK") == 1
    assert value(s, "lutstore_rows_served_total", table="t") == 6
    row_bytes = sum(len(values[i]) for i in (1, 2, 3, 3, 10, 11))
    assert row_bytes <= value(s, "lutstore_bytes_served_total", table="t") <= row_bytes + 64 * 6
