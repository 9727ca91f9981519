"""Checkpoint folder -> rows (reparameterised) -> a new table version."""

from lutstore.ingest.pipeline import RepRows, TrainRows, ingest_checkpoint, main

_TrainRows = TrainRows   # kept for engines that import it by this name

__all__ = ["RepRows", "TrainRows", "ingest_checkpoint", "main"]
