"""The load meter: decayed rates from the cumulative figures Stats keeps."""

from __future__ import annotations

import pytest

from sqsbalancerd.loadsignals import LoadMeter
from sqsbalancerd.stats import LoadTotals, Stats


def _feed(meter: LoadMeter, seconds: int, per_s: LoadTotals, *, every_s: float = 10.0) -> None:
    """Constant rates for `seconds`, sampled every `every_s`."""
    t = 0.0
    while t <= seconds:
        n = t
        totals = {
            "orders": LoadTotals(
                handler_s=per_s.handler_s * n,
                received=int(per_s.received * n),
                receives=int(per_s.receives * n),
                full_receives=int(per_s.full_receives * n),
            )
        }
        meter.sample(t, totals)
        t += every_s


def test_steady_rates_converge_to_the_true_rates() -> None:
    meter = LoadMeter(workers=10)
    _feed(meter, 600, LoadTotals(handler_s=4.0, received=200, receives=10, full_receives=5))
    signals = meter.sample(600.0 + 1e-9, {})  # nothing new folded in a zero-length step
    (orders,) = signals.queues
    assert orders.handler_s_per_s == pytest.approx(4.0, rel=0.01)
    assert orders.messages_per_s == pytest.approx(200, rel=0.01)
    assert orders.fullness == pytest.approx(0.5, rel=0.01)
    assert signals.utilisation == pytest.approx(0.4, rel=0.01)


def test_a_queue_that_stopped_decays_and_a_forgotten_one_is_dropped() -> None:
    meter = LoadMeter(workers=10)
    meter.sample(0.0, {"orders": LoadTotals(handler_s=0.0)})
    meter.sample(10.0, {"orders": LoadTotals(handler_s=50.0)})
    first = meter.sample(20.0, {"orders": LoadTotals(handler_s=50.0)}).queues[0].handler_s_per_s
    later = meter.sample(120.0, {"orders": LoadTotals(handler_s=50.0)}).queues[0].handler_s_per_s
    assert 0 < later < first
    for t in range(130, 2000, 10):  # forgotten by Stats: decays out of the report
        signals = meter.sample(float(t), {})
    assert signals.queues == ()


def test_counters_reset_by_forget_count_as_new() -> None:
    meter = LoadMeter(workers=1, tau_s=1e-6)  # no memory: each rate is the last interval's
    meter.sample(0.0, {"orders": LoadTotals(handler_s=100.0)})
    signals = meter.sample(10.0, {"orders": LoadTotals(handler_s=5.0)})
    assert signals.queues[0].handler_s_per_s == pytest.approx(0.5)


def test_only_owned_queues_are_reported_but_all_count_in_utilisation() -> None:
    meter = LoadMeter(workers=2, tau_s=1e-6)
    meter.sample(0.0, {})
    signals = meter.sample(
        10.0,
        {"a": LoadTotals(handler_s=10.0), "b": LoadTotals(handler_s=5.0)},
        owned=frozenset({"a"}),
        depths={"a": 42},
    )
    assert [q.queue for q in signals.queues] == ["a"]
    assert signals.queues[0].backlog == 42
    assert signals.utilisation == pytest.approx(0.75)


def test_stats_keep_what_the_meter_reads() -> None:
    stats = Stats()
    stats.observe_handler("orders", 0.25)
    stats.observe_handler("orders", 0.5)
    stats.count("orders", "received", 3)
    stats.note_receive("orders", is_full=True)
    stats.note_receive("orders", is_full=False)
    assert stats.load_totals() == {
        "orders": LoadTotals(handler_s=0.75, received=3, receives=2, full_receives=1)
    }
    stats.forget_queue("orders")
    assert stats.load_totals() == {}


def test_a_queue_just_taken_over_reads_its_first_interval_undamped() -> None:
    meter = LoadMeter(workers=4, tau_s=30.0)
    meter.sample(0.0, {})
    signals = meter.sample(2.0, {"hot": LoadTotals(handler_s=8.0)})  # 4 handler-s/s
    assert signals.queues[0].handler_s_per_s == pytest.approx(4.0)
    later = meter.sample(4.0, {"hot": LoadTotals(handler_s=8.0)})  # stopped: decays slowly
    assert 3.5 < later.queues[0].handler_s_per_s < 4.0
