"""Resolve a handler given as "module:function" (or "module:attr.sub"), like uvicorn's importer.

"The module does not exist" and "the module exists but raised ImportError while importing"
are different mistakes with different fixes, so they get different messages.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqsbalancerd.errors import HandlerImportError
from sqsbalancerd.message import Message


@dataclass(frozen=True, slots=True)
class ResolvedHandler:
    path: str
    function: Callable[..., Any]
    is_async: bool
    is_batch: bool


def import_from_string(path: str) -> Any:
    module_name, _, attrs = path.partition(":")
    if not module_name or not attrs:
        raise HandlerImportError(
            f'handler "{path}": expected "module:function" (for example "app.tasks:handle")'
        )
    if "" not in sys.path:
        # The working directory is importable, as it is for `python -m`.
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name and not module_name.startswith(f"{exc.name}."):
            raise HandlerImportError(
                f'handler "{path}": importing module "{module_name}" failed: {exc}'
            ) from exc
        raise HandlerImportError(
            f'handler "{path}": module "{module_name}" not found (is it on PYTHONPATH?)'
        ) from None
    except (Exception, SystemExit) as exc:  # a module calling sys.exit() must not end us
        detail = " ".join(str(exc).split())  # the CLI prints one line
        raise HandlerImportError(
            f'handler "{path}": importing module "{module_name}" raised '
            f"{type(exc).__name__}: {detail}"
        ) from exc
    return _walk_attributes(module, attrs, path)


def _walk_attributes(module: Any, attrs: str, path: str) -> Any:
    target = module
    for attr in attrs.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError:
            raise HandlerImportError(
                f'handler "{path}": attribute "{attrs}" not found in module "{module.__name__}"'
            ) from None
    return target


def resolve_handler(path: str) -> ResolvedHandler:
    function = import_from_string(path)
    if not callable(function):
        raise HandlerImportError(f'handler "{path}": {type(function).__name__} is not callable')
    is_async = inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        getattr(function, "__call__", None)  # noqa: B004 - async callable objects
    )
    is_batch = bool(getattr(function, "__sqsbalancerd_batch__", False))
    return ResolvedHandler(path=path, function=function, is_async=is_async, is_batch=is_batch)


def resolve_hook(path: str | None) -> Callable[[], Any] | None:
    """on_startup / on_shutdown hooks: plain callables taking no argument (sync or async)."""
    if path is None:
        return None
    hook = import_from_string(path)
    if not callable(hook):
        raise HandlerImportError(f'hook "{path}": {type(hook).__name__} is not callable')
    return hook


class BatchResult:
    """What a batch handler may return: the ids of the messages that failed."""

    def __init__(self, failed_message_ids: Iterable[str] | None = None) -> None:
        self.failed_message_ids = frozenset(failed_message_ids or ())

    def __repr__(self) -> str:
        return f"BatchResult(failed_message_ids={sorted(self.failed_message_ids)!r})"


def batch(function: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a handler as taking the whole received batch (a list of Message).

    It returns None (all succeeded), a BatchResult, an iterable of failed message ids or
    Message objects, or Lambda's {"batchItemFailures": [{"itemIdentifier": id}, ...]}.
    Raising, or any other answer, fails the whole batch.
    """
    function.__sqsbalancerd_batch__ = True  # type: ignore[attr-defined]
    return function


class UnreadableBatchAnswer(ValueError):
    """A batch handler's answer that does not say exactly which messages failed."""


def read_batch_answer(answer: Any, messages: Sequence[Message]) -> frozenset[str]:
    """The ids of the failed messages; raises UnreadableBatchAnswer for anything that is not
    one of the documented answers, naming what came back. Nothing is deleted on a guess."""
    ids = {m.message_id for m in messages}
    if answer is None:
        return frozenset()
    if isinstance(answer, BatchResult):
        return _known(answer.failed_message_ids, ids, "BatchResult id")
    if isinstance(answer, Mapping):
        return _lambda_failures(answer, ids)
    if isinstance(answer, str | bytes | bool | int | float) or not isinstance(answer, Iterable):
        raise UnreadableBatchAnswer(
            f"{_describe(answer)} (expected None, a BatchResult, failed ids or Messages, "
            'or {"batchItemFailures": [...]})'
        )
    try:
        items = list(answer)
    except Exception as exc:
        raise UnreadableBatchAnswer(
            f"{type(answer).__name__} raised {type(exc).__name__} while iterated: {exc}"
        ) from exc
    return _known((_item_id(item, messages) for item in items), ids, "failed id")


def _item_id(item: Any, messages: Sequence[Message]) -> str:
    if isinstance(item, Message):
        if item not in messages:  # equal by (queue_url, message_id)
            raise UnreadableBatchAnswer(f"Message {item.message_id!r} is not in this batch")
        return item.message_id
    if isinstance(item, str):
        return item
    raise UnreadableBatchAnswer(
        f"an iterable holding {_describe(item)} (expected message ids or Messages)"
    )


def _lambda_failures(answer: Mapping[Any, Any], ids: set[str]) -> frozenset[str]:
    """AWS Lambda's partial-batch response, with Lambda's rule: an empty or unknown
    itemIdentifier fails the whole batch."""
    if "batchItemFailures" not in answer:
        keys = ", ".join(repr(k) for k in list(answer)[:5]) or "no keys"
        raise UnreadableBatchAnswer(f"a mapping without batchItemFailures ({keys})")
    failures = answer["batchItemFailures"]
    if failures is None:
        return frozenset()
    if isinstance(failures, str | bytes | Mapping) or not isinstance(failures, Iterable):
        raise UnreadableBatchAnswer(f"batchItemFailures is {_describe(failures)}, not a list")
    found = []
    for entry in failures:
        item = entry.get("itemIdentifier") if isinstance(entry, Mapping) else None
        if not isinstance(item, str) or not item:
            raise UnreadableBatchAnswer(
                f"batchItemFailures entry {_describe(entry)} has no itemIdentifier"
            )
        found.append(item)
    return _known(found, ids, "itemIdentifier")


def _known(found: Iterable[str], ids: set[str], what: str) -> frozenset[str]:
    failed = frozenset(found)
    unknown = sorted(failed - ids)
    if unknown:
        raise UnreadableBatchAnswer(f"{what} {unknown[0]!r} is not a message of this batch")
    return failed


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"
