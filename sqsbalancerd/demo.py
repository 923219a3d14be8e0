"""`sqsbalancerd demo`: a small cluster on the embedded emulator, watched live.

Starts moto on 127.0.0.1, creates queues, runs several `sqsbalancerd run` processes with
fast timings, feeds messages, kills one instance midway to show the takeover, then stops
the rest with SIGTERM and prints a summary. Needs only `pip install "sqsbalancerd[local]"`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from sqsbalancerd.clock import SystemClock
from sqsbalancerd.config import child_environment
from sqsbalancerd.coordination.table import CoordinationTable
from sqsbalancerd.local import LocalEmulator, create_queues, emulator_env, free_port

TABLE = "sqsbalancerd-demo"
FAST_TIMINGS = {"heartbeat_interval": 1, "heartbeat_timeout": 4, "rebalance_delay": 1}


@dataclass
class DemoInstance:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    killed_at: float | None = None

    def succeeded(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1) as r:
                text = r.read().decode()
        except OSError:
            return -1
        total = 0.0
        for line in text.splitlines():
            if line.startswith("sqsbalancerd_messages_total{") and 'outcome="succeeded"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return int(total)


@dataclass
class DemoState:
    sent: int = 0
    owners: dict[str, str | None] = field(default_factory=dict)
    takeover_s: float | None = None
    handled_by_killed: int = 0


def _config(queue_prefix: str, endpoint: str) -> str:
    coordination = "\n".join(f"{k} = {v}" for k, v in FAST_TIMINGS.items())
    return f"""
handler = "sqsbalancerd.demo_handler:handle"
[aws]
region = "us-east-1"
endpoint_url = "{endpoint}"
[coordination]
table_name = "{TABLE}"
{coordination}
[discovery]
queue_pattern = "^{queue_prefix}"
interval = 2
[sqs]
wait_time_seconds = 1
visibility_timeout = 10
[shutdown]
timeout = 10
[observability]
log_format = "json"
log_level = "warning"
"""


class Demo:
    def __init__(self, *, instances: int, queues: int, duration_s: float, console: Console) -> None:
        self._count = instances
        self._queue_count = queues
        self._duration_s = duration_s
        self._console = console
        self._state = DemoState()
        self._instances: list[DemoInstance] = []
        self._stop_feeding = threading.Event()

    def run(self) -> int:
        self._console.print(
            "[bold]sqsbalancerd demo[/]: fast timings for show (heartbeat 1 s, timeout 4 s, "
            "rebalance delay 1 s); production defaults are 10 s / 30 s / 30 s."
        )
        with LocalEmulator(port=0) as emulator, tempfile.TemporaryDirectory() as tmp:
            sqs = emulator.sqs()
            names = [f"demo-{i:02d}" for i in range(1, self._queue_count + 1)]
            urls = create_queues(sqs, names)
            config = Path(tmp) / "demo.toml"
            config.write_text(_config("demo-", emulator.endpoint_url))
            env = child_environment(emulator_env(emulator.endpoint_url))
            self._start_instances(config, env, Path(tmp))
            feeder = threading.Thread(target=self._feed, args=(sqs, urls), daemon=True)
            feeder.start()
            code = self._watch(emulator, urls)
            feeder.join(timeout=5)
        return code

    def _start_instances(self, config: Path, env: dict[str, str], tmp: Path) -> None:
        for index in range(1, self._count + 1):
            name, port = f"demo-instance-{index}", free_port()
            command = [
                sys.executable,
                "-m",
                "sqsbalancerd",
                "run",
                "--config",
                str(config),
                "--instance-id",
                name,
            ]
            child_env = {**env, "SQSBALANCERD_OBSERVABILITY__HTTP_PORT": str(port)}
            log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the tmp dir
            proc = subprocess.Popen(command, env=child_env, stdout=log, stderr=subprocess.STDOUT)
            self._instances.append(DemoInstance(name, port, proc))

    def _feed(self, sqs: object, urls: dict[str, str]) -> None:
        n = 0
        while not self._stop_feeding.wait(0.5):
            for url in urls.values():
                entries = [
                    {"Id": str(i), "MessageBody": json.dumps({"n": n + i, "work_s": 0.02})}
                    for i in range(5)
                ]
                sqs.send_message_batch(QueueUrl=url, Entries=entries)  # type: ignore[attr-defined]
                n += 5
                self._state.sent += 5

    def _watch(self, emulator: LocalEmulator, urls: dict[str, str]) -> int:
        started = time.monotonic()
        kill_at = started + self._duration_s / 2
        dynamodb = emulator.dynamodb()
        with Live(console=self._console, refresh_per_second=2) as live:
            while time.monotonic() - started < self._duration_s:
                self._refresh_owners(dynamodb)
                if kill_at and time.monotonic() >= kill_at:
                    self._kill_one()
                    kill_at = 0.0
                self._note_takeover()
                live.update(self._view(time.monotonic() - started))
                time.sleep(0.5)
            self._stop_feeding.set()
            is_empty = self._drain_queues(emulator, urls, live, started)
        return self._finish(is_empty)

    def _refresh_owners(self, dynamodb: object) -> None:
        if not self._table_exists(dynamodb):
            self._state.owners = {}
            return
        reader = CoordinationTable(
            dynamodb,  # type: ignore[arg-type]
            table_name=TABLE,
            application="sqsbalancer",
            clock=SystemClock(),
        )
        self._state.owners = {q: row.owner for q, row in reader.ownership().items()}

    @staticmethod
    def _table_exists(dynamodb: object) -> bool:
        tables = dynamodb.list_tables()["TableNames"]  # type: ignore[attr-defined]
        return TABLE in tables

    def _kill_one(self) -> None:
        # The busiest instance, so there is something to take over.
        victim = max(
            self._instances,
            key=lambda i: sum(1 for o in self._state.owners.values() if o == i.name),
        )
        victim.proc.kill()
        victim.killed_at = time.monotonic()
        self._console.log(f"[red]killed {victim.name}[/] (SIGKILL): watch the others take over")

    def _note_takeover(self) -> None:
        killed = [i for i in self._instances if i.killed_at is not None]
        if not killed or self._state.takeover_s is not None:
            return
        victim = killed[0].name
        owners = self._state.owners
        if (
            owners
            and len(owners) == self._queue_count
            and victim not in owners.values()
            and None not in owners.values()
        ):
            self._state.takeover_s = time.monotonic() - (killed[0].killed_at or 0.0)

    def _view(self, elapsed_s: float) -> Group:
        table = Table(
            title=f"sqsbalancerd demo — {elapsed_s:.0f}/{self._duration_s:.0f} s, "
            f"{self._state.sent} messages sent"
        )
        for column in ("instance", "state", "queues owned", "messages handled"):
            table.add_column(column)
        for instance in self._instances:
            owned = sorted(q for q, o in self._state.owners.items() if o == instance.name)
            state = (
                "killed"
                if instance.killed_at
                else (
                    "running"
                    if instance.proc.poll() is None
                    else f"exited {instance.proc.returncode}"
                )
            )
            handled = instance.succeeded() if instance.killed_at is None else "-"
            table.add_row(
                instance.name,
                state,
                f"{len(owned)}: {' '.join(q[-2:] for q in owned)}",
                str(handled),
            )
        lines: list[Table | str] = [table]
        if self._state.takeover_s is not None:
            lines.append(f"takeover after SIGKILL: {self._state.takeover_s:.1f} s")
        return Group(*lines)

    def _drain_queues(
        self, emulator: LocalEmulator, urls: dict[str, str], live: Live, started: float
    ) -> bool:
        sqs = emulator.sqs()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            left = sum(
                int(
                    sqs.get_queue_attributes(
                        QueueUrl=url,
                        AttributeNames=[
                            "ApproximateNumberOfMessages",
                            "ApproximateNumberOfMessagesNotVisible",
                        ],
                    )["Attributes"][key]
                )
                for url in urls.values()
                for key in ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible")
            )
            live.update(self._view(time.monotonic() - started))
            if left == 0:
                return True
            time.sleep(0.5)
        return False

    def _finish(self, is_empty: bool) -> int:
        handled = sum(max(0, i.succeeded()) for i in self._instances if i.killed_at is None)
        survivors = [i for i in self._instances if i.killed_at is None]
        for instance in survivors:
            instance.proc.terminate()
        codes = [instance.proc.wait(timeout=30) for instance in survivors]
        self._console.print()
        self._console.print(
            f"[bold]summary[/]: sent {self._state.sent}, handled by survivors {handled} "
            f"(the rest by the killed instance before it died), instances exited {codes}, "
            f"queues {'empty: nothing lost' if is_empty else 'NOT empty'}"
            + (f", takeover {self._state.takeover_s:.1f} s" if self._state.takeover_s else "")
        )
        return 0 if is_empty and all(code == 0 for code in codes) else 1
