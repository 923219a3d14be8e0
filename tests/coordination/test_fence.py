"""Self-fencing on its own: the budget, a late renewal, and a resume only after verifying."""

from __future__ import annotations

from support import FakeClock

from sqsbalancerd.coordination.fence import Fence, ReceiveControl

BUDGET_S = 20.0


class Engine:
    def __init__(self) -> None:
        self.paused = False
        self.renewals = 0

    def control(self) -> ReceiveControl:
        return ReceiveControl(
            pause=lambda: setattr(self, "paused", True),
            resume=lambda: setattr(self, "paused", False),
            set_budget=lambda budget, due: None,
            renewed=self._renewed,
        )

    def _renewed(self) -> None:
        self.renewals += 1


def make_fence(clock: FakeClock, engine: Engine) -> Fence:
    fence = Fence(clock=clock, control=engine.control(), budget_s=BUDGET_S, instance_id="a")
    fence.renewed(clock.monotonic())
    return fence


def test_a_timely_renewal_keeps_receiving() -> None:
    clock, engine = FakeClock(), Engine()
    fence = make_fence(clock, engine)
    clock.advance(BUDGET_S - 1)
    fence.renewed(clock.monotonic())
    fence.check(lambda: True)
    assert not engine.paused and not fence.is_fenced
    assert fence.receive_budget_s() == BUDGET_S


def test_a_renewal_after_the_budget_ran_out_fences_until_the_rows_are_verified() -> None:
    """SIGSTOP (or a starved loop) past the budget: the loop never saw the budget run out,
    and its next renewal restores it at once. Peers may have taken our queues meanwhile, so
    receiving must wait for our rows to be read back (found by a real SIGSTOP test: a poller
    woken by the renewal received on a queue another instance had taken)."""
    clock, engine = FakeClock(), Engine()
    fence = make_fence(clock, engine)
    clock.advance(BUDGET_S + 30)  # stopped: nothing ran, not even the fence check

    fence.renewed(clock.monotonic())

    assert engine.paused and fence.is_fenced  # before the engine hears of the renewal
    assert engine.renewals == 2
    fence.check(lambda: False)  # the rows could not be read: stay fenced
    assert engine.paused
    fence.check(lambda: True)
    assert not engine.paused and not fence.is_fenced
