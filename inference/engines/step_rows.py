"""The lookup rows of one engine step, from a RemoteTable or an in-memory table.

An engine such as vLLM hands its model every token of a step at once (prefill chunks and
decode tokens of many requests, flattened to ids [T]). `StepRows` asks the source for
their rows the moment the ids are known and gives layer l's rows [T, N, D] when layer l
runs (RemoteTable's per-layer overlap).

Through a daemon outage it waits instead of raising: in vLLM an exception in the forward
kills the engine core (every request fails and the server exits), while a step that waits
resumes with the right rows as soon as the daemon or a replica answers again. Each wait
is one RemoteTable attempt (its client's retry budget, `retry_seconds`), then the step's
missing rows are asked for again; a warning is logged per attempt. No row is ever invented.
"""

from __future__ import annotations

import logging
import time

from torch import Tensor

from inference.lut import LutSource, RemoteTable
from lutstore.errors import LutError

log = logging.getLogger(__name__)

# What a fetch raises when the daemon does not answer (the row cache never holds a partial row:
# RemoteTable forgets a failed fetch's slots, so asking again fetches them again).
OUTAGE_ERRORS = (LutError, TimeoutError, ConnectionError)
RETRY_PAUSE = 1.0   # seconds between attempts


class StepRows:
    """LayerRows of one step: .layer(l) -> [T, N, D] for the step's flat ids [T]."""

    def __init__(self, source: LutSource, ids: Tensor, wait_through_outages: bool = True) -> None:
        self.source, self.ids = source, ids.reshape(1, -1)
        self.wait = wait_through_outages and isinstance(source, RemoteTable)
        self._rows = None
        try:
            self._rows = source.rows(self.ids)    # RemoteTable: the fetch of absent ids starts now
        except OUTAGE_ERRORS:
            if not self.wait:
                raise                             # else layer 0 asks again

    def layer(self, l: int) -> Tensor:
        outage_started = None
        while True:
            try:
                if self._rows is None:            # a new plan: every row not in the cache is asked for again
                    self._rows = self.source.rows(self.ids)
                rows = self._rows.layer(l)
                break
            except OUTAGE_ERRORS as e:
                if not self.wait:
                    raise
                self._rows = None
                outage_started = outage_started or time.monotonic()
                log.warning("lutstore: rows of a step (%d tokens) did not arrive for %.0f s (%s); the step waits "
                            "until the daemon or a replica answers", self.ids.shape[1],
                            time.monotonic() - outage_started, e)
                time.sleep(RETRY_PAUSE)           # errors that are not retried by the client come back at once
        if outage_started is not None:
            log.warning("lutstore: rows arrive again after %.1f s; the step goes on", time.monotonic() - outage_started)
        return rows.reshape(rows.shape[1:])
