"""CoordinationTable against moto: creation, scoping by application, members, fenced leases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from support import FakeClock

from sqsbalancerd.coordination.table import (
    PROTOCOL_VERSION,
    SHARDS,
    ConditionFailed,
    CoordinationTable,
    MemberRecord,
    TableGone,
    shard_of,
)
from sqsbalancerd.errors import TableMissingError

TABLE = "coordination-test"
REGION = "us-east-1"


@pytest.fixture
def client() -> Iterator[Any]:
    with mock_aws():
        yield boto3.client("dynamodb", region_name=REGION)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_table(client: Any, clock: FakeClock, application: str = "app") -> CoordinationTable:
    table = CoordinationTable(client, table_name=TABLE, application=application, clock=clock)
    table.ensure(create=True, region=REGION)
    return table


def member(instance_id: str, *, counter: int = 1, epoch: str = "e1") -> MemberRecord:
    return MemberRecord(
        instance_id=instance_id,
        host="host",
        status="active",
        counter=counter,
        epoch=epoch,
        protocol=PROTOCOL_VERSION,
        heartbeat_at=1_700_000_000.0,
        started_at=1_700_000_000.0,
    )


class LateToTheRace:
    """A client whose first DescribeTable says "missing", as if it looked just before
    another instance created the table."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.creates = 0
        self._has_described = False

    def describe_table(self, **kwargs: Any) -> Any:
        if not self._has_described:
            self._has_described = True
            raise ClientError(
                {"Error": {"Code": "ResourceNotFoundException", "Message": "not found"}},
                "DescribeTable",
            )
        return self._client.describe_table(**kwargs)

    def create_table(self, **kwargs: Any) -> Any:
        self.creates += 1
        return self._client.create_table(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class CreatesSlowly:
    """Like real DynamoDB: a new table is CREATING for a while, and refuses UpdateTimeToLive
    until it is ACTIVE (ResourceInUseException)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.is_creating = False

    def create_table(self, **kwargs: Any) -> Any:
        self.is_creating = True
        return self._client.create_table(**kwargs)

    def describe_table(self, **kwargs: Any) -> Any:
        response = self._client.describe_table(**kwargs)
        if self.is_creating:
            self.is_creating = False  # ACTIVE from the next look on
            response["Table"]["TableStatus"] = "CREATING"
        return response

    def update_time_to_live(self, **kwargs: Any) -> Any:
        if self.is_creating:
            raise ClientError(
                {"Error": {"Code": "ResourceInUseException", "Message": "being created"}},
                "UpdateTimeToLive",
            )
        return self._client.update_time_to_live(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


# -- the table ------------------------------------------------------------------------------


def test_ensure_creates_a_missing_table_on_demand_with_ttl(client, clock):
    make_table(client, clock)

    description = client.describe_table(TableName=TABLE)["Table"]
    assert description["TableStatus"] == "ACTIVE"
    assert description["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert {k["AttributeName"]: k["KeyType"] for k in description["KeySchema"]} == {
        "pk": "HASH",
        "sk": "RANGE",
    }
    ttl = client.describe_time_to_live(TableName=TABLE)["TimeToLiveDescription"]
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": "ttl"}


def test_ttl_is_enabled_once_a_new_table_is_active(client, clock):
    table = CoordinationTable(
        CreatesSlowly(client), table_name=TABLE, application="app", clock=clock
    )

    table.ensure(create=True, region=REGION)

    ttl = client.describe_time_to_live(TableName=TABLE)["TimeToLiveDescription"]
    assert ttl["TimeToLiveStatus"] == "ENABLED"


def test_ensure_keeps_an_existing_table_and_its_rows(client, clock):
    first = make_table(client, clock)
    first.create_member(member("a"))

    make_table(client, clock)

    assert [m.instance_id for m in first.members()] == ["a"]


def test_concurrent_create_by_another_instance_is_tolerated(client, clock):
    make_table(client, clock)  # the other instance won the race
    racing = LateToTheRace(client)
    table = CoordinationTable(racing, table_name=TABLE, application="app", clock=clock)

    table.ensure(create=True, region=REGION)  # CreateTable → ResourceInUseException, ignored

    assert racing.creates == 1
    table.create_member(member("a"))
    assert [m.instance_id for m in table.members()] == ["a"]


def test_missing_table_without_create_names_the_table_and_region(client, clock):
    table = CoordinationTable(client, table_name=TABLE, application="app", clock=clock)

    with pytest.raises(TableMissingError) as raised:
        table.ensure(create=False, region="eu-west-3")

    message = str(raised.value)
    assert TABLE in message and "eu-west-3" in message
    assert "\n" not in message
    assert client.list_tables()["TableNames"] == []


def test_a_table_deleted_while_in_use_raises_table_gone(client, clock):
    table = make_table(client, clock)
    client.delete_table(TableName=TABLE)

    with pytest.raises(TableGone):
        table.members()


# -- scoping --------------------------------------------------------------------------------


def test_two_applications_in_one_table_do_not_see_each_other(client, clock):
    orders = make_table(client, clock, application="orders")
    emails = make_table(client, clock, application="emails")
    orders.create_member(member("same-id", epoch="orders"))
    emails.create_member(member("same-id", epoch="emails"))  # no clash across applications
    emails.create_member(member("emails-only"))
    orders.acquire("q1", "url-1", owner="same-id", previous=None, now_wall=1.0)

    assert [m.epoch for m in orders.members()] == ["orders"]
    assert sorted(m.instance_id for m in emails.members()) == ["emails-only", "same-id"]
    assert list(orders.ownership()) == ["q1"]
    assert emails.ownership() == {}
    emails.acquire("q1", "url-1", owner="emails-only", previous=None, now_wall=1.0)
    assert orders.ownership()["q1"].owner == "same-id"


def test_member_and_queue_rows_live_under_the_application_key(client, clock):
    table = make_table(client, clock, application="sqsbalancer")
    table.create_member(member("a"))
    table.acquire("work-1", "url", owner="a", previous=None, now_wall=1.0)

    items = client.scan(TableName=TABLE)["Items"]

    # Ownership rows are spread over shard keys; the member rows and shard versions share
    # the application key.
    assert sorted((i["pk"]["S"], i["sk"]["S"]) for i in items) == [
        ("app#sqsbalancer", "member#a"),
        (f"app#sqsbalancer#{shard_of('work-1'):02d}", "queue#work-1"),
    ]
    assert table.members()[0].instance_id == "a"  # queue rows are not members
    assert list(table.ownership()) == ["work-1"]  # and member rows are not queues


# -- members --------------------------------------------------------------------------------


def test_create_member_is_conditional(client, clock):
    table = make_table(client, clock)
    table.create_member(member("a", epoch="first"))

    with pytest.raises(ConditionFailed):
        table.create_member(member("a", epoch="second"))

    assert table.get_member("a").epoch == "first"
    assert table.get_member("nobody") is None


def test_heartbeat_advances_the_counter_and_records_status(client, clock):
    table = make_table(client, clock)
    table.create_member(member("a", counter=1, epoch="mine"))

    assert table.heartbeat("a", epoch="mine", status="active", now_wall=1_800_000_000.0) == 2
    assert table.heartbeat("a", epoch="mine", status="draining", now_wall=1_800_000_001.5) == 3

    row = table.get_member("a")
    assert (row.counter, row.status, row.heartbeat_at) == (3, "draining", 1_800_000_001.5)


def test_heartbeat_with_another_epoch_fails_and_changes_nothing(client, clock):
    table = make_table(client, clock)
    table.create_member(member("a", counter=5, epoch="new-owner"))

    with pytest.raises(ConditionFailed):
        table.heartbeat("a", epoch="old-owner", status="active", now_wall=1.0)

    assert table.get_member("a").counter == 5


def test_heartbeat_of_a_removed_member_fails(client, clock):
    table = make_table(client, clock)

    with pytest.raises(ConditionFailed):
        table.heartbeat("gone", epoch="e", status="active", now_wall=1.0)
    assert table.members() == []  # the update did not create a row


def test_take_over_member_only_at_the_counter_seen(client, clock):
    table = make_table(client, clock)
    table.create_member(member("a", counter=7, epoch="old"))

    with pytest.raises(ConditionFailed):
        table.take_over_member(member("a", counter=7, epoch="new"), observed_counter=6)
    table.take_over_member(member("a", counter=8, epoch="new"), observed_counter=7)

    assert table.get_member("a").epoch == "new"
    with pytest.raises(ConditionFailed):
        table.heartbeat("a", epoch="old", status="active", now_wall=1.0)


def test_delete_member_by_epoch_or_by_the_counter_seen(client, clock):
    table = make_table(client, clock)
    table.create_member(member("mine", epoch="e-mine"))
    table.create_member(member("dead", counter=4))

    with pytest.raises(ConditionFailed):
        table.delete_member("mine", epoch="someone-else")
    with pytest.raises(ConditionFailed):
        table.delete_member("dead", observed_counter=3)  # it moved since: alive after all
    table.delete_member("mine", epoch="e-mine")
    table.delete_member("dead", observed_counter=4)

    assert table.members() == []


# -- ownership ------------------------------------------------------------------------------


def test_acquire_a_free_queue_once(client, clock):
    table = make_table(client, clock)

    assert table.acquire("q", "url-q", owner="a", previous=None, now_wall=5.0) == 1
    with pytest.raises(ConditionFailed):
        table.acquire("q", "url-q", owner="b", previous=None, now_wall=5.0)

    row = table.ownership()["q"]
    assert (row.owner, row.lease, row.queue_url, row.updated_at) == ("a", 1, "url-q", 5.0)


def test_release_frees_the_row_and_advances_the_lease(client, clock):
    table = make_table(client, clock)
    table.acquire("q", "url", owner="a", previous=None, now_wall=1.0)

    table.release("q", owner="a", lease=1, now_wall=2.0)

    row = table.ownership()["q"]
    assert (row.owner, row.lease) == (None, 2)
    assert table.acquire("q", "url", owner="b", previous=row, now_wall=3.0) == 3
    assert table.ownership()["q"].owner == "b"


def test_stale_lease_writes_fail(client, clock):
    table = make_table(client, clock)
    table.acquire("q", "url", owner="a", previous=None, now_wall=1.0)
    seen_by_b = table.ownership()["q"]
    seen_by_c = table.ownership()["q"]
    # b judged a dead and takes the queue over: the lease moves on, fencing a out.
    assert table.acquire("q", "url", owner="b", previous=seen_by_b, now_wall=2.0) == 2

    with pytest.raises(ConditionFailed):
        table.release("q", owner="a", lease=1, now_wall=3.0)  # a's lease is stale
    with pytest.raises(ConditionFailed):
        table.acquire("q", "url", owner="c", previous=seen_by_c, now_wall=3.0)
    with pytest.raises(ConditionFailed):
        table.release("q", owner="c", lease=2, now_wall=3.0)  # right lease, wrong owner
    with pytest.raises(ConditionFailed):
        table.delete_ownership("q", lease=1)

    row = table.ownership()["q"]
    assert (row.owner, row.lease) == ("b", 2)


def test_delete_ownership_with_the_current_lease(client, clock):
    table = make_table(client, clock)
    table.acquire("q", "url", owner="a", previous=None, now_wall=1.0)

    table.delete_ownership("q", lease=1)

    assert table.ownership() == {}


def test_ownership_pages_through_many_queues(client, clock):
    table = make_table(client, clock)
    long_url = "https://sqs.example/" + "x" * 3000  # ~3 KB rows: 1 MB query pages
    for index in range(400):
        table.acquire(f"q{index:03d}", long_url, owner="a", previous=None, now_wall=1.0)

    assert len(table.ownership()) == 400


def test_ownership_rows_spread_over_shards_and_each_write_is_announced(client, clock):
    table = make_table(client, clock)
    queues = [f"work-{index:02d}" for index in range(40)]
    for queue in queues:
        table.acquire(queue, "url", owner="a", previous=None, now_wall=1.0)
    shards = {shard_of(q) for q in queues}
    assert len(shards) > 8  # a stable hash spreads them (crc32: the same in every process)

    assert table.shard_versions() == dict.fromkeys(range(SHARDS), 0)
    moved = shard_of("work-07")
    assert table.advance_shard(moved) == 1
    assert table.advance_shard(moved) == 2
    assert table.shard_versions() == {**dict.fromkeys(range(SHARDS), 0), moved: 2}
    assert set(table.ownership()) == set(queues)
    assert set(table.shard_rows(moved)) == {q for q in queues if shard_of(q) == moved}


def test_rows_of_reads_the_named_rows_in_batches_of_a_hundred(client, clock):
    table = make_table(client, clock)
    queues = [f"work-{index:03d}" for index in range(150)]
    for queue in queues:
        table.acquire(queue, "url", owner="a", previous=None, now_wall=1.0)

    rows = table.rows_of([*queues, "never-written"])

    assert set(rows) == set(queues) and {r.owner for r in rows.values()} == {"a"}
    assert table.rows_of([]) == {}


def test_heartbeat_publishes_the_idle_figures_for_status(client, clock):
    table = make_table(client, clock)
    table.create_member(member("a", counter=1, epoch="mine"))
    assert table.get_member("a").idling_queues is None  # an older version sends none

    table.heartbeat("a", epoch="mine", status="active", now_wall=1.0, idle=(7, 1234.567))

    row = table.get_member("a")
    assert (row.idling_queues, row.sqs_requests_per_hour) == (7, 1234.57)
