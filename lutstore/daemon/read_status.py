"""What a failed read of the store means to a gRPC client, said once for every RPC that reads it
(BatchGet, its layer-sliced form, BatchGetShared, GetArtifact, table lookups).

A damaged row is DATA_LOSS (CorruptRow's message names the table, version and ids, never a
file); a cluster node that cannot be reached is UNAVAILABLE (it may succeed later, so clients
retry it). Both go to the log too.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import grpc

from lutstore.daemon.rows import CorruptRow
from lutstore.storage.model import StoreUnavailable

log = logging.getLogger(__name__)


@contextmanager
def abort_on_read_errors(context: grpc.ServicerContext) -> Iterator[None]:
    """Reads inside the block that fail with CorruptRow or StoreUnavailable end the call with
    DATA_LOSS or UNAVAILABLE and the error's message; other errors pass through."""
    try:
        yield
    except CorruptRow as e:
        log.error("%s", e)
        context.abort(grpc.StatusCode.DATA_LOSS, str(e))
    except StoreUnavailable as e:
        log.warning("%s", e)
        context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
