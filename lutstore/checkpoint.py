"""The old path of lutstore.ingest.checkpoint, kept for code written against it; new code imports that."""

from lutstore.ingest.checkpoint import *  # noqa: F401,F403
