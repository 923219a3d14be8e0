"""The only module that talks to DynamoDB.

Layout (one table, shared by applications), protocol 2:
- member rows: pk = "app#<application>", sk = "member#<instance_id>";
- ownership rows, spread over SHARDS partition keys by a stable hash of the queue name:
  pk = "app#<application>#<shard>", sk = "queue#<queue name>";
- one version item per shard next to the member rows: pk = "app#<application>",
  sk = "shard#<shard>", a counter every ownership write advances after it lands.

Why: every instance reads the member rows each heartbeat, but the ownership rows only when
a shard's version moved (one small query of the versions tells it), and then only that
shard. Steady state reads no ownership row at all, a handoff reads the shards it touched,
and no single partition key carries the cluster's ownership reads and writes (DynamoDB
limits each key's partition to 3,000 read and 1,000 write units a second).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from sqsbalancerd.aws import describe_error, error_code
from sqsbalancerd.clock import Clock
from sqsbalancerd.errors import CoordinationError, TableMissingError

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
MEMBER_PREFIX = "member#"
QUEUE_PREFIX = "queue#"
SHARD_PREFIX = "shard#"
# Fixed by the protocol: every instance must hash a queue to the same shard.
SHARDS = 16
# Member rows expire through DynamoDB TTL if nobody renews or removes them.
MEMBER_TTL_S = 24 * 3600
_TABLE_WAIT_S = 60.0
_BATCH_GET_KEYS = 100  # BatchGetItem's limit


def shard_of(queue: str) -> int:
    """The shard of a queue's ownership row (stable across processes, unlike hash())."""
    return zlib.crc32(queue.encode()) % SHARDS


class ConditionFailed(CoordinationError):
    """A conditional write lost: someone else changed the record first."""


class TableGone(CoordinationError):
    """The table was deleted while in use."""


@dataclass(frozen=True, slots=True)
class MemberRecord:
    instance_id: str
    host: str
    status: str
    counter: int
    epoch: str
    protocol: int
    heartbeat_at: float
    started_at: float
    # What the member plans with: instances planning with other ring parameters, or
    # from another queue set, must not act on each other's plans.
    ring: str = ""  # "<virtual_nodes>/<load_factor>"; "" from versions before it
    queues_hash: str = ""
    # Load-aware planning (loadsummary.py): the summary measured for the planning epoch
    # `load_epoch` names, and the worker count it weighs with. "" / 0: none published.
    load_epoch: str = ""
    load: str = ""
    workers: int = 0
    load_joined: float = 0.0  # the epoch time of its first summary (the newcomer ramp)
    # For `status` (engine/idle.py): owned queues idling and the SQS requests an hour the
    # owned queues cost while nothing arrives, as of its last heartbeat (None: not sent).
    idling_queues: int | None = None
    sqs_requests_per_hour: float | None = None


@dataclass(frozen=True, slots=True)
class OwnershipRecord:
    queue: str
    queue_url: str
    owner: str | None
    lease: int
    updated_at: float
    # The lease as stored when it is not a number (edited by hand): ("", "") when absent,
    # else its type and value. Such a row is acquired conditional on exactly that.
    damaged_lease: tuple[str, str] | None = None
    # When the owner took it, in planning-epoch time (loadbalance.py); None: not written.
    moved_at: float | None = None


def _s(value: str) -> dict[str, str]:
    return {"S": value}


def _n(value: float) -> dict[str, str]:
    return {"N": repr(value) if isinstance(value, float) else str(value)}


def _member_from_item(item: dict[str, Any]) -> MemberRecord:
    return MemberRecord(
        instance_id=item["instance_id"]["S"],
        host=item.get("host", {}).get("S", ""),
        status=item.get("status", {}).get("S", "active"),
        counter=int(item.get("counter", {}).get("N", "0")),
        epoch=item.get("epoch", {}).get("S", ""),
        protocol=int(item.get("protocol", {}).get("N", "0")),
        heartbeat_at=float(item.get("heartbeat_at", {}).get("N", "0")),
        started_at=float(item.get("started_at", {}).get("N", "0")),
        ring=item.get("ring", {}).get("S", ""),
        queues_hash=item.get("queues_hash", {}).get("S", ""),
        load_epoch=item.get("load_epoch", {}).get("S", ""),
        load=item.get("load", {}).get("S", ""),
        workers=_int_or_zero(item.get("workers", {}).get("N", "0")),
        load_joined=_float_or_none(item.get("load_joined", {}).get("N")) or 0.0,
        idling_queues=_int_or_none(item.get("idling_queues", {}).get("N")),
        sqs_requests_per_hour=_float_or_none(item.get("sqs_requests_per_hour", {}).get("N")),
    )


def _int_or_none(raw: str | None) -> int | None:
    value = _float_or_none(raw)
    return None if value is None else int(value)


def _int_or_zero(raw: str) -> int:
    try:
        return max(0, int(raw))
    except ValueError:  # edited by hand: plans as an instance that published nothing
        return 0


def _ownership_from_item(item: dict[str, Any]) -> OwnershipRecord:
    owner = item.get("owner", {}).get("S") or None
    lease, damaged = _lease_of(item.get("lease"))
    return OwnershipRecord(
        queue=item["sk"]["S"].removeprefix(QUEUE_PREFIX),
        queue_url=item.get("queue_url", {}).get("S", ""),
        owner=owner,
        lease=lease,
        updated_at=float(item.get("updated_at", {}).get("N", "0")),
        damaged_lease=damaged,
        moved_at=_float_or_none(item.get("moved_at", {}).get("N")),
    )


def _float_or_none(raw: str | None) -> float | None:
    try:
        return None if raw is None else float(raw)
    except ValueError:
        return None


def _lease_of(value: dict[str, Any] | None) -> tuple[int, tuple[str, str] | None]:
    if not value:
        return 0, ("", "")
    (kind, raw), *_ = value.items()
    if kind == "N":
        try:
            return int(raw), None
        except ValueError:  # a fraction typed by hand
            pass
    return 0, (kind, str(raw))


class CoordinationTable:
    def __init__(
        self, dynamodb: DynamoDBClient, *, table_name: str, application: str, clock: Clock
    ) -> None:
        self._db = dynamodb
        self.table_name = table_name
        self.application = application
        self._pk = f"app#{application}"
        self._clock = clock

    # -- table ----------------------------------------------------------------------------

    def ensure(self, *, create: bool, region: str) -> None:
        """Wait until the table is ACTIVE, creating it when allowed and missing."""
        status = self._status()
        if status is None:
            if not create:
                raise TableMissingError(
                    f'coordination table "{self.table_name}" does not exist in {region} '
                    "(create it with `sqsbalancerd init-table` or set create_table = true)"
                )
            self._create()
            self._wait_active()
            self._enable_ttl()  # DynamoDB refuses UpdateTimeToLive while CREATING
            return
        self._wait_active()

    def _status(self) -> str | None:
        try:
            table = self._db.describe_table(TableName=self.table_name)["Table"]
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return None
            raise
        return str(table.get("TableStatus", "ACTIVE"))

    def _create(self) -> None:
        try:
            self._db.create_table(**table_definition(self.table_name))
            logger.info("created coordination table", extra={"table": self.table_name})
        except ClientError as exc:
            if error_code(exc) != "ResourceInUseException":
                raise  # someone else creating it at the same moment is fine

    def _enable_ttl(self) -> None:
        try:
            self._db.update_time_to_live(
                TableName=self.table_name,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": "ttl"},
            )
        except ClientError as exc:
            # "already enabled" (another instance won the race) is a ValidationException.
            log = logger.debug if error_code(exc) == "ValidationException" else logger.warning
            log("ttl not enabled on the coordination table", extra={"error": describe_error(exc)})

    def _wait_active(self) -> None:
        deadline = self._clock.monotonic() + _TABLE_WAIT_S
        while self._status() != "ACTIVE":
            if self._clock.monotonic() > deadline:
                raise CoordinationError(f'table "{self.table_name}" did not become ACTIVE')
            _pause(1.0)

    # -- members --------------------------------------------------------------------------

    def _member_key(self, instance_id: str) -> dict[str, Any]:
        return {"pk": _s(self._pk), "sk": _s(MEMBER_PREFIX + instance_id)}

    def _member_item(self, record: MemberRecord) -> dict[str, Any]:
        return {
            **self._member_key(record.instance_id),
            "instance_id": _s(record.instance_id),
            "host": _s(record.host),
            "status": _s(record.status),
            "counter": _n(record.counter),
            "epoch": _s(record.epoch),
            "protocol": _n(record.protocol),
            "heartbeat_at": _n(record.heartbeat_at),
            "started_at": _n(record.started_at),
            "ttl": _n(int(record.heartbeat_at) + MEMBER_TTL_S),
            "ring": _s(record.ring),
            "queues_hash": _s(record.queues_hash),
        }

    def create_member(self, record: MemberRecord) -> None:
        """Register; ConditionFailed if the instance id is already in the table."""
        self._write(
            "put_item",
            Item=self._member_item(record),
            ConditionExpression="attribute_not_exists(sk)",
        )

    def take_over_member(self, record: MemberRecord, *, observed_counter: int) -> None:
        """Replace a dead record of the same id, only if its counter is still the one seen."""
        self._write(
            "put_item",
            Item=self._member_item(record),
            ConditionExpression="#c = :seen",
            ExpressionAttributeNames={"#c": "counter"},
            ExpressionAttributeValues={":seen": _n(observed_counter)},
        )

    def get_member(self, instance_id: str) -> MemberRecord | None:
        item = self._call("get_item", Key=self._member_key(instance_id), ConsistentRead=True)
        found = item.get("Item")
        return _member_from_item(found) if found else None

    def heartbeat(
        self,
        instance_id: str,
        *,
        epoch: str,
        status: str,
        now_wall: float,
        ttl_wall: float | None = None,
        queues_hash: str = "",
        load: tuple[str, str, int, float] | None = None,
        idle: tuple[int, float] | None = None,
    ) -> int:
        """Advance our counter; ConditionFailed if our identity was taken over.

        ``load``: (epoch, summary, workers, joined) to publish, only when it changed (the summary
        is up to 2 KB: written once a planning epoch, not every heartbeat). ``idle``:
        (queues idling, estimated SQS requests an hour), for `status`: a few bytes."""
        ttl_from = now_wall if ttl_wall is None else ttl_wall
        expression = (
            "SET #c = #c + :one, heartbeat_at = :now, #s = :status, #t = :ttl, queues_hash = :qh"
        )
        values = {
            ":one": _n(1),
            ":now": _n(now_wall),
            ":status": _s(status),
            ":epoch": _s(epoch),
            ":ttl": _n(int(ttl_from) + MEMBER_TTL_S),
            ":qh": _s(queues_hash),
        }
        if load is not None:
            expression += ", load_epoch = :le, #l = :load, workers = :w, load_joined = :lj"
            values.update(
                {
                    ":le": _s(load[0]),
                    ":load": _s(load[1]),
                    ":w": _n(load[2]),
                    ":lj": _n(load[3]),
                }
            )
        if idle is not None:
            expression += ", idling_queues = :iq, sqs_requests_per_hour = :rph"
            values.update({":iq": _n(idle[0]), ":rph": _n(round(float(idle[1]), 2))})
        response = self._write(
            "update_item",
            Key=self._member_key(instance_id),
            UpdateExpression=expression,
            ConditionExpression="epoch = :epoch",
            ExpressionAttributeNames={
                "#c": "counter",
                "#s": "status",
                "#t": "ttl",
                **({"#l": "load"} if load is not None else {}),
            },
            ExpressionAttributeValues=values,
            ReturnValues="UPDATED_NEW",
        )
        return int(response["Attributes"]["counter"]["N"])

    def delete_member(
        self, instance_id: str, *, epoch: str | None = None, observed_counter: int | None = None
    ) -> None:
        """Remove a member row: ours (by epoch) or a dead one (by the counter we saw)."""
        if epoch is not None:
            condition, values = "epoch = :v", {":v": _s(epoch)}
            names: dict[str, str] | None = None
        else:
            condition, values, names = (
                "#c = :v",
                {":v": _n(observed_counter or 0)},
                {"#c": "counter"},
            )
        kwargs: dict[str, Any] = {
            "Key": self._member_key(instance_id),
            "ConditionExpression": condition,
            "ExpressionAttributeValues": values,
        }
        if names:
            kwargs["ExpressionAttributeNames"] = names
        self._write("delete_item", **kwargs)

    def members(self, *, consistent: bool = True) -> list[MemberRecord]:
        """Every member row. Eventually consistent costs half (the heartbeat's read of all
        N rows is the one read that grows with the cluster); see peers.Peers.observe."""
        items = self._query(MEMBER_PREFIX, consistent=consistent)
        return [_member_from_item(i) for i in items]

    # -- ownership ------------------------------------------------------------------------

    def _queue_key(self, queue: str) -> dict[str, Any]:
        return {"pk": _s(f"{self._pk}#{shard_of(queue):02d}"), "sk": _s(QUEUE_PREFIX + queue)}

    def ownership(self) -> dict[str, OwnershipRecord]:
        """Every ownership row (one query per shard): for `status` and first reads."""
        rows: dict[str, OwnershipRecord] = {}
        for shard in range(SHARDS):
            rows.update(self.shard_rows(shard))
        return rows

    def shard_rows(self, shard: int) -> dict[str, OwnershipRecord]:
        items = self._query(QUEUE_PREFIX, pk=f"{self._pk}#{shard:02d}")
        return {r.queue: r for r in map(_ownership_from_item, items)}

    def shard_versions(self) -> dict[int, int]:
        """Each shard's change counter (absent: never written, 0)."""
        versions = dict.fromkeys(range(SHARDS), 0)
        for item in self._query(SHARD_PREFIX):
            shard = int(item["sk"]["S"].removeprefix(SHARD_PREFIX))
            versions[shard] = int(item.get("version", {}).get("N", "0"))
        return versions

    def advance_shard(self, shard: int) -> int:
        """Tell readers the shard changed; returns its new version."""
        response = self._call(
            "update_item",
            Key={"pk": _s(self._pk), "sk": _s(f"{SHARD_PREFIX}{shard:02d}")},
            UpdateExpression="ADD version :one",
            ExpressionAttributeValues={":one": _n(1)},
            ReturnValues="UPDATED_NEW",
        )
        return int(response["Attributes"]["version"]["N"])

    def rows_of(self, queues: Iterable[str]) -> dict[str, OwnershipRecord]:
        """The named rows (BatchGetItem, consistent): what we hold, checked cheaply."""
        keys = [self._queue_key(q) for q in sorted(set(queues))]
        rows: dict[str, OwnershipRecord] = {}
        for start in range(0, len(keys), _BATCH_GET_KEYS):
            batch = keys[start : start + _BATCH_GET_KEYS]
            pending: dict[str, Any] = {self.table_name: {"Keys": batch, "ConsistentRead": True}}
            while pending:
                page = self._call("batch_get_item", RequestItems=pending)
                for item in page.get("Responses", {}).get(self.table_name, []):
                    record = _ownership_from_item(item)
                    rows[record.queue] = record
                pending = page.get("UnprocessedKeys") or {}
                if pending:
                    _pause(0.05)  # throttled part of the batch: botocore does not retry it
        return rows

    def acquire(
        self,
        queue: str,
        queue_url: str,
        *,
        owner: str,
        previous: OwnershipRecord | None,
        now_wall: float,
        moved_at: float | None = None,
    ) -> int:
        """Take a free queue, or one whose owner we judged dead; returns the new lease.

        ``moved_at``: the taker's planning-epoch time, for the dwell (loadbalance.py)."""
        lease = (previous.lease if previous else 0) + 1
        values: dict[str, Any] = {}
        if previous is None:
            condition = "attribute_not_exists(sk)"
        elif previous.damaged_lease == ("", ""):
            condition = "attribute_exists(sk) AND attribute_not_exists(lease)"
        elif previous.damaged_lease is not None:
            kind, raw = previous.damaged_lease
            condition, values = "lease = :lease", {":lease": {kind: raw}}
        else:
            condition, values = "lease = :lease", {":lease": _n(previous.lease)}
        item = {
            **self._queue_key(queue),
            "owner": _s(owner),
            "lease": _n(lease),
            "queue_url": _s(queue_url),
            "updated_at": _n(now_wall),
        }
        if moved_at is not None:
            item["moved_at"] = _n(float(moved_at))
        kwargs: dict[str, Any] = {"Item": item, "ConditionExpression": condition}
        if values:
            kwargs["ExpressionAttributeValues"] = values
        self._write("put_item", **kwargs)
        return lease

    def release(self, queue: str, *, owner: str, lease: int, now_wall: float) -> None:
        """Give a queue up (owner removed, lease advanced) if we still hold that lease."""
        self._write(
            "update_item",
            Key=self._queue_key(queue),
            UpdateExpression="REMOVE #o SET lease = :next, updated_at = :now",
            ConditionExpression="#o = :me AND lease = :lease",
            ExpressionAttributeNames={"#o": "owner"},
            ExpressionAttributeValues={
                ":me": _s(owner),
                ":lease": _n(lease),
                ":next": _n(lease + 1),
                ":now": _n(now_wall),
            },
        )

    def delete_ownership(self, queue: str, *, lease: int) -> None:
        self._write(
            "delete_item",
            Key=self._queue_key(queue),
            ConditionExpression="lease = :lease",
            ExpressionAttributeValues={":lease": _n(lease)},
        )

    # -- plumbing -------------------------------------------------------------------------

    def _query(
        self, prefix: str, *, pk: str | None = None, consistent: bool = True
    ) -> Iterator[dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "TableName": self.table_name,
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :prefix)",
            "ExpressionAttributeValues": {":pk": _s(pk or self._pk), ":prefix": _s(prefix)},
            "ConsistentRead": consistent,
        }
        while True:
            page = self._call("query", **kwargs)
            yield from page.get("Items", [])
            if "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _write(self, method: str, **kwargs: Any) -> Any:
        try:
            return self._call(method, **kwargs)
        except ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                raise ConditionFailed(f"{method} condition failed") from None
            raise

    def _call(self, method: str, **kwargs: Any) -> Any:
        if method not in ("query", "batch_get_item"):
            kwargs.setdefault("TableName", self.table_name)
        try:
            return getattr(self._db, method)(**kwargs)
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                raise TableGone(
                    f'coordination table "{self.table_name}" no longer exists'
                ) from None
            raise


def table_definition(table_name: str) -> dict[str, Any]:
    """CreateTable arguments; `init-table --print` renders the same as CloudFormation."""
    return {
        "TableName": table_name,
        "AttributeDefinitions": [
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        "KeySchema": [
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        "BillingMode": "PAY_PER_REQUEST",
    }


def cloudformation_template(table_name: str) -> str:
    """The table `ensure(create=True)` makes, as a CloudFormation template (JSON)."""
    import json

    definition = table_definition(table_name)
    resource = {
        "Type": "AWS::DynamoDB::Table",
        "Properties": {
            "TableName": definition["TableName"],
            "AttributeDefinitions": definition["AttributeDefinitions"],
            "KeySchema": definition["KeySchema"],
            "BillingMode": definition["BillingMode"],
            "TimeToLiveSpecification": {"AttributeName": "ttl", "Enabled": True},
        },
    }
    template = {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": "sqsbalancerd coordination table",
        "Resources": {"CoordinationTable": resource},
        "Outputs": {"TableName": {"Value": {"Ref": "CoordinationTable"}}},
    }
    return json.dumps(template, indent=2)


def _pause(seconds: float) -> None:
    import threading

    threading.Event().wait(seconds)
