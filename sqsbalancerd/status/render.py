"""Render discovery's result and a status report as rich tables."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table

from sqsbalancerd.discovery import DiscoveryResult
from sqsbalancerd.status.report import UNCLAIMED_NAMED, QueueView, StatusReport


def render_discovery(result: DiscoveryResult, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"Queues: {len(result.matched)} consumed, {len(result.skipped)} skipped")
    table.add_column("queue")
    table.add_column("consumed")
    table.add_column("type / reason")
    table.add_column("visibility s", justify="right")
    table.add_column("redrive")
    for info in result.matched:
        table.add_row(
            info.name,
            "yes",
            "fifo" if info.is_fifo else "standard",
            str(info.visibility_timeout_s),
            "yes" if info.has_redrive_policy else "no",
        )
    for skipped in result.skipped:
        table.add_row(skipped.name, "no", skipped.reason, "", "")
    console.print(table)


def render_status(
    report: StatusReport, console: Console | None = None, *, is_detailed: bool = False
) -> None:
    console = console or Console()
    instances = Table(title=f"{report.application}: instances (table {report.table})")
    columns = ["instance", "host", "status", "alive", "heartbeat age s", "queues", "busy"]
    columns += ["idling", "SQS req/h", "started"]
    for column in columns:
        instances.add_column(column)
    for i in report.instances:
        started = datetime.fromtimestamp(i.started_at, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
        instances.add_row(
            i.instance_id,
            i.host,
            i.status,
            "[green]yes[/]" if i.alive else "[red]no[/]",
            f"{i.heartbeat_age_seconds:.1f}",
            str(len(i.queues)),
            "" if i.utilisation is None else f"{i.utilisation:.0%}",
            "" if i.idling_queues is None else str(i.idling_queues),
            "" if i.sqs_requests_per_hour is None else f"{i.sqs_requests_per_hour:,.0f}",
            started,
        )
    console.print(instances)
    console.print(_queue_table(report.queues, is_detailed=is_detailed))
    if report.dead_letter:
        shown = ", ".join(report.dead_letter[:UNCLAIMED_NAMED])
        more = " ..." if len(report.dead_letter) > UNCLAIMED_NAMED else ""
        console.print(f"{len(report.dead_letter)} dead-letter queues, never claimed: {shown}{more}")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


def _queue_table(views: tuple[QueueView, ...], *, is_detailed: bool) -> Table:
    table = Table(title="queues")
    table.add_column("queue")
    table.add_column("owner")
    table.add_column("load", justify="right")
    if is_detailed:
        for column in ("messages", "in flight"):
            table.add_column(column, justify="right")
        table.add_column("redrive")
    for q in views:
        load = "" if q.load is None else f"{q.load:.2f}"
        cells = [q.queue, q.owner or "[red]none[/]", load]
        if is_detailed:
            cells += [_cell(q.messages), _cell(q.messages_in_flight), _yes_no(q.has_redrive_policy)]
        table.add_row(*cells)
    return table


def _cell(value: int | None) -> str:
    return "" if value is None else str(value)


def _yes_no(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "no")
