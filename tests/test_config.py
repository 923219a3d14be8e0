"""Configuration: precedence, unknown keys, validation, region, retry delays, the example file."""

from __future__ import annotations

import json
import os
import re
import tempfile
import tomllib
import typing
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import tomli_w
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from typer.testing import CliRunner

from sqsbalancerd.cli import app
from sqsbalancerd.config import (
    CoordinationSettings,
    QueueOverride,
    RetrySettings,
    Settings,
    effective_toml,
    load_settings,
)
from sqsbalancerd.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "config.example.toml"
# The example sets this one key away from its default (None), so that it validates as shipped.
EXAMPLE_SET = ("discovery", "queue_pattern")
MINIMAL = '[discovery]\nqueue_pattern = "^work-"\n'


@pytest.fixture
def write(tmp_path: Path) -> Any:
    def write(text: str, name: str = "config.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def config_error(*args: Any, **kwargs: Any) -> str:
    """The ConfigError message load_settings raises; always a single line."""
    with pytest.raises(ConfigError) as info:
        load_settings(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


# --- sources and precedence --------------------------------------------------------------


def test_defaults_apply_when_nothing_else_is_set() -> None:
    loaded = load_settings(overrides={"discovery": {"queue_pattern": "^work-"}})
    assert loaded.application_name == "sqsbalancer"
    assert loaded.coordination.mode == "dynamodb"
    assert loaded.workers.pool_size == 10
    assert loaded.sqs.visibility_timeout is None
    assert loaded.aws.region == "us-east-1"  # from the AWS chain (the test environment)
    assert loaded.instance_id  # hostname-pid-random


def test_precedence_is_flags_then_env_then_file_then_defaults(
    write: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        '[discovery]\nqueue_pattern = "^file-"\n'
        "[workers]\npool_size = 3\nqueue_size = 7\n"
        "[shutdown]\ntimeout = 12.5\n"
    )
    monkeypatch.setenv("SQSBALANCERD_DISCOVERY__QUEUE_PATTERN", "^env-")
    monkeypatch.setenv("SQSBALANCERD_WORKERS__POOL_SIZE", "20")
    loaded = load_settings(path, overrides={"discovery": {"queue_pattern": "^flag-"}})
    assert loaded.discovery.queue_pattern == "^flag-"  # flag beats env and file
    assert loaded.workers.pool_size == 20  # env beats file
    assert loaded.workers.queue_size == 7  # file beats default; one section merges sources
    assert loaded.shutdown.timeout == 12.5
    assert loaded.retry.base == 5.0  # default


def test_nested_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQSBALANCERD_WORKERS__POOL_SIZE", "20")
    monkeypatch.setenv("SQSBALANCERD_DISCOVERY__QUEUES", '["a", "b"]')
    monkeypatch.setenv("SQSBALANCERD_COORDINATION__MODE", "standalone")
    loaded = load_settings()
    assert loaded.workers.pool_size == 20
    assert loaded.discovery.queues == ("a", "b")
    assert loaded.coordination.mode == "standalone"


def test_queue_overrides_from_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQSBALANCERD_QUEUE", '[{"match": "^a", "max_concurrency": 2}]')
    loaded = load_settings(overrides={"discovery": {"queue_pattern": "x"}})
    assert loaded.queue == (QueueOverride(match="^a", max_concurrency=2),)


def test_config_file_from_environment_and_flag_wins(
    write: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_env = write(MINIMAL + "[workers]\npool_size = 4\n", "env.toml")
    from_flag = write(MINIMAL + "[workers]\npool_size = 5\n", "flag.toml")
    monkeypatch.setenv("SQSBALANCERD_CONFIG", str(from_env))
    assert load_settings().workers.pool_size == 4
    assert load_settings(from_flag).workers.pool_size == 5


def test_settings_are_frozen() -> None:
    loaded = load_settings(overrides={"discovery": {"queue_pattern": "x"}})
    with pytest.raises(ValueError, match="frozen"):
        loaded.workers.pool_size = 3  # type: ignore[misc]


# --- unknown keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colour = 1\n" + MINIMAL, "colour"),
        (MINIMAL + "[workers]\npool_siz = 3\n", "workers.pool_siz"),
        (MINIMAL + "[workerz]\npool_size = 3\n", "workerz"),
        (MINIMAL + '[[queue]]\nmatch = "x"\nbogus = 1\n', "queue.0.bogus"),
        (
            MINIMAL + '[[queue]]\nmatch = "x"\n[queue.retry]\nbase = 1\nbasis = 2\n',
            "queue.0.retry.basis",
        ),
    ],
)
def test_unknown_key_in_file_is_rejected(write: Any, text: str, key: str) -> None:
    path = write(text)
    message = config_error(path)
    assert message.startswith(f"{key}: unknown setting")
    assert str(path) in message


@pytest.mark.parametrize(
    "name",
    [
        "SQSBALANCERD_WORKERS__POOL_SIZ",
        "SQSBALANCERD_COLOUR",
        "SQSBALANCERD_AWS__REGION__EXTRA",
        "SQSBALANCERD_QUEUE__0__MATCH",
        "SQSBALANCERD_",
        "sqsbalancerd_workerz",
    ],
)
def test_unknown_environment_variable_is_rejected(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "3")
    message = config_error(overrides={"discovery": {"queue_pattern": "x"}})
    assert name in message


def test_config_file_variable_is_not_an_unknown_setting(
    write: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SQSBALANCERD_CONFIG", str(write(MINIMAL)))
    assert load_settings().discovery.queue_pattern == "^work-"


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "bad", "good"),
    [
        ("sqs", "visibility_timeout", [0, 43_201], [1, 43_200]),
        ("sqs", "wait_time_seconds", [-1, 21], [0, 20]),
        ("sqs", "max_messages", [0, 11], [1, 10]),
        ("sqs", "max_extension", [0, 43_201], [0.5, 43_200]),
        ("workers", "pool_size", [0], [1]),
        ("workers", "queue_size", [-1], [0]),
        ("shutdown", "timeout", [-1], [0, 0.25]),
        ("retry", "max", [-1, 43_201], [0, 43_200]),
        ("retry", "base", [-0.5], [0]),
        ("coordination", "virtual_nodes", [0], [1]),
        ("coordination", "load_factor", [0.99], [1.0]),
        ("observability", "http_port", [-1, 65_536], [0, 65_535]),
    ],
)
def test_value_ranges(
    write: Any, section: str, key: str, bad: list[float], good: list[float]
) -> None:
    for value in good:
        loaded = load_settings(write(f"{MINIMAL}[{section}]\n{key} = {value}\n"))
        assert getattr(getattr(loaded, section), key) == value
    for value in bad:
        path = write(f"{MINIMAL}[{section}]\n{key} = {value}\n")
        message = config_error(path)
        assert message.startswith(f"{section}.{key}: ")
        assert f"[file {path}]" in message


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
@pytest.mark.parametrize(
    "key", ["coordination.heartbeat_interval", "shutdown.timeout", "discovery.interval"]
)
def test_durations_reject_infinity_and_nan(write: Any, key: str, value: str) -> None:
    section, name = key.split(".")
    text = f"[{section}]\n{name} = {value}\n"
    text = text + 'queue_pattern = "x"\n' if section == "discovery" else MINIMAL + text
    assert config_error(write(text)).startswith(f"{key}: ")


def test_durations_accept_floats(write: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQSBALANCERD_SHUTDOWN__TIMEOUT", "2.5")
    path = write(
        MINIMAL.replace("\n", "\ninterval = 0.25\n", 1)
        + "[coordination]\nheartbeat_interval = 1.5\nheartbeat_timeout = 4.5\n"
        "rebalance_delay = 0.5\nfence_margin = 0.75\n"
        "[retry]\nbase = 0.5\nmax = 1.5\n[sqs]\nmax_extension = 90.5\n"
    )
    loaded = load_settings(path)
    assert loaded.discovery.interval == 0.25
    assert loaded.coordination.heartbeat_interval == 1.5
    assert loaded.coordination.heartbeat_timeout == 4.5
    assert loaded.coordination.effective_fence_margin == 0.75
    assert loaded.shutdown.timeout == 2.5
    assert loaded.retry.delay_s(2) == 1.0
    assert loaded.sqs.max_extension == 90.5


def test_whole_seconds_keys_reject_fractions(write: Any) -> None:
    message = config_error(write(MINIMAL + "[sqs]\nwait_time_seconds = 1.5\n"))
    assert message.startswith("sqs.wait_time_seconds: ")


@pytest.mark.parametrize(("interval", "timeout"), [(10, 10), (10, 5)])
def test_heartbeat_timeout_must_exceed_interval(interval: float, timeout: float) -> None:
    with pytest.raises(ValueError, match="heartbeat_timeout must be greater"):
        CoordinationSettings(heartbeat_interval=interval, heartbeat_timeout=timeout)


def test_heartbeat_timeout_error_names_the_section_and_its_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SQSBALANCERD_COORDINATION__HEARTBEAT_TIMEOUT", "5")
    message = config_error(overrides={"discovery": {"queue_pattern": "x"}})
    assert message.startswith("coordination: heartbeat_timeout must be greater")
    assert "environment SQSBALANCERD_COORDINATION__" in message


def test_fence_margin_defaults_to_heartbeat_interval() -> None:
    coordination = CoordinationSettings(heartbeat_interval=4, heartbeat_timeout=20)
    assert coordination.fence_margin is None
    assert coordination.effective_fence_margin == 4
    assert CoordinationSettings().effective_fence_margin == 10


def test_fence_margin_must_be_less_than_timeout_minus_interval() -> None:
    assert CoordinationSettings(
        heartbeat_interval=10, heartbeat_timeout=30, fence_margin=19.9
    ).effective_fence_margin == pytest.approx(19.9)
    with pytest.raises(ValueError, match=r"fence_margin \(20\) must be less than .* \(20\)"):
        CoordinationSettings(heartbeat_interval=10, heartbeat_timeout=30, fence_margin=20)
    # The default margin (= interval) applies the same rule: timeout must then exceed 2x interval.
    with pytest.raises(ValueError, match=r"fence_margin \(10, its default: heartbeat_interval\)"):
        CoordinationSettings(heartbeat_interval=10, heartbeat_timeout=20)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[discovery]\nqueue_pattern = "("\n', "discovery.queue_pattern"),
        (MINIMAL.replace("\n", '\nexclude_pattern = "[a-"\n', 1), "discovery.exclude_pattern"),
        (MINIMAL + '[[queue]]\nmatch = "^ok"\n[[queue]]\nmatch = "*x"\n', "queue.1.match"),
    ],
)
def test_bad_regex_is_rejected_naming_the_key(write: Any, text: str, key: str) -> None:
    message = config_error(write(text))
    assert message.startswith(f"{key}: not a valid regular expression")


def test_bad_regex_flag_names_the_flag_as_source() -> None:
    message = config_error(overrides={"discovery": {"queue_pattern": "("}})
    assert message.startswith("discovery.queue_pattern: not a valid regular expression")
    assert message.endswith("[command-line flag]")


def test_queue_override_needs_a_match(write: Any) -> None:
    message = config_error(write(MINIMAL + "[[queue]]\nmax_concurrency = 2\n"))
    assert message.startswith("queue.0.match: ")


def test_neither_pattern_nor_queues_is_an_error(write: Any) -> None:
    message = config_error(write("[workers]\npool_size = 2\n"))
    assert "queue_pattern or queues" in message
    message = config_error()
    assert "queue_pattern or queues" in message


def test_queues_alone_are_enough(write: Any) -> None:
    loaded = load_settings(write('[discovery]\nqueues = ["orders", "https://x/1/q"]\n'))
    assert loaded.discovery.queue_pattern is None
    assert loaded.discovery.queues == ("orders", "https://x/1/q")


@pytest.mark.parametrize(
    ("given_level", "level"),
    [
        ("debug", "debug"),
        ("info", "info"),
        ("warning", "warning"),
        ("error", "error"),
        ("DEBUG", "debug"),
        ("Warning", "warning"),
    ],
)
def test_log_level_values(given_level: str, level: str) -> None:
    loaded = load_settings(
        overrides={"discovery": {"queue_pattern": "x"}, "observability": {"log_level": given_level}}
    )
    assert loaded.observability.log_level == level


@pytest.mark.parametrize("given_level", ["verbose", "warn", "", "10"])
def test_log_level_rejects_other_values(monkeypatch: pytest.MonkeyPatch, given_level: str) -> None:
    monkeypatch.setenv("SQSBALANCERD_OBSERVABILITY__LOG_LEVEL", given_level)
    message = config_error(overrides={"discovery": {"queue_pattern": "x"}})
    assert message.startswith("observability.log_level: ")
    assert "[environment SQSBALANCERD_OBSERVABILITY__LOG_LEVEL]" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("coordination.mode", "cluster"),
        ("retry.backoff", "linear"),
        ("observability.log_format", "xml"),
    ],
)
def test_choices_are_checked(key: str, value: str) -> None:
    section, name = key.split(".")
    overrides = {"discovery": {"queue_pattern": "x"}, section: {name: value}}
    assert config_error(overrides=overrides).startswith(f"{key}: ")


def test_bad_value_in_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQSBALANCERD_WORKERS__POOL_SIZE", "many")
    message = config_error(overrides={"discovery": {"queue_pattern": "x"}})
    assert message.startswith("workers.pool_size: ")
    assert "'many'" in message
    assert message.endswith("[environment SQSBALANCERD_WORKERS__POOL_SIZE]")


def test_undecodable_list_in_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SQSBALANCERD_DISCOVERY__QUEUES", "a,b")
    message = config_error()
    assert "SQSBALANCERD_DISCOVERY__QUEUES" in message
    assert "config file" not in message


def test_missing_file_and_toml_syntax_error_name_the_file(write: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert config_error(missing) == f"config file not found: {missing}"
    broken = write("[discovery\nqueue_pattern = 1\n")
    message = config_error(broken)
    assert str(broken) in message
    assert "line 1" in message


# --- region ------------------------------------------------------------------------------


@pytest.fixture
def no_aws_region(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


PATTERN = {"discovery": {"queue_pattern": "x"}}


@pytest.mark.usefixtures("no_aws_region")
def test_no_region_anywhere_is_a_config_error_naming_aws_region() -> None:
    assert config_error(overrides=PATTERN).startswith("aws.region: ")
    assert load_settings(overrides=PATTERN, resolve_region=False).aws.region is None


@pytest.mark.usefixtures("no_aws_region")
def test_region_from_file_env_or_aws_chain(write: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(write(MINIMAL + '[aws]\nregion = "eu-west-1"\n')).aws.region == "eu-west-1"
    monkeypatch.setenv("SQSBALANCERD_AWS__REGION", "eu-west-2")
    assert load_settings(overrides=PATTERN).aws.region == "eu-west-2"
    monkeypatch.delenv("SQSBALANCERD_AWS__REGION")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    assert load_settings(overrides=PATTERN).aws.region == "eu-west-3"
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "eu-north-1")
    assert load_settings(overrides=PATTERN).aws.region == "eu-north-1"


def test_empty_region_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQSBALANCERD_AWS__REGION", "")
    message = config_error(overrides=PATTERN)
    assert message.startswith("aws.region: ")
    assert message.endswith("[environment SQSBALANCERD_AWS__REGION]")


@pytest.mark.usefixtures("no_aws_region")
def test_unknown_aws_profile_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    message = config_error(overrides=PATTERN)
    assert message.startswith("aws.region: ")
    assert "no-such-profile" in message


# --- retry delays and overrides ----------------------------------------------------------


def test_retry_delay_is_exponential_and_capped() -> None:
    retry = RetrySettings()
    assert [retry.delay_s(n) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert retry.delay_s(9) == 900  # 5 * 2**8 = 1280, capped
    assert retry.delay_s(10**6) == 900  # no overflow
    assert RetrySettings(base=0.5, max=3).delay_s(3) == 2
    assert RetrySettings(base=0).delay_s(5) == 0
    for receive_count in range(1, 20):
        assert retry.delay_s(receive_count) == min(900, 5 * 2 ** (receive_count - 1))


def test_retry_none_leaves_it_to_the_visibility_timeout() -> None:
    assert RetrySettings(backoff="none").delay_s(1) is None
    assert RetrySettings(backoff="none").delay_s(7) is None


def test_override_for_first_match_wins(write: Any) -> None:
    path = write(
        MINIMAL + '[[queue]]\nmatch = "^orders-priority"\nmax_concurrency = 1\n'
        '[[queue]]\nmatch = "orders"\nmax_concurrency = 2\n[queue.retry]\nbackoff = "none"\n'
    )
    loaded = load_settings(path)
    first = loaded.override_for("orders-priority-eu")
    assert first is not None and first.max_concurrency == 1
    second = loaded.override_for("eu-orders")  # `match` is searched, not anchored
    assert second is not None and second.max_concurrency == 2
    assert second.retry == RetrySettings(backoff="none")
    assert loaded.override_for("billing") is None


# --- `sqsbalancerd config` output --------------------------------------------------------


def test_effective_toml_round_trips(write: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQSBALANCERD_WORKERS__POOL_SIZE", "20")
    path = write(
        'instance_id = "i-1"\n' + MINIMAL + "[coordination]\nfence_margin = 2.5\n"
        '[[queue]]\nmatch = "^a"\nhandler = "m:f"\nmax_rate = 2.5\n[queue.retry]\nbase = 1\n'
    )
    loaded = load_settings(path)
    text = effective_toml(loaded)
    document = tomllib.loads(text)
    assert document["workers"]["pool_size"] == 20
    assert document["queue"][0]["retry"]["base"] == 1.0
    again = load_settings(write(text, "again.toml"))
    assert again == loaded
    assert effective_toml(again) == text


# --- config.example.toml matches the models ----------------------------------------------

_KEY_LINE = re.compile(r"^(?:# )?([a-z_]+) = (.+)$")
_SECTION_LINE = re.compile(r"^(?:# )?\[\[?([a-z_.]+)\]\]?$")


def _example_keys(text: str) -> dict[str, dict[str, str]]:
    """section ("" for the top) -> key -> raw value, for set and commented-out keys alike."""
    sections: dict[str, dict[str, str]] = {"": {}}
    current = ""
    for line in text.splitlines():
        if section := _SECTION_LINE.match(line):
            current = section.group(1)
            assert current not in sections, f"section [{current}] appears twice"
            sections[current] = {}
        elif key := _KEY_LINE.match(line):
            assert key.group(1) not in sections[current], f"{current}.{key.group(1)} twice"
            sections[current][key.group(1)] = key.group(2)
    return sections


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        if (model := _model_in(argument)) is not None:
            return model
    return None


def _model_sections(model: type[BaseModel], prefix: str = "") -> dict[str, set[str]]:
    """section -> scalar keys, walking nested models (Settings.queue -> [[queue]] -> retry)."""
    sections: dict[str, set[str]] = {prefix: set()}
    for name, field in model.model_fields.items():
        nested = _model_in(field.annotation)
        if nested is None:
            sections[prefix].add(name)
        else:
            sections.update(_model_sections(nested, f"{prefix}.{name}".lstrip(".")))
    return sections


def test_example_lists_every_key_of_every_model() -> None:
    found = {section: set(keys) for section, keys in _example_keys(EXAMPLE.read_text()).items()}
    expected = _model_sections(Settings)
    assert set(expected) >= {"", "aws", "coordination", "queue", "queue.retry", "observability"}
    assert found == expected


def test_example_set_values_are_the_model_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    document = tomllib.loads(EXAMPLE.read_text())  # commented-out keys are not in it
    assert "queue" not in document
    for section, keys in _model_sections(Settings).items():
        if section.startswith("queue"):
            continue
        model: type[BaseModel] = Settings
        for part in filter(None, section.split(".")):
            model = _model_in(model.model_fields[part].annotation)  # type: ignore[assignment]
        table = document
        for part in filter(None, section.split(".")):
            table = table[part]
        for key in keys:
            field = model.model_fields[key]
            if (section, key) == EXAMPLE_SET:
                continue
            if key not in table:
                assert field.is_required() or field.default is None or field.default_factory, (
                    f"{section}.{key} has a default ({field.default!r}) but is commented out"
                )
                continue
            value = table[key]
            default = field.default
            assert type(value) is type(default) or isinstance(default, tuple | float), key
            assert (tuple(value) if isinstance(default, tuple) else value) == default, (
                f"{section}.{key}: example says {value!r}, the model default is {default!r}"
            )
    # And the file loads to exactly the defaults, with its example pattern.
    loaded = load_settings(EXAMPLE, resolve_region=False)
    assert loaded.discovery.queue_pattern == "^orders-"
    monkeypatch.setenv("SQSBALANCERD_DISCOVERY__QUEUE_PATTERN", "^orders-")
    defaults = load_settings(resolve_region=False)
    assert loaded.model_dump(exclude={"instance_id"}) == defaults.model_dump(
        exclude={"instance_id"}
    )


def test_example_validates_as_shipped() -> None:
    """A user copies the example first: `sqsbalancerd config` must accept it unchanged."""
    result = CliRunner().invoke(
        app, ["config", "--config", str(EXAMPLE)], env={"AWS_DEFAULT_REGION": "us-east-1"}
    )
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.output)["discovery"]["queue_pattern"] == "^orders-"


def _uncommented_example() -> dict[str, Any]:
    """The example with every commented-out key and table uncommented."""
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        if _KEY_LINE.match(line) or _SECTION_LINE.match(line):
            line = line.removeprefix("# ")
        lines.append(line)
    return tomllib.loads("\n".join(lines))


def test_example_commented_values_are_valid() -> None:
    """Uncommenting every key (and the [[queue]] table) still gives a valid configuration."""
    loaded = Settings.model_validate(_uncommented_example())
    assert loaded.queue[0].retry is not None
    assert loaded.discovery.queue_pattern is not None
    assert loaded.coordination.fence_margin is not None


# --- fuzzing: any document, any variable -> Settings or one-line ConfigError -------------
# A document of valid values (each key's default or the example's), then up to three
# mutations (anything at all, at a real key, a whole section, or an unknown key), so most
# examples get deep into validation instead of stopping at the first key.

_EXAMPLE_VALUES = _uncommented_example()
_SECTIONS: dict[str, type[BaseModel]] = {
    name: model
    for name, field in Settings.model_fields.items()
    if name != "queue" and (model := _model_in(field.annotation)) is not None
}
_TOP_KEYS = [name for name in Settings.model_fields if name not in _SECTIONS and name != "queue"]

_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),  # nan and inf included
    st.text(max_size=12),
    st.sampled_from(["(", "[a-", "DEBUG", "none", "json", "m:f", 0, 1, 20, 43_201, 0.5, -1]),
    st.datetimes(),
)
_anything = st.one_of(
    _scalars,
    st.lists(_scalars, max_size=3),
    st.dictionaries(st.sampled_from(["match", "base", "x"]), _scalars, max_size=2),
)
_unknown_keys = st.from_regex(r"[a-z_]{1,8}", fullmatch=True)


def _good(model: type[BaseModel], key: str, example: dict[str, Any]) -> st.SearchStrategy[Any]:
    default = model.model_fields[key].default
    values = [list(default) if isinstance(default, tuple) else default]
    values = [v for v in values if isinstance(v, str | int | float | bool | list)]
    values += [example[key]] if key in example else []
    return st.sampled_from(values) if values else _anything


def _table(model: type[BaseModel], example: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    scalar_keys = [k for k, f in model.model_fields.items() if _model_in(f.annotation) is None]
    return st.fixed_dictionaries(
        {}, optional={key: _good(model, key, example) for key in scalar_keys}
    )


_queue_example = _EXAMPLE_VALUES["queue"][0]
_queue_entry = st.builds(
    lambda table, retry: {**table, **({} if retry is None else {"retry": retry})},
    _table(QueueOverride, _queue_example).map(lambda t: {"match": _queue_example["match"], **t}),
    st.none() | _table(RetrySettings, _queue_example["retry"]),
)
_valid_documents = st.builds(
    lambda top, sections, queues: {
        **top,
        **sections,
        "discovery": {"queue_pattern": "^work-", **sections.get("discovery", {})},
        "queue": queues,
    },
    _table(Settings, _EXAMPLE_VALUES),
    st.fixed_dictionaries(
        {},
        optional={name: _table(model, _EXAMPLE_VALUES[name]) for name, model in _SECTIONS.items()},
    ),
    st.lists(_queue_entry, max_size=2),
)
_paths = st.one_of(
    st.sampled_from(
        [(key,) for key in [*_TOP_KEYS, *_SECTIONS, "queue"]]
        + [(name, key) for name, model in _SECTIONS.items() for key in model.model_fields]
        + [("queue", 0, key) for key in QueueOverride.model_fields]
        + [("queue", 0, "retry", key) for key in RetrySettings.model_fields]
    ),
    st.tuples(st.sampled_from(["", *_SECTIONS]), _unknown_keys).map(
        lambda t: tuple(filter(None, t))
    ),
)


def _mutate(document: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = document
    for part in path[:-1]:
        if isinstance(part, int):
            if not isinstance(node, list) or not node:
                return  # nothing there to mutate
            node = node[part]
            continue
        if not isinstance(node.get(part), dict | list):
            node[part] = {}
        node = node[part]
    if isinstance(node, dict):
        node[path[-1]] = value


def _as_env(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        return json.dumps(value, default=str)
    return str(value)


_env_junk = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=16),
    st.sampled_from(['["a"]', '{"match": "x"}', "{bad", "1e999", "nan", "(", "a,b", ""]),
)
_env_names = [f"SQSBALANCERD_{key.upper()}" for key in Settings.model_fields] + [
    f"SQSBALANCERD_{name.upper()}__{key.upper()}"
    for name, model in _SECTIONS.items()
    for key in model.model_fields
]
_environments = st.builds(
    lambda valid, junk: {**valid, **junk},
    st.fixed_dictionaries(
        {},
        optional={
            f"SQSBALANCERD_{name.upper()}__{key.upper()}": _good(
                model, key, _EXAMPLE_VALUES[name]
            ).map(_as_env)
            for name, model in _SECTIONS.items()
            for key in model.model_fields
        },
    ),
    st.dictionaries(
        st.sampled_from(_env_names) | _unknown_keys.map(lambda k: f"SQSBALANCERD_{k}"),
        _env_junk,
        max_size=1,
    ),
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    document=_valid_documents,
    mutations=st.lists(st.tuples(_paths, _anything), max_size=3),
    environment=st.just({}) | _environments,
    pattern_flag=st.sampled_from([None, "^work-", "^work-", "(", ""]),
)
def test_fuzz_load_settings_returns_settings_or_one_line_config_error(
    document: dict[str, Any],
    mutations: list[tuple[tuple[Any, ...], Any]],
    environment: dict[str, str],
    pattern_flag: str | None,
) -> None:
    for path, value in mutations:
        _mutate(document, path, value)
    overrides = {} if pattern_flag is None else {"discovery": {"queue_pattern": pattern_flag}}
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("SQSBALANCERD_")}
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.toml"
        path.write_text(tomli_w.dumps(document))
        with mock.patch.dict(os.environ, {**clean, **environment}, clear=True):
            try:
                loaded = load_settings(path, overrides=overrides)
            except ConfigError as exc:
                message = str(exc)
                assert message and "\n" not in message and "\r" not in message
                event(f"ConfigError: {message.split(' ')[0]}")
            else:
                event("loaded")
                assert isinstance(loaded, Settings)
                assert loaded.aws.region
                assert tomllib.loads(effective_toml(loaded))  # `sqsbalancerd config` prints it
