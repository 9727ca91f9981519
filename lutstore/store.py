"""The old path of lutstore.storage.rocksdb, kept for code written against it; new code imports that."""

from lutstore.storage.rocksdb import *  # noqa: F401,F403
