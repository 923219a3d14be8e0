"""The command line: parse options, set up logging, call the application; map errors to exits.

Exit codes (every command): 0 success; 1 runtime failure (AWS unreachable, lost table,
handlers abandoned at the shutdown deadline; "not all owned"/"not ready" for status/health);
2 usage or configuration error. Only this module calls sys.exit.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from sqsbalancerd import __version__
from sqsbalancerd.config import Settings, effective_toml, load_settings
from sqsbalancerd.errors import (
    ConfigError,
    DuplicateInstanceError,
    HandlerImportError,
    IncompatibleProtocolError,
    QueueNotFoundError,
    SqsBalancerError,
    TableMissingError,
)

if TYPE_CHECKING:
    from sqsbalancerd.aws import AwsOptions
    from sqsbalancerd.status import QueueSource, StatusReader

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2

_USAGE_ERRORS = (
    ConfigError,
    HandlerImportError,
    QueueNotFoundError,
    TableMissingError,
    DuplicateInstanceError,
    IncompatibleProtocolError,
)

logger = logging.getLogger("sqsbalancerd.cli")

app = typer.Typer(
    name="sqsbalancerd",
    help="Balance many SQS queues across several instances and run your handler on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help: typer's rich panels label every flag `<bool>` (typer 0.29).
    rich_markup_mode=None,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        metavar="FILE",
        help="TOML config file (or SQSBALANCERD_CONFIG).",
        show_default=False,
    ),
]
LogLevelOption = Annotated[
    str | None,
    typer.Option(
        "--log-level", metavar="LEVEL", help="debug, info, warning or error.", show_default=False
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sqsbalancerd {__version__}")
        raise typer.Exit(EXIT_OK)


@dataclass
class _Global:
    is_debug: bool = False


_global = _Global()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """sqsbalancerd: many SQS queues, several workers, nobody hand-assigns who consumes what."""
    _global.is_debug = debug


def fail(message: str, code: int) -> NoReturn:
    typer.secho(f"sqsbalancerd: error: {message}", err=True, fg="red")
    sys.exit(code)


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, _USAGE_ERRORS):
        return EXIT_USAGE
    return EXIT_RUNTIME


@contextmanager
def reported_errors(*, debug: Callable[[], bool]) -> Iterator[None]:
    """Turn our errors (and AWS ones) into one line and an exit code; tracebacks on debug."""

    def is_debug() -> bool:
        return _global.is_debug or debug()

    try:
        yield
    except SqsBalancerError as exc:
        if is_debug():
            logger.exception("failed")
        fail(str(exc), exit_code_for(exc))
    except Exception as exc:
        from sqsbalancerd.aws import describe_error

        if debug():
            logger.exception("failed")
        fail(
            f"unexpected {describe_error(exc)} (rerun with --log-level debug for details)",
            EXIT_RUNTIME,
        )


def _overrides(**flags: Any) -> dict[str, Any]:
    """CLI flags as the nested dict pydantic-settings takes as its top source."""
    nested: dict[str, Any] = {}
    for dotted, value in flags.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _load(
    config: Path | None,
    *,
    resolve_region: bool = True,
    require_discovery: bool = True,
    flags: dict[str, str | None] | None = None,
) -> Settings:
    overrides = _overrides(**(flags or {}))
    return load_settings(
        config,
        overrides=overrides,
        resolve_region=resolve_region,
        require_discovery=require_discovery,
    )


def _setup_logging(settings: Settings | None, level: str | None) -> None:
    from sqsbalancerd.observability.logging import configure_logging

    configure_logging(
        level=level or (settings.observability.log_level if settings else "info"),
        log_format=settings.observability.log_format if settings else "auto",
        instance_id=settings.instance_id if settings else None,
    )


@app.command()
def run(
    handler: Annotated[
        str | None,
        typer.Option(
            "--handler", metavar="MODULE:FUNCTION", help="MODULE:FUNCTION to call per message."
        ),
    ] = None,
    config: ConfigOption = None,
    queue_pattern: Annotated[
        str | None,
        typer.Option("--queue-pattern", metavar="REGEX", help="Regex for queue names to consume."),
    ] = None,
    instance_id: Annotated[
        str | None, typer.Option("--instance-id", metavar="ID", help="This instance's unique id.")
    ] = None,
    log_level: LogLevelOption = None,
) -> None:
    """Consume the matching queues through your handler until SIGTERM/SIGINT."""
    is_debug = (log_level or "").lower() == "debug"
    with reported_errors(debug=lambda: is_debug):
        settings = _load(
            config,
            flags={
                "handler": handler,
                "instance_id": instance_id,
                "discovery.queue_pattern": queue_pattern,
                "observability.log_level": log_level,
            },
        )
        _setup_logging(settings, settings.observability.log_level)
        is_debug = settings.observability.log_level == "debug"
        from sqsbalancerd.app import build_application

        application = build_application(settings)
        runtime = application.runtime
        assert runtime is not None
        report = runtime.run()
    _log_summary(report)
    sys.exit(report.exit_code)


def _log_summary(report: Any) -> None:
    counts = dict(report.counts)
    counts.update(
        released_at_stop=report.released,
        abandoned=report.abandoned,
        forced=report.is_forced,
        exit_code=report.exit_code,
    )
    if report.failure:
        counts["failure"] = report.failure
    message = "stopped" if report.exit_code == 0 else "stopped with work abandoned or failed"
    logging.getLogger("sqsbalancerd").info(message, extra=counts)
    if report.failure:
        typer.secho(f"sqsbalancerd: error: {report.failure}", err=True, fg="red")


@app.command("config")
def show_config(config: ConfigOption = None) -> None:
    """Print the effective configuration as TOML, after validation."""
    with reported_errors(debug=lambda: False):
        settings = _load(config)
        typer.echo(effective_toml(settings), nl=False)


@app.command()
def queues(
    config: ConfigOption = None,
    queue_pattern: Annotated[
        str | None, typer.Option("--queue-pattern", metavar="REGEX", help="Regex for queue names.")
    ] = None,
) -> None:
    """List the queues discovery matches and those it skips, and why (a dry run)."""
    with reported_errors(debug=lambda: False):
        settings = _load(config, flags={"discovery.queue_pattern": queue_pattern})
        from sqsbalancerd.app import discovery_options
        from sqsbalancerd.aws import sqs_client
        from sqsbalancerd.discovery import Discovery
        from sqsbalancerd.status import render_discovery

        sqs = sqs_client(discovery_options(settings))
        result = Discovery(sqs, settings.discovery).discover(strict=False)
        render_discovery(result)


@app.command()
def local(
    port: Annotated[
        int, typer.Option(metavar="PORT", help="Port on 127.0.0.1 (0 picks a free one).")
    ] = 4566,
    queues_count: Annotated[
        int, typer.Option("--queues", metavar="N", help="Demo queues to create.")
    ] = 3,
    messages: Annotated[
        int, typer.Option(metavar="N", help="Messages to put on each demo queue.")
    ] = 20,
    prefix: Annotated[
        str, typer.Option(metavar="TEXT", help="Name prefix of the demo queues.")
    ] = "demo-",
) -> None:
    """Start the embedded emulator on 127.0.0.1 and print the environment for `run`."""
    with reported_errors(debug=lambda: False):
        from sqsbalancerd.local import LocalEmulator, create_queues, emulator_env, send_messages

        emulator = LocalEmulator(port=port).start()
        sqs = emulator.sqs()
        names = [f"{prefix}{i}" for i in range(1, queues_count + 1)]
        for name, url in create_queues(sqs, names).items():
            send_messages(sqs, url, (f'{{"n": {n}, "queue": "{name}"}}' for n in range(messages)))
        typer.echo(f"# emulator on {emulator.endpoint_url}; queues: {', '.join(names)}")
        typer.echo("# paste into another shell, then run sqsbalancerd there:")
        for key, value in emulator_env(emulator.endpoint_url).items():
            typer.echo(f"export {key}={value}")
        typer.echo("export SQSBALANCERD_COORDINATION__MODE=standalone")
        typer.echo(f"export SQSBALANCERD_DISCOVERY__QUEUE_PATTERN='^{prefix}'")
        typer.echo("# Ctrl+C stops the emulator.")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            emulator.stop()


@app.command()
def demo(
    instances: Annotated[
        int, typer.Option(min=1, max=10, metavar="N", help="Instances to run.")
    ] = 3,
    queues_count: Annotated[
        int, typer.Option("--queues", min=1, max=200, metavar="N", help="Demo queues.")
    ] = 12,
    duration: Annotated[
        float, typer.Option(min=10, metavar="SECONDS", help="Seconds to run.")
    ] = 60,
) -> None:
    """Try it with no AWS: a cluster on the embedded emulator, a takeover, a summary."""
    with reported_errors(debug=lambda: False):
        from rich.console import Console

        from sqsbalancerd.demo import Demo

        code = Demo(
            instances=instances, queues=queues_count, duration_s=duration, console=Console()
        ).run()
    sys.exit(code)


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until Ctrl+C.")] = False,
    details: Annotated[
        bool,
        typer.Option("--details", help="Read each queue's depth and redrive policy (1 call each)."),
    ] = False,
) -> None:
    """Show instances, their health and queue ownership from the coordination table."""
    with reported_errors(debug=lambda: False):
        settings = _load(config)
        from sqsbalancerd.status import read_report, render_status

        reader, source = _status_parts(settings, is_detailed=details, is_watching=watch)
        if watch:
            _watch_status(reader, source, settings.coordination.heartbeat_interval)
            return
        report = read_report(reader, source, reader.read_once(threading.Event().wait))
        if as_json:
            typer.echo(report.to_json())
        else:
            render_status(report, is_detailed=details)
    sys.exit(EXIT_OK if report.is_all_owned else EXIT_RUNTIME)


def _status_parts(
    settings: Settings, *, is_detailed: bool, is_watching: bool
) -> tuple[StatusReader, QueueSource]:
    from sqsbalancerd.app import discovery_options, dynamodb_options
    from sqsbalancerd.aws import dynamodb_client, sqs_client
    from sqsbalancerd.clock import SystemClock
    from sqsbalancerd.coordination.table import CoordinationTable
    from sqsbalancerd.discovery import Discovery
    from sqsbalancerd.status import QueueSource, StatusReader

    clock = SystemClock()
    # status holds no lease: the daemons' table timeouts, kept inside the fence margin (0.5 s
    # at a 2 s heartbeat), and discovery's few attempts would only make it fail where the
    # endpoint is slow; an operator's command may wait instead.
    table = CoordinationTable(
        dynamodb_client(_patient(dynamodb_options(settings))),
        table_name=settings.coordination.table_name,
        application=settings.application_name,
        clock=clock,
    )
    table.ensure(create=False, region=settings.aws.region or "")
    every_s = settings.coordination.heartbeat_interval
    # --watch --details shows live depth: every refresh reads every queue's attributes again.
    discovery_settings = settings.discovery.model_copy(
        update={"interval": every_s, "attribute_max_age": every_s} if is_watching else {}
    )
    sqs = sqs_client(_patient(discovery_options(settings)))
    discovery = Discovery(sqs, discovery_settings, clock=clock)
    reader = StatusReader(
        table,
        clock=clock,
        heartbeat_interval_s=every_s,
        heartbeat_timeout_s=settings.coordination.heartbeat_timeout,
        load_factor=settings.coordination.load_factor,
    )
    # The daemons list queues every discovery.interval: --watch re-lists no more often.
    source = QueueSource(
        discovery, clock=clock, relist_s=settings.discovery.interval, is_detailed=is_detailed
    )
    return reader, source


def _patient(options: AwsOptions) -> AwsOptions:
    return replace(options, connect_timeout_s=10.0, read_timeout_s=20.0, max_attempts=5)


def _watch_status(reader: StatusReader, source: QueueSource, interval_s: float) -> None:
    from rich.console import Console, Group
    from rich.live import Live

    from sqsbalancerd.status import StatusReport, render_status, watch

    console = Console()
    with Live(console=console, refresh_per_second=2) as live:

        def show(report: StatusReport) -> None:
            capture = Console(record=True, width=console.width)
            with capture.capture():
                render_status(report, capture, is_detailed=source.is_detailed)
            live.update(Group(*capture.export_text().splitlines()))

        try:
            watch(reader, source, every_s=interval_s, show=show, wait=threading.Event().wait)
        except KeyboardInterrupt:
            return


@app.command("init-table")
def init_table(
    config: ConfigOption = None,
    print_template: Annotated[
        bool, typer.Option("--print", help="Print a CloudFormation template instead.")
    ] = False,
) -> None:
    """Create the coordination table (or print it as CloudFormation for your infra code)."""
    with reported_errors(debug=lambda: False):
        settings = _load(config, resolve_region=not print_template, require_discovery=False)
        from sqsbalancerd.coordination.table import cloudformation_template

        if print_template:
            typer.echo(cloudformation_template(settings.coordination.table_name))
            return
        from sqsbalancerd.app import dynamodb_options
        from sqsbalancerd.aws import dynamodb_client
        from sqsbalancerd.clock import SystemClock
        from sqsbalancerd.coordination.table import CoordinationTable

        table = CoordinationTable(
            dynamodb_client(dynamodb_options(settings)),
            table_name=settings.coordination.table_name,
            application=settings.application_name,
            clock=SystemClock(),
        )
        table.ensure(create=True, region=settings.aws.region or "")
        typer.echo(f"table {settings.coordination.table_name} is ACTIVE in {settings.aws.region}")


@app.command("iam-policy")
def iam_policy(
    config: ConfigOption = None,
    account_id: Annotated[
        str, typer.Option("--account-id", metavar="ID", help="AWS account id in the ARNs.")
    ] = "${AWS_ACCOUNT_ID}",
    region: Annotated[
        str | None,
        typer.Option("--region", metavar="REGION", help="Region in the ARNs [aws.region]."),
    ] = None,
) -> None:
    """Print the least-privilege IAM policy (JSON) that `run` needs with this configuration."""
    with reported_errors(debug=lambda: False):
        settings = _load(config, resolve_region=False)
        from sqsbalancerd.iam_policy import REGION_PLACEHOLDER, build_policy

        policy = build_policy(
            settings,
            region=region or settings.aws.region or REGION_PLACEHOLDER,
            account_id=account_id,
        )
        for warning in policy.warnings:
            typer.secho(f"sqsbalancerd: warning: {warning}", err=True, fg="yellow")
        typer.echo(policy.to_json(), nl=False)


@app.command()
def health(config: ConfigOption = None) -> None:
    """Exit 0 if the daemon this config describes is ready (its /readyz), else 1."""
    with reported_errors(debug=lambda: False):
        settings = _load(config, resolve_region=False, require_discovery=False)
        observability = settings.observability
        if not observability.http_port:
            fail("observability.http_port is 0 (HTTP off): health has nothing to ask", EXIT_USAGE)
        host = (
            "127.0.0.1" if observability.http_host in ("0.0.0.0", "") else observability.http_host
        )
        url = f"http://{host}:{observability.http_port}/readyz"
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                typer.echo(response.read().decode().strip())
        except urllib.error.HTTPError as exc:
            typer.echo(exc.read().decode().strip())
            sys.exit(EXIT_RUNTIME)
        except OSError as exc:
            typer.echo(f"not ready: {url} unreachable ({exc})", err=True)
            sys.exit(EXIT_RUNTIME)


def main() -> None:
    app()
