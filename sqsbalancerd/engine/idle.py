"""Idle queues below the long-poll floor (`sqs.idle_latency`).

A queue long-polled around the clock costs 3600 / wait_time_seconds requests an hour (180
at 20 s) even when it never gets a message. Once a queue's receives have returned nothing
for a while, its poller waits `idle_latency` seconds after each empty long poll before the
next one: a message sent meanwhile is picked up when that poll starts, so within
`idle_latency` seconds plus the poll's round trip. Any receive that returns messages (or a
queue that still holds some) ends the pause at once: busy queues are never slowed.

An idle queue then costs 3600 / (wait_time_seconds + idle_latency) requests an hour: 45 at
60 s (a quarter of the floor), 11.25 at 300 s. Pure: the caller passes the time.
"""

from __future__ import annotations

from dataclasses import dataclass

# Empty receives spanning this long (or idle_latency, if shorter) make a queue idle: a
# queue whose messages come a little apart keeps its continuous long poll.
IDLE_AFTER_S = 60.0
# A pausing poller wakes at least this often (and so ticks: the liveness check reads its
# tick age), then waits again; its pause does not get longer for it.
MAX_WAIT_S = 30.0
# wait_time_seconds 0 (short polls) is counted as a one-second cycle in the estimate.
MIN_CYCLE_S = 1.0


@dataclass(slots=True)
class IdlePacer:
    """One queue's poller: when its next receive may start, and whether it is idling."""

    latency_s: float  # 0: off (continuous long polling, as before)
    empty_since_s: float | None = None  # start of the first of the empty receives in a row
    resume_at_s: float | None = None  # set while idling: the next receive starts then

    @property
    def is_idling(self) -> bool:
        return self.resume_at_s is not None

    def wait_s(self, now_s: float) -> float:
        """Seconds to wait before the next receive (0: receive now), at most MAX_WAIT_S."""
        if self.resume_at_s is None:
            return 0.0
        return min(max(0.0, self.resume_at_s - now_s), MAX_WAIT_S)

    def after_receive(
        self, received: int, *, started_s: float, now_s: float, is_holding: bool = False
    ) -> float:
        """A receive that started at `started_s` returned `received` messages: the seconds
        to wait before the next one. `is_holding`: the queue still has messages in hand (a
        FIFO group held back, handlers running): not idle, whatever this receive got."""
        if self.latency_s <= 0 or received or is_holding:
            self.empty_since_s = self.resume_at_s = None
            return 0.0
        if self.empty_since_s is None:
            self.empty_since_s = started_s
        if now_s - self.empty_since_s < min(IDLE_AFTER_S, self.latency_s):
            return 0.0
        self.resume_at_s = now_s + self.latency_s
        return self.wait_s(now_s)

    def requests_per_hour(self, wait_time_s: float) -> float:
        """ReceiveMessage calls an hour while nothing arrives, in the current state."""
        cycle_s = max(float(wait_time_s), MIN_CYCLE_S)
        if self.is_idling:
            cycle_s += self.latency_s
        return 3600.0 / cycle_s
