"""The old path of lutstore.formats.codec, kept for code written against it; new code imports that."""

from lutstore.formats.codec import *  # noqa: F401,F403
