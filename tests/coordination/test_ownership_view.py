"""OwnershipView against moto: which shards a round reads again, and what a failure keeps."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from support import FakeClock

from sqsbalancerd.coordination.rows import OwnershipView
from sqsbalancerd.coordination.table import SHARDS, CoordinationTable, shard_of

REGION = "us-east-1"


@pytest.fixture
def table() -> Iterator[CoordinationTable]:
    with mock_aws():
        client = boto3.client("dynamodb", region_name=REGION)
        made = CoordinationTable(
            client, table_name="rows-test", application="app", clock=FakeClock()
        )
        made.ensure(create=True, region=REGION)
        yield made


def one_queue_per_shard() -> dict[int, str]:
    found: dict[int, str] = {}
    for i in range(10 * SHARDS):
        found.setdefault(shard_of(f"q-{i}"), f"q-{i}")
    assert len(found) == SHARDS
    return found


def throttle_shard(table: CoordinationTable, shard: int, reads: list[int]) -> None:
    """Every Query of that shard's rows fails as throttled; the others are counted."""
    pk_suffix = f"#{shard:02d}"

    def maybe_throttle(params: dict[str, Any], **_: Any) -> None:
        pk = params["ExpressionAttributeValues"][":pk"]["S"]
        if pk.endswith(pk_suffix):
            raise ClientError(
                {"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, "Query"
            )
        reads.append(1)

    table._db.meta.events.register("before-parameter-build.dynamodb.Query", maybe_throttle)


def test_a_throttled_shard_does_not_cost_the_shards_read_with_it(
    table: CoordinationTable,
) -> None:
    """Reading shards at once, one failing must not throw away the others: under partial
    throttling a round that reads all or none can fail round after round and never learn
    the rows it did read."""
    queues = one_queue_per_shard()
    for shard, queue in queues.items():
        table.acquire(queue, f"https://q/{queue}", owner="a", previous=None, now_wall=1.0)
        table.advance_shard(shard)
    view = OwnershipView(table, read_concurrency=4)
    reads: list[int] = []
    throttle_shard(table, 5, reads)
    with pytest.raises(ClientError):
        view.refresh(now_s=1.0)
    assert set(view.rows) == set(queues.values()) - {queues[5]}
    reads.clear()
    with pytest.raises(ClientError):
        view.refresh(now_s=2.0)
    # Only the versions query: no shard but the throttled one is read again.
    assert len(reads) == 1
