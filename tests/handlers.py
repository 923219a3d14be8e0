"""Handlers the end-to-end tests run inside `sqsbalancerd run` subprocesses.

Each process appends JSON lines to $SQSB_TEST_EVENTS.<pid>: start/end per message, so
tests can assert counts per message id and order from the recorded events.
Behaviour is steered by the message body (JSON): {"fail_once": true}, {"sleep": 2.5}, ...
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from sqsbalancerd import BatchResult, Message, Retry, batch

_lock = threading.Lock()
_file: Any = None


def _record(event: str, message: Message, **fields: Any) -> None:
    global _file
    with _lock:
        if _file is None:
            path = os.environ["SQSB_TEST_EVENTS"] + f".{os.getpid()}"
            _file = open(path, "a", buffering=1)  # noqa: SIM115 - kept open for the process
        line = {
            "event": event,
            "t": time.time(),
            "pid": os.getpid(),
            "queue": message.queue_name,
            "id": message.message_id,
            "receive_count": message.receive_count,
            "attempt": message.attempt,
            "group": message.group_id,
            "body": message.body,
            **fields,
        }
        _file.write(json.dumps(line) + "\n")


def record(message: Message) -> None:
    """Records start and end; obeys the body's instructions."""
    data = message.json() if message.body.startswith("{") else {}
    _record("start", message)
    try:
        if data.get("sleep"):
            time.sleep(float(data["sleep"]))
        if data.get("fail_once") and message.attempt == 1:
            raise ValueError("failing once on purpose")
        if data.get("fail_always"):
            raise ValueError("failing always on purpose")
        if data.get("retry_after") is not None and message.attempt == 1:
            raise Retry(after=float(data["retry_after"]))
        if data.get("exit"):
            raise SystemExit(3)
    except BaseException as exc:
        _record("end", message, outcome="failed", error=type(exc).__name__)
        raise
    _record("end", message, outcome="ok")


async def record_async(message: Message) -> None:
    import asyncio

    _record("start", message)
    await asyncio.sleep(0)
    _record("end", message, outcome="ok")


def not_a_function() -> None: ...


NOT_CALLABLE = 42


@batch
def record_batch(messages: list[Message]) -> BatchResult:
    """Batch mode: records each message; those whose body says fail_once fail the first time."""
    failed: set[str] = set()
    for message in messages:
        data = message.json() if message.body.startswith("{") else {}
        _record("start", message, batch_size=len(messages))
        if data.get("fail_once") and message.attempt == 1:
            failed.add(message.message_id)
            _record("end", message, outcome="failed", error="ValueError")
        else:
            _record("end", message, outcome="ok")
    return BatchResult(failed)


class _Namespace:
    """For "handlers:namespace.record" (module:attr.sub)."""

    record = staticmethod(record)


namespace = _Namespace()


# -- fault suite (tests/faults) -----------------------------------------------------------


def _faults_returns(kind: str, message: Message) -> Any:
    if kind == "false":
        return False
    if kind == "dict":
        return {"ok": False, "id": message.message_id}
    if kind == "coroutine":
        return _coroutine_result(message)  # a sync function returning a coroutine object
    return None


async def _coroutine_result(message: Message) -> str:
    _record("awaited", message)
    return "awaited"


def faults(message: Message) -> Any:
    """Fault-suite handler; records like `record`. The body (JSON) steers it:
    {"raise": "SystemExit" | "KeyboardInterrupt"} raises that on the first receive;
    {"hang_once": s} sleeps s seconds on the first receive only; {"sleep": s} always;
    {"returns": "none" | "false" | "dict" | "coroutine"} returns such a value;
    {"fail_always": true} always raises ValueError (its text never holds the body);
    {"receipt": true} records the receipt handle (to look for it in the daemon's logs).
    """
    data = message.json() if message.body.startswith("{") else {}
    extra = {"receipt_handle": message.receipt_handle} if data.get("receipt") else {}
    _record("start", message, **extra)
    try:
        if data.get("hang_once") and message.receive_count == 1:
            time.sleep(float(data["hang_once"]))
        if data.get("sleep"):
            time.sleep(float(data["sleep"]))
        if data.get("raise") and message.receive_count == 1:
            raise {"SystemExit": SystemExit(4), "KeyboardInterrupt": KeyboardInterrupt()}[
                data["raise"]
            ]
        if data.get("fail_always"):
            raise ValueError("failing always on purpose")
    except BaseException as exc:
        _record("end", message, outcome="failed", error=type(exc).__name__)
        raise
    result = _faults_returns(str(data.get("returns", "none")), message)
    _record("end", message, outcome="ok", returned=type(result).__name__)
    return result


@batch
def faults_batch(messages: list[Message]) -> Any:
    """Batch fault handler: the first message's body {"batch_returns": "false" | "zero" |
    "dict"} picks what the whole batch returns on its first receive (None afterwards)."""
    for message in messages:
        _record("start", message, batch_size=len(messages))
    first = messages[0]
    kind = first.json().get("batch_returns") if first.body.startswith("{") else None
    result: Any = None
    if first.receive_count == 1:
        result = {"false": False, "zero": 0, "dict": {"no-such-id": "x"}}.get(str(kind))
    for message in messages:
        _record("end", message, outcome="returned", returned=repr(result))
    return result


# -- handler contract (tests/e2e/test_handler_contract.py) --------------------------------


def _failing_generator(messages: list[Message]) -> Any:
    yield messages[0].message_id
    raise RuntimeError("broke while listing failures")


def _answer(shape: str, messages: list[Message]) -> Any:
    """The answer of shape `shape` saying that the message with body n=1 failed."""
    bad = [m for m in messages if m.json().get("n") == 1]
    ids = [m.message_id for m in bad]
    answers: dict[str, Any] = {
        "none": lambda: None,
        "batchresult": lambda: BatchResult(ids),
        "ids": lambda: ids,
        "messages": lambda: bad,
        "mixed": lambda: (x for pair in zip(bad, ids, strict=True) for x in pair),
        "lambda": lambda: {"batchItemFailures": [{"itemIdentifier": i} for i in ids]},
        "lambdaempty": lambda: {"batchItemFailures": []},
        "foreignid": lambda: ["no-such-message"],
        "foreignbatchresult": lambda: BatchResult({"no-such-message"}),
        "emptyidentifier": lambda: {"batchItemFailures": [{"itemIdentifier": ""}]},
        "unknownidentifier": lambda: {"batchItemFailures": [{"itemIdentifier": "nope"}]},
        "nobatchitemfailures": lambda: {"failures": ids},
        "false": lambda: False,
        "number": lambda: 1,
        "raisinggenerator": lambda: _failing_generator(messages),
    }
    return answers[shape]()


@batch
def contract_batch(messages: list[Message]) -> Any:
    """Answers in the shape its queue's name says (work-<shape>) on the first attempt;
    all succeed on later ones."""
    for message in messages:
        _record("start", message, batch_size=len(messages))
    shape = messages[0].queue_name.removeprefix("work-")
    answer = _answer(shape, messages) if messages[0].attempt == 1 else None
    for message in messages:
        _record("end", message, outcome="answered", answer=shape)
    return answer


async def sleepy_async(message: Message) -> None:
    """Async: awaits body.sleep seconds on the first attempt; blocks the loop with
    time.sleep for body.block seconds (a bug this handler has on purpose)."""
    import asyncio

    data = message.json()
    _record("start", message)
    try:
        if data.get("sleep") and message.attempt == 1:
            await asyncio.sleep(float(data["sleep"]))
        if data.get("block"):
            time.sleep(float(data["block"]))
    except BaseException as exc:
        _record("end", message, outcome="failed", error=type(exc).__name__)
        raise
    _record("end", message, outcome="ok")
