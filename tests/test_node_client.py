"""The Node.js client (clients/node) against a real daemon.

A table of each encoding (and two zstd ones) is served by `lutstore serve`;
the Python client says what the rows are; `node --test clients/node/test/`
must decode the same values bit for bit, see the same raw bytes, and get the
same errors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from lutstore.client import LutClient
from lutstore.formats.codec import Encoding, RowFormat, decode_row, decode_rows, encode_rows

from conftest import REPO, write_table

NODE_DIR = REPO / "clients" / "node"
MAX_BATCH_ROWS = 8  # small, so that the ids below need more than one BatchGet
VOCAB = 64
IDS = [5, 0, 5, 63, 17, 1, 2, 3, 4, 6, 7, 8, 9, 10, 17]  # unordered, repeated, 13 distinct
TABLES = [
    ("t-fp32", RowFormat(2, 3, 16, Encoding.FP32)),
    ("t-fp16", RowFormat(2, 3, 16, Encoding.FP16)),
    ("t-bf16", RowFormat(2, 3, 16, Encoding.BF16)),
    ("t-int8", RowFormat(2, 4, 16, Encoding.INT8)),
    ("t-fp16-zstd", RowFormat(2, 2, 32, Encoding.FP16, zstd=True)),
    ("t-int8-zstd", RowFormat(2, 2, 32, Encoding.INT8, zstd=True)),
    ("t-nf4", RowFormat(3, 2, 16, Encoding.NF4, block_size=8)),
]

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


def edge_rows() -> list[dict]:
    """Rows with the values a decoder gets wrong first (fp16 subnormals and
    extremes, signed zeros, an all-zero int8 vector), encoded and decoded by
    the Python codec, for the Node decoder to reproduce offline."""
    fmt_shape = (1, 2, 8)
    values = np.array([[[0.0, -0.0, 6e-8, -3e-6, 6.1e-5, 65504.0, -65504.0, 1.0009765625],
                        [0.0] * 8]], dtype=np.float32)[None]
    cases = []
    for encoding in Encoding:
        for zstd in (False, True):
            fmt = RowFormat(*fmt_shape, encoding, zstd=zstd, block_size=4)   # block_size: nf4 only
            (stored,) = encode_rows(fmt, values)
            cases.append({"encoding": encoding.value, "zstd": zstd, "shape": list(fmt_shape), "data": stored.hex(),
                          "block_size": fmt.block_size,
                          "values": decode_row(fmt, stored).astype(np.float64).ravel().tolist()})
    return cases


def python_rows(client: LutClient, name: str, ids: list[int]) -> np.ndarray:
    """The Python client's rows, asked for in batches the server accepts."""
    parts = [client.get_rows(name, ids[i:i + MAX_BATCH_ROWS]) for i in range(0, len(ids), MAX_BATCH_ROWS)]
    return np.concatenate(parts)


def test_node_client_matches_python_client(db_path, serve, tmp_path):
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("clients/node has no node_modules: run `make node-deps` (npm ci in clients/node)")
    stored = {}
    for seed, (name, fmt) in enumerate(TABLES):
        meta, _rows, values = write_table(db_path, name, fmt, vocab_size=VOCAB, seed=seed)
        stored[name] = (meta, fmt, values)
    server = serve(db_path, "--max-batch-rows", str(MAX_BATCH_ROWS))

    expected = {"tables": [], "edge_rows": edge_rows()}
    client = LutClient(server.address)
    try:
        for name, (meta, fmt, values) in stored.items():
            rows = python_rows(client, name, IDS)
            # Both clients are checked against the codec's own reading of the stored bytes.
            np.testing.assert_array_equal(rows, decode_rows(fmt, [values[i] for i in IDS]))
            raw = client.get_raw(name, [0, 17, VOCAB - 1])
            expected["tables"].append({
                "name": name, "version": meta.version, "encoding": fmt.encoding.value, "zstd": fmt.zstd,
                "shape": list(fmt.shape), "vocab_size": VOCAB, "max_batch_rows": MAX_BATCH_ROWS,
                "ids": IDS,
                # float32 -> Python float is exact, and JSON keeps every digit of it.
                "values": rows.astype(np.float64).ravel().tolist(),
                "raw": {str(i): bytes(v).hex() for i, v in raw.items()},
            })
    finally:
        client.close()
    expected_file = tmp_path / "expected.json"
    expected_file.write_text(json.dumps(expected))

    env = dict(os.environ, LUTSTORE_ADDR=server.address, LUTSTORE_EXPECTED=str(expected_file))
    result = subprocess.run(["node", "--test", "clients/node/test/"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=180)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    # The daemon tests must have run, not been skipped.
    assert re.search(r"^# skipped 0$", result.stdout, re.M), report
    passed = int(re.search(r"^# pass (\d+)$", result.stdout, re.M).group(1))
    assert passed >= 2, report


def test_node_example_prints_rows(db_path, serve):
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("clients/node has no node_modules: run `make node-deps` (npm ci in clients/node)")
    meta, _rows, _values = write_table(db_path, "tiny", RowFormat(2, 2, 8, Encoding.INT8), vocab_size=VOCAB)
    server = serve(db_path)
    result = subprocess.run(["node", "examples/get_rows.js", "--addr", server.address, "--table", "tiny", "3", "1"],
                            cwd=NODE_DIR, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"tiny v{meta.version}: rows of shape [2, 2, 2, 8]" in result.stdout
    assert re.search(r"token 3: \[-?\d", result.stdout)
    missing = subprocess.run(["node", "examples/get_rows.js", "--addr", server.address, "--table", "nope"],
                             cwd=NODE_DIR, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
