"""The checks every row RPC makes of its request (BatchGet, BatchGetStream, BatchGetShared), each
ending the call with the status and one line that names the reason."""

from __future__ import annotations

import logging

import grpc

from lutstore.daemon.read_status import abort_on_read_errors
from lutstore.daemon.rows import Catalog
from lutstore.storage.model import DatabaseDamaged, StoreError, TableMeta, TableNotFound, VersionGone

log = logging.getLogger(__name__)


class RequestChecks:
    def __init__(self, catalog: Catalog, max_batch_rows: int) -> None:
        self.catalog = catalog
        self.max_batch_rows = max_batch_rows

    def table(self, name: str, version: int, context: grpc.ServicerContext) -> TableMeta:
        """The live version the request names (0: the latest); NOT_FOUND, FAILED_PRECONDITION
        (a dropped version), DATA_LOSS, UNAVAILABLE or INTERNAL otherwise."""
        if not name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request names no table")
        try:
            with abort_on_read_errors(context):   # a cluster node down: UNAVAILABLE, may succeed later
                return self.catalog.resolve(name, version)
        except TableNotFound as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except VersionGone as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except DatabaseDamaged as e:  # the table list went unreadable: the detail names files, so log it
            log.error("%s", e)
            context.abort(grpc.StatusCode.DATA_LOSS, "the server's database is damaged (its table list cannot be "
                                                     "read); the server log says where")
        except StoreError as e:
            context.abort(grpc.StatusCode.INTERNAL, str(e))
        raise AssertionError("unreachable")  # context.abort always raises

    def ids(self, token_ids, meta: TableMeta, context: grpc.ServicerContext) -> list[int]:
        """The distinct requested ids, ascending; INVALID_ARGUMENT naming the limit for an empty or
        oversized batch or an id outside the vocabulary."""
        n = len(token_ids)
        if n == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty batch: give at least one token id")
        if n > self.max_batch_rows:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"batch of {n} token ids exceeds max_batch_rows={self.max_batch_rows}; split it")
        ids = sorted(set(token_ids))
        if ids[-1] >= meta.vocab_size:
            bad = next(t for t in token_ids if t >= meta.vocab_size)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"token id {bad} out of range: table {meta.name!r} v{meta.version} has vocab_size "
                          f"{meta.vocab_size} (valid ids 0..{meta.vocab_size - 1})")
        return ids
