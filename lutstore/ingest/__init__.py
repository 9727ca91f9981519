"""Checkpoint folder -> rows (reparameterised) -> a new table version."""

from lutstore.ingest.pipeline import _TrainRows, ingest_checkpoint, main

__all__ = ["ingest_checkpoint", "main"]
