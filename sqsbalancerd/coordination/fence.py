"""Self-fencing: the receive budget, and stopping and resuming the engine by it.

Receiving stops `heartbeat_timeout - fence_margin` after the start of our last successful
renewal, and long polls (and each retry of one) are cut to end before then. Others judge
us dead no earlier than `heartbeat_timeout` after that renewal, on their own clocks, so —
unless this process pauses for longer than `fence_margin` — no two instances receive from
one queue at the same time. After a fence we receive again only once the rows we hold
have been read back and found still ours.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqsbalancerd.clock import Clock

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReceiveControl:
    """The engine's self-fencing seam, handed in by app.py."""

    pause: Callable[[], None]
    resume: Callable[[], None]
    set_budget: Callable[[Callable[[], float | None], Callable[[], float | None]], None]
    renewed: Callable[[], None] = lambda: None


class Fence:
    def __init__(
        self,
        *,
        clock: Clock,
        control: ReceiveControl,
        budget_s: float,
        instance_id: str,
    ) -> None:
        self._clock = clock
        self._control = control
        self._budget_s = budget_s  # heartbeat_timeout - fence_margin
        self._instance_id = instance_id
        self.renewed_at_s: float | None = None  # start of our last successful renewal
        self.next_round_s: float | None = None
        self.is_fenced = False

    def install(self) -> None:
        self._control.set_budget(self.receive_budget_s, self.renewal_due_in_s)

    def renewed(self, started_s: float) -> None:
        """A renewal that started after the budget had run out (the process was paused, or
        the loop starved) fences us first: others may have judged us dead meanwhile, and we
        must not receive again before our rows are verified (see `check`)."""
        last = self.renewed_at_s
        if last is not None and started_s >= last + self._budget_s and not self.is_fenced:
            self.is_fenced = True
            self._control.pause()
            logger.error(
                "heartbeat renewed after the receive budget ran out; receiving stays stopped "
                "until our ownership rows are verified",
                extra={"instance": self._instance_id, "late_s": round(started_s - last, 1)},
            )
        self.renewed_at_s = started_s
        self._control.renewed()

    def receive_budget_s(self) -> float | None:
        """Seconds of receiving left before we must be silent (used to cut long polls)."""
        if self.renewed_at_s is None:
            return 0.0
        return self.renewed_at_s + self._budget_s - self._clock.monotonic()

    def renewal_due_in_s(self) -> float | None:
        """Seconds until the next heartbeat round (pollers may wait for it; see ReceiveGate)."""
        if self.next_round_s is None:
            return None
        return self.next_round_s - self._clock.monotonic()

    def check(self, verify_holdings: Callable[[], bool]) -> None:
        """Fence when the budget is spent; lift it once renewed and `verify_holdings` (our
        rows read back) succeeded — False keeps us fenced until the next check."""
        budget = self.receive_budget_s()
        fenced = budget is not None and budget <= 0
        if fenced and not self.is_fenced:
            self.is_fenced = True
            self._control.pause()
            logger.error(
                "heartbeat not renewed in time; stopped receiving (self-fenced)",
                extra={"instance": self._instance_id},
            )
        elif not fenced and self.is_fenced and verify_holdings():
            self.is_fenced = False
            self._control.resume()
            logger.warning(
                "heartbeat renewed; receiving again", extra={"instance": self._instance_id}
            )
