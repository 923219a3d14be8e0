from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from sqsbalancerd.observability.logging import (
    QUIET_LOGGERS,
    bind_instance,
    configure_logging,
    current_context,
    log_context,
)

_TOUCHED_LOGGERS = ("", "sqsbalancerd", *QUIET_LOGGERS)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state; put it back after each test."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in _TOUCHED_LOGGERS}
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    bind_instance(None)


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_has_core_fields_extra_and_instance(stream: io.StringIO) -> None:
    configure_logging(log_format="json", instance_id="i-1", stream=stream)

    logging.getLogger("sqsbalancerd.engine").info(
        "deleted %d", 3, extra={"queue": "orders", "count": 3}
    )

    [line] = json_lines(stream)
    assert line["level"] == "info"
    assert line["logger"] == "sqsbalancerd.engine"
    assert line["msg"] == "deleted 3"
    assert line["queue"] == "orders"
    assert line["count"] == 3
    assert line["instance_id"] == "i-1"
    assert line["ts"].endswith("Z")
    ts = datetime.fromisoformat(line["ts"])
    assert ts.tzinfo is not None and ts.utcoffset() == UTC.utcoffset(None)
    # Standard LogRecord attributes stay out of the object.
    assert not {"args", "levelno", "pathname", "thread"} & line.keys()


def test_user_code_inside_log_context_gets_the_fields(stream: io.StringIO) -> None:
    configure_logging(log_format="json", instance_id="i-1", stream=stream)
    user_logger = logging.getLogger("my_app.handlers")

    with log_context(queue="orders", message_id="m-1"):
        user_logger.info("processing")
    user_logger.info("outside")

    inside, outside = json_lines(stream)
    assert inside["queue"] == "orders"
    assert inside["message_id"] == "m-1"
    assert inside["instance_id"] == "i-1"
    assert "queue" not in outside
    assert "message_id" not in outside
    assert outside["instance_id"] == "i-1"


def test_contexts_nest_and_extra_wins(stream: io.StringIO) -> None:
    configure_logging(log_format="json", stream=stream)
    log = logging.getLogger("sqsbalancerd.test")

    with log_context(queue="orders"):
        with log_context(message_id="m-1"):
            assert current_context() == {"queue": "orders", "message_id": "m-1"}
            log.info("nested")
            log.info("explicit", extra={"queue": "refunds"})
        log.info("outer")

    nested, explicit, outer = json_lines(stream)
    assert (nested["queue"], nested["message_id"]) == ("orders", "m-1")
    assert (explicit["queue"], explicit["message_id"]) == ("refunds", "m-1")
    assert outer["queue"] == "orders"
    assert "message_id" not in outer
    assert current_context() == {}


def test_bound_instance_reaches_other_threads(stream: io.StringIO) -> None:
    configure_logging(log_format="json", stream=stream)
    bind_instance("i-2")

    def work() -> None:
        logging.getLogger("sqsbalancerd.worker").info("from a thread")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=5)
    assert not thread.is_alive()

    [line] = json_lines(stream)
    assert line["instance_id"] == "i-2"


def test_exception_goes_into_exc_fields(stream: io.StringIO) -> None:
    configure_logging(log_format="json", stream=stream)

    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("sqsbalancerd.test").exception("handler failed")

    [line] = json_lines(stream)
    assert line["level"] == "error"
    assert line["msg"] == "handler failed"
    assert line["exc_type"] == "ValueError"
    assert line["exc"].startswith("Traceback")
    assert "ValueError: boom" in line["exc"]


def test_colliding_field_is_renamed_not_lost(stream: io.StringIO) -> None:
    configure_logging(log_format="json", stream=stream)

    logging.getLogger("sqsbalancerd.test").info("hi", extra={"level": "custom"})

    [line] = json_lines(stream)
    assert line["level"] == "info"
    assert line["field_level"] == "custom"


def test_unencodable_field_does_not_drop_the_line(stream: io.StringIO) -> None:
    configure_logging(log_format="json", stream=stream)

    logging.getLogger("sqsbalancerd.test").info("hi", extra={"when": datetime(2024, 1, 2)})

    [line] = json_lines(stream)
    assert line["when"] == "2024-01-02 00:00:00"


def test_debug_level_keeps_aws_libraries_at_warning(stream: io.StringIO) -> None:
    configure_logging(level="debug", log_format="json", stream=stream)

    logging.getLogger("sqsbalancerd.engine.poller").debug("ours")
    logging.getLogger("my_app").debug("user code")
    logging.getLogger("botocore.endpoint").debug("response body with a receipt handle")
    logging.getLogger("urllib3.connectionpool").info("connection")
    logging.getLogger("botocore.retries").warning("throttled")

    assert [line["msg"] for line in json_lines(stream)] == ["ours", "user code", "throttled"]
    for name in QUIET_LOGGERS:
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING


def test_info_level_drops_debug(stream: io.StringIO) -> None:
    configure_logging(level="INFO", log_format="json", stream=stream)

    logging.getLogger("sqsbalancerd.test").debug("hidden")
    logging.getLogger("sqsbalancerd.test").info("shown")

    assert [line["msg"] for line in json_lines(stream)] == ["shown"]


def test_configuring_twice_does_not_duplicate_output(stream: io.StringIO) -> None:
    configure_logging(log_format="json", stream=stream)
    configure_logging(log_format="json", stream=stream)

    logging.getLogger("sqsbalancerd.test").info("once")

    assert len(json_lines(stream)) == 1


def test_reconfiguring_replaces_only_our_handler(stream: io.StringIO) -> None:
    other = logging.StreamHandler(io.StringIO())
    logging.getLogger().addHandler(other)
    first = io.StringIO()
    configure_logging(log_format="json", stream=first)
    configure_logging(log_format="json", stream=stream)

    logging.getLogger("sqsbalancerd.test").info("where")

    assert first.getvalue() == ""
    assert len(json_lines(stream)) == 1
    assert other in logging.getLogger().handlers


def test_console_format_shows_fields_as_key_value(stream: io.StringIO) -> None:
    configure_logging(log_format="console", instance_id="i-1", stream=stream)

    with log_context(queue="orders"):
        logging.getLogger("sqsbalancerd.test").warning("slow", extra={"count": 2})

    output = stream.getvalue()
    assert "slow" in output
    assert "queue=orders" in output
    assert "count=2" in output
    assert "instance_id=i-1" in output
    assert not output.lstrip().startswith("{")


class _TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_format_follows_the_stream(stream: io.StringIO) -> None:
    configure_logging(log_format="auto", stream=stream)
    logging.getLogger("sqsbalancerd.test").info("to a pipe")
    assert json_lines(stream)[0]["msg"] == "to a pipe"

    tty = _TtyStream()
    configure_logging(log_format="auto", stream=tty)
    logging.getLogger("sqsbalancerd.test").info("to a terminal", extra={"queue": "orders"})

    text = re.sub(r"\x1b\[[0-9;]*m", "", tty.getvalue())  # rich colours a terminal
    assert "to a terminal" in text
    assert "queue=orders" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize(
    ("level", "log_format"), [("verbose", "json"), ("info", "xml")], ids=["level", "format"]
)
def test_rejects_unknown_level_and_format(level: str, log_format: str) -> None:
    handlers = list(logging.getLogger().handlers)

    with pytest.raises(ValueError, match="unknown log"):
        configure_logging(level=level, log_format=log_format)

    assert logging.getLogger().handlers == handlers
