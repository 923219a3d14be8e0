"""`status`: its warnings (pure), and what it reads from SQS by default, with --details and
when watching (moto)."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from rich.console import Console
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
    StatusReport,
    read_report,
    render_status,
    warnings_for,
    watch,
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
    assert warnings_for(instances, queues, 1.10) == ()


def test_more_than_the_capacity_is_an_imbalance() -> None:
    names = [f"q{index:02d}" for index in range(60)]
    instances, queues = owned({"a": names[:23], "b": names[23:41], "c": names[41:]})
    assert warnings_for(instances, queues, 1.10) == (
        "imbalance: an instance owns 23 queues (capacity 22 at load_factor 1.1)",
    )


def test_unowned_queues_and_dead_owners_are_named() -> None:
    instances = (instance("a", ["q1"]), instance("b", ["q2"], alive=False))
    queues = (
        QueueView("q1", "http://sqs/q1", "a"),
        QueueView("q2", "http://sqs/q2", "b"),
        QueueView("q3", "http://sqs/q3", None),
    )
    assert set(warnings_for(instances, queues, 1.10)) == {
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

    report = read_report(reader, source_for(sqs, clock, is_detailed=False), reader.read_watching())

    # No attributes: names, and one question per queue without a row (the six DLQs).
    assert calls == {"ListQueues": 1, "ListDeadLetterSourceQueues": 6}
    assert {q.queue: q.owner for q in report.queues} == dict.fromkeys(urls, "n1")
    assert report.is_all_owned
    assert json.loads(report.to_json())["queues"][0]["owner"] == "n1"


def test_by_default_a_dead_letter_queue_is_named_as_one_not_unclaimed(aws):
    sqs, table, clock = aws
    urls = create_queues(sqs, ["st-a", "st-b"])  # with st-a-dlq, st-b-dlq
    urls |= create_queues(sqs, ["st-new"], dead_letter=False)
    cluster_of_one(table, clock, {name: urls[name] for name in ("st-a", "st-b")})
    reader = reader_for(table, clock)

    report = read_report(reader, source_for(sqs, clock, is_detailed=False), reader.read_watching())

    assert report.dead_letter == ("st-a-dlq", "st-b-dlq")
    assert report.unclaimed == ()
    # A queue without a row that is no dead-letter queue waits for an owner: not all owned,
    # as --details says too.
    assert {q.queue: q.owner for q in report.queues} == {"st-a": "n1", "st-b": "n1", "st-new": None}
    assert not report.is_all_owned
    assert "queue st-new has no owner" in report.warnings
    assert not any("dlq" in warning for warning in report.warnings)
    document = json.loads(report.to_json())
    assert (document["dead_letter"], document["unclaimed"]) == (["st-a-dlq", "st-b-dlq"], [])


def test_a_dead_letter_queue_of_an_unlisted_queue_is_waiting_to_be_claimed(aws):
    """As discovery judges it: only a listed queue's redrive policy makes a DLQ."""
    sqs, table, clock = aws
    create_queues(sqs, ["other-a"])  # other-a-dlq does not match; its DLQ is named st-...
    dlq = sqs.create_queue(QueueName="st-dlq")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]
    policy = json.dumps({"deadLetterTargetArn": arn["QueueArn"], "maxReceiveCount": "3"})
    sqs.create_queue(QueueName="other-b", Attributes={"RedrivePolicy": policy})
    reader = reader_for(table, clock)

    report = read_report(reader, source_for(sqs, clock, is_detailed=False), reader.read_watching())

    assert report.dead_letter == ()
    assert [(q.queue, q.owner) for q in report.queues] == [("st-dlq", None)]


def test_queues_not_checked_are_listed_as_unclaimed_and_not_held_against_the_cluster(aws):
    sqs, table, clock = aws
    urls = create_queues(sqs, ["st-a"])
    cluster_of_one(table, clock, {"st-a": urls["st-a"]})
    reader = reader_for(table, clock)

    def refuse(model: Any, **_: Any) -> None:
        if model.name == "ListDeadLetterSourceQueues":
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, model.name)

    sqs.meta.events.register("before-call.sqs.*", refuse)
    report = read_report(reader, source_for(sqs, clock, is_detailed=False), reader.read_watching())

    assert (report.unclaimed, report.dead_letter) == (("st-a-dlq",), ())
    assert report.is_all_owned
    assert any("1 matching queues have no ownership row (st-a-dlq)" in w for w in report.warnings)


def test_details_reads_attributes_and_tells_dead_letter_queues_apart(aws):
    sqs, table, clock = aws
    urls = create_queues(sqs, [f"st-{n}" for n in range(6)])
    cluster_of_one(table, clock, {name: url for name, url in urls.items() if name != "st-5"})
    for body in ("a", "b", "c"):
        sqs.send_message(QueueUrl=urls["st-0"], MessageBody=body)
    reader = reader_for(table, clock)
    calls = count_calls(sqs)

    source = source_for(sqs, clock, is_detailed=True, attribute_concurrency=4)
    report = read_report(reader, source, reader.read_watching())

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

    first = source.snapshot(claimed=["st-a"])
    create_queues(sqs, ["st-b"], dead_letter=False)
    clock.advance(299)
    assert source.snapshot(claimed=["st-a"]) == first
    assert calls == {"ListQueues": 1}

    clock.advance(1)
    assert [name for name, _ in source.snapshot(claimed=["st-a", "st-b"]).listed] == [
        "st-a",
        "st-b",
    ]
    assert calls == {"ListQueues": 2}


def test_watching_with_details_reads_live_depth_without_relisting(aws):
    sqs, _, clock = aws
    urls = create_queues(sqs, ["st-a", "st-b"], dead_letter=False)
    source = source_for(sqs, clock, is_detailed=True, interval=1, attribute_max_age=1)
    calls = count_calls(sqs)

    assert {q.name: q.approximate_messages for q in source.snapshot(claimed=()).discovered} == {
        "st-a": 0,
        "st-b": 0,
    }
    sqs.send_message(QueueUrl=urls["st-b"], MessageBody="x")
    clock.advance(1)

    assert {q.name: q.approximate_messages for q in source.snapshot(claimed=()).discovered} == {
        "st-a": 0,
        "st-b": 1,
    }
    assert calls == {"ListQueues": 1, "GetQueueAttributes": 4}


def test_watch_lists_and_checks_dead_letter_queues_once_per_listing(aws):
    sqs, table, clock = aws
    urls = create_queues(sqs, ["st-a", "st-b"])
    cluster_of_one(table, clock, urls)
    reader = reader_for(table, clock)
    source = source_for(sqs, clock, is_detailed=False)  # lists again after 300 s
    calls = count_calls(sqs)
    reads: Counter[str] = Counter()
    table_reads = table.members, table.ownership
    table.members = lambda: reads.update(["members"]) or table_reads[0]()  # type: ignore[method-assign]
    table.ownership = lambda: reads.update(["ownership"]) or table_reads[1]()  # type: ignore[method-assign]
    shown: list[StatusReport] = []

    def wait(seconds: float) -> bool:
        clock.advance(seconds)
        table.heartbeat("n1", epoch="e", status="active", now_wall=clock.wall())  # alive
        return len(shown) == 10

    watch(reader, source, every_s=5, show=shown.append, wait=wait)

    # Ten refreshes in 50 s: the rows each time, the queues and their DLQs once.
    assert reads == {"members": 10, "ownership": 10}
    assert calls == {"ListQueues": 1, "ListDeadLetterSourceQueues": 2}
    assert all(r.dead_letter == ("st-a-dlq", "st-b-dlq") and r.is_all_owned for r in shown)


def test_one_read_calls_an_instance_one_renewal_late_alive_and_a_stale_one_dead(aws):
    """The cluster judges death after heartbeat_timeout; one slow renewal is not it."""
    _, table, clock = aws
    reader = StatusReader(table, clock=clock, heartbeat_interval_s=5, heartbeat_timeout_s=30)
    for name, age_s in (("late", 12.0), ("stale", 31.0)):
        wall = clock.wall() - age_s
        table.create_member(MemberRecord(name, "host", "active", 7, "e", 1, wall, wall))

    alive = reader.read_once(clock.advance)  # neither counter moves in the 6.25 s

    assert alive == {"late": True, "stale": False}


def test_status_shows_each_instances_utilisation_and_each_busy_queues_load(aws):
    sqs, table, clock = aws
    urls = create_queues(sqs, ["st-hot", "st-cold"])
    cluster_of_one(table, clock, urls)
    table.heartbeat(
        "n1",
        epoch="e",
        status="active",
        now_wall=clock.wall(),
        load=("n1:1", "1|750|st-hot:2.5:40:0", 8, 0.0),
    )
    reader = reader_for(table, clock)

    report = read_report(reader, source_for(sqs, clock, is_detailed=False), reader.read_watching())

    assert report.instances[0].utilisation == 0.75
    assert {q.queue: q.load for q in report.queues} == {"st-hot": 2.5, "st-cold": None}
    render_status(report, Console(file=io.StringIO(), width=200))  # the new columns render


def test_status_shows_each_instances_idling_queues_and_sqs_requests_per_hour(aws):
    sqs, table, clock = aws
    urls = create_queues(sqs, ["st-a", "st-b"])
    cluster_of_one(table, clock, urls)
    table.heartbeat("n1", epoch="e", status="active", now_wall=clock.wall(), idle=(1, 225.0))
    reader = reader_for(table, clock)

    report = read_report(reader, source_for(sqs, clock, is_detailed=False), reader.read_watching())

    [instance] = report.instances
    assert (instance.idling_queues, instance.sqs_requests_per_hour) == (1, 225.0)
    assert json.loads(report.to_json())["instances"][0]["sqs_requests_per_hour"] == 225.0
    out = io.StringIO()
    render_status(report, Console(file=out, width=200))
    assert "SQS req/h" in out.getvalue() and "225" in out.getvalue()
