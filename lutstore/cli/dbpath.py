"""What `--db` may name, checked before anything is opened or created.

A database is a local RocksDB folder or a Redis Cluster URL (`redis-cluster://HOST:PORT`,
lutstore.storage.backends). Any other URL-looking value ("scheme://...") is refused with one line
instead of silently becoming a folder named "scheme:".
"""

from __future__ import annotations

import logging
import re
import stat
from pathlib import Path

from lutstore.errors import UserError
from lutstore.storage.backends import backend_for

log = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _is_url(text: str) -> bool:
    return bool(_URL.match(text))


def _is_database(path: Path) -> bool:
    return (path / "CURRENT").is_file()


def check_db(db: str | Path, create: bool = False) -> str | Path:
    """The database named by `db` (the raw --db text, before Path() folds "//"): a cluster URL as
    given (its backend opens it), else the local folder.

    UserError (one line) for a URL, a file, or (when `create`) a non-empty folder that is not
    already a lutstore database: RocksDB's files must not be mixed in among someone else's.
    """
    text = str(db)
    if not backend_for(text).local:   # a URL of a backend's: checked when it is opened
        return text
    if _is_url(text):
        raise UserError(f"--db {text} looks like a URL; --db takes a local folder (the RocksDB database) or a "
                        f"cluster URL, redis-cluster://HOST:PORT[,HOST:PORT...][?password_file=PATH] "
                        f"(rediss-cluster:// for TLS)")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        hint = "; give a folder path (a new one is created)" if create else ""
        raise UserError(f"--db {path} is a file, not a lutstore database folder{hint}")
    if create and path.is_dir() and not _is_database(path) and any(path.iterdir()):
        raise UserError(f"--db {path} is a non-empty folder that is not a lutstore database; "
                        f"give a new or empty folder (refusing to mix database files into it)")
    _warn_if_anyone_can_write(path)
    return path


def _warn_if_anyone_can_write(path: Path) -> None:
    """A database folder every local user may write (a `mkdir` under umask 0, a folder in /tmp made
    for sharing) lets any of them replace the files the daemon serves: say so, once, at start."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return   # not created yet: ingest makes it with this process's umask
    if mode & stat.S_IWOTH:
        log.warning("--db %s is writable by every local user (mode %03o): any of them can replace the tables "
                    "it serves; `chmod o-w %s`", path, mode & 0o777, path)
