"""What `--db` may name, checked before anything is opened or created.

Today a database is a local RocksDB folder. A URL-looking value ("scheme://...")
is refused with one line instead of silently becoming a folder named
"scheme:"; `redis-cluster://HOST:PORT` is reserved for the Redis Cluster
backend (see is_cluster_url) and refused while this build has none.
"""

from __future__ import annotations

import re
from pathlib import Path

from lutstore.errors import UserError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
CLUSTER_SCHEME = "redis-cluster://"


def is_cluster_url(db: str | Path) -> bool:
    """True for `redis-cluster://HOST:PORT[,HOST:PORT...]`: the hook where a Redis Cluster backend plugs in."""
    return str(db).lower().startswith(CLUSTER_SCHEME)


def _is_url(text: str) -> bool:
    return bool(_URL.match(text))


def _is_database(path: Path) -> bool:
    return (path / "CURRENT").is_file()


def check_db(db: str | Path, create: bool = False) -> Path:
    """The local database folder named by `db` (the raw --db text, before Path() folds "//").

    UserError (one line) for a URL, a file, or (when `create`) a non-empty folder that is not
    already a lutstore database: RocksDB's files must not be mixed in among someone else's.
    """
    text = str(db)
    if is_cluster_url(text):
        raise UserError(f"--db {text}: the redis-cluster backend is not available in this build; "
                        f"give a local database folder")
    if _is_url(text):
        raise UserError(f"--db {text} looks like a URL; --db takes a local folder (the RocksDB database)")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        hint = "; give a folder path (a new one is created)" if create else ""
        raise UserError(f"--db {path} is a file, not a lutstore database folder{hint}")
    if create and path.is_dir() and not _is_database(path) and any(path.iterdir()):
        raise UserError(f"--db {path} is a non-empty folder that is not a lutstore database; "
                        f"give a new or empty folder (refusing to mix database files into it)")
    return path
