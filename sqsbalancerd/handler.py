"""Resolve a handler given as "module:function" (or "module:attr.sub"), like uvicorn's importer.

"The module does not exist" and "the module exists but raised ImportError while importing"
are different mistakes with different fixes, so they get different messages.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqsbalancerd.errors import HandlerImportError


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

    def __init__(self, failed_message_ids: set[str] | None = None) -> None:
        self.failed_message_ids = frozenset(failed_message_ids or ())


def batch(function: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a handler as taking the whole received batch (a list of Message).

    It returns None (all succeeded), a BatchResult, or an iterable of failed message ids.
    Raising fails the whole batch.
    """
    function.__sqsbalancerd_batch__ = True  # type: ignore[attr-defined]
    return function
