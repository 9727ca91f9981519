"""The docs' code runs as printed, and the docs say what the code does: docs/writing-a-client.md's
examples and hand decoder against a real daemon, and --max-message-mb as --help, docs/operations.md
and the server agree on it."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys

import grpc
import numpy as np
import pytest

from lutstore.client import LutClient
from lutstore.formats.codec import Encoding, RowFormat
from lutstore.v1 import lutstore_pb2 as pb
from lutstore.v1 import lutstore_pb2_grpc as pb_grpc

from conftest import REPO, write_table

CLIENT_DOC = REPO / "docs" / "writing-a-client.md"


def python_blocks(path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_hand_decoder_decodes_every_encoding_as_the_client_does(db_path, serve) -> None:
    """The page's decoder, run as printed (numpy, zlib, zstandard only): every encoding, with and
    without zstd, gives the values LutClient.get_rows gives."""
    [decoder] = [b for b in python_blocks(CLIENT_DOC) if "def decode(" in b]
    namespace: dict = {}
    exec(compile(decoder, str(CLIENT_DOC), "exec"), namespace)
    decode = namespace["decode"]
    formats = [RowFormat(3, 2, 64, e) for e in Encoding] + [RowFormat(3, 2, 64, Encoding.FP16, zstd=True),
                                                             RowFormat(3, 2, 64, Encoding.NF4, block_size=16)]
    names = [f"{f.encoding.value}{'-zstd' if f.zstd else ''}-{f.block_size}" for f in formats]
    for i, (name, fmt) in enumerate(zip(names, formats)):
        write_table(db_path, name, fmt, vocab_size=16, seed=i)
    server = serve(db_path)
    with LutClient(server.address) as client:
        for name in names:
            info = client.info(name)
            ids = [0, 7, 15]
            raw, want = client.get_raw(name, ids), client.get_rows(name, ids)
            for i, t in enumerate(ids):
                np.testing.assert_allclose(decode(bytes(raw[t]), info), want[i], rtol=1e-6, atol=0, err_msg=name)


def test_python_example_runs_on_a_table_named_tiny(db_path, serve) -> None:
    """The page's first Python example, as printed, against a daemon serving a table named tiny."""
    example = next(b for b in python_blocks(CLIENT_DOC) if "LutClient(" in b)
    assert '"tiny"' in example and "127.0.0.1:50051" in example
    write_table(db_path, "tiny", RowFormat(2, 4, 16), vocab_size=8)
    server = serve(db_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example.replace("127.0.0.1:50051", server.address), str(CLIENT_DOC), "exec"), {})
    assert out.getvalue().splitlines()[0] == "tiny 1 2 4 16", out.getvalue()
    # And the page says how to make one, with commands that exist.
    text = CLIENT_DOC.read_text()
    assert "lutstore ingest tiny-ckpt --name tiny" in text and "python -m inference.train --out tiny-ckpt" in text


def test_max_message_mb_bounds_what_is_sent_and_requests_as_documented(db_path, serve) -> None:
    """--max-message-mb caps messages sent, and requests too (the smaller of it and what
    --max-batch-rows ids need): --help and docs/operations.md say exactly that."""
    helped = subprocess.run([sys.executable, "-m", "lutstore.cli", "serve", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60).stdout
    flat = " ".join(helped.split())
    assert "--max-message-mb MAX_MESSAGE_MB largest gRPC message sent (MiB); a request is read up to the smaller " \
           "of this and what --max-batch-rows ids need" in flat, helped
    row = next(line for line in (REPO / "docs" / "operations.md").read_text().splitlines()
               if line.startswith("| `--max-message-mb`"))
    assert "largest gRPC message sent" in row and "the smaller of this and 5 x `--max-batch-rows` + 64 KiB" in row
    write_table(db_path, "t", RowFormat(2, 4, 16), vocab_size=8192)
    server = serve(db_path, "--max-message-mb", "0.01", "--max-batch-rows", "100000")   # 10 KiB < 564 KiB
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LutStoreStub(channel)
        small = list(stub.BatchGet(pb.BatchGetRequest(table="t", token_ids=list(range(200, 1200))), timeout=30))
        assert sum(len(m.rows) for m in small) == 1000
        assert max(m.ByteSize() for m in small) <= 10 * 1024   # what is sent
        with pytest.raises(grpc.RpcError) as err:   # ~12 KB of ids: within --max-batch-rows, over --max-message-mb
            list(stub.BatchGet(pb.BatchGetRequest(table="t", token_ids=list(range(2000, 8000))), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
