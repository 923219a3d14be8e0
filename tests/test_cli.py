"""The command line through `python -m sqsbalancerd` in a subprocess (help text in-process)."""

from __future__ import annotations

import re
import socket
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from support import queue_depth
from typer.main import get_command
from typer.testing import CliRunner

from sqsbalancerd import __version__
from sqsbalancerd.cli import app
from sqsbalancerd.local import create_queues, send_messages

STANDALONE = """\
coordination.mode = "standalone"
[discovery]
queue_pattern = "^work-"
interval = 1
[sqs]
wait_time_seconds = 1
[observability]
http_port = 0
"""


def write(daemons: Any, text: str, name: str = "config.toml") -> Path:
    path = daemons.tmp_path / name
    path.write_text(text)
    return path


def assert_one_line_error(result: subprocess.CompletedProcess[str], *names: str) -> str:
    """Exit 2, one line on stderr naming what is wrong, and never a traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


# --- version and help --------------------------------------------------------------------


def test_version(daemons: Any) -> None:
    result = daemons.run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"sqsbalancerd {__version__}"


def test_no_arguments_shows_help_and_exits_2(daemons: Any) -> None:
    result = daemons.run_cli()
    assert result.returncode == 2, result.stderr  # click: no command is a usage error
    assert "Usage" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_unknown_option_exits_2(daemons: Any) -> None:
    result = daemons.run_cli("run", "--no-such-option")
    assert result.returncode == 2, result.stderr
    assert "No such option: --no-such-option" in result.stderr


def _command_names() -> list[str]:
    return sorted(get_command(app).commands)  # type: ignore[attr-defined]


def test_every_command_has_a_one_line_description() -> None:
    commands = get_command(app).commands  # type: ignore[attr-defined]
    assert {"run", "config", "queues", "local"} <= set(commands)
    for name, command in commands.items():
        summary = command.get_short_help_str(limit=200)
        assert summary and not summary.endswith("..."), name


@pytest.mark.parametrize("command", [None, *_command_names()])
def test_help_on_every_command(command: str | None) -> None:
    args = ["--help"] if command is None else [command, "--help"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    # Click's usual rendering: a flag alone, a value option with its metavar, no type tags.
    assert re.search(r"^  --help +Show this message and exit\.$", result.output, re.M)
    assert not re.search(r"<(bool|str|int|float|path)>", result.output), result.output


def test_help_in_a_subprocess(daemons: Any) -> None:
    result = daemons.run_cli("run", "--help")
    assert result.returncode == 0, result.stderr
    assert "--handler MODULE:FUNCTION" in result.stdout
    assert "--queue-pattern REGEX" in result.stdout


# --- config ------------------------------------------------------------------------------


def test_config_prints_toml_that_round_trips(daemons: Any) -> None:
    path = write(
        daemons,
        'instance_id = "i-1"\n'
        + STANDALONE
        + '[[queue]]\nmatch = "^work-slow"\nmax_concurrency = 2\n[queue.retry]\nbase = 1\n',
    )
    first = daemons.run_cli(
        "config", "--config", str(path), env={"SQSBALANCERD_WORKERS__POOL_SIZE": "20"}
    )
    assert first.returncode == 0, first.stderr
    document = tomllib.loads(first.stdout)
    assert document["instance_id"] == "i-1"
    assert document["coordination"]["mode"] == "standalone"
    assert document["workers"]["pool_size"] == 20  # the environment is part of the effective config
    assert document["queue"][0]["retry"]["base"] == 1.0
    again = write(daemons, first.stdout, "again.toml")
    second = daemons.run_cli("config", "--config", str(again))
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout


def test_config_file_from_environment(daemons: Any) -> None:
    path = write(daemons, STANDALONE)
    result = daemons.run_cli("config", env={"SQSBALANCERD_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["discovery"]["queue_pattern"] == "^work-"


# --- every invalid configuration: exit 2, one line, no traceback -------------------------

BROKEN_MODULE = 'raise RuntimeError("cannot connect\\nto the database")\n'


@pytest.mark.parametrize(
    ("files", "args", "env", "names"),
    [
        pytest.param(
            {"c.toml": STANDALONE + "[workers]\npool_siz = 3\n"},
            ["config", "--config", "c.toml"],
            {},
            ["workers.pool_siz", "unknown setting", "c.toml"],
            id="unknown-key-in-file",
        ),
        pytest.param(
            {"c.toml": STANDALONE},
            ["config", "--config", "c.toml"],
            {"SQSBALANCERD_WORKERS__POOL_SIZ": "3"},
            ["SQSBALANCERD_WORKERS__POOL_SIZ"],
            id="unknown-key-in-env",
        ),
        pytest.param(
            {"c.toml": STANDALONE + "[workers]\npool_size = 0\n"},
            ["config", "--config", "c.toml"],
            {},
            ["workers.pool_size", "greater than or equal to 1", "c.toml"],
            id="out-of-range-in-file",
        ),
        pytest.param(
            {"c.toml": STANDALONE},
            ["config", "--config", "c.toml"],
            {"SQSBALANCERD_WORKERS__POOL_SIZE": "0"},
            ["workers.pool_size", "SQSBALANCERD_WORKERS__POOL_SIZE"],
            id="out-of-range-in-env",
        ),
        pytest.param(
            {"c.toml": STANDALONE},
            ["config", "--config", "c.toml"],
            {"SQSBALANCERD_DISCOVERY__QUEUES": "a,b"},
            ["SQSBALANCERD_DISCOVERY__QUEUES"],
            id="undecodable-list-in-env",
        ),
        pytest.param(
            {"c.toml": STANDALONE},
            ["queues", "--config", "c.toml", "--queue-pattern", "("],
            {},
            ["discovery.queue_pattern", "regular expression", "command-line flag"],
            id="bad-regex-flag-queues",
        ),
        pytest.param(
            {"c.toml": STANDALONE},
            ["run", "--config", "c.toml", "--handler", "handlers:record", "--queue-pattern", "("],
            {},
            ["discovery.queue_pattern", "regular expression"],
            id="bad-regex-flag-run",
        ),
        pytest.param(
            {"c.toml": STANDALONE},
            ["run", "--config", "c.toml", "--handler", "handlers:record", "--log-level", "loud"],
            {},
            ["observability.log_level", "loud"],
            id="bad-log-level-flag",
        ),
        pytest.param(
            {"c.toml": STANDALONE},
            ["run", "--config", "c.toml", "--handler", "no_such_module_xq:handle"],
            {},
            ["no_such_module_xq:handle", "not found"],
            id="handler-module-missing",
        ),
        pytest.param(
            {"c.toml": STANDALONE},
            ["run", "--config", "c.toml", "--handler", "handlers:no_such_handler"],
            {},
            ["handlers:no_such_handler", 'attribute "no_such_handler" not found'],
            id="handler-attribute-missing",
        ),
        pytest.param(
            {"c.toml": STANDALONE, "broken.py": BROKEN_MODULE},
            ["run", "--config", "c.toml", "--handler", "broken:handle"],
            {},
            ["broken:handle", "RuntimeError: cannot connect to the database"],
            id="handler-module-raises",
        ),
        pytest.param(
            {"c.toml": STANDALONE, "exits.py": "import sys\nsys.exit(5)\n"},
            ["run", "--config", "c.toml", "--handler", "exits:handle"],
            {},
            ["exits:handle", "SystemExit"],
            id="handler-module-exits",
        ),
        pytest.param(
            {"c.toml": STANDALONE},
            ["run", "--config", "c.toml"],
            {},
            ["handler"],
            id="no-handler",
        ),
        pytest.param(
            {},
            ["config", "--config", "missing.toml"],
            {},
            ["config file not found", "missing.toml"],
            id="file-not-found",
        ),
        pytest.param(
            {},
            ["config"],
            {"SQSBALANCERD_CONFIG": "missing.toml"},
            ["config file not found", "missing.toml"],
            id="file-from-env-not-found",
        ),
        pytest.param(
            {"c.toml": "[discovery\nqueue_pattern = 1\n"},
            ["config", "--config", "c.toml"],
            {},
            ["c.toml", "line 1"],
            id="toml-syntax-error",
        ),
        pytest.param(
            {"c.toml": "[workers]\npool_size = 2\n"},
            ["config", "--config", "c.toml"],
            {},
            ["queue_pattern or queues"],
            id="nothing-to-consume",
        ),
        pytest.param(
            {"c.toml": STANDALONE},
            ["config", "--config", "c.toml"],
            {"SQSBALANCERD_COORDINATION__HEARTBEAT_TIMEOUT": "5"},
            ["coordination", "heartbeat_timeout", "SQSBALANCERD_COORDINATION__"],
            id="heartbeat-timeout-not-above-interval",
        ),
        pytest.param(
            {"c.toml": STANDALONE},
            ["queues", "--config", "c.toml"],
            {"AWS_REGION": "", "AWS_DEFAULT_REGION": "", "AWS_CONFIG_FILE": "no-aws-config"},
            ["aws.region"],
            id="no-region",
        ),
    ],
)
def test_invalid_configuration_exits_2_with_one_line(
    daemons: Any, files: dict[str, str], args: list[str], env: dict[str, str], names: list[str]
) -> None:
    for name, text in files.items():
        write(daemons, text, name)
    result = daemons.run_cli(*args, env=env, timeout_s=30)
    assert_one_line_error(result, *names)


def test_debug_log_level_shows_the_traceback(daemons: Any) -> None:
    path = write(daemons, STANDALONE)
    result = daemons.run_cli(
        "run",
        "--config",
        str(path),
        "--handler",
        "no_such_module_xq:handle",
        "--log-level",
        "debug",
    )
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert "no_such_module_xq" in result.stderr


# --- queues (a dry run against the moto server) ------------------------------------------


def test_queues_lists_matched_and_skipped_with_reasons(daemons: Any, sqs: Any) -> None:
    create_queues(sqs, ["work-a"])  # with its dead-letter queue work-a-dlq
    create_queues(sqs, ["other-b", "work-skip"], dead_letter=False)
    path = write(
        daemons,
        '[discovery]\nqueue_pattern = "work-"\nexclude_pattern = "skip$"\n',  # no ^: lists all
    )
    result = daemons.run_cli("queues", "--config", str(path), env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "│" in line}
    assert "yes" in rows["work-a"]
    assert "dead-letter queue of another" in rows["work-a-dlq"]
    assert "does not match queue_pattern" in rows["other-b"]
    assert "matches exclude_pattern" in rows["work-skip"]
    assert "1 consumed, 3 skipped" in result.stdout


# --- run: a handler that does not resolve fails before receiving anything ----------------


def test_run_with_unimportable_handler_exits_2_before_receiving(daemons: Any, sqs: Any) -> None:
    url = create_queues(sqs, ["work-a"], dead_letter=False)["work-a"]
    send_messages(sqs, url, ['{"n": 1}'])
    write(daemons, "import no_such_dependency_xq\n", "tasks.py")
    path = write(daemons, STANDALONE)
    result = daemons.run_cli(
        "run", "--config", str(path), "--handler", "tasks:handle", timeout_s=30
    )
    line = assert_one_line_error(result, "tasks:handle", "no_such_dependency_xq")
    assert "not found (is it on PYTHONPATH?)" not in line  # the module exists; its import failed
    assert queue_depth(sqs, url) == (1, 0)
    received = sqs.receive_message(QueueUrl=url, AttributeNames=["ApproximateReceiveCount"])
    assert received["Messages"][0]["Attributes"]["ApproximateReceiveCount"] == "1"


def test_run_with_its_port_taken_exits_2_before_receiving(daemons: Any, sqs: Any) -> None:
    """A second instance on one host: the bind fails before any message is received."""
    url = create_queues(sqs, ["work-a"], dead_letter=False)["work-a"]
    send_messages(sqs, url, ['{"n": 1}'])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write(daemons, STANDALONE.replace("http_port = 0", f"http_port = {port}"))
        result = daemons.run_cli(
            "run", "--config", str(path), "--handler", "handlers:record", timeout_s=30
        )
    line = assert_one_line_error(result, "observability.http_port", f"127.0.0.1:{port}")
    assert "http_port = 0" in line and "own port" in line  # says how to run a second one
    assert not list(daemons.tmp_path.glob("events.jsonl*")), "the handler ran"
    assert queue_depth(sqs, url) == (1, 0)
    received = sqs.receive_message(QueueUrl=url, AttributeNames=["ApproximateReceiveCount"])
    assert received["Messages"][0]["Attributes"]["ApproximateReceiveCount"] == "1"
