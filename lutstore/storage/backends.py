"""Choose the store backend from `--db`: a path is a RocksDB directory
(lutstore.store.Store); `redis-cluster://HOST:PORT[,HOST:PORT...][?options]`
(or `rediss-cluster://` for TLS) is a Valkey / Redis Cluster
(lutstore.cluster_store.ClusterStore; options in its ClusterConfig)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lutstore.storage.api import TableStore

CLUSTER_SCHEMES = ("redis-cluster://", "rediss-cluster://")


def is_cluster_url(db: str | Path) -> bool:
    return isinstance(db, str) and db.startswith(CLUSTER_SCHEMES)


def db_argument(text: str) -> str | Path:
    """argparse `type=` for --db: a cluster URL stays a string (Path would fold its '//')."""
    return text if is_cluster_url(text) else Path(text)


def open_store(db: str | Path, mode: Literal["primary", "secondary"] = "primary", create: bool = False) -> TableStore:
    """Open the store `db` names; StoreError (a one-line reason) if it cannot be opened."""
    if is_cluster_url(db):
        from lutstore.storage.cluster import ClusterStore

        return ClusterStore.open(str(db), mode, create)
    from lutstore.storage.rocksdb import Store

    return Store.open(db, mode, create)
