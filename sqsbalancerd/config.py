"""Configuration: frozen pydantic-settings models loaded from flags > env > TOML > defaults.

The only module that reads os.environ. Every failure becomes a ConfigError whose message
names the key and where its value came from, so the CLI can print one readable line.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from sqsbalancerd.errors import ConfigError

ENV_PREFIX = "SQSBALANCERD_"
CONFIG_FILE_ENV = "SQSBALANCERD_CONFIG"

PositiveSeconds = Annotated[float, Field(gt=0)]
Seconds = Annotated[float, Field(ge=0)]
# A loop period: below this a loop would spin against AWS.
MIN_LOOP_S = 0.1
LoopSeconds = Annotated[float, Field(ge=MIN_LOOP_S)]


def _off_or_loop(value: float) -> float:
    if 0 < value < MIN_LOOP_S:
        raise ValueError(f"must be 0 (off) or at least {MIN_LOOP_S}")
    return value


class _Section(BaseModel):
    # inf would pass `gt=0` and later overflow Event.wait(); nan would slip past comparisons.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _check_regex(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression ({exc})") from None
    return value


class AwsSettings(_Section):
    # "" (an empty SQSBALANCERD_AWS__REGION) would reach boto3 and fail there as an endpoint.
    region: str | None = Field(default=None, min_length=1)
    endpoint_url: str | None = None


class CoordinationSettings(_Section):
    mode: Literal["dynamodb", "standalone"] = "dynamodb"
    table_name: str = Field(default="sqsbalancer-coordination", min_length=3, max_length=255)
    create_table: bool = True
    heartbeat_interval: LoopSeconds = 10.0
    heartbeat_timeout: PositiveSeconds = 30.0
    rebalance_delay: Seconds = 30.0
    virtual_nodes: int = Field(default=150, ge=1, le=10_000)
    load_factor: float = Field(default=1.10, ge=1.0, le=10.0)
    fence_margin: PositiveSeconds | None = None
    # "load": place queues by measured handler time and share hot ones (README "How
    # balancing works"); "count": by queue count only. Every instance should run the same.
    balance: Literal["load", "count"] = "load"
    # Length of a planning epoch: load summaries are measured and published once per epoch.
    load_interval: LoopSeconds = 60.0
    # A queue moved for balance stays put at least this long (no flapping on noise).
    load_min_dwell: Seconds = 300.0
    # Most owners one hot queue may have (each with a row of its own); 1: never shared.
    max_replicas: int = Field(default=128, ge=1, le=1_000)

    @model_validator(mode="after")
    def _check_timings(self) -> CoordinationSettings:
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must be greater than heartbeat_interval")
        margin = self.effective_fence_margin
        window = self.heartbeat_timeout - self.heartbeat_interval
        if margin >= window:
            # Name the default too: a user who never set fence_margin must see where it came from.
            given = "" if self.fence_margin is not None else ", its default: heartbeat_interval"
            raise ValueError(
                f"fence_margin ({margin:g}{given}) must be less than "
                f"heartbeat_timeout - heartbeat_interval ({window:g})"
            )
        return self

    @property
    def effective_fence_margin(self) -> float:
        return self.fence_margin if self.fence_margin is not None else self.heartbeat_interval


class DiscoverySettings(_Section):
    queue_pattern: str | None = None
    exclude_pattern: str | None = None
    queues: tuple[str, ...] = ()
    interval: LoopSeconds = 300.0
    include_dead_letter_queues: bool = False
    # GetQueueAttributes in flight at once; the discovery client's connection pool matches.
    attribute_concurrency: int = Field(default=16, ge=1, le=64)
    # A cached queue's attributes are read again at least this often, spread over refreshes.
    attribute_max_age: LoopSeconds = 3600.0

    @field_validator("queue_pattern", "exclude_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        return _check_regex(value)


class SqsSettings(_Section):
    visibility_timeout: int | None = Field(default=None, ge=1, le=43_200)
    wait_time_seconds: int = Field(default=20, ge=0, le=20)
    max_messages: int = Field(default=10, ge=1, le=10)
    message_attribute_names: tuple[str, ...] = ("All",)
    max_extension: PositiveSeconds = Field(default=3600.0, le=43_200)
    # Receive, batch delete and batch visibility change without botocore's per-call work
    # (dataplane.py); errors still go through boto3.
    lean_requests: bool = True
    # Seconds within which a message sent to an idle queue is picked up (plus the poll
    # itself); its long polls are spaced to match (engine/idle.py). 0: poll continuously.
    idle_latency: Seconds = Field(default=0.0, le=43_200)


class WorkersSettings(_Section):
    pool_size: int = Field(default=10, ge=1, le=1_000)
    queue_size: int = Field(default=100, ge=0, le=100_000)
    # Seconds a handler call may take (None: no limit). See README "Time limits".
    handler_timeout: PositiveSeconds | None = None
    # Bytes of received messages (bodies and attribute values) held at once, roughly.
    max_held_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024, le=1024**4)


class ShutdownSettings(_Section):
    timeout: Seconds = 30.0


class RetrySettings(_Section):
    backoff: Literal["exponential", "none"] = "exponential"
    base: Seconds = 5.0
    max: Annotated[float, Field(ge=0, le=43_200)] = 900.0

    def delay_s(self, receive_count: int) -> float | None:
        """Seconds until a failed message is visible again; None leaves it to its timeout."""
        if self.backoff == "none":
            return None
        exponent = min(max(receive_count - 1, 0), 30)
        return float(min(self.max, self.base * 2**exponent))


class ObservabilitySettings(_Section):
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "console", "json"] = "auto"
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=9400, ge=0, le=65_535)
    backlog_interval: Annotated[float, Field(ge=0), AfterValidator(_off_or_loop)] = 0.0
    otel: bool = False

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class QueueOverride(_Section):
    match: str
    handler: str | None = None
    max_concurrency: int | None = Field(default=None, ge=1)
    max_rate: PositiveSeconds | None = None
    visibility_timeout: int | None = Field(default=None, ge=1, le=43_200)
    max_messages: int | None = Field(default=None, ge=1, le=10)
    wait_time_seconds: int | None = Field(default=None, ge=0, le=20)
    handler_timeout: PositiveSeconds | None = None
    idle_latency: Seconds | None = Field(default=None, le=43_200)
    retry: RetrySettings | None = None

    @field_validator("match")
    @classmethod
    def _compiles(cls, value: str) -> str:
        _check_regex(value)
        return value


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


_toml_path: ContextVar[Path | None] = ContextVar("_toml_path", default=None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
    )

    application_name: str = Field(default="sqsbalancer", min_length=1, max_length=200)
    instance_id: str = Field(default_factory=default_instance_id, min_length=1, max_length=200)
    handler: str | None = None
    on_startup: str | None = None
    on_shutdown: str | None = None
    aws: AwsSettings = AwsSettings()
    coordination: CoordinationSettings = CoordinationSettings()
    discovery: DiscoverySettings = DiscoverySettings()
    sqs: SqsSettings = SqsSettings()
    workers: WorkersSettings = WorkersSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    retry: RetrySettings = RetrySettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    queue: tuple[QueueOverride, ...] = ()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _toml_path.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    def check_discovery(self) -> None:
        """Commands that consume or list queues need something to discover."""
        if not self.discovery.queue_pattern and not self.discovery.queues:
            raise ConfigError("discovery: set queue_pattern or queues (nothing to consume)")

    def override_for(self, queue_name: str) -> QueueOverride | None:
        """The first [[queue]] entry whose `match` finds the queue name."""
        for override in self.queue:
            if re.search(override.match, queue_name):
                return override
        return None


def load_settings(
    path: str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    resolve_region: bool = True,
    require_discovery: bool = True,
) -> Settings:
    """Load, merge and validate; raise ConfigError with one readable line on any problem.

    `overrides` are CLI flags as a nested dict ({"discovery": {"queue_pattern": "^x"}}).
    `require_discovery=False` is for commands that never look at queues (init-table, health).
    """
    env = os.environ if environ is None else environ
    file_path = _config_path(path, env)
    _reject_unknown_env(env)
    token = _toml_path.set(file_path)
    try:
        settings = Settings(**dict(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, file_path, overrides or {}, env)) from None
    except SettingsError as exc:  # only the environment source raises these
        raise ConfigError(_describe_env_error(exc, env)) from None
    except (OSError, ValueError) as exc:  # TOML syntax errors are ValueErrors
        raise ConfigError(f"cannot read config file {file_path}: {exc}") from None
    finally:
        _toml_path.reset(token)
    if require_discovery:
        settings.check_discovery()
    if resolve_region and settings.aws.region is None:
        settings = settings.model_copy(update={"aws": _with_region(settings.aws, env)})
    return settings


def _config_path(path: str | Path | None, env: Mapping[str, str]) -> Path | None:
    raw = path if path is not None else env.get(CONFIG_FILE_ENV)
    if not raw:
        return None
    file_path = Path(raw)
    if not file_path.is_file():
        raise ConfigError(f"config file not found: {file_path}")
    return file_path


def _with_region(aws: AwsSettings, env: Mapping[str, str]) -> AwsSettings:
    import boto3.session
    from botocore.exceptions import BotoCoreError

    try:
        region: str | None = boto3.session.Session().region_name
    except BotoCoreError as exc:  # e.g. AWS_PROFILE names a profile that does not exist
        raise ConfigError(f"aws.region: cannot read the AWS configuration: {exc}") from None
    # botocore reads AWS_DEFAULT_REGION and the profile, not AWS_REGION (which the message,
    # and the other AWS SDKs, promise).
    region = region or env.get("AWS_REGION")
    if not region:
        raise ConfigError(
            "aws.region: no AWS region set (set [aws] region, SQSBALANCERD_AWS__REGION "
            "or AWS_REGION/AWS_DEFAULT_REGION)"
        )
    return aws.model_copy(update={"region": region})


def _reject_unknown_env(env: Mapping[str, str]) -> None:
    """pydantic-settings ignores unknown SQSBALANCERD_ variables; a typo must not pass silently."""
    for name in env:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper == CONFIG_FILE_ENV:
            continue
        parts = upper[len(ENV_PREFIX) :].lower().split("__")
        if not _is_known_path(Settings, parts):
            raise ConfigError(f"unknown setting in environment variable {name}")


def _is_known_path(model: type[BaseModel], parts: list[str]) -> bool:
    field = model.model_fields.get(parts[0])
    if field is None:
        return False
    if len(parts) == 1:
        return True
    annotation = field.annotation
    return (
        isinstance(annotation, type)
        and issubclass(annotation, BaseModel)
        and _is_known_path(annotation, parts[1:])
    )


def _describe(
    exc: ValidationError,
    file_path: Path | None,
    overrides: Mapping[str, Any],
    env: Mapping[str, str],
) -> str:
    """One line: the first problem, its key and where the value came from."""
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"])
    message = " ".join(error["msg"].removeprefix("Value error, ").split())
    if error["type"] == "extra_forbidden":
        message = "unknown setting"
    source = _source_of(key, file_path, overrides, env)
    value = error.get("input")
    shown = f" (got {value!r})" if _is_scalar(value) and error["type"] != "extra_forbidden" else ""
    # Whole-config checks have no location; their message starts with the section's name.
    label = f"{key}: " if key else ""
    return f"{label}{message}{shown} [{source}]"


def _describe_env_error(exc: SettingsError, env: Mapping[str, str]) -> str:
    """pydantic-settings could not decode a variable (lists and tables are JSON there)."""
    match = re.search(r'field "(\w+)"', str(exc))
    field = match.group(1) if match else ""
    stem = ENV_PREFIX + field.upper()
    names = sorted(n for n in env if n.upper() == stem or n.upper().startswith(stem + "__"))
    cause = " ".join(str(exc.__cause__ or exc).split())
    return (
        f"{field or 'config'}: cannot parse environment {', '.join(names) or stem} "
        f"(lists and tables are written as JSON there): {cause}"
    )


def _is_scalar(value: object) -> bool:
    return isinstance(value, str | int | float | bool) and len(repr(value)) <= 80


def _source_of(
    key: str, file_path: Path | None, overrides: Mapping[str, Any], env: Mapping[str, str]
) -> str:
    parts = key.split(".") if key else []
    node: Any = overrides
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            break
        node = node[part]
    else:
        if parts:
            return "command-line flag"
    names = {name.upper() for name in env}
    for end in range(len(parts), 0, -1):  # the key itself, or a section given as JSON
        env_name = ENV_PREFIX + "__".join(parts[:end]).upper()
        if env_name in names:
            return f"environment {env_name}"
    stem = ENV_PREFIX + "__".join(parts).upper() + "__"
    if parts and any(name.startswith(stem) for name in names):
        return f"environment {stem}*"  # a section-wide check over values set in variables
    return f"file {file_path}" if file_path else "defaults"


def effective_toml(settings: Settings) -> str:
    """The validated configuration as TOML (for `sqsbalancerd config`)."""
    import tomli_w

    data = settings.model_dump(mode="json", exclude_none=True)
    return tomli_w.dumps(data)


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment plus `extra`, minus our own settings (for demo children)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    env.update(extra)
    return env
