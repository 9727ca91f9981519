"""The daemon's response budget: bytes of answers being built or sent, all calls together."""

from __future__ import annotations

import threading

RESPONSE_BUDGET_WAIT_SECONDS = 60.0


class BudgetExhausted(Exception):
    """The byte budget stayed full for RESPONSE_BUDGET_WAIT_SECONDS."""


class ByteBudget:
    """Bytes of responses being built or sent, all calls together (--max-response-mb): what makes the
    daemon's memory bound true under load. A call takes what its next message will cost before it
    reads the rows and gives it back once gRPC has sent the message. A call never waits while it
    holds any (it prefetches only what try_take grants), so calls cannot deadlock on the budget."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self._used = 0
        self._peak = 0
        self._free = threading.Condition()

    def take(self, n: int, timeout: float = RESPONSE_BUDGET_WAIT_SECONDS) -> int:
        """Wait until n bytes (at most the whole budget) are free and take them; the amount taken."""
        n = min(max(n, 0), self.limit)
        with self._free:
            if not self._free.wait_for(lambda: self._used + n <= self.limit, timeout):
                raise BudgetExhausted(f"the daemon's response budget ({self.limit >> 20} MiB, --max-response-mb) "
                                      f"stayed full for {timeout:.0f} s")
            self._used += n
            self._peak = max(self._peak, self._used)
        return n

    def try_take(self, n: int) -> int | None:
        """Take n bytes if they are free now, else None."""
        n = min(max(n, 0), self.limit)
        with self._free:
            if self._used + n > self.limit:
                return None
            self._used += n
            self._peak = max(self._peak, self._used)
        return n

    def give(self, n: int) -> None:
        if n:
            with self._free:
                self._used -= n
                self._free.notify_all()

    @property
    def used(self) -> int:
        return self._used

    @property
    def peak(self) -> int:
        return self._peak
