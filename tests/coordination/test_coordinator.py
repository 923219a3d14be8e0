"""DynamoCoordinator decisions, driven tick by tick on a FakeClock against moto.

Each `Node` is one instance: a coordinator with its own DynamoDB client, and a fake engine
that records what it is told to consume and reports drained queues back (`on_released`).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
from botocore.exceptions import EndpointConnectionError
from moto import mock_aws
from support import FakeClock, is_fixed_point

from sqsbalancerd.config import CoordinationSettings
from sqsbalancerd.coordination.coordinator import (
    DynamoCoordinator,
    ReceiveControl,
)
from sqsbalancerd.coordination.ring import rebalance
from sqsbalancerd.coordination.sweep import SWEEP_ROUNDS
from sqsbalancerd.coordination.table import (
    PROTOCOL_VERSION,
    CoordinationTable,
    MemberRecord,
    shard_of,
)
from sqsbalancerd.discovery import DiscoveryResult, QueueInfo
from sqsbalancerd.engine.poller import ReceiveGate

TABLE = "coordination"
REGION = "us-east-1"
INTERVAL_S = 1.0
TIMEOUT_S = 4.0
DELAY_S = 2.0
MARGIN_S = 1.0  # the default: heartbeat_interval
QUEUES = [f"work-{index:02d}" for index in range(12)]


def settings(**changes: Any) -> CoordinationSettings:
    values: dict[str, Any] = {
        "table_name": TABLE,
        "heartbeat_interval": INTERVAL_S,
        "heartbeat_timeout": TIMEOUT_S,
        "rebalance_delay": DELAY_S,
        **changes,
    }
    return CoordinationSettings(**values)


def discovered(names: Iterable[str]) -> DiscoveryResult:
    return DiscoveryResult(
        matched=tuple(QueueInfo(name=n, url=f"http://sqs/{n}") for n in names), skipped=()
    )


class FlakyClient:
    """A DynamoDB client that can be cut off, as if the network or the service were away."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.is_down = False
        self.calls: Counter[str] = Counter()
        self.before_call: Callable[[], None] = lambda: None

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method) or name.startswith("_") or name == "meta":
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.is_down:
                raise EndpointConnectionError(endpoint_url="https://dynamodb.invalid")
            self.calls[name] += 1
            self.before_call()
            return method(*args, **kwargs)

        return call


@dataclass
class FakeEngine:
    """Records set_owned; queues taken away drain until `release_drained` reports them."""

    owned: frozenset[str] = frozenset()
    draining: set[str] = field(default_factory=set)
    history: list[frozenset[str]] = field(default_factory=list)
    pauses: int = 0
    resumes: int = 0
    is_paused: bool = False
    budget: Callable[[], float | None] = lambda: None

    def set_owned(self, queues: Iterable[QueueInfo]) -> None:
        names = frozenset(q.name for q in queues)
        self.draining |= self.owned - names
        self.owned = names
        self.history.append(names)

    def pause(self) -> None:
        self.pauses += 1
        self.is_paused = True

    def resume(self) -> None:
        self.resumes += 1
        self.is_paused = False

    def set_budget(
        self,
        budget: Callable[[], float | None],
        renewal_due_in_s: Callable[[], float | None] | None = None,
    ) -> None:
        self.budget = budget
        self.renewal_due_in_s = renewal_due_in_s

    def control(self) -> ReceiveControl:
        return ReceiveControl(pause=self.pause, resume=self.resume, set_budget=self.set_budget)

    @property
    def is_receiving(self) -> bool:
        budget = self.budget()
        return not self.is_paused and (budget is None or budget > 0)


@dataclass
class Node:
    instance_id: str
    coordinator: DynamoCoordinator
    engine: FakeEngine
    client: FlakyClient
    failures: list[str]
    is_running: bool = True

    def tick(self) -> None:
        for queue in sorted(self.engine.draining):
            self.coordinator.on_released(queue)
        self.engine.draining.clear()
        self.coordinator.tick()

    @property
    def consuming(self) -> frozenset[str]:
        return self.engine.owned if self.engine.is_receiving else frozenset()


class Cluster:
    """Instances sharing one fake clock and one (moto) table; `step` ticks every runner."""

    def __init__(self, clock: FakeClock, queues: list[str], **changes: Any) -> None:
        self.clock = clock
        self.queues = queues
        self.settings = settings(**changes)
        self.nodes: dict[str, Node] = {}
        self.reader = self.table_for(boto3.client("dynamodb", region_name=REGION))
        self.reader.ensure(create=True, region=REGION)

    def table_for(self, client: Any, application: str = "sqsbalancer") -> CoordinationTable:
        return CoordinationTable(
            client, table_name=TABLE, application=application, clock=self.clock
        )

    def add(self, instance_id: str, *, clock: Any = None, table_concurrency: int = 1) -> Node:
        client = FlakyClient(boto3.client("dynamodb", region_name=REGION))
        engine = FakeEngine()
        failures: list[str] = []
        coordinator = DynamoCoordinator(
            table=self.table_for(client),
            settings=self.settings,
            instance_id=instance_id,
            region=REGION,
            clock=clock or self.clock,
            set_owned=engine.set_owned,
            control=engine.control(),
            spawn=lambda name, run, stop: None,
            fail=failures.append,
            table_concurrency=table_concurrency,
        )
        coordinator.start()
        coordinator.on_discovered(discovered(self.queues))
        node = Node(instance_id, coordinator, engine, client, failures)
        self.nodes[instance_id] = node
        return node

    def running(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.is_running]

    def step(self, seconds: float = INTERVAL_S) -> None:
        self.clock.advance(seconds)
        for node in self.running():
            node.tick()
        self.assert_exclusive()

    def step_until(self, predicate: Callable[[], bool], *, limit_s: float) -> float:
        """Step until `predicate`; returns the fake seconds it took."""
        started = self.clock.monotonic()
        while not predicate():
            assert self.clock.monotonic() - started <= limit_s, "not reached in time"
            self.step()
        return self.clock.monotonic() - started

    def owners(self) -> dict[str, str | None]:
        return {q: r.owner for q, r in self.reader.ownership().items()}

    def owned_counts(self) -> Counter[str]:
        return Counter(owner for owner in self.owners().values() if owner)

    def is_settled(self) -> bool:
        """Rows are the assignment's fixed point for the running instances (nothing left to
        move), every queue owned by one of them, each consuming exactly its rows."""
        owners = self.owners()
        running = self.running()
        members = [n.instance_id for n in running]
        vnodes, factor = self.settings.virtual_nodes, self.settings.load_factor
        if not is_fixed_point(
            owners, self.queues, members, virtual_nodes=vnodes, load_factor=factor
        ):
            return False
        return all(
            n.consuming == {q for q, o in owners.items() if o == n.instance_id} for n in running
        )

    def assert_exclusive(self) -> None:
        """No queue consumed by two instances; each consumer holds the queue's row."""
        owners = self.owners()
        seen: dict[str, str] = {}
        for node in self.running():
            for queue in node.consuming:
                assert queue not in seen, f"{queue}: {seen[queue]} and {node.instance_id}"
                seen[queue] = node.instance_id
                assert owners.get(queue) == node.instance_id, (queue, node.instance_id, owners)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def aws() -> Iterator[None]:
    with mock_aws():
        yield


@pytest.fixture
def cluster(aws: None, clock: FakeClock) -> Cluster:
    return Cluster(clock, QUEUES)


def settle(cluster: Cluster) -> float:
    """Until the rows settle and every instance has seen it (and stopped reading them)."""
    return cluster.step_until(
        lambda: (
            cluster.is_settled()
            and not any(n.coordinator.is_following_handoff for n in cluster.running())
        ),
        limit_s=6 * (DELAY_S + INTERVAL_S),
    )


# -- one instance ---------------------------------------------------------------------------


def test_a_lone_instance_takes_every_queue_after_the_delay(cluster):
    node = cluster.add("a")

    took_s = settle(cluster)

    assert DELAY_S <= took_s <= DELAY_S + 2 * INTERVAL_S
    assert node.engine.owned == set(QUEUES)
    assert cluster.owned_counts() == {"a": len(QUEUES)}
    assert node.failures == []


def test_ownership_rows_are_written_only_when_they_change(cluster):
    node = cluster.add("a")
    settle(cluster)
    before = dict(node.client.calls)

    for _ in range(20):
        cluster.step()

    calls = node.client.calls - Counter(before)
    # A round: one heartbeat, one member query, one query of the shard versions (nothing
    # moved, so no ownership query); a sweep: one read of the rows we hold; no writes.
    assert set(calls) == {"update_item", "query", "batch_get_item"}
    assert calls["update_item"] == 20 and calls["query"] == 2 * 20
    assert 1 <= calls["batch_get_item"] <= math.ceil(20 / SWEEP_ROUNDS) + 1


def test_steady_state_requests_do_not_grow_with_queues(aws, clock, capsys):
    queues = [f"work-{index:03d}" for index in range(240)]
    cluster = Cluster(clock, queues)
    nodes = [cluster.add(name) for name in ("a", "b", "c")]
    cluster.step_until(cluster.is_settled, limit_s=30)
    # Each sees the settled rows on its next round, then stops reading them.
    cluster.step_until(
        lambda: not any(n.coordinator.is_following_handoff for n in nodes), limit_s=10
    )
    before = [Counter(n.client.calls) for n in nodes]
    ticks = 30

    for _ in range(ticks):
        cluster.step()

    for node, earlier in zip(nodes, before, strict=True):
        per_tick = sum((node.client.calls - earlier).values()) / ticks
        # Heartbeat, member query and shard versions each round, plus a sweep's read of
        # the rows it holds: nothing that grows with the number of queues.
        assert 3 <= per_tick <= 3 + (ticks / SWEEP_ROUNDS + 1) / ticks
    with capsys.disabled():
        print(
            f"\nDynamoDB requests per instance per heartbeat: {per_tick:g} "
            f"(= {per_tick * 60 / 10:g}/min at the default 10 s interval, "
            f"{per_tick * 60:g}/min at 1 s), with {len(queues) // 3} queues each"
        )


# -- rebalancing ----------------------------------------------------------------------------


def test_the_delay_counts_between_rounds_whatever_the_calls_cost(cluster):
    """A slow read in the round that saw the change must not push the rebalance a round
    later: the delay is measured between heartbeat rounds, which start `interval` apart."""
    a = cluster.add("a")
    latency_s = [0.2]
    a.client.before_call = lambda: cluster.clock.advance(latency_s[0])
    first_round_s = cluster.clock.monotonic() + INTERVAL_S
    rounds_until_assigned = 0
    while not a.engine.history:
        rounds_until_assigned += 1
        cluster.clock.now_s = first_round_s + (rounds_until_assigned - 1) * INTERVAL_S
        a.tick()
        latency_s[0] = 0.01  # only the round that saw the queues appear was slow

    assert rounds_until_assigned == 1 + DELAY_S / INTERVAL_S


def test_joins_inside_the_delay_cause_one_rebalance(cluster):
    first = cluster.add("a")
    settle(cluster)
    assert first.coordinator.snapshot().rebalances == 0
    pushes_before = len(first.engine.history)

    for name in ("b", "c", "d"):  # each within rebalance_delay of the previous
        cluster.add(name)
        cluster.step()
        assert len(first.engine.history) == pushes_before, "rebalanced before the view settled"
    settle(cluster)

    assert [n.coordinator.snapshot().rebalances for n in cluster.nodes.values()] == [1, 0, 0, 0]
    counts = cluster.owned_counts()
    assert sorted(counts) == ["a", "b", "c", "d"]
    assert max(counts.values()) <= math.ceil(1.1 * len(QUEUES) / 4)


def test_five_instances_starting_together_settle_with_one_assignment_each(cluster):
    nodes = [cluster.add(name) for name in "abcde"]

    settle(cluster)

    assert [n.coordinator.snapshot().rebalances for n in nodes] == [0] * 5
    assert sum(cluster.owned_counts().values()) == len(QUEUES)


def test_a_join_moves_only_the_newcomers_share(cluster):
    for name in ("a", "b", "c"):
        cluster.add(name)
    settle(cluster)
    before = cluster.owners()

    cluster.add("d")
    settle(cluster)

    after = cluster.owners()
    moved = [q for q in QUEUES if before[q] != after[q]]
    # The minimum: d's share (12 // 4) and nothing else; the plan keeps to the rows.
    assert len(moved) == len(QUEUES) // 4
    assert all(after[q] == "d" for q in moved)


def test_plans_made_from_different_rows_still_settle_with_every_queue_owned(cluster):
    """c waits three times longer before planning (a misconfigured rebalance_delay), so it
    plans from rows a and b have already changed: plans disagree. The cluster must still
    settle with every queue owned once, and no queue consumed twice on the way."""
    for name in ("a", "b"):
        cluster.add(name)
    cluster.settings = settings(rebalance_delay=3 * DELAY_S)
    cluster.add("c")
    cluster.settings = settings()
    settle(cluster)
    cluster.add("d")

    took_s = cluster.step_until(cluster.is_settled, limit_s=20 * (DELAY_S + INTERVAL_S))

    assert set(cluster.owners()) == set(QUEUES)
    assert sorted(cluster.owned_counts().values()) == [3, 3, 3, 3]
    print(f"settled {took_s:g} s after d joined")


def test_a_queue_only_one_instance_can_see_is_taken_after_its_plan_gives_it_away(cluster):
    """ListQueues is eventually consistent: a sees a new queue, b does not yet. Their member
    rows publish different queue sets, so a's plan moves nothing for balance and takes the
    free row itself, rather than give it to b, which cannot take it (issue 11, defect 6);
    once b sees it too, the balance moves happen once."""
    a = cluster.add("a")
    cluster.add("b")
    settle(cluster)
    owners = cluster.owners()
    new = next(
        name
        for name in (f"late-{n}" for n in range(100))
        if rebalance([*QUEUES, name], ["a", "b"], owners, virtual_nodes=150)[name] == "b"
    )
    a.coordinator.on_discovered(discovered([*QUEUES, new]))

    took_s = cluster.step_until(lambda: cluster.owners().get(new) == "a", limit_s=60)

    assert "a" in {n.instance_id for n in cluster.running() if new in n.consuming}
    assert took_s <= DELAY_S + 3 * INTERVAL_S  # one plan after the view changed
    print(f"queue b could not see taken by a after {took_s:g} s")
    cluster.nodes["b"].coordinator.on_discovered(discovered([*QUEUES, new]))
    settle(cluster)
    assert set(cluster.owners()) == {*QUEUES, new}


def test_discovered_queues_are_shared_after_the_delay(cluster):
    a, b = cluster.add("a"), cluster.add("b")
    settle(cluster)
    cluster.queues = [*QUEUES, "work-new"]
    for node in (a, b):
        node.coordinator.on_discovered(discovered(cluster.queues))

    settle(cluster)

    assert cluster.owners()["work-new"] in {"a", "b"}


# -- stop and crash -------------------------------------------------------------------------


def test_a_crashed_instance_is_taken_over_after_the_timeout_not_before(cluster, caplog):
    a, b = cluster.add("a"), cluster.add("b")
    settle(cluster)
    caplog.set_level(logging.WARNING)
    b_queues = {q for q, o in cluster.owners().items() if o == "b"}
    b_last_renewal = cluster.clock.monotonic()
    b.is_running = False  # SIGKILL: no more heartbeats, no release

    while not b_queues <= a.engine.owned:
        assert not (a.engine.owned & b_queues) or (
            cluster.clock.monotonic() - b_last_renewal >= TIMEOUT_S
        )
        cluster.step()
    took_s = cluster.clock.monotonic() - b_last_renewal

    assert TIMEOUT_S <= took_s <= TIMEOUT_S + DELAY_S + 2 * INTERVAL_S
    assert cluster.reader.get_member("b") is None  # dead rows are removed by survivors
    assert cluster.owned_counts() == {"a": len(QUEUES)}
    took = [r.queue for r in caplog.records if r.getMessage().startswith("took over a queue")]
    assert sorted(took) == sorted(b_queues)  # once each, naming the queue


def test_a_draining_instance_hands_over_after_it_releases(cluster):
    a, b = cluster.add("a"), cluster.add("b")
    settle(cluster)
    b_queues = {q for q, o in cluster.owners().items() if o == "b"}
    b.engine.set_owned([])  # the engine stops receiving first (runtime drain step 1)
    b.engine.draining.clear()  # ... and finishes its in-flight messages later
    b.coordinator.begin_drain()

    for _ in range(int(DELAY_S + 2 * INTERVAL_S)):
        cluster.step()
    assert not (a.engine.owned & b_queues), "took queues whose owner is alive and draining"
    assert a.coordinator.snapshot().members_alive == 1

    b.coordinator.leave()  # drained: release every row, remove the member row
    b.is_running = False
    released_at = cluster.clock.monotonic()
    cluster.step_until(lambda: b_queues <= a.engine.owned, limit_s=DELAY_S + INTERVAL_S)

    assert cluster.clock.monotonic() - released_at <= INTERVAL_S
    assert cluster.reader.get_member("b") is None
    assert a.failures == b.failures == []


def a_draining_ghost_holds_four(cluster: Cluster) -> tuple[CoordinationTable, Node]:
    """A live, draining member ("ghost", written by hand) holding the first four queues, and
    "a" that has lived beside it long enough to own every other queue and none of its."""
    ghost = cluster.table_for(boto3.client("dynamodb", region_name=REGION))
    ghost.create_member(member_record("ghost", status="draining"))
    for queue in QUEUES[:4]:
        ghost.acquire(queue, f"http://sqs/{queue}", owner="ghost", previous=None, now_wall=1.0)
    a = cluster.add("a")
    for _ in range(int(TIMEOUT_S * 3)):
        ghost.heartbeat("ghost", epoch="ghost", status="draining", now_wall=1.0)
        cluster.step()
    assert a.engine.owned == set(QUEUES[4:])
    return ghost, a


def test_a_queue_whose_owner_is_alive_is_not_taken(cluster):
    """Rows held by a live member are left alone until released, even if the ring moved them."""
    ghost, a = a_draining_ghost_holds_four(cluster)

    row = ghost.ownership()[QUEUES[0]]
    ghost.release(QUEUES[0], owner="ghost", lease=row.lease, now_wall=2.0)
    ghost.advance_shard(shard_of(QUEUES[0]))  # as every writer does: readers look again
    ghost.heartbeat("ghost", epoch="ghost", status="draining", now_wall=1.0)
    cluster.step()
    assert a.engine.owned == {QUEUES[0], *QUEUES[4:]}

    cluster.step_until(lambda: a.engine.owned == set(QUEUES), limit_s=TIMEOUT_S + INTERVAL_S)
    assert cluster.reader.get_member("ghost") is None


def member_record(instance_id: str, *, status: str = "active", protocol: int = PROTOCOL_VERSION):
    return MemberRecord(
        instance_id=instance_id,
        host="elsewhere",
        status=status,
        counter=1,
        epoch=instance_id,
        protocol=protocol,
        heartbeat_at=1.0,
        started_at=1.0,
    )


def test_an_incompatible_version_is_ignored_and_its_queues_left_while_it_lives(cluster, caplog):
    old = cluster.table_for(boto3.client("dynamodb", region_name=REGION))
    old.create_member(member_record("old-version", protocol=PROTOCOL_VERSION + 1))
    for queue in QUEUES[:3]:
        old.acquire(queue, f"http://sqs/{queue}", owner="old-version", previous=None, now_wall=1)
    caplog.set_level(logging.ERROR)
    a = cluster.add("a")

    for _ in range(int(TIMEOUT_S * 3)):
        old.heartbeat("old-version", epoch="old-version", status="active", now_wall=1.0)
        cluster.step()

    assert a.engine.owned == set(QUEUES[3:])  # the whole ring is ours, minus its live rows
    assert a.coordinator.snapshot().members_alive == 1
    errors = [r for r in caplog.records if "incompatible protocol" in r.getMessage()]
    assert len(errors) == 1, "said once, not every heartbeat"
    assert errors[0].instance == "old-version"

    cluster.step_until(lambda: a.engine.owned == set(QUEUES), limit_s=TIMEOUT_S + 2 * INTERVAL_S)


def test_a_live_instance_of_an_older_protocol_is_waited_for(cluster, caplog):
    """Protocol 1 keeps its ownership rows elsewhere: taking queues beside a live one would
    consume them twice, so an upgrade hands over — nothing is taken until it has gone."""
    old = cluster.table_for(boto3.client("dynamodb", region_name=REGION))
    old.create_member(member_record("v1", protocol=PROTOCOL_VERSION - 1))
    caplog.set_level(logging.INFO)
    a = cluster.add("a")

    for _ in range(int(TIMEOUT_S * 3)):
        old.heartbeat("v1", epoch="v1", status="active", now_wall=1.0)
        cluster.step()
    assert a.engine.owned == set()
    waits = [r for r in caplog.records if "older protocol are alive" in r.getMessage()]
    assert len(waits) == 1, "said once, not every heartbeat"

    old.delete_member("v1", epoch="v1")  # it left
    cluster.step_until(lambda: a.engine.owned == set(QUEUES), limit_s=DELAY_S + 4 * INTERVAL_S)


# -- self-fencing ---------------------------------------------------------------------------


def test_no_renewal_for_timeout_minus_margin_pauses_receiving(cluster):
    a = cluster.add("a")
    settle(cluster)
    renewed_at = cluster.clock.monotonic()  # the last tick renewed
    a.client.is_down = True
    budgets: list[float] = []

    while a.engine.pauses == 0:
        budgets.append(a.engine.budget())
        cluster.clock.advance(0.25)
        a.coordinator.tick()

    paused_after_s = cluster.clock.monotonic() - renewed_at
    assert paused_after_s == pytest.approx(TIMEOUT_S - MARGIN_S)
    assert a.engine.budget() <= 0
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1] > 0
    assert a.coordinator.snapshot().is_fenced
    assert a.engine.owned == set(QUEUES)  # still held: fencing is not giving up


def test_long_polls_shrink_as_the_fence_deadline_nears(cluster):
    a = cluster.add("a")
    settle(cluster)
    gate = ReceiveGate()
    gate.set_budget(a.engine.budget)
    a.client.is_down = True

    waits = []
    for _ in range(int((TIMEOUT_S - MARGIN_S) / 0.5) + 1):
        waits.append(gate.wait_time_s(20))
        cluster.clock.advance(0.5)

    # 3 s of budget: polls end a second before it runs out, then none start.
    assert waits == [2, 1, 1, 0, 0, None, None]


def test_renewal_resumes_receiving_and_keeps_the_queues(cluster):
    a = cluster.add("a")
    settle(cluster)
    a.client.is_down = True
    for _ in range(int(TIMEOUT_S - MARGIN_S)):
        cluster.step()
    assert a.engine.pauses == 1 and not a.engine.is_receiving

    a.client.is_down = False
    cluster.step()

    assert a.engine.resumes == 1 and a.engine.is_receiving
    assert a.engine.budget() == pytest.approx(TIMEOUT_S - MARGIN_S)
    assert a.engine.owned == set(QUEUES)
    assert a.failures == []


def test_a_fenced_instance_is_silent_before_anyone_may_take_its_queues(cluster):
    a, b = cluster.add("a"), cluster.add("b")
    settle(cluster)
    b.client.is_down = True  # b cannot reach DynamoDB; a can

    cluster.step_until(lambda: a.engine.owned == set(QUEUES), limit_s=3 * TIMEOUT_S)

    assert b.engine.pauses == 1  # assert_exclusive held at every step on the way
    b.client.is_down = False
    cluster.step()
    # Issue 11, defect 4: it used to exit here ("lost its identity"); it rejoins instead, as
    # a new incarnation that owns nothing until the next plan gives it queues again.
    assert b.failures == []
    assert b.engine.owned == frozenset()
    settle(cluster)
    assert b.engine.owned and a.engine.owned
    assert b.failures == []


def test_a_renewal_racing_the_dead_judgement_wins(aws, clock):
    """b judges a dead from a read taken just before a renews; with no rebalance delay to
    wait through, b must not take a's queues on that stale judgement."""
    cluster = Cluster(clock, QUEUES, rebalance_delay=0.0)
    a, b = cluster.add("a"), cluster.add("b")
    settle(cluster)
    a.is_running = False  # a stalls (e.g. a long GC pause) ...
    for _ in range(int(TIMEOUT_S) - 1):
        cluster.step()
    renewals: list[None] = []

    def a_renews_first() -> None:
        if not renewals:  # ... and renews between b's read and b's conditional delete
            renewals.append(None)
            a.tick()

    b.client.before_call = lambda: a_renews_first() if b.client.calls["delete_item"] else None
    cluster.clock.advance(INTERVAL_S)
    b.tick()
    assert renewals, "b did not judge a dead"
    a.is_running = True
    cluster.assert_exclusive()
    for _ in range(int(TIMEOUT_S)):
        cluster.step()

    assert a.failures == [] and b.failures == []
    assert a.engine.is_receiving
    assert cluster.reader.get_member("a") is not None


def test_leave_stops_the_coordinator_loop_and_frees_everything(aws, clock):
    engine = FakeEngine()
    spawned: list[tuple[Callable[[threading.Event], None], threading.Event]] = []
    table = CoordinationTable(
        boto3.client("dynamodb", region_name=REGION),
        table_name=TABLE,
        application="sqsbalancer",
        clock=clock,
    )
    coordinator = DynamoCoordinator(
        table=table,
        settings=settings(),
        instance_id="a",
        region=REGION,
        clock=clock,
        set_owned=engine.set_owned,
        control=engine.control(),
        spawn=lambda name, run, stop: spawned.append((run, stop)),
        fail=lambda reason: None,
    )
    coordinator.start()
    coordinator.on_discovered(discovered(QUEUES))
    for _ in range(int(DELAY_S + 2 * INTERVAL_S)):
        clock.advance(INTERVAL_S)
        coordinator.tick()
    assert len(table.ownership()) == len(QUEUES)
    [(run, stop)] = spawned
    thread = threading.Thread(target=run, args=(stop,), name="sqsb-test-coordinator")
    thread.start()

    coordinator.leave()

    thread.join(5)
    assert not thread.is_alive()
    assert table.members() == []
    assert {r.owner for r in table.ownership().values()} == {None}


def test_a_graceful_leave_seen_late_is_not_logged_as_a_takeover(cluster, caplog):
    """A row released by an owner that then left looks, from a stale copy, like a dead
    owner's: the acquire fails its condition, and no takeover may be claimed in the log."""
    ghost, a = a_draining_ghost_holds_four(cluster)

    for queue in QUEUES[:4]:  # released and gone, but no shard advanced: a's copy is stale
        ghost.release(queue, owner="ghost", lease=ghost.ownership()[queue].lease, now_wall=2.0)
    ghost.delete_member("ghost", epoch="ghost")
    caplog.set_level(logging.WARNING)
    cluster.step_until(lambda: a.engine.owned == set(QUEUES), limit_s=DELAY_S + 3 * INTERVAL_S)

    assert not [r for r in caplog.records if "took over" in r.getMessage()]


# -- many rows at once ----------------------------------------------------------------------


class InFlight:
    """Counts ownership PutItems in flight at once; each takes `latency_s` of real time."""

    def __init__(self, client: FlakyClient, latency_s: float = 0.01) -> None:
        self._put = client._client.put_item
        self._lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.fail_once: set[str] = set()
        self._latency_s = latency_s
        client._client.put_item = self.put_item

    def put_item(self, **kwargs: Any) -> Any:
        queue = kwargs["Item"]["sk"]["S"].removeprefix("queue#")
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
            fails = queue in self.fail_once
            self.fail_once.discard(queue)
        try:
            threading.Event().wait(self._latency_s)  # a round trip, so that writes overlap
            if fails:
                raise EndpointConnectionError(endpoint_url="https://dynamodb.invalid")
            return self._put(**kwargs)
        finally:
            with self._lock:
                self.now -= 1


def test_a_start_up_writes_its_rows_concurrently_and_takes_them_all(aws, clock):
    queues = [f"work-{index:03d}" for index in range(120)]
    cluster = Cluster(clock, queues)
    node = cluster.add("a", table_concurrency=8)
    writes = InFlight(node.client)

    cluster.step_until(cluster.is_settled, limit_s=DELAY_S + 3 * INTERVAL_S)

    assert 1 < writes.most <= 8
    assert node.engine.owned == set(queues)
    assert cluster.owned_counts() == {"a": len(queues)}


def test_a_lost_answer_among_concurrent_writes_keeps_every_row_that_landed(aws, clock):
    queues = [f"work-{index:03d}" for index in range(40)]
    cluster = Cluster(clock, queues)
    a = cluster.add("a", table_concurrency=8)
    b = cluster.add("b", table_concurrency=8)
    for node in (a, b):
        InFlight(node.client).fail_once = {"work-005", "work-006", "work-033"}

    cluster.step_until(cluster.is_settled, limit_s=8 * (DELAY_S + INTERVAL_S))

    owners = cluster.owners()
    assert set(owners) == set(queues) and None not in owners.values()
    for node in (a, b):  # each consumes exactly the rows that name it (assert_exclusive too)
        assert node.engine.owned == {q for q, o in owners.items() if o == node.instance_id}


def test_concurrent_writes_lose_a_row_taken_meanwhile_and_keep_the_rest(aws, clock):
    queues = [f"work-{index:03d}" for index in range(30)]
    cluster = Cluster(clock, queues)
    node = cluster.add("a", table_concurrency=8)
    writes = InFlight(node.client)
    taker = cluster.table_for(boto3.client("dynamodb", region_name=REGION))
    original = writes.put_item

    def put_item(**kwargs: Any) -> Any:
        if kwargs["Item"]["sk"]["S"] == "queue#work-007":  # a ghost writes it first
            taker.acquire(
                "work-007", "http://sqs/work-007", owner="ghost", previous=None, now_wall=1.0
            )
        return original(**kwargs)

    node.client._client.put_item = put_item
    cluster.step_until(lambda: bool(node.engine.owned), limit_s=DELAY_S + 2 * INTERVAL_S)

    owners = cluster.owners()
    assert owners["work-007"] == "ghost"
    assert node.engine.owned == set(queues) - {"work-007"}
    assert {q for q, o in owners.items() if o == "a"} == set(queues) - {"work-007"}


def test_shards_that_moved_are_read_at_once(aws, clock):
    queues = [f"work-{index:03d}" for index in range(120)]
    cluster = Cluster(clock, queues)
    a = cluster.add("a", table_concurrency=8)
    b = cluster.add("b", table_concurrency=8)
    in_flight, most, lock = [0], [0], threading.Lock()
    query = b.client._client.query

    def counting_query(**kwargs: Any) -> Any:
        is_shard = kwargs["ExpressionAttributeValues"][":prefix"]["S"] == "queue#"
        with lock:
            in_flight[0] += is_shard
            most[0] = max(most[0], in_flight[0])
        try:
            threading.Event().wait(0.01 if is_shard else 0)  # a round trip: reads overlap
            return query(**kwargs)
        finally:
            with lock:
                in_flight[0] -= is_shard

    b.client._client.query = counting_query

    cluster.step_until(cluster.is_settled, limit_s=8 * (DELAY_S + INTERVAL_S))

    assert 1 < most[0] <= 8  # a's writes moved several shards: b read them together
    owners = cluster.owners()
    for node in (a, b):
        assert node.engine.owned == {q for q, o in owners.items() if o == node.instance_id}


def test_unowned_queues_count_what_no_live_member_holds(cluster):
    """The coordinator's view behind the "queue without an owner" alert: every queue before
    the first plan lands, those of a crashed member until they are taken over, then none."""
    a, b = cluster.add("a"), cluster.add("b")
    assert a.coordinator.snapshot().unowned_queues is None  # no round counted yet
    cluster.step()
    assert a.coordinator.snapshot().unowned_queues == len(QUEUES)
    settle(cluster)
    assert a.coordinator.snapshot().unowned_queues == 0
    b_queues = {q for q, o in cluster.owners().items() if o == "b"}
    b.is_running = False  # SIGKILL

    cluster.step_until(
        lambda: a.coordinator.snapshot().unowned_queues == len(b_queues), limit_s=2 * TIMEOUT_S
    )
    assert not (a.engine.owned & b_queues)  # counted while nobody consumes them
    cluster.step_until(lambda: b_queues <= a.engine.owned, limit_s=DELAY_S + 4 * INTERVAL_S)
    assert a.coordinator.snapshot().unowned_queues == 0
