"""Resolving "module:function" handlers, like uvicorn's importer."""

from __future__ import annotations

import functools
import importlib
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import handlers
import pytest

from sqsbalancerd import BatchResult, batch
from sqsbalancerd.errors import HandlerImportError
from sqsbalancerd.handler import import_from_string, resolve_handler, resolve_hook

NOT_FOUND = "not found (is it on PYTHONPATH?)"


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Write a uniquely named module into a fresh working directory; returns its name.

    Only the working directory makes it importable: neither it nor "" is on sys.path before.
    """
    monkeypatch.chdir(tmp_path)
    cwd = {"", ".", str(tmp_path)}
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in cwd])
    written: list[str] = []

    def write(source: str) -> str:
        name = f"user_handlers_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(source)
        importlib.invalidate_caches()
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def error_for(path: str) -> str:
    with pytest.raises(HandlerImportError) as info:
        resolve_handler(path)
    message = str(info.value)
    assert "\n" not in message
    assert f'handler "{path}"' in message
    return message


def test_module_function() -> None:
    resolved = resolve_handler("handlers:record")
    assert resolved.function is handlers.record
    assert resolved.path == "handlers:record"
    assert not resolved.is_async
    assert not resolved.is_batch


def test_module_attribute_path() -> None:
    resolved = resolve_handler("handlers:namespace.record")
    assert resolved.function is handlers.record


def test_dotted_module_path() -> None:
    assert import_from_string("os.path:join") is importlib.import_module("os.path").join


def test_working_directory_is_importable(user_module: Callable[[str], str]) -> None:
    name = user_module("def handle(message):\n    return 'handled'\n")
    resolved = resolve_handler(f"{name}:handle")
    assert resolved.function("m") == "handled"


@pytest.mark.parametrize("path", ["handlers", "handlers:", ":record", ""])
def test_path_without_module_and_function_is_rejected(path: str) -> None:
    assert 'expected "module:function"' in error_for(path)


@pytest.mark.parametrize("path", ["no_such_module_xq:handle", "json.no_such_submodule:handle"])
def test_module_not_found(path: str) -> None:
    message = error_for(path)
    assert NOT_FOUND in message
    assert f'module "{path.split(":")[0]}"' in message


def test_missing_package_of_a_dotted_module_is_not_found() -> None:
    assert NOT_FOUND in error_for("no_such_package_xq.tasks:handle")


def test_import_error_inside_the_users_module_is_not_not_found(
    user_module: Callable[[str], str],
) -> None:
    name = user_module("import no_such_dependency_xq\n\ndef handle(message): ...\n")
    message = error_for(f"{name}:handle")
    assert NOT_FOUND not in message
    assert f'importing module "{name}" failed' in message
    assert "no_such_dependency_xq" in message


def test_bad_name_imported_inside_the_users_module(user_module: Callable[[str], str]) -> None:
    name = user_module("from os import no_such_name_xq\n")
    message = error_for(f"{name}:handle")
    assert NOT_FOUND not in message
    assert "raised ImportError" in message
    assert "no_such_name_xq" in message


def test_other_exception_while_importing_is_reported_on_one_line(
    user_module: Callable[[str], str],
) -> None:
    name = user_module('raise RuntimeError("database\\nunreachable")\n')
    message = error_for(f"{name}:handle")
    assert "raised RuntimeError: database unreachable" in message


def test_system_exit_while_importing_does_not_end_the_process(
    user_module: Callable[[str], str],
) -> None:
    name = user_module("import sys\nsys.exit(5)\n")
    assert "raised SystemExit: 5" in error_for(f"{name}:handle")


def test_syntax_error_in_the_users_module(user_module: Callable[[str], str]) -> None:
    name = user_module("def handle(message:\n")
    assert "raised SyntaxError" in error_for(f"{name}:handle")


@pytest.mark.parametrize(
    ("path", "attrs"),
    [("handlers:no_such_handler", "no_such_handler"), ("handlers:record.nope", "record.nope")],
)
def test_attribute_missing(path: str, attrs: str) -> None:
    message = error_for(path)
    assert f'attribute "{attrs}" not found in module "handlers"' in message


def test_not_callable() -> None:
    assert "int is not callable" in error_for("handlers:NOT_CALLABLE")


class _AsyncCallable:
    async def __call__(self, message: Any) -> None: ...


class _SyncCallable:
    def __call__(self, message: Any) -> None: ...


async def _async_function(message: Any) -> None: ...


def _sync_function(message: Any) -> None: ...


@pytest.mark.parametrize(
    ("target", "is_async"),
    [
        (_async_function, True),
        (_AsyncCallable(), True),
        (functools.partial(_async_function), True),
        (_sync_function, False),
        (_SyncCallable(), False),
        (functools.partial(_sync_function), False),
    ],
)
def test_async_detection(monkeypatch: pytest.MonkeyPatch, target: Any, is_async: bool) -> None:
    monkeypatch.setattr(handlers, "target_under_test", target, raising=False)
    resolved = resolve_handler("handlers:target_under_test")
    assert resolved.is_async is is_async
    assert resolved.function is target


def test_async_handler_from_the_fixtures() -> None:
    assert resolve_handler("handlers:record_async").is_async


def test_batch_decorator_marks_the_handler() -> None:
    resolved = resolve_handler("handlers:record_batch")
    assert resolved.is_batch
    assert not resolved.is_async


def test_batch_decorator_returns_the_function_and_works_on_async(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def handle_many(messages: list[Any]) -> None: ...

    assert batch(handle_many) is handle_many
    monkeypatch.setattr(handlers, "target_under_test", handle_many, raising=False)
    resolved = resolve_handler("handlers:target_under_test")
    assert resolved.is_batch and resolved.is_async


def test_batch_result_holds_failed_ids() -> None:
    assert BatchResult({"a", "b"}).failed_message_ids == frozenset({"a", "b"})
    assert BatchResult().failed_message_ids == frozenset()


def test_hooks() -> None:
    assert resolve_hook(None) is None
    assert resolve_hook("handlers:not_a_function") is handlers.not_a_function
    with pytest.raises(HandlerImportError, match='hook "handlers:NOT_CALLABLE": int is not'):
        resolve_hook("handlers:NOT_CALLABLE")
    with pytest.raises(HandlerImportError, match=NOT_FOUND.split(" (")[0]):
        resolve_hook("no_such_module_xq:start")
