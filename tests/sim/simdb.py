"""An in-memory DynamoDB for deterministic simulations: the calls CoordinationTable makes.

It honours what coordination relies on: conditional writes (the condition and update
expression languages, the subset the code uses, parsed for real), consistent and
eventually consistent reads (a query that is not consistent sees its partition as it stood
up to `stale_read_s` ago, a lag drawn per request: `allow_stale_reads`; or as of
`frozen_at_s`, a stalled replica), pagination (1 MB pages, `Limit`, or `page_items` to
force small pages) and per-partition throughput limits (3,000 read / 1,000 write units per
second per partition key, beyond which it throttles as DynamoDB does). Every request is
metered per caller in requests, read units and write units, which is what the cost model
reads.

One `SimDynamoDB` is the service; each instance talks to it through its own `SimClient`,
where the simulation injects latency, loss (before or after the write applies), partitions
and throttling for that instance alone.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

Item = dict[str, dict[str, Any]]
Key = tuple[str, str]

_MEMBER_OR_QUEUE_QUERY = "pk = :pk AND begins_with(sk, :prefix)"
READ_UNIT_BYTES = 4096
WRITE_UNIT_BYTES = 1024
PAGE_BYTES = 1 << 20
PARTITION_READ_UNITS_S = 3000.0
PARTITION_WRITE_UNITS_S = 1000.0


def client_error(code: str, message: str = "", status: int = 400) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "SimDynamoDB",
    )


# -- expressions ----------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(<>|<=|>=|[=<>(),+\-]|[#:]?[A-Za-z_][A-Za-z0-9_]*)")


@lru_cache(maxsize=512)
def _tokens(text: str) -> tuple[str, ...]:
    out: list[str] = []
    position = 0
    text = text.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise client_error("ValidationException", f"cannot parse: {text!r}")
        out.append(match.group(1))
        position = match.end()
    return tuple(out)


class _Expr:
    """Evaluates a condition or key-condition expression against one item."""

    def __init__(self, text: str, names: dict[str, str], values: dict[str, Any]) -> None:
        self._tokens = _tokens(text)
        self._at = 0
        self._names = names
        self._values = values

    def _peek(self) -> str | None:
        return self._tokens[self._at] if self._at < len(self._tokens) else None

    def _take(self) -> str:
        token = self._tokens[self._at]
        self._at += 1
        return token

    def evaluate(self, item: Item | None) -> bool:
        self._at = 0
        result = self._or(item or {})
        if self._peek() is not None:
            raise client_error("ValidationException", "trailing tokens in expression")
        return result

    def _or(self, item: Item) -> bool:
        result = self._and(item)
        while self._peek() == "OR":
            self._take()
            result = self._and(item) or result
        return result

    def _and(self, item: Item) -> bool:
        result = self._not(item)
        while self._peek() == "AND":
            self._take()
            result = self._not(item) and result
        return result

    def _not(self, item: Item) -> bool:
        if self._peek() == "NOT":
            self._take()
            return not self._not(item)
        return self._term(item)

    def _term(self, item: Item) -> bool:
        token = self._take()
        if token == "(":
            result = self._or(item)
            self._take()  # ")"
            return result
        if token in {"attribute_exists", "attribute_not_exists", "begins_with"}:
            self._take()  # "("
            name = self._name(self._take())
            prefix = None
            if token == "begins_with":
                self._take()  # ","
                prefix = self._operand(self._take(), item)
            self._take()  # ")"
            if token == "attribute_exists":
                return name in item
            if token == "attribute_not_exists":
                return name not in item
            value = item.get(name)
            return value is not None and prefix is not None and _compare("begins", value, prefix)
        left = self._operand(token, item)
        operator = self._take()
        right = self._operand(self._take(), item)
        return _compare(operator, left, right)

    def _name(self, token: str) -> str:
        return self._names[token] if token.startswith("#") else token

    def _operand(self, token: str, item: Item) -> Any:
        if token.startswith(":"):
            return self._values[token]
        return item.get(self._name(token))


def _scalar(value: Any) -> tuple[str, Any] | None:
    if value is None:
        return None
    (kind, raw), *_ = value.items()
    if kind == "N":
        return "N", float(raw)
    return kind, raw


def _compare(operator: str, left: Any, right: Any) -> bool:
    a, b = _scalar(left), _scalar(right)
    if a is None or b is None:
        return operator == "<>" and (a is None) != (b is None)
    if a[0] != b[0]:
        return operator == "<>"
    x, y = a[1], b[1]
    if operator == "begins":
        return isinstance(x, str) and x.startswith(y)
    comparisons: dict[str, Callable[[Any, Any], bool]] = {
        "=": lambda p, q: p == q,
        "<>": lambda p, q: p != q,
        "<": lambda p, q: p < q,
        "<=": lambda p, q: p <= q,
        ">": lambda p, q: p > q,
        ">=": lambda p, q: p >= q,
    }
    return comparisons[operator](x, y)


def _apply_update(item: Item, text: str, names: dict[str, str], values: dict[str, Any]) -> None:
    """SET a = operand [+|- operand], b = if_not_exists(b, :v); REMOVE a, b; ADD n :v."""
    tokens = list(_tokens(text))
    before = _copy(item)  # operands read the item as it was before the update

    def name(token: str) -> str:
        return names[token] if token.startswith("#") else token

    def operand() -> Any:
        token = tokens.pop(0)
        if token == "if_not_exists":
            tokens.pop(0)
            path = name(tokens.pop(0))
            tokens.pop(0)
            default = operand()
            tokens.pop(0)
            return before.get(path, default)
        return values[token] if token.startswith(":") else before.get(name(token))

    clause = ""
    while tokens:
        token = tokens.pop(0)
        if token in {"SET", "REMOVE", "ADD"}:
            clause = token
            continue
        if token == ",":
            continue
        target = name(token)
        if clause == "REMOVE":
            item.pop(target, None)
            continue
        if clause == "ADD":  # ADD a :n — a number attribute, created at 0
            item[target] = _add(before.get(target), operand())
            continue
        tokens.pop(0)  # "="
        value = operand()
        if tokens and tokens[0] in {"+", "-"}:
            sign = 1 if tokens.pop(0) == "+" else -1
            value = _arithmetic(value, sign, operand())
        item[target] = value


def _arithmetic(value: Any, sign: int, other: Any) -> Any:
    if value is None or other is None or "N" not in value or "N" not in other:
        raise client_error("ValidationException", "arithmetic on a non-number")
    return {"N": _number(float(value["N"]) + sign * float(other["N"]))}


def _add(current: Any, amount: Any) -> Any:
    return {"N": _number(float((current or {"N": "0"})["N"]) + float(amount["N"]))}


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def _copy(item: Item) -> Item:
    """Items are one level of attribute values: a two-level copy is a deep one."""
    return {name: dict(value) for name, value in item.items()}


def item_bytes(item: Item | None) -> int:
    if not item:
        return 0
    return sum(
        len(name) + sum(len(str(raw)) for raw in value.values()) for name, value in item.items()
    )


# -- the service ----------------------------------------------------------------------------


class SimTable(dict[Key, Item]):
    """A table's items by (pk, sk), indexed by pk so a query reads only its partition."""

    def __init__(self) -> None:
        super().__init__()
        self.by_pk: dict[str, set[str]] = defaultdict(set)
        self._sorted: dict[str, list[Key]] = {}
        # Writes per partition: a cached query page is good while its partition's count holds.
        self.writes: Counter[str] = Counter()
        # For eventually consistent reads: each key's earlier values, (replaced at, value).
        self.clock: Callable[[], float] | None = None  # set: keep history this long
        self.history_s = 0.0
        self._history: dict[str, dict[str, list[tuple[float, Item | None]]]] = {}

    def __setitem__(self, key: Key, item: Item) -> None:
        self._remember(key)
        if key not in self:
            self.by_pk[key[0]].add(key[1])
            self._sorted.pop(key[0], None)
        self.writes[key[0]] += 1
        super().__setitem__(key, item)

    def __delitem__(self, key: Key) -> None:
        self._remember(key)
        super().__delitem__(key)
        self.by_pk[key[0]].discard(key[1])
        self._sorted.pop(key[0], None)
        self.writes[key[0]] += 1

    def pop(self, key: Key, *default: Any) -> Any:  # type: ignore[override]
        if key in self:
            self._remember(key)
            self.by_pk[key[0]].discard(key[1])
            self._sorted.pop(key[0], None)
            self.writes[key[0]] += 1
        return super().pop(key, *default)

    def _remember(self, key: Key) -> None:
        if self.clock is None:
            return
        now = self.clock()
        changes = self._history.setdefault(key[0], {}).setdefault(key[1], [])
        changes.append((now, self.get(key)))
        while changes and changes[0][0] < now - self.history_s:
            changes.pop(0)

    def as_of(self, pk: str, at_s: float) -> list[tuple[Key, Item]]:
        """The partition as it stood at `at_s` (within the history kept), in key order."""
        view = {key: self[key] for key in self.keys_of(pk)}
        for sk, changes in self._history.get(pk, {}).items():
            earlier = next((value for when, value in changes if when > at_s), view.get((pk, sk)))
            if earlier is None:
                view.pop((pk, sk), None)
            else:
                view[(pk, sk)] = earlier
        return sorted(view.items())

    def keys_of(self, pk: str) -> list[Key]:
        """The partition's keys in sort-key order (kept until the key set changes)."""
        keys = self._sorted.get(pk)
        if keys is None:
            keys = self._sorted[pk] = sorted((pk, sk) for sk in self.by_pk.get(pk, ()))
        return keys


@dataclass
class Meter:
    """What one caller spent: requests by operation, read and write units."""

    requests: Counter[str] = field(default_factory=Counter)
    read_units: float = 0.0
    write_units: float = 0.0
    throttled: int = 0

    def add(self, other: Meter) -> None:
        self.requests.update(other.requests)
        self.read_units += other.read_units
        self.write_units += other.write_units
        self.throttled += other.throttled


class SimDynamoDB:
    """The table(s): items by (pk, sk), per-partition unit accounting in 1 s windows."""

    def __init__(
        self,
        now: Callable[[], float],
        *,
        read_units_s: float = PARTITION_READ_UNITS_S,
        write_units_s: float = PARTITION_WRITE_UNITS_S,
        page_items: int | None = None,
    ) -> None:
        self._now = now
        self.items: dict[str, dict[Key, Item]] = {}
        self._sizes: dict[int, tuple[Item, int]] = {}  # id(item) -> (item, bytes)
        self.read_units_s = read_units_s
        self.write_units_s = write_units_s
        self.page_items = page_items
        self._window: dict[tuple[str, str], tuple[int, float]] = {}
        # Answers carry copies, as boto3's do; cost runs of hundreds of instances hand out
        # the stored items themselves (the coordinator only parses what it reads).
        self.copy_reads = True
        # Without copies, an unchanged partition answers a repeated query with the same page
        # (harness speed: hundreds of instances read the same rows every round).
        self.pages: dict[tuple[Any, ...], tuple[int, dict[str, Any], int, SimTable]] = {}
        # Eventually consistent reads see the table as it stood up to this long ago (a lag
        # drawn per request from `rng`); 0: every read is current.
        self.stale_read_s = 0.0
        self.rng = random.Random(0)
        # A stalled replica: eventually consistent reads see the table as of this time.
        self.frozen_at_s: float | None = None
        self.queue_writes = 0  # conditional writes to ownership rows, applied or not
        self.peak_units: dict[tuple[str, str], float] = defaultdict(float)  # (pk, r|w) -> max/s

    def now(self) -> float:
        return self._now()

    def allow_stale_reads(self, lag_s: float, *, history_s: float | None = None) -> None:
        """Let eventually consistent reads lag up to `lag_s` (tables keep their history for
        `history_s`, at least the lag: a lag can shrink, the history it needs stays)."""
        self.stale_read_s = lag_s
        for table in self.items.values():
            if isinstance(table, SimTable):
                table.clock = self._now
                table.history_s = max(table.history_s, lag_s, history_s or 0.0)

    def table(self, name: str) -> dict[Key, Item]:
        try:
            return self.items[name]
        except KeyError:
            raise client_error("ResourceNotFoundException", f"table {name} not found") from None

    def size_of(self, item: Item | None) -> int:
        """item_bytes, remembered per stored item (stored items are replaced, not changed,
        except by a hand edit, whose size drift only the metering would see)."""
        if item is None:
            return 0
        cached = self._sizes.get(id(item))
        if cached is not None and cached[0] is item:
            return cached[1]
        size = item_bytes(item)
        if len(self._sizes) > 100_000:
            self._sizes.clear()
        self._sizes[id(item)] = (item, size)
        return size

    def answer(self, item: Item) -> Item:
        return _copy(item) if self.copy_reads else item

    def spend(self, pk: str, kind: str, units: float) -> None:
        """Charge a partition; throttle beyond its per-second limit (DynamoDB's code)."""
        second = int(self._now())
        window_second, used = self._window.get((pk, kind), (second, 0.0))
        if window_second != second:
            used = 0.0
        limit = self.read_units_s if kind == "r" else self.write_units_s
        if used + units > limit:
            raise client_error("ProvisionedThroughputExceededException", "partition throttled")
        self._window[(pk, kind)] = (second, used + units)
        self.peak_units[(pk, kind)] = max(self.peak_units[(pk, kind)], used + units)


@dataclass
class Faults:
    """What the network and the service do to one instance's calls right now."""

    is_partitioned: bool = False
    latency_s: Callable[[], float] = lambda: 0.0
    lose_request: Callable[[], bool] = lambda: False  # lost before DynamoDB applied it
    lose_response: Callable[[], bool] = lambda: False  # applied, but the answer never came
    throttle: Callable[[str], bool] = lambda method: False


class SimClient:
    """A boto3-DynamoDB-client-shaped facade over SimDynamoDB for one instance."""

    def __init__(
        self,
        db: SimDynamoDB,
        *,
        faults: Faults | None = None,
        sleep: Callable[[float], None] = lambda s: None,
    ) -> None:
        self._db = db
        self.faults = faults or Faults()
        self.meter = Meter()
        self._sleep = sleep  # the simulation advances its clock for the call's latency

    # -- fault plumbing -------------------------------------------------------------------

    def _call(self, method: str, apply: Callable[[], Any]) -> Any:
        self._sleep(self.faults.latency_s())
        if self.faults.is_partitioned or self.faults.lose_request():
            raise EndpointConnectionError(endpoint_url="https://dynamodb.sim")
        self.meter.requests[method] += 1
        if self.faults.throttle(method):
            self.meter.throttled += 1
            raise client_error("ThrottlingException", "rate exceeded")
        try:
            result = apply()
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ProvisionedThroughputExceededException":
                self.meter.throttled += 1
            raise
        if self.faults.lose_response():
            raise ReadTimeoutError(endpoint_url="https://dynamodb.sim")
        return result

    def _charge_read(self, pk: str, size: int, *, consistent: bool) -> None:
        units = max(1, math.ceil(size / READ_UNIT_BYTES)) * (1.0 if consistent else 0.5)
        self._db.spend(pk, "r", units)
        self.meter.read_units += units

    def _charge_write(self, key: Key, size: int) -> None:
        units = float(max(1, math.ceil(size / WRITE_UNIT_BYTES)))
        self._db.spend(key[0], "w", units)
        if key[1].startswith("queue#"):
            self._db.queue_writes += 1
        self.meter.write_units += units

    # -- table management -----------------------------------------------------------------

    def describe_table(self, *, TableName: str) -> dict[str, Any]:
        def apply() -> dict[str, Any]:
            self._db.table(TableName)
            return {"Table": {"TableName": TableName, "TableStatus": "ACTIVE"}}

        return dict(self._call("describe_table", apply))

    def create_table(self, *, TableName: str, **_: Any) -> dict[str, Any]:
        def apply() -> dict[str, Any]:
            if TableName in self._db.items:
                raise client_error("ResourceInUseException", "table exists")
            self._db.items[TableName] = SimTable()
            return {}

        return dict(self._call("create_table", apply))

    def update_time_to_live(self, **_: Any) -> dict[str, Any]:
        return dict(self._call("update_time_to_live", dict))

    # -- items ----------------------------------------------------------------------------

    def put_item(self, **kw: Any) -> dict[str, Any]:
        def apply() -> dict[str, Any]:
            table = self._db.table(kw["TableName"])
            item = _copy(kw["Item"])
            key = (item["pk"]["S"], item["sk"]["S"])
            self._charge_write(key, max(item_bytes(item), self._db.size_of(table.get(key))))
            self._check(kw, table.get(key))
            table[key] = item
            return {}

        return dict(self._call("put_item", apply))

    def update_item(self, **kw: Any) -> dict[str, Any]:
        def apply() -> dict[str, Any]:
            table = self._db.table(kw["TableName"])
            key = (kw["Key"]["pk"]["S"], kw["Key"]["sk"]["S"])
            current = table.get(key)
            self._charge_write(key, self._db.size_of(current) or 1)
            self._check(kw, current)
            item = _copy(current) if current else _copy(kw["Key"])
            names, values = (
                kw.get("ExpressionAttributeNames", {}),
                kw.get("ExpressionAttributeValues", {}),
            )
            _apply_update(item, kw["UpdateExpression"], names, values)
            table[key] = item
            if kw.get("ReturnValues") in {"UPDATED_NEW", "ALL_NEW"}:
                return {"Attributes": _copy(item)}
            return {}

        return dict(self._call("update_item", apply))

    def delete_item(self, **kw: Any) -> dict[str, Any]:
        def apply() -> dict[str, Any]:
            table = self._db.table(kw["TableName"])
            key = (kw["Key"]["pk"]["S"], kw["Key"]["sk"]["S"])
            self._charge_write(key, self._db.size_of(table.get(key)) or 1)
            self._check(kw, table.get(key))
            table.pop(key, None)
            return {}

        return dict(self._call("delete_item", apply))

    def get_item(self, **kw: Any) -> dict[str, Any]:
        def apply() -> dict[str, Any]:
            table = self._db.table(kw["TableName"])
            key = (kw["Key"]["pk"]["S"], kw["Key"]["sk"]["S"])
            item = table.get(key)
            consistent = bool(kw.get("ConsistentRead"))
            self._charge_read(key[0], item_bytes(item), consistent=consistent)
            return {"Item": self._db.answer(item)} if item else {}

        return dict(self._call("get_item", apply))

    def batch_get_item(self, **kw: Any) -> dict[str, Any]:
        def apply() -> dict[str, Any]:
            responses: dict[str, list[Item]] = {}
            for name, request in kw["RequestItems"].items():
                table = self._db.table(name)
                consistent = bool(request.get("ConsistentRead"))
                found = responses.setdefault(name, [])
                for key_item in request["Keys"]:
                    key = (key_item["pk"]["S"], key_item["sk"]["S"])
                    item = table.get(key)
                    # Each item is rounded up to a read unit on its own (DynamoDB's billing).
                    self._charge_read(key[0], self._db.size_of(item), consistent=consistent)
                    if item:
                        found.append(self._db.answer(item))
            return {"Responses": responses, "UnprocessedKeys": {}}

        return dict(self._call("batch_get_item", apply))

    def query(self, **kw: Any) -> dict[str, Any]:
        return dict(self._call("query", lambda: self._query_page(kw)))

    def _query_page(self, kw: dict[str, Any]) -> dict[str, Any]:
        table = self._db.table(kw["TableName"])
        values = kw.get("ExpressionAttributeValues", {})
        text = kw["KeyConditionExpression"]
        condition = _Expr(text, kw.get("ExpressionAttributeNames", {}), values)
        # The query the code makes, answered without parsing (the hot path of the harness).
        prefix = values[":prefix"]["S"] if text == _MEMBER_OR_QUEUE_QUERY else None
        pk = values[":pk"]["S"]
        start = kw.get("ExclusiveStartKey")
        after = (start["pk"]["S"], start["sk"]["S"]) if start else None
        limit = kw.get("Limit") or self._db.page_items
        consistent = bool(kw.get("ConsistentRead"))
        rows = None if consistent else self._stale_rows(table, pk, after)
        # A current answer to the code's own query, without copies, can be answered again.
        cache_key = (id(table), pk, prefix, after, limit)
        cacheable = (
            rows is None and prefix is not None and isinstance(table, SimTable)
        ) and not self._db.copy_reads
        cached = self._db.pages.get(cache_key) if cacheable else None
        if cached is not None and cached[3] is table and cached[0] == table.writes[pk]:
            self._charge_read(pk, cached[2], consistent=consistent)
            return cached[1]
        if rows is None:
            rows = self._current_rows(table, pk, after)
        page: list[Item] = []
        size = 0
        last: Key | None = None
        for key, item in rows:
            if not (key[1].startswith(prefix) if prefix is not None else condition.evaluate(item)):
                continue
            page.append(self._db.answer(item))
            size += self._db.size_of(item)
            last = key
            if size >= PAGE_BYTES or (limit is not None and len(page) >= limit):
                break
        else:
            last = None
        self._charge_read(pk, size, consistent=consistent)
        response: dict[str, Any] = {"Items": page, "Count": len(page)}
        if last is not None:
            response["LastEvaluatedKey"] = {"pk": {"S": last[0]}, "sk": {"S": last[1]}}
        if cacheable and isinstance(table, SimTable):
            self._db.pages[cache_key] = (table.writes[pk], response, size, table)
        return response

    @staticmethod
    def _current_rows(
        table: dict[Key, Item], pk: str, after: Key | None
    ) -> Iterator[tuple[Key, Item]]:
        keys = (
            table.keys_of(pk)
            if isinstance(table, SimTable)
            else sorted(k for k in table if k[0] == pk)
        )
        if after is not None:
            keys = keys[bisect.bisect_right(keys, after) :]
        return ((key, table[key]) for key in keys)

    def _stale_rows(
        self, table: dict[Key, Item], pk: str, after: Key | None
    ) -> list[tuple[Key, Item]] | None:
        """An eventually consistent read's view of the partition (None: the current one)."""
        lag, frozen_at = self._db.stale_read_s, self._db.frozen_at_s
        if (lag <= 0 and frozen_at is None) or not isinstance(table, SimTable):
            return None
        at_s = self._db.now() - self._db.rng.uniform(0.0, lag) if frozen_at is None else frozen_at
        rows = table.as_of(pk, at_s)
        return [(key, item) for key, item in rows if after is None or key > after]

    def _check(self, kw: dict[str, Any], current: Item | None) -> None:
        text = kw.get("ConditionExpression")
        if text is None:
            return
        names = kw.get("ExpressionAttributeNames", {})
        values = kw.get("ExpressionAttributeValues", {})
        if not _Expr(text, names, values).evaluate(current):
            raise client_error("ConditionalCheckFailedException", "The conditional request failed")
