"""Checkpoint folder -> rows (reparameterised) -> a new table version: checkpoint.py reads the
folder, reparam.py computes its rows, pipeline.py encodes and writes them. The names of reparam
and pipeline (TrainRows, RepRows, ingest_checkpoint, main, ...) are this package's too, loaded
when first asked for, so that reading a checkpoint (inference.backbone does) loads no storage."""

from __future__ import annotations

_ALIASES = {"_TrainRows": "TrainRows"}   # kept for engines that import it by this name


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    import lutstore.ingest.pipeline as pipeline
    import lutstore.ingest.reparam as reparam

    name = _ALIASES.get(name, name)
    try:
        return getattr(reparam, name) if hasattr(reparam, name) else getattr(pipeline, name)
    except AttributeError:
        raise AttributeError(f"module 'lutstore.ingest' has no attribute {name!r}") from None
