"""Switchable fixes for moto's SQS hot spots, applied only inside the bench's server process.

moto 5.2.x makes deep queues slow, so that a benchmark would measure moto, not consumers:

1. ReceiveMessage checks each message it returns against the retention period through
   `get_queue_attributes(queue, ["MessageRetentionPeriod"])`, which first builds *every*
   queue attribute, and three of them (ApproximateNumberOfMessages, ...NotVisible,
   ...Delayed) scan the whole queue: a receive of ten from an n-deep queue visits ~30·n
   messages (0.17 s at n = 500, 2.6 s at n = 5,000, measured here). The patch reads the
   queue's integer `message_retention_period`, the value the original returns.
2. SendMessage(Batch) reads `queue.attributes["ContentBasedDeduplication"]` twice per
   message, paying the same three scans. The patch computes the three counts as 0 while a
   send is on the stack (a thread-local flag); only ContentBasedDeduplication is read there.
3. `Message.visible` / `.delayed` (called per message per scan) build datetimes to get the
   time; the patch compares with `time.time() * 1000`, the same clock moto's
   `unix_time_millis()` derives from.

4. DeleteMessage calls `had_receipt_handle` on every queued message to rebuild the list
   without the deleted one (13 ms per batch of ten at n = 5,000). The patch stops at the
   first match (receipt handles are unique per receive) and rebuilds the list with a slice;
   like the original it rebinds the list, so concurrent scans keep a consistent copy.

And one correctness fix, applied with the rest (and by the embedded emulator, which the
tests use): `sqsbalancerd.moto_fixes`, one receive of a queue at a time and no lost deletes.

`verify()` runs one scripted scenario (sends,
receives, deletes, visibility changes, delayed, expired and FIFO de-duplicated messages)
on stock and on patched moto, in process, and asserts every answer is the same; the server
runs it at start and refuses to start if it fails. `python -m bench --no-moto-patch` runs
the whole bench on stock moto.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from sqsbalancerd import moto_fixes
from sqsbalancerd.moto_fixes import (
    concurrent_receive_duplicates,
    releasing_claim,
)

_ORIGINAL: dict[str, Any] = {}
_in_send = threading.local()
_COUNT_PROPERTIES = (
    "approximate_number_of_messages",
    "approximate_number_of_messages_not_visible",
    "approximate_number_of_messages_delayed",
)


def _fast_is_valid(self: Any, queue_name: str, message: Any) -> bool:
    queue = self.get_queue(queue_name)
    retain_until = int(queue.message_retention_period) + message.sent_timestamp / 1000
    return bool(retain_until > time.time())


def _visible(self: Any) -> bool:
    return bool(time.time() * 1000.0 > self.visible_at)


def _delayed(self: Any) -> bool:
    return bool(time.time() * 1000.0 < self.delayed_until)


def _fast_delete(self: Any, receipt_handle: str) -> None:
    from moto.sqs.exceptions import ReceiptHandleIsInvalid

    if receipt_handle in self.deleted_messages:
        return  # already deleted: moto accepts a second delete
    messages = self._messages
    for index, message in enumerate(messages):
        if message.had_receipt_handle(receipt_handle):
            self.pending_messages.discard(message)
            self.deleted_messages.update(message.all_receipt_handles)
            self._messages = messages[:index] + messages[index + 1 :]
            return
    raise ReceiptHandleIsInvalid()


def _count_outside_sends(original: property) -> property:
    def getter(self: Any) -> int:
        if getattr(_in_send, "depth", 0):
            return 0  # nobody on the send path reads the counts
        return int(original.fget(self))  # type: ignore[misc]

    return property(getter)


def _marking_send(original: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _in_send.depth = getattr(_in_send, "depth", 0) + 1
        try:
            return original(*args, **kwargs)
        finally:
            _in_send.depth -= 1

    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapper


def apply() -> None:
    from moto.sqs.models import Message, Queue, SQSBackend

    if is_applied():
        return
    moto_fixes.apply()
    _ORIGINAL.update(
        is_valid=SQSBackend.is_message_valid_based_on_retention_period,
        send_message=SQSBackend.send_message,
        add_message=Queue.add_message,
        delete_message=Queue.delete_message,
        visible=Message.__dict__["visible"],
        delayed=Message.__dict__["delayed"],
        **{name: Queue.__dict__[name] for name in _COUNT_PROPERTIES},
    )
    SQSBackend.is_message_valid_based_on_retention_period = _fast_is_valid
    SQSBackend.send_message = _marking_send(_ORIGINAL["send_message"])
    Queue.add_message = _marking_send(_ORIGINAL["add_message"])
    Queue.delete_message = _fast_delete
    Message.visible = property(_visible)
    Message.delayed = property(_delayed)
    for name in _COUNT_PROPERTIES:
        setattr(Queue, name, _count_outside_sends(_ORIGINAL[name]))


def revert() -> None:
    """Undo the speed patches (the atomic receives stay: a fix, not a speed-up)."""
    from moto.sqs.models import Message, Queue, SQSBackend

    if not is_applied():
        return
    SQSBackend.is_message_valid_based_on_retention_period = _ORIGINAL["is_valid"]
    SQSBackend.send_message = _ORIGINAL["send_message"]
    Queue.add_message = _ORIGINAL["add_message"]
    Queue.delete_message = _ORIGINAL["delete_message"]
    Message.visible = _ORIGINAL["visible"]
    Message.delayed = _ORIGINAL["delayed"]
    for name in _COUNT_PROPERTIES:
        setattr(Queue, name, _ORIGINAL[name])


def is_applied() -> bool:
    from moto.sqs.models import SQSBackend

    return SQSBackend.is_message_valid_based_on_retention_period is _fast_is_valid


def verify() -> None:
    """Raise AssertionError unless stock and patched moto answer the scenario alike."""
    was_applied = is_applied()
    try:
        revert()
        stock = _scenario()
        apply()
        patched = _scenario()
    finally:
        (apply if was_applied else revert)()
    for step, (expected, actual) in enumerate(zip(stock, patched, strict=True)):
        assert expected == actual, f"moto patch changes step {step}: {expected!r} != {actual!r}"
    was_applied or apply()
    try:
        twice = concurrent_receive_duplicates()
    finally:
        was_applied or revert()
    assert twice == 0, f"patched moto gave {twice} messages to two concurrent receives"
    left = moto_fixes.concurrent_delete_leftovers()
    assert left == 0, f"concurrent deletes on patched moto left {left} messages behind"


_COUNTS = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
)


def _scenario() -> list[Any]:
    """Observable answers of a fixed sequence of calls on a fresh in-process backend."""
    from moto.sqs.models import SQSBackend

    backend = SQSBackend("us-east-1", "123456789012")
    backend.create_queue("v-std", MessageRetentionPeriod="60")
    backend.create_queue("v.fifo", FifoQueue="true", ContentBasedDeduplication="true")
    out: list[Any] = []

    def counts(name: str) -> tuple[Any, ...]:
        attributes = backend.get_queue_attributes(name, ["All"])
        return tuple(attributes[key] for key in _COUNTS)

    sent = [backend.send_message("v-std", f"b{n}").id for n in range(25)]
    backend.send_message("v-std", "later", delay_seconds=60)
    old = backend.send_message("v-std", "expired")
    old.sent_timestamp -= 120 * 1000  # older than the 60 s retention period
    out.append(counts("v-std"))
    first = backend.receive_message("v-std", 10, 0, 30, ["All"])
    out.append([m.body for m in first])
    out.append(counts("v-std"))
    for message in first[:4]:
        backend.delete_message("v-std", message.receipt_handle)
    backend.delete_message("v-std", first[0].receipt_handle)  # twice: accepted
    try:
        backend.delete_message("v-std", "not-a-handle")
    except Exception as exc:
        out.append(type(exc).__name__)
    backend.change_message_visibility("v-std", first[5].receipt_handle, 0)
    out.append(counts("v-std"))
    rest = list(iter(lambda: backend.receive_message("v-std", 10, 0, 30), []))
    out.append(sorted(m.body for batch in rest for m in batch))
    out.append(counts("v-std"))
    for body in ("x", "x", "y"):  # content-based de-duplication drops the second "x"
        backend.send_message("v.fifo", body, group_id="g")
    out.append(counts("v.fifo"))
    out.append([m.body for m in backend.receive_message("v.fifo", 10, 0, 30)])
    out.append(len(sent))
    return out


# -- quiet long polls (bench.emulator --scale) ---------------------------------------------

_poll = threading.local()
# A quiet wait ends this long after the poll's deadline, so that moto's loop sees it passed.
_QUIET_END_MARGIN_S = 0.05


def _noting_deadline(original: Callable[..., Any]) -> Callable[..., Any]:
    def receive_message(
        self: Any, queue_name: str, count: int, wait_seconds_timeout: int, *args: Any
    ) -> Any:
        _poll.end_s = time.time() + wait_seconds_timeout
        try:
            return original(self, queue_name, count, wait_seconds_timeout, *args)
        finally:
            _poll.end_s = None

    receive_message.__wrapped__ = original  # type: ignore[attr-defined]
    return receive_message


def _quiet_wait(self: Any, timeout: float) -> None:
    end_s = getattr(_poll, "end_s", None)
    # Nothing queued, in flight or delayed: only a send (which notifies this condition) can
    # give the poll a message before its end, so waking every second would find nothing.
    if end_s is not None and not self._messages:
        timeout = max(timeout, end_s - time.time() + _QUIET_END_MARGIN_S)
    with self._messages_lock:
        self._messages_lock.wait_for(lambda: self.messages, timeout=timeout)


def quiet_long_polls() -> None:
    """A long poll of an empty queue sleeps until a send or its WaitTimeSeconds, instead of
    waking every second (moto's `wait_for_messages(1)`). Answers are unchanged; a queue with
    any message (in flight or delayed: it may become visible without a send) keeps the
    one-second wake. With thousands of polls those wakes, not the daemons' requests, were
    what slowed every other answer (bench/status_long_polls.py)."""
    from moto.sqs.models import Queue, SQSBackend

    if "receive_message" in _ORIGINAL:
        return
    _ORIGINAL["receive_message"] = SQSBackend.receive_message
    _ORIGINAL["wait_for_messages"] = Queue.wait_for_messages
    SQSBackend.receive_message = _noting_deadline(SQSBackend.receive_message)
    Queue.wait_for_messages = releasing_claim(_quiet_wait)


def verify_quiet_long_polls() -> None:
    """An empty queue's long poll still returns a message sent while it waits, at once, and
    an idle one still returns empty after its WaitTimeSeconds (about 2 s in all)."""
    from moto.sqs.models import SQSBackend

    backend = SQSBackend("us-east-1", "123456789012")
    backend.create_queue("v-quiet")
    sender = threading.Timer(0.3, lambda: backend.send_message("v-quiet", "woken"))
    started = time.monotonic()
    sender.start()
    woken = backend.receive_message("v-quiet", 10, 5, 30)
    woken_s = time.monotonic() - started
    sender.join()
    assert [m.body for m in woken] == ["woken"] and woken_s < 2.0, (woken, woken_s)
    backend.delete_message("v-quiet", woken[0].receipt_handle)
    started = time.monotonic()
    assert backend.receive_message("v-quiet", 10, 1, 30) == []
    assert 1.0 <= time.monotonic() - started < 2.0


# -- partition queries (bench.emulator --scale) --------------------------------------------

_partition = threading.local()


def _partition_query(original: Callable[..., Any]) -> Callable[..., Any]:
    def query(self: Any, hash_key: Any, *args: Any, **kwargs: Any) -> Any:
        is_plain = kwargs.get("index_name") is None and self.range_key_attr is not None
        _partition.hash_key = hash_key if is_plain else None
        try:
            return original(self, hash_key, *args, **kwargs)
        finally:
            _partition.hash_key = None

    query.__wrapped__ = original  # type: ignore[attr-defined]
    return query


def _partition_items(original: Callable[..., Any]) -> Callable[..., Any]:
    def all_items(self: Any) -> list[Any]:
        hash_key = getattr(_partition, "hash_key", None)
        if hash_key is None:
            return list(original(self))
        # What the table query keeps of all_items() (the items of this hash key, sorted by
        # range key), without sorting every item of the table first.
        return sorted(self.items.get(hash_key, {}).values(), key=lambda item: item.range_key)

    all_items.__wrapped__ = original  # type: ignore[attr-defined]
    return all_items


def partition_queries() -> None:
    """A table Query visits only its partition. moto's sorts every item of the table (all
    partitions) on every Query page: with 2,000 ownership rows each page of the member, shard
    version or shard rows cost a 2,000-item sort, and two daemons following a handoff
    read 16 shards a round each. Answers are unchanged (verify_partition_queries)."""
    from moto.dynamodb.models.table import Table

    if "table_query" in _ORIGINAL:
        return
    _ORIGINAL["table_query"] = Table.query
    _ORIGINAL["table_all_items"] = Table.all_items
    Table.query = _partition_query(Table.query)
    Table.all_items = _partition_items(Table.all_items)


def _revert_partition_queries() -> None:
    from moto.dynamodb.models.table import Table

    if "table_query" in _ORIGINAL:
        Table.query = _ORIGINAL.pop("table_query")
        Table.all_items = _ORIGINAL.pop("table_all_items")


def _query_scenario() -> list[Any]:
    """Pages of table queries over several partitions: forward, backward, by prefix, paged."""
    from moto.dynamodb.models import DynamoDBBackend
    from moto.dynamodb.models.dynamo_type import DynamoType

    backend = DynamoDBBackend("us-east-1", "123456789012")
    table = backend.create_table(
        "v-query",
        schema=[
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        throughput=None,
        attr=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        global_indexes=None,
        indexes=None,
        streams=None,
        billing_mode="PAY_PER_REQUEST",
        sse_specification=None,
        tags=[],
        deletion_protection_enabled=None,
        warm_throughput=None,
    )
    for n in range(60):  # inserted out of order, over three partitions and two prefixes
        pk, prefix = f"p{n % 3}", ("queue#", "member#")[n % 4 == 0]
        table.put_item({"pk": {"S": pk}, "sk": {"S": f"{prefix}{(n * 37) % 60:03d}"}})
    out: list[Any] = []
    for pk in ("p0", "p2", "absent"):
        for forward in (True, False):
            for comparison, values in ((None, []), ("BEGINS_WITH", [{"S": "queue#"}])):
                start: dict[str, Any] | None = None
                while True:
                    items, scanned, last = table.query(
                        DynamoType({"S": pk}),
                        comparison,
                        [DynamoType(v) for v in values],
                        7,
                        start,
                        forward,
                        None,
                    )
                    out.append(([i.to_json() for i in items], scanned, last))
                    if not last:
                        break
                    start = last
    out.append(len(table.all_items()))  # outside a query: every item, as before
    return out


def verify_partition_queries() -> None:
    """Raise AssertionError unless stock and patched table queries answer alike."""
    was_applied = "table_query" in _ORIGINAL
    try:
        _revert_partition_queries()
        stock = _query_scenario()
        partition_queries()
        patched = _query_scenario()
    finally:
        if not was_applied:
            _revert_partition_queries()
    for step, (expected, actual) in enumerate(zip(stock, patched, strict=True)):
        assert expected == actual, f"query patch changes step {step}: {expected!r} != {actual!r}"


# -- item serialisation (bench.emulator --scale) -------------------------------------------

# AttributeValue types whose wire form is the model's own (binary ones are base64-encoded).
_PLAIN_SCALARS = frozenset({"S", "N", "BOOL", "NULL"})
_PLAIN_SETS = frozenset({"SS", "NS"})


def _is_plain_value(value: Any) -> bool:
    if not isinstance(value, dict) or len(value) != 1:
        return False
    ((kind, inner),) = value.items()
    if kind in _PLAIN_SCALARS:
        return isinstance(inner, (str, bool)) and inner != ""
    if kind in _PLAIN_SETS:
        return isinstance(inner, list) and all(isinstance(v, str) and v for v in inner)
    if kind == "M":
        return isinstance(inner, dict) and all(_is_plain_value(v) for v in inner.values())
    if kind == "L":
        return isinstance(inner, list) and all(_is_plain_value(v) for v in inner)
    return False


def _plain_attribute_maps(original: Callable[..., Any]) -> Callable[..., Any]:
    def serialize_map(self: Any, serialized: Any, value: Any, shape: Any, key: str) -> None:
        if (
            shape.name == "AttributeMap"
            and isinstance(value, dict)
            and all(isinstance(k, str) for k in value)
            and all(_is_plain_value(v) for v in value.values())
        ):
            # The generic walk of each AttributeValue's ten members gives back these very
            # dicts; it cost ~0.5 ms an item, most of a page of ownership rows.
            self._default_serialize(serialized, dict(value), shape, key)
            return
        original(self, serialized, value, shape, key)

    serialize_map.__wrapped__ = original  # type: ignore[attr-defined]
    return serialize_map


def plain_item_serialisation() -> None:
    """DynamoDB items made of strings, numbers, booleans, nulls and their sets, lists and
    maps are written as they are stored, not walked member by member through the model.
    Answers are unchanged (verify_plain_item_serialisation)."""
    from moto.core.serialize import BaseJSONSerializer

    if "serialize_map" in _ORIGINAL:
        return
    _ORIGINAL["serialize_map"] = BaseJSONSerializer._serialize_type_map
    BaseJSONSerializer._serialize_type_map = _plain_attribute_maps(  # type: ignore[method-assign]
        BaseJSONSerializer._serialize_type_map
    )


def _revert_plain_item_serialisation() -> None:
    from moto.core.serialize import BaseJSONSerializer

    if "serialize_map" in _ORIGINAL:
        BaseJSONSerializer._serialize_type_map = _ORIGINAL.pop("serialize_map")  # type: ignore[method-assign]


def _serialisation_scenario() -> list[Any]:
    from moto.core.serialize import XFormedAttributePicker, get_serializer_class
    from moto.core.utils import get_service_model

    model = get_service_model("dynamodb")
    items = [
        {"pk": {"S": "app#a#01"}, "sk": {"S": "queue#q1"}, "lease": {"N": "3"}},
        {"pk": {"S": "p"}, "flag": {"BOOL": False}, "none": {"NULL": True}, "e": {"S": ""}},
        {"pk": {"S": "p"}, "ss": {"SS": ["a", "b"]}, "ns": {"NS": ["1", "2.5"]}},
        {"pk": {"S": "p"}, "m": {"M": {"a": {"N": "1"}, "l": {"L": [{"S": "x"}, {"BOOL": True}]}}}},
        {"pk": {"S": "p"}, "b": {"B": b"\x00\x01"}, "bs": {"BS": [b"\x02"]}},
    ]
    out: list[Any] = []
    for operation, result in (
        ("Query", {"Items": items, "Count": 5, "ScannedCount": 5, "LastEvaluatedKey": items[0]}),
        ("GetItem", {"Item": items[3]}),
        ("UpdateItem", {"Attributes": {"version": {"N": "7"}}}),
        ("BatchGetItem", {"Responses": {"t": items[:3]}, "UnprocessedKeys": {}}),
    ):
        serializer_class = get_serializer_class("dynamodb", model.protocol)
        serializer = serializer_class(
            operation_model=model.operation_model(operation),
            value_picker=XFormedAttributePicker(response_transformers=None),
        )
        out.append(serializer.serialize(result)["body"])
    return out


def verify_plain_item_serialisation() -> None:
    """Raise AssertionError unless stock and patched serialisation write the same bodies."""
    was_applied = "serialize_map" in _ORIGINAL
    try:
        _revert_plain_item_serialisation()
        stock = _serialisation_scenario()
        plain_item_serialisation()
        patched = _serialisation_scenario()
    finally:
        if not was_applied:
            _revert_plain_item_serialisation()
    for step, (expected, actual) in enumerate(zip(stock, patched, strict=True)):
        assert expected == actual, f"serialiser patch changes step {step}: {expected} != {actual}"


# -- per-request dispatch (bench.emulator --scale) -----------------------------------------


def cached_dispatch() -> None:
    """What moto's server recomputes on every request, computed once: the list of its
    service modules (`os.listdir` and a `stat` per entry of its package, ~150, to route a
    request) and a response class's method names (`inspect.getmembers`). Both are fixed for
    the process's life; with 2,000 long polls ending every 20 s they were paid 100 times a
    second. Answers are unchanged (verify_cached_dispatch)."""
    import moto.backends as backends
    import moto.core.responses as responses

    if "list_of_moto_modules" in _ORIGINAL:
        return
    _ORIGINAL["list_of_moto_modules"] = backends.list_of_moto_modules
    _ORIGINAL["method_names_from_class"] = responses.method_names_from_class
    modules = tuple(backends.list_of_moto_modules())
    backends.list_of_moto_modules = lambda: modules  # type: ignore[assignment]
    names: dict[object, list[str]] = {}
    original = _ORIGINAL["method_names_from_class"]

    def method_names_from_class(clazz: object) -> list[str]:
        if clazz not in names:
            names[clazz] = original(clazz)
        return list(names[clazz])

    responses.method_names_from_class = method_names_from_class  # type: ignore[assignment]


def verify_cached_dispatch() -> None:
    """Raise AssertionError unless the cached answers are the computed ones."""
    import moto.backends as backends
    import moto.core.responses as responses
    from moto.dynamodb.responses import DynamoHandler
    from moto.sqs.responses import SQSResponse

    assert tuple(backends.list_of_moto_modules()) == tuple(_ORIGINAL["list_of_moto_modules"]())
    for clazz in (SQSResponse, DynamoHandler, SQSResponse):
        expected = _ORIGINAL["method_names_from_class"](clazz)
        assert responses.method_names_from_class(clazz) == expected, clazz
