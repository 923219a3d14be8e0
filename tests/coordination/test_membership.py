"""Membership and liveness: counters timed on the observer's clock, never stealing a live id."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import boto3
import pytest
from moto import mock_aws
from support import FakeClock

from sqsbalancerd.coordination.membership import LivenessTracker, Membership
from sqsbalancerd.coordination.table import (
    PROTOCOL_VERSION,
    ConditionFailed,
    CoordinationTable,
    MemberRecord,
)
from sqsbalancerd.errors import DuplicateInstanceError

INTERVAL_S = 1.0
TIMEOUT_S = 4.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def table(clock: FakeClock) -> Iterator[CoordinationTable]:
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        table = CoordinationTable(client, table_name="members", application="app", clock=clock)
        table.ensure(create=True, region="us-east-1")
        yield table


def membership(table: CoordinationTable, clock: Any, instance_id: str = "a") -> Membership:
    return Membership(
        table,
        instance_id=instance_id,
        clock=clock,
        heartbeat_interval_s=INTERVAL_S,
        heartbeat_timeout_s=TIMEOUT_S,
    )


def record(instance_id: str = "a", *, counter: int, heartbeat_at: float = 1e9) -> MemberRecord:
    return MemberRecord(
        instance_id=instance_id,
        host="h",
        status="active",
        counter=counter,
        epoch="e",
        protocol=PROTOCOL_VERSION,
        heartbeat_at=heartbeat_at,
        started_at=1e9,
    )


def advancing(clock: FakeClock, *, between: Callable[[], object] = lambda: None):
    """A `wait` for Membership.join: moves the fake clock, runs `between`, never stops."""

    def wait(seconds: float) -> bool:
        clock.advance(seconds)
        between()
        return False

    return wait


# -- liveness -------------------------------------------------------------------------------


def test_first_sight_is_alive_and_a_still_counter_dies_after_the_timeout(clock):
    tracker = LivenessTracker(clock, timeout_s=TIMEOUT_S)
    tracker.observe([record(counter=3)])
    assert tracker.is_alive("a") and not tracker.is_dead("a")

    clock.advance(TIMEOUT_S - 0.01)
    tracker.observe([record(counter=3)])
    assert tracker.is_alive("a") and not tracker.is_dead("a")

    clock.advance(0.01)
    tracker.observe([record(counter=3)])
    assert not tracker.is_alive("a") and tracker.is_dead("a")
    assert [r.instance_id for r in tracker.dead_records()] == ["a"]


def test_a_moving_counter_stays_alive_indefinitely(clock):
    tracker = LivenessTracker(clock, timeout_s=TIMEOUT_S)
    for counter in range(1, 50):
        tracker.observe([record(counter=counter)])
        clock.advance(TIMEOUT_S - 0.5)
        assert tracker.is_alive("a")
    assert tracker.dead_records() == []


def test_a_counter_that_moves_again_resurrects(clock):
    tracker = LivenessTracker(clock, timeout_s=TIMEOUT_S)
    tracker.observe([record(counter=1)])
    clock.advance(TIMEOUT_S)
    assert tracker.is_dead("a")

    tracker.observe([record(counter=2)])  # it was only slow (e.g. a long pause)

    assert tracker.is_alive("a") and not tracker.is_dead("a")


def test_a_vanished_row_dies_only_a_timeout_after_its_last_change(clock):
    """Issue 11, defect 2: a row deleted by hand or by TTL was judged dead at once (against the
    observer's start), while its owner still received."""
    tracker = LivenessTracker(clock, timeout_s=TIMEOUT_S)
    clock.advance(10 * TIMEOUT_S)  # an observer that has run for a while
    tracker.observe([record(counter=7)])
    clock.advance(INTERVAL_S)
    tracker.observe([])  # the row is gone
    assert not tracker.is_dead("a")
    assert tracker.dead_records() == []  # no row to delete
    clock.advance(TIMEOUT_S - INTERVAL_S)
    assert tracker.is_dead("a")


def test_an_owner_never_seen_dies_a_timeout_after_first_asked(clock):
    tracker = LivenessTracker(clock, timeout_s=TIMEOUT_S)
    clock.advance(10 * TIMEOUT_S)
    assert not tracker.is_dead("stranger")
    clock.advance(TIMEOUT_S)
    assert tracker.is_dead("stranger")


def test_an_observer_blind_for_longer_than_an_interval_restarts_every_clock(clock):
    """Issue 11, defect 3: after a DynamoDB outage longer than the timeout the first instance
    to read again saw every counter unchanged and judged the whole fleet dead."""
    tracker = LivenessTracker(clock, timeout_s=TIMEOUT_S, blind_after_s=1.5 * INTERVAL_S)
    tracker.observe([record(counter=3)])
    clock.advance(3 * TIMEOUT_S)  # nobody could write, and we could not read
    tracker.note_missed_read()
    tracker.observe([record(counter=3)])
    assert tracker.is_alive("a") and not tracker.is_dead("a")
    for _ in range(int(TIMEOUT_S / INTERVAL_S)):  # now it really stopped, with us watching
        clock.advance(INTERVAL_S)
        tracker.observe([record(counter=3)])
    assert tracker.is_dead("a")


def test_a_slow_round_is_not_blindness(clock):
    """Issue 11 (found end to end): a round made slow by throttled, retried writes (no read
    failed) restarted every clock, so a dead owner was never judged dead while a takeover
    was throttled. Only a failed read makes the gap blind."""
    tracker = LivenessTracker(clock, timeout_s=TIMEOUT_S, blind_after_s=1.5 * INTERVAL_S)
    tracker.observe([record(counter=3)])
    for _ in range(int(TIMEOUT_S / (2 * INTERVAL_S))):  # rounds two intervals apart
        clock.advance(2 * INTERVAL_S)
        tracker.observe([record(counter=3)])
    assert tracker.is_dead("a")


@pytest.mark.parametrize("skewed_wall_s", [0.0, 1e8, 1e11, 4e12])
def test_wall_clock_time_in_the_record_changes_nothing(clock, skewed_wall_s):
    """Clock skew can neither kill a live member nor resurrect a dead one."""
    tracker = LivenessTracker(clock, timeout_s=TIMEOUT_S)
    for counter in range(1, 10):  # alive, whatever its clock says
        tracker.observe([record(counter=counter, heartbeat_at=skewed_wall_s + counter)])
        clock.advance(INTERVAL_S)
        assert tracker.is_alive("a")

    stuck = record(counter=9, heartbeat_at=skewed_wall_s)
    for step in range(int(TIMEOUT_S)):  # only heartbeat_at moves: still dying
        tracker.observe([replace(stuck, heartbeat_at=clock.wall() + 1e6 * step)])
        clock.advance(INTERVAL_S)
    tracker.observe([replace(stuck, heartbeat_at=clock.wall() + 1e9)])
    assert tracker.is_dead("a")


def test_skewed_writer_clock_through_the_table(table, clock):
    """A member whose host clock is decades off heartbeats normally; observers judge by counter."""
    skewed = FakeClock(start_s=clock.monotonic(), wall_s=1e12)  # ~33,000 years ahead
    writer = membership(table, skewed, "skewed")
    writer.join(advancing(skewed))
    observer = LivenessTracker(clock, timeout_s=TIMEOUT_S)

    for _ in range(10):
        writer.heartbeat()
        observer.observe(table.members())
        clock.advance(INTERVAL_S)
        skewed.advance(INTERVAL_S)
        assert observer.is_alive("skewed")
    assert table.get_member("skewed").heartbeat_at > 1e12

    for _ in range(int(TIMEOUT_S)):  # it stops: dead after the timeout on *our* clock
        observer.observe(table.members())
        clock.advance(INTERVAL_S)
    observer.observe(table.members())
    assert observer.is_dead("skewed")


def test_a_vanished_row_counts_as_dead_once_we_have_watched_for_a_timeout(clock):
    tracker = LivenessTracker(clock, timeout_s=TIMEOUT_S)
    tracker.observe([record(counter=1)])
    tracker.observe([])  # deleted (left, or removed as dead)

    assert tracker.records() == []
    assert not tracker.is_alive("a")
    assert not tracker.is_dead("a")  # we have not watched long enough to be sure
    clock.advance(TIMEOUT_S)
    assert tracker.is_dead("a")


# -- join, heartbeat, leave -----------------------------------------------------------------


def test_ttl_counts_from_the_latest_members_clock_not_ours_alone(table, clock):
    """Issue 11, defect 2: a wall clock a day behind set a TTL already past, and DynamoDB
    removed the live member's row."""
    mine = membership(table, clock)
    mine.join(advancing(clock))
    day_s = 86_400.0
    clock.wall_offset_s -= day_s  # our clock falls a day behind the others
    mine.heartbeat(ttl_floor_wall=clock.wall() + day_s)  # a peer's latest heartbeat time
    item = table._db.get_item(TableName="members", Key=table._member_key("a"))["Item"]
    assert float(item["ttl"]["N"]) >= clock.wall() + day_s + 23 * 3600


def test_rejoin_registers_a_new_incarnation_and_refuses_a_live_one(table, clock):
    mine = membership(table, clock)
    mine.join(advancing(clock))
    table.delete_member("a", epoch=mine.epoch)  # judged dead and removed, TTL, a hand
    with pytest.raises(ConditionFailed):
        mine.heartbeat()
    first = mine.epoch
    mine.rejoin()
    assert mine.epoch != first and table.get_member("a").epoch == mine.epoch
    mine.heartbeat()  # renewing again
    with pytest.raises(DuplicateInstanceError):
        mine.rejoin()  # the row is there: a live process holds the id


def test_join_registers_and_heartbeats_move_the_counter(table, clock):
    mine = membership(table, clock)
    mine.join(advancing(clock))

    assert mine.is_registered
    assert table.get_member("a").counter == 1
    mine.heartbeat()
    mine.heartbeat()
    assert mine.counter == 3 == table.get_member("a").counter
    assert table.get_member("a").epoch == mine.epoch


def test_leave_removes_only_our_own_row(table, clock):
    mine = membership(table, clock)
    mine.join(advancing(clock))
    mine.leave()
    assert table.get_member("a") is None
    assert not mine.is_registered

    other = membership(table, clock)
    other.join(advancing(clock))
    mine.is_registered = True  # a stale instance that thinks it still holds the id
    mine.leave()
    assert table.get_member("a").epoch == other.epoch


def test_a_live_duplicate_id_is_refused_and_left_alone(table, clock, caplog):
    first = membership(table, clock)
    first.join(advancing(clock))
    second = membership(table, clock)

    caplog.set_level(logging.WARNING)
    with pytest.raises(DuplicateInstanceError, match='"a" is in use by a live instance'):
        second.join(advancing(clock, between=first.heartbeat))

    assert not second.is_registered
    assert table.get_member("a").epoch == first.epoch
    first.heartbeat()  # the original is undisturbed
    assert "already registered" in caplog.text


def test_a_slow_but_live_duplicate_is_still_refused(table, clock):
    """Its counter moves once, late in the watch: that is enough to refuse."""
    first = membership(table, clock)
    first.join(advancing(clock))
    second = membership(table, clock)
    waited = [0.0]

    def slow_heartbeat() -> None:
        waited[0] += 1
        if waited[0] == 2 * TIMEOUT_S / INTERVAL_S - 1:
            first.heartbeat()

    with pytest.raises(DuplicateInstanceError):
        second.join(advancing(clock, between=slow_heartbeat))
    assert table.get_member("a").epoch == first.epoch


def test_a_dead_id_is_taken_over_after_watching_a_whole_timeout(table, clock):
    crashed = membership(table, clock)
    crashed.join(advancing(clock))
    crashed.heartbeat()
    successor = membership(table, clock)
    started = clock.monotonic()

    successor.join(advancing(clock))

    assert clock.monotonic() - started >= TIMEOUT_S
    row = table.get_member("a")
    assert (row.epoch, row.counter) == (successor.epoch, 3)
    assert successor.is_registered and successor.counter == 3
    successor.heartbeat()
    with pytest.raises(ConditionFailed):
        crashed.heartbeat()  # if it was only paused, it learns it lost its identity


def test_two_successors_racing_for_a_dead_id_one_wins(table, clock):
    crashed = membership(table, clock)
    crashed.join(advancing(clock))
    winner = membership(table, clock)
    loser = membership(table, clock)
    # The loser watches the same dead counter; at its last wait, the winner takes over.
    winner_joined: list[bool] = []

    def winner_takes_over() -> None:
        if clock.monotonic() >= loser_deadline and not winner_joined:
            winner.join(advancing(clock))
            winner_joined.append(True)

    loser_deadline = clock.monotonic() + TIMEOUT_S
    with pytest.raises(DuplicateInstanceError):
        loser.join(advancing(clock, between=winner_takes_over))

    assert table.get_member("a").epoch == winner.epoch


def test_the_old_row_leaving_during_the_watch_lets_us_register(table, clock):
    """A graceful stop of the previous holder mid-watch is not a duplicate."""
    previous = membership(table, clock)
    previous.join(advancing(clock))
    successor = membership(table, clock)
    calls = [0]

    def previous_leaves() -> None:
        calls[0] += 1
        if calls[0] == 2:
            previous.leave()

    successor.join(advancing(clock, between=previous_leaves))

    assert table.get_member("a").epoch == successor.epoch
    assert successor.is_registered


def test_stopping_while_watching_gives_up(table, clock):
    membership(table, clock).join(advancing(clock))
    second = membership(table, clock)

    with pytest.raises(DuplicateInstanceError, match="stopped"):
        second.join(lambda seconds: True)


def test_every_heartbeat_publishes_the_engines_idle_figures(table, clock):
    mine = membership(table, clock)
    mine.join(advancing(clock))
    figures = [(0, 360.0), (2, 180.0)]
    mine.idle_source = lambda: figures[0]
    mine.heartbeat()
    assert table.get_member("a").idling_queues == 0
    figures.pop(0)
    mine.heartbeat()
    row = table.get_member("a")
    assert (row.idling_queues, row.sqs_requests_per_hour) == (2, 180.0)
