"""Render what discovery and the coordination table say, for people (rich) and scripts (JSON)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from sqsbalancerd.discovery import DiscoveryResult


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
