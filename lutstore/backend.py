"""The old path of lutstore.storage.backends, kept for code written against it; new code imports that."""

from lutstore.storage.backends import *  # noqa: F401,F403
