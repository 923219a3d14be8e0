import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sqsbalancerd.coordination.loadplan import QueueLoad
from sqsbalancerd.coordination.loadsummary import (
    EMPTY,
    MAX_BYTES,
    MAX_LISTED,
    LoadSummary,
    QueueSample,
    backlogs,
    decode,
    encode,
    queue_loads,
)


def sample(name: str, load: float, backlog: int = 0) -> QueueSample:
    return QueueSample(name, load, load * 10, backlog)


def test_round_trip_keeps_three_significant_digits() -> None:
    summary = LoadSummary(0.7346, (sample("orders", 12.3456, 37), sample("billing.fifo", 3.2)))
    decoded = decode(encode(summary))
    assert decoded.utilisation == pytest.approx(0.735)
    assert [s.queue for s in decoded.queues] == ["orders", "billing.fifo"]
    assert decoded.queues[0].handler_s_per_s == pytest.approx(12.3)
    assert decoded.queues[0].messages_per_s == pytest.approx(123)
    assert decoded.queues[0].backlog == 37


def test_only_queues_above_the_threshold_are_listed_busiest_first() -> None:
    summary = LoadSummary(0.5, (sample("idle", 0.01), sample("warm", 0.5), sample("hot", 5.0)))
    assert [s.queue for s in decode(encode(summary)).queues] == ["hot", "warm"]


def test_a_shared_queue_is_listed_below_the_threshold() -> None:
    summary = LoadSummary(0.5, (sample("split-8-ways", 0.02), sample("idle", 0.02)))
    value = encode(summary, shared=frozenset({"split-8-ways"}))
    assert [s.queue for s in decode(value).queues] == ["split-8-ways"]


def test_ten_thousand_queues_stay_within_the_bound() -> None:
    """The worst case: every queue busy, names of SQS's full 80 characters."""
    queues = tuple(sample(f"{i:05d}".ljust(80, "x"), 1 + i / 1000, 10**9) for i in range(10_000))
    value = encode(LoadSummary(1.0, queues))
    assert len(value.encode()) <= MAX_BYTES
    decoded = decode(value)
    assert decoded.queues  # the busiest still listed
    assert decoded.queues[0].queue == queues[-1].queue


def test_fifty_typical_queues_fit_whole() -> None:
    queues = tuple(sample(f"tenant-{i:05d}-events.fifo", 100.0 + i, 12345) for i in range(60))
    decoded = decode(encode(LoadSummary(0.9, queues)))
    assert len(decoded.queues) == MAX_LISTED
    assert len(encode(LoadSummary(0.9, queues)).encode()) <= MAX_BYTES


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        42,
        b"1|500|",
        "",
        "2|500|q:1:1:1",
        "1|1500|q:1:1:1",
        "1|-5|q:1:1:1",
        "1|500|q:1:1",
        "1|500|q:nan:1:1",
        "1|500|q:inf:1:1",
        "1|500|q:-1:1:1",
        "1|500|q:1:1:1.5",
        "1|500|q:1:1:1,q:2:2:2",
        "1|500|bad name:1:1:1",
        "1|500|q:1:1:1|extra",
        "1|500|q:1:1:1,",
        "x" * 100_000,
    ],
)
def test_garbage_decodes_to_the_empty_summary(garbage: object) -> None:
    assert decode(garbage) == EMPTY


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_decode_never_raises(text: str) -> None:
    decoded = decode(text)
    assert 0 <= decoded.utilisation <= 1


@settings(max_examples=100, deadline=None)
@given(
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=60),
)
def test_any_measurements_encode_to_something_decodable(
    utilisation: float, loads: list[float]
) -> None:
    queues = tuple(QueueSample(f"q{i}", x, x, -3) for i, x in enumerate(loads))
    value = encode(LoadSummary(utilisation, queues))
    assert len(value.encode()) <= MAX_BYTES
    decoded = decode(value)
    assert 0 <= decoded.utilisation <= 1
    assert len(decoded.queues) == min(MAX_LISTED, sum(1 for x in loads if x > 0.05))
    assert all(s.backlog == 0 for s in decoded.queues)


def test_loads_sum_over_the_owners_of_a_shared_queue() -> None:
    first = LoadSummary(0.9, (sample("hot", 6.0, 100), sample("a", 1.0)))
    second = LoadSummary(0.8, (sample("hot", 4.0, 120),))
    loads = queue_loads([first, second], previous={"hot": 110, "a": 0})
    assert loads == {
        "a": QueueLoad(1.0, is_backlog_growing=False),
        "hot": QueueLoad(10.0, is_backlog_growing=True, backlog=120),  # the largest seen
    }
    assert backlogs([first, second]) == {"a": 0, "hot": 120}
    assert queue_loads([first, second], previous={"hot": 130})["hot"].is_backlog_growing is False
