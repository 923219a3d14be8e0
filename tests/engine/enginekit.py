"""Builders for the engine's unit tests: hand-made queues and items, and a moto-backed rig.

The rig wires one real queue (in moto) to a Dispatcher, an Acknowledger, a Poller and a
Worker that the test drives step by step (`receive`, `work`, `flush`), with no threads.
`CallLog` records the SQS calls a client makes; `Faults` answers some in SQS's place;
`Throttle` throttles some queues' requests below botocore's retries.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import boto3
from botocore.awsrequest import AWSResponse
from support import queue_depth

from sqsbalancerd.clock import Clock, SystemClock
from sqsbalancerd.config import RetrySettings, Settings
from sqsbalancerd.discovery import QueueInfo
from sqsbalancerd.engine.acks import Acknowledger
from sqsbalancerd.engine.dispatch import Dispatcher
from sqsbalancerd.engine.poller import Poller, ReceiveGate
from sqsbalancerd.engine.state import (
    Delivery,
    QueuePolicy,
    QueueRuntime,
    TokenBucket,
    WorkItem,
)
from sqsbalancerd.engine.workers import AsyncBridge, Worker
from sqsbalancerd.message import Message
from sqsbalancerd.stats import Stats

_ids = itertools.count(1)


def make_policy(**overrides: Any) -> QueuePolicy:
    fields: dict[str, Any] = {
        "visibility_timeout_s": 30,
        "is_visibility_configured": False,
        "wait_time_s": 0,
        "max_messages": 10,
        "max_concurrency": None,
        "max_rate_per_s": None,
        "retry": RetrySettings(),
        "max_extension_s": 3600.0,
        "message_attribute_names": ("All",),
    }
    fields.update(overrides)
    return QueuePolicy(**fields)


def make_queue(
    name: str = "q",
    *,
    url: str | None = None,
    clock: Clock | None = None,
    invoke: Callable[[Any], Any] = lambda message: None,
    is_batch: bool = False,
    is_async: bool = False,
    **policy: Any,
) -> QueueRuntime:
    info = QueueInfo(
        name=name,
        url=url or f"https://sqs.local/000000000000/{name}",
        is_fifo=name.endswith(".fifo"),
        visibility_timeout_s=policy.get("visibility_timeout_s", 30),
    )
    resolved = make_policy(**policy)
    rate = None
    if resolved.max_rate_per_s:
        rate = TokenBucket(resolved.max_rate_per_s, (clock or SystemClock()).monotonic())
    return QueueRuntime(
        info=info,
        policy=resolved,
        invoke=invoke,
        is_batch=is_batch,
        is_async=is_async,
        rate=rate,
    )


def make_message(queue: QueueRuntime, body: str = "", *, group: str | None = None) -> Message:
    n = next(_ids)
    return Message(
        body=body or json.dumps({"n": n}),
        message_id=f"m-{n}",
        receipt_handle=f"rh-{n}",
        queue_url=queue.url,
        queue_name=queue.name,
        receive_count=1,
        sent_at=datetime.now(tz=UTC),
        attributes=MappingProxyType({}),
        message_attributes=MappingProxyType({}),
        group_id=group,
    )


def make_item(queue: QueueRuntime, *, group: str | None = None, now_s: float = 0.0) -> WorkItem:
    delivery = Delivery(
        message=make_message(queue, group=group),
        queue=queue,
        received_at_s=now_s,
        visible_until_s=now_s + queue.policy.visibility_timeout_s,
    )
    return WorkItem(queue, (delivery,), frozenset([group] if group else []))


def fill(dispatcher: Dispatcher, queue: QueueRuntime, items: list[WorkItem]) -> list[WorkItem]:
    """Reserve room for `items` (as a poller would) and submit them."""
    granted = dispatcher.reserve(queue, len(items), timeout_s=0)
    assert granted == len(items), f"only {granted} of {len(items)} reserved"
    dispatcher.end_poll(queue, granted, received=granted)
    assert dispatcher.submit(queue, items)
    return items


def body_of(item: WorkItem) -> str:
    return item.deliveries[0].message.body


def standalone_settings(**sections: Any) -> Settings:
    """Settings for Engine tests: standalone, discovery by pattern, other keys as given."""
    fields: dict[str, Any] = {
        "coordination": {"mode": "standalone"},
        "discovery": {"queue_pattern": "^work-"},
        "aws": {"region": "us-east-1"},
    }
    fields.update(sections)
    return Settings(**fields)


class CallLog:
    """Every SQS call a client makes, in order: (operation, API parameters)."""

    def __init__(self, client: Any) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        client.meta.events.register("before-parameter-build.sqs.*", self._record)

    def _record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        with self._lock:
            self.calls.append((model.name, dict(params)))

    def of(self, operation: str) -> list[dict[str, Any]]:
        with self._lock:
            return [params for name, params in self.calls if name == operation]

    def entries(self, operation: str) -> list[dict[str, Any]]:
        return [entry for params in self.of(operation) for entry in params["Entries"]]


class Rig:
    """One moto queue driven by hand: receive → dispatcher → worker → acknowledger."""

    def __init__(
        self,
        sqs: Any,
        *,
        handler: Callable[[Any], Any] = lambda message: None,
        name: str = "work-a",
        clock: Clock | None = None,
        is_batch: bool = False,
        is_async: bool = False,
        capacity: int = 20,
        bridge: AsyncBridge | None = None,
        acks: Acknowledger | None = None,
        stats: Stats | None = None,
        **policy: Any,
    ) -> None:
        self.sqs = sqs
        self.clock = clock or SystemClock()
        attributes = {"VisibilityTimeout": str(policy.get("visibility_timeout_s", 30))}
        if name.endswith(".fifo"):
            attributes["FifoQueue"] = "true"
        self.url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        self.stats = stats or Stats()
        self.queue = make_queue(
            name,
            url=self.url,
            clock=self.clock,
            invoke=handler,
            is_batch=is_batch,
            is_async=is_async,
            **policy,
        )
        self.dispatcher = Dispatcher(capacity=capacity, clock=self.clock)
        self.dispatcher.add_queue(self.queue)
        # Rigs may share one (as every queue shares the acks thread), with its stats.
        self.acks = acks or Acknowledger(sqs, stats=self.stats, clock=self.clock)
        self.gate = ReceiveGate()
        self.gone: list[QueueRuntime] = []
        self.poller = Poller(
            self.queue,
            sqs=sqs,
            dispatcher=self.dispatcher,
            acks=self.acks,
            gate=self.gate,
            stats=self.stats,
            clock=self.clock,
            on_gone=self.gone.append,
        )
        self.worker = Worker(
            dispatcher=self.dispatcher,
            acks=self.acks,
            stats=self.stats,
            clock=self.clock,
            bridge=bridge,
        )

    def send(self, *bodies: str, group: str | None = None) -> list[str]:
        ids = []
        for body in bodies:
            kwargs: dict[str, Any] = {"QueueUrl": self.url, "MessageBody": body}
            if group is not None:
                kwargs["MessageGroupId"] = group
                kwargs["MessageDeduplicationId"] = f"d-{next(_ids)}"
            ids.append(self.sqs.send_message(**kwargs)["MessageId"])
        return ids

    def receive(self) -> int:
        """One poller round; returns how many messages it queued."""
        before = self.dispatcher.depth()
        assert self.poller.run_once() == 0.0
        return self.dispatcher.depth() - before

    def work(self) -> bool:
        return self.worker.run_once(timeout_s=0)

    def work_all(self) -> int:
        done = 0
        while self.work():
            done += 1
        return done

    def flush(self) -> None:
        self.acks.flush_all()

    def depth(self) -> tuple[int, int]:
        return queue_depth(self.sqs, self.url)

    def counters(self) -> dict[str, int]:
        return self.stats.queue_counters().get(self.queue.name, {})

    def handled(self, count: int) -> None:
        """Receive and handle `count` messages (already sent): their deletes are pending."""
        done = 0
        while done < count:
            assert self.receive() > 0, f"only {done} of {count} messages received"
            done += self.work_all()
        assert done == count


class Faults:
    """Answers DeleteMessageBatch / ChangeMessageVisibilityBatch in SQS's place.

    `plan` is a list, one element per call to intercept (later calls go to moto):
    a dict {entry index: error code} → those entries fail, the others are really applied
    through a second, unhooked client; or an exception instance → the call raises it.
    """

    def __init__(self, client: Any, operation: str, plan: list[Any]) -> None:
        self._plan = list(plan)
        self._operation = operation
        self._direct = boto3.client("sqs", region_name="us-east-1")
        client.meta.events.register(f"before-call.sqs.{operation}", self._answer)
        self.intercepted = 0

    def _answer(self, params: dict[str, Any], **_: Any) -> Any:
        if not self._plan:
            return None
        step = self._plan.pop(0)
        self.intercepted += 1
        if isinstance(step, BaseException):
            raise step
        request = _request_params(params)
        entries = request["Entries"]
        failed = [
            {"Id": e["Id"], "Code": step[i], "SenderFault": False, "Message": "simulated"}
            for i, e in enumerate(entries)
            if i in step
        ]
        applied = [e for i, e in enumerate(entries) if i not in step]
        if applied:
            call = getattr(self._direct, _snake(self._operation))
            call(QueueUrl=request["QueueUrl"], Entries=applied)
        parsed = {"Successful": [{"Id": e["Id"]} for e in applied], "Failed": failed}
        return AWSResponse("https://sqs.simulated", 200, {}, None), parsed


def _request_params(request_dict: dict[str, Any]) -> dict[str, Any]:
    return json.loads(request_dict["body"])


def _snake(operation: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in operation).lstrip("_")


class Throttle:
    """Throttles `operation` for the queues in `urls`, one HTTP request at a time: a
    ThrottlingException answered in SQS's place at `before-send`, beneath botocore's retry
    layer, so a client that retries makes (and this counts) every attempt. `stop()` ends it.
    """

    def __init__(self, client: Any, operation: str, urls: Iterable[str]) -> None:
        self._urls = set(urls)
        self._cond = threading.Condition()
        self._is_active = True
        self.attempts: Counter[str] = Counter()  # throttled requests, by queue URL
        self.entries: Counter[str] = Counter()  # their batch entries, by queue URL
        client.meta.events.register_first(f"before-send.sqs.{operation}", self._answer)

    def stop(self) -> None:
        with self._cond:
            self._is_active = False

    def wait_for(self, url: str, attempts: int, *, timeout_s: float = 10.0) -> None:
        """Until `attempts` requests for `url` were throttled; fails after `timeout_s`."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.attempts[url] >= attempts, timeout_s):
                raise AssertionError(
                    f"only {self.attempts[url]} of {attempts} throttled requests in {timeout_s}s"
                )

    def _answer(self, request: Any, **_: Any) -> AWSResponse | None:
        params = json.loads(request.body)
        url = params["QueueUrl"]
        with self._cond:
            if not self._is_active or url not in self._urls:
                return None  # on to moto
            self.attempts[url] += 1
            self.entries[url] += len(params.get("Entries", ()))
            self._cond.notify_all()
        # botocore still calls moto's own before-send handler after this one (its answer is
        # ignored): pointed elsewhere, moto lets the request be instead of applying it.
        request.url = "https://throttled.invalid/"
        body = json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"})
        headers = {
            "x-amzn-query-error": "ThrottlingException;Sender",
            "Content-Type": "application/x-amz-json-1.0",
        }
        return AWSResponse(request.url, 400, headers, _RawBody(body.encode()))


class _RawBody:
    """The `raw` of an AWSResponse: what botocore reads the body from."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterable[bytes]:
        yield self._body
