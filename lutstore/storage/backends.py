"""Which backend a --db value names, and how to open it: one registry for ingest, serve, info,
verify, drop and get.

    redis-cluster://HOST:PORT[,HOST:PORT...][?options]   a Valkey / Redis Cluster
    rediss-cluster://...                                  the same over TLS
                                                          (lutstore.storage.cluster; options in ClusterConfig)
    anything else                                         a local RocksDB folder (lutstore.storage.rocksdb)

A new backend is one Backend entry here (its URL schemes and its opener) and its module
beside the others; each backend module is imported only when its --db is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from lutstore.storage.api import TableStore

Mode = Literal["primary", "secondary"]


def _open_cluster(db: str | Path, mode: Mode, create: bool) -> TableStore:
    from lutstore.storage.cluster import ClusterStore

    return ClusterStore.open(str(db), mode, create)


def _open_rocksdb(db: str | Path, mode: Mode, create: bool) -> TableStore:
    from lutstore.storage.rocksdb import Store

    return Store.open(db, mode, create)


@dataclass(frozen=True)
class Backend:
    name: str
    schemes: tuple[str, ...]    # the --db prefixes it answers to; () for the local folder, the default
    open: Callable[[str | Path, Mode, bool], TableStore]
    local: bool                 # a folder on this host: ingest checks its free space and stages files in it

    def matches(self, db: str | Path) -> bool:
        return isinstance(db, str) and db.startswith(self.schemes) if self.schemes else True


BACKENDS: tuple[Backend, ...] = (   # the first that matches; the local folder last
    Backend("redis-cluster", ("redis-cluster://", "rediss-cluster://"), _open_cluster, local=False),
    Backend("rocksdb", (), _open_rocksdb, local=True),
)


def backend_for(db: str | Path) -> Backend:
    return next(b for b in BACKENDS if b.matches(db))


def is_cluster_url(db: str | Path) -> bool:
    return not backend_for(db).local


def open_store(db: str | Path, mode: Mode = "primary", create: bool = False) -> TableStore:
    """Open the store `db` names; StoreError (a one-line reason) if it cannot be opened."""
    return backend_for(db).open(db, mode, create)
