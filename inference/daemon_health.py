"""Whether the lutstore daemon answers, as an endpoint sees it: /health's answer, and the check
that lets a request fail at once while the daemon is known to be down.

A request that finds the daemon gone waits the client's whole retry budget (the daemon may be
restarting). Once that has happened, or a probe has failed, later requests would each wait the
same budget for the same answer; instead they get their 503 at once while a fresh probe (no
retries, a short deadline, at most one per REUSE_S) still fails, and go through again as soon
as one succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from inference.connection import LutstoreSettings

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0    # deadline of one probe (a ListTables, no retries); a refused connection fails at once
REUSE_S = 1.0            # a probe's answer is reused this long: one probe at a time, however many requests ask


class DaemonHealth:
    """The daemon's last known state. probe() raises when the daemon does not answer (it runs in a
    thread: a LutClient call with no retries)."""

    def __init__(self, settings: LutstoreSettings, probe: Callable[[], object], reuse_s: float = REUSE_S) -> None:
        self.settings, self._probe, self.reuse_s = settings, probe, reuse_s
        self.address = settings.addr
        self.reason: str | None = None        # why the daemon is down; None: it answered last time (or never asked)
        self._task: asyncio.Future | None = None
        self._at = 0.0

    @property
    def down(self) -> bool:
        return self.reason is not None

    async def check(self) -> bool:
        """Does the daemon answer now? One probe at a time, its answer reused for reuse_s."""
        now = time.monotonic()
        if self._task is None or (self._task.done() and now - self._at > self.reuse_s):
            self._task = asyncio.ensure_future(asyncio.to_thread(self._probe_once))
            self._at = now
        return await asyncio.shield(self._task)   # shield: a request that goes away leaves the probe running

    def went_down(self, reason: str) -> None:
        """The daemon did not answer (a probe, or a request that spent its retry budget)."""
        if self.reason is None:
            log.warning("the lutstore daemon at %s does not answer (%s); requests get 503 at once until it does",
                        self.address, reason)
        self.reason = reason

    def _probe_once(self) -> bool:
        try:
            self._probe()
        except Exception as e:  # noqa: BLE001 - any failure means "does not answer"; the reason is kept
            log.debug("probe of the lutstore daemon at %s failed", self.address, exc_info=True)
            # "Connection refused" says more than the client's retry-budget sentence around it
            self.went_down(self.settings.why_unreachable() or getattr(e, "message", None) or str(e)
                           or type(e).__name__)
            return False
        if self.reason is not None:
            log.warning("the lutstore daemon at %s answers again", self.address)
        self.reason = None
        return True
