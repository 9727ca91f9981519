"""Where lutstore keeps things by default: the database (`lutstore ingest` / `serve`) and the
client's cache of fetched backbones and corpora (inference). Environment first, then XDG."""

from __future__ import annotations

import os
from pathlib import Path


def default_db_path() -> str | Path:
    """$LUTSTORE_DB (a folder or a redis-cluster:// URL), else a per-user data directory."""
    env = os.environ.get("LUTSTORE_DB")
    if env:
        return env if env.startswith(("redis-cluster://", "rediss-cluster://")) else Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "lutstore" / "db"


def default_cache_dir() -> Path:
    """$LUTSTORE_CACHE, else $XDG_CACHE_HOME/lutstore, else ~/.cache/lutstore: fetched backbones
    (by fingerprint) and the demo's corpus."""
    env = os.environ.get("LUTSTORE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lutstore"
