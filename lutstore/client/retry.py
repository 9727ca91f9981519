"""The client's one retry policy, for every transport (a call, a session, shared memory):
UNAVAILABLE (a restarting daemon, a dead replica) is retried with exponential backoff within a
budget of tries and seconds, then reported as a LutError naming the address; any other status
is reported at once."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import grpc

from lutstore.errors import LutError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long an unavailable server is waited for: at most `retries` retries within `seconds`,
    sleeping 50 ms, 100 ms, ... up to 1 s between them."""

    address: str
    retries: int = 5
    seconds: float = 10.0
    first_delay: float = 0.05
    max_delay: float = 1.0

    def budget(self) -> RetryBudget:
        """A fresh budget for one operation (a call, or a session's run of failures)."""
        return RetryBudget(self)

    def run(self, attempt: Callable[[], T]) -> T:
        """attempt(), retried on UNAVAILABLE within the budget; a gRPC failure becomes a LutError."""
        budget = self.budget()
        while True:
            try:
                return attempt()
            except grpc.RpcError as e:
                code = e.code()
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise LutError(code, e.details() or code.name) from None
                delay = budget.next_delay(e.details())
                log.debug("lutstore at %s unavailable (%s); retry %d in %.2fs", self.address, e.details(),
                          budget.tries, delay)
                time.sleep(delay)


class RetryBudget:
    """The failures of one operation so far, against its RetryPolicy."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.started = time.monotonic()
        self.tries = 0
        self._delay = policy.first_delay

    def next_delay(self, details: str | None) -> float:
        """Count a failed attempt; the seconds to wait before the next one, or LutError(UNAVAILABLE)
        when the budget is spent."""
        self.tries += 1
        elapsed = time.monotonic() - self.started
        p = self.policy
        if self.tries > p.retries or elapsed + self._delay > p.seconds:
            raise LutError(grpc.StatusCode.UNAVAILABLE,
                           f"lutstore at {p.address} unavailable after {self.tries} attempts in {elapsed:.1f}s "
                           f"(retry budget: {p.retries} retries, {p.seconds:g}s): {details}")
        delay, self._delay = self._delay, min(2 * self._delay, p.max_delay)
        return delay
