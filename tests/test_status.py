"""`status`: its warnings (pure), and what it reads from SQS by default, with --details and
when watching (moto)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws
from support import FakeClock

from sqsbalancerd.config import DiscoverySettings
from sqsbalancerd.coordination.table import CoordinationTable, MemberRecord
from sqsbalancerd.discovery import Discovery
from sqsbalancerd.local import create_queues
from sqsbalancerd.status import (
    InstanceView,
    QueueSource,
    QueueView,
    StatusReader,
    _warnings,
)


def instance(name: str, queues: list[str], *, alive: bool = True) -> InstanceView:
    return InstanceView(
        instance_id=name,
        host="host",
        status="active",
        alive=alive,
        heartbeat_age_seconds=1.0,
        queues=tuple(queues),
        started_at=0.0,
        protocol=1,
    )


def owned(split: dict[str, list[str]]) -> tuple[tuple[InstanceView, ...], tuple[QueueView, ...]]:
    instances = tuple(instance(name, queues) for name, queues in split.items())
    queue_views = tuple(
        QueueView(queue=q, queue_url=f"http://sqs/{q}", owner=name)
        for name, queues in split.items()
        for q in queues
    )
    return instances, queue_views


def test_a_cluster_at_the_capacity_is_not_an_imbalance() -> None:
    # 60 queues over 3: capacity ceil(1.1 * 20) = 22, and the ring may fill a member to it.
    names = [f"q{index:02d}" for index in range(60)]
    instances, queues = owned({"a": names[:22], "b": names[22:41], "c": names[41:]})
    assert _warnings(instances, queues, 1.10) == ()


def test_more_than_the_capacity_is_an_imbalance() -> None:
    names = [f"q{index:02d}" for index in range(60)]
    instances, queues = owned({"a": names[:23], "b": names[23:41], "c": names[41:]})
    assert _warnings(instances, queues, 1.10) == (
        "imbalance: an instance owns 23 queues (capacity 22 at load_factor 1.1)",
    )


def test_unowned_queues_and_dead_owners_are_named() -> None:
    instances = (instance("a", ["q1"]), instance("b", ["q2"], alive=False))
    queues = (
        QueueView("q1", "http://sqs/q1", "a"),
        QueueView("q2", "http://sqs/q2", "b"),
        QueueView("q3", "http://sqs/q3", None),
    )
    assert set(_warnings(instances, queues, 1.10)) == {
        "queue q3 has no owner",
        "queue q2 is owned by b, which is not alive",
        "instance b looks dead (stale record)",
    }


# -- what `status` reads: names by default, attributes with --details (moto) -----------------


@pytest.fixture
def aws() -> Iterator[tuple[Any, CoordinationTable, FakeClock]]:
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        clock = FakeClock()
        table = CoordinationTable(
            boto3.client("dynamodb", region_name="us-east-1"),
            table_name="status-test",
            application="app",
            clock=clock,
        )
        table.ensure(create=True, region="us-east-1")
        yield sqs, table, clock


def cluster_of_one(table: CoordinationTable, clock: FakeClock, urls: dict[str, str]) -> None:
    """Member n1, owning every queue in `urls`."""
    table.create_member(MemberRecord("n1", "host", "active", 1, "e", 1, clock.wall(), clock.wall()))
    for name, url in urls.items():
        table.acquire(name, url, owner="n1", previous=None, now_wall=clock.wall())


def source_for(sqs: Any, clock: FakeClock, *, is_detailed: bool, **settings: Any) -> QueueSource:
    discovery = Discovery(sqs, DiscoverySettings(queue_pattern="^st-", **settings), clock=clock)
    return QueueSource(discovery, clock=clock, relist_s=300, is_detailed=is_detailed)


def reader_for(table: CoordinationTable, clock: FakeClock) -> StatusReader:
    return StatusReader(table, clock=clock, heartbeat_interval_s=1, heartbeat_timeout_s=4)


def count_calls(sqs: Any) -> Counter[str]:
    """The reads `status` makes (the tests' own sends and creations left out)."""
    calls: Counter[str] = Counter()

    def count(model: Any, **_: Any) -> None:
        if model.name.startswith(("List", "Get")):
            calls[model.name] += 1

    sqs.meta.events.register("before-call.sqs.*", count)
    return calls


def test_by_default_status_reads_queue_names_only(aws):
    sqs, table, clock = aws
    urls = create_queues(sqs, [f"st-{n}" for n in range(6)])  # each with an st-N-dlq
    cluster_of_one(table, clock, urls)
    reader = reader_for(table, clock)
    calls = count_calls(sqs)

    report = reader.report(
        reader.read_watching(), source_for(sqs, clock, is_detailed=False).snapshot()
    )

    assert calls == {"ListQueues": 1}
    assert {q.queue: q.owner for q in report.queues} == dict.fromkeys(urls, "n1")
    assert report.unclaimed == tuple(sorted(f"{name}-dlq" for name in urls))
    assert report.is_all_owned  # a dead-letter queue is never claimed: not held against it
    assert any("6 matching queues have no ownership row" in w for w in report.warnings)
    assert json.loads(report.to_json())["unclaimed"] == list(report.unclaimed)


def test_details_reads_attributes_and_tells_dead_letter_queues_apart(aws):
    sqs, table, clock = aws
    urls = create_queues(sqs, [f"st-{n}" for n in range(6)])
    cluster_of_one(table, clock, {name: url for name, url in urls.items() if name != "st-5"})
    for body in ("a", "b", "c"):
        sqs.send_message(QueueUrl=urls["st-0"], MessageBody=body)
    reader = reader_for(table, clock)
    calls = count_calls(sqs)

    source = source_for(sqs, clock, is_detailed=True, attribute_concurrency=4)
    report = reader.report(reader.read_watching(), source.snapshot())

    assert calls == {"ListQueues": 1, "GetQueueAttributes": 12}  # 6 queues and their DLQs
    views = {q.queue: q for q in report.queues}
    assert sorted(views) == sorted(urls)  # the dead-letter queues are left out
    assert views["st-0"].messages == 3
    assert views["st-0"].messages_in_flight == 0
    assert views["st-0"].has_redrive_policy
    assert views["st-5"].owner is None
    assert not report.is_all_owned
    assert "queue st-5 has no owner" in report.warnings
    assert report.unclaimed == ()


def test_watching_relists_only_every_relist_interval(aws):
    sqs, _, clock = aws
    create_queues(sqs, ["st-a"], dead_letter=False)
    source = source_for(sqs, clock, is_detailed=False)
    calls = count_calls(sqs)

    first = source.snapshot()
    create_queues(sqs, ["st-b"], dead_letter=False)
    clock.advance(299)
    assert source.snapshot() == first
    assert calls == {"ListQueues": 1}

    clock.advance(1)
    assert [name for name, _ in source.snapshot().listed] == ["st-a", "st-b"]
    assert calls == {"ListQueues": 2}


def test_watching_with_details_reads_live_depth_without_relisting(aws):
    sqs, _, clock = aws
    urls = create_queues(sqs, ["st-a", "st-b"], dead_letter=False)
    source = source_for(sqs, clock, is_detailed=True, interval=1, attribute_max_age=1)
    calls = count_calls(sqs)

    assert {q.name: q.approximate_messages for q in source.snapshot().discovered} == {
        "st-a": 0,
        "st-b": 0,
    }
    sqs.send_message(QueueUrl=urls["st-b"], MessageBody="x")
    clock.advance(1)

    assert {q.name: q.approximate_messages for q in source.snapshot().discovered} == {
        "st-a": 0,
        "st-b": 1,
    }
    assert calls == {"ListQueues": 1, "GetQueueAttributes": 4}
