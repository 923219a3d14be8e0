"""Helpers shared by the tests: bounded waits, a fake clock, recorded handler events."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sqsbalancerd.clock import SystemClock
from sqsbalancerd.coordination.ring import rebalance
from sqsbalancerd.coordination.table import CoordinationTable, OwnershipRecord, TableGone


def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout_s: float = 10.0,
    every_s: float = 0.02,
    what: str = "condition",
) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, start_s: float = 1000.0, wall_s: float = 1_700_000_000.0) -> None:
        self.now_s = start_s
        self.wall_offset_s = wall_s - start_s

    def monotonic(self) -> float:
        return self.now_s

    def wall(self) -> float:
        return self.now_s + self.wall_offset_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def ownership_rows(
    dynamodb: Any, table: str, *, application: str = "sqsbalancer"
) -> dict[str, OwnershipRecord]:
    """Every ownership row, read as the daemon reads them ({} before the table exists)."""
    reader = CoordinationTable(
        dynamodb, table_name=table, application=application, clock=SystemClock()
    )
    try:
        return reader.ownership()
    except TableGone:
        return {}


def read_events(path: Path) -> list[dict[str, Any]]:
    """JSON lines written by tests/handlers.py (one file per process, appended atomically)."""
    events: list[dict[str, Any]] = []
    for file in sorted(path.parent.glob(path.name + "*")) if path.parent.exists() else []:
        # A line without its newline is still being written by the handler's process.
        for line in file.read_text().split("\n")[:-1]:
            if line.strip():
                events.append(json.loads(line))
    return sorted(events, key=lambda e: e["t"])


def queue_depth(sqs: Any, url: str) -> tuple[int, int]:
    attributes = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return (
        int(attributes["ApproximateNumberOfMessages"]),
        int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    )


# -- fault suite helpers (tests/faults) ---------------------------------------------------


class Feeder:
    """Sends `total` messages spread evenly over `urls` from a background thread, keeping each
    queue shallow (topped up to `depth` visible messages: moto's receive slows with depth).
    `limit` (default: all) caps how many it has sent until `allow` raises it, so that a test
    can keep sending spread over the steps it takes, however fast the consumers are.

    `sent` maps every SQS message id it sent to its queue name.
    """

    def __init__(
        self,
        endpoint: str,
        urls: dict[str, str],
        *,
        total: int,
        depth: int = 100,
        body: Callable[[int], str] = lambda n: json.dumps({"n": n}),
        limit: int | None = None,
    ) -> None:
        import threading

        import boto3

        self._sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
        self._urls = urls
        self._depth = depth
        self._body = body
        share, extra = divmod(total, len(urls))
        self._todo = {q: share + (i < extra) for i, q in enumerate(sorted(urls))}
        self.total = total
        self._limit = total if limit is None else limit
        self.sent: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-feeder", daemon=True)

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def allow(self, limit: int) -> None:
        """Raise the cap on messages sent (at most `total`)."""
        with self._lock:
            self._limit = max(self._limit, min(limit, self.total))

    def sent_ids(self) -> dict[str, str]:
        """Every id sent so far; raises if the feeder failed (the count would be short)."""
        self.check()
        with self._lock:
            return dict(self.sent)

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the feeder failed: {self.error!r}") from self.error

    def is_finished(self) -> bool:
        """Everything sent, or failed: wait on this, then `sent_ids()` says which."""
        return self.done.is_set() or self.error is not None

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and any(self._todo.values()):
                for queue in sorted(q for q, n in self._todo.items() if n):
                    self._top_up(queue)
                self._stop.wait(0.1)
            self.done.set()
        except BaseException as exc:  # surfaced by the test through .error
            self.error = exc

    def _top_up(self, queue: str) -> None:
        url = self._urls[queue]
        visible = int(
            self._sqs.get_queue_attributes(
                QueueUrl=url,
                AttributeNames=["ApproximateNumberOfMessages"],
            )["Attributes"]["ApproximateNumberOfMessages"]
        )
        want = min(self._todo[queue], self._depth - visible)
        while want > 0 and not self._stop.is_set():
            with self._lock:
                first = len(self.sent)
                count = min(10, want, self._limit - first)
            if count <= 0:
                return
            entries = [{"Id": str(i), "MessageBody": self._body(first + i)} for i in range(count)]
            response = self._sqs.send_message_batch(QueueUrl=url, Entries=entries)
            assert not response.get("Failed"), response.get("Failed")
            with self._lock:
                for entry in response["Successful"]:
                    self.sent[entry["MessageId"]] = queue
            self._todo[queue] -= count
            want -= count


def handling_intervals(
    events: list[dict[str, Any]], killed_at: dict[int, float]
) -> dict[str, list[tuple[float, float, int]]]:
    """queue -> [(start, end, pid)] from recorded start/end events; a handler cut short by
    SIGKILL (start without end in a killed pid) ends at its kill time."""
    open_starts: dict[tuple[int, str, int], dict[str, Any]] = {}
    by_queue: dict[str, list[tuple[float, float, int]]] = {}
    for event in events:
        key = (event["pid"], event["id"], event["receive_count"])
        if event["event"] == "start":
            open_starts[key] = event
        elif event["event"] == "end" and key in open_starts:
            start = open_starts.pop(key)
            by_queue.setdefault(event["queue"], []).append((start["t"], event["t"], event["pid"]))
    for (pid, _, _), start in open_starts.items():
        assert pid in killed_at, f"handler never ended in a process not killed ({pid}): {start}"
        by_queue.setdefault(start["queue"], []).append((start["t"], killed_at[pid], pid))
    return by_queue


def concurrent_handlings(
    events: list[dict[str, Any]], killed_at: dict[int, float]
) -> tuple[int, list[str]]:
    """(intervals checked, violations): per queue, intervals of different processes must not
    overlap."""
    checked, violations = 0, []
    for queue, intervals in handling_intervals(events, killed_at).items():
        latest_end: dict[int, float] = {}
        for start, end, pid in sorted(intervals):
            for other, other_end in latest_end.items():
                if other != pid and other_end > start:
                    violations.append(
                        f"{queue}: pid {pid} started at {start:.3f} while pid "
                        f"{other} was handling until {other_end:.3f}"
                    )
            latest_end[pid] = max(end, latest_end.get(pid, end))
            checked += 1
    return checked, violations


# Message ids or queue URLs: any collection of strings (a dict's keys count).
Ids = set[str] | list[str] | tuple[str, ...] | dict[str, str]


class Tally:
    """Per message id: what was sent, handled (an "ok" end event), left in SQS, lost."""

    def __init__(self, sent: Ids, events: list[dict[str, Any]], *, left: Ids = ()) -> None:
        from collections import Counter

        sent_ids, left_ids = set(sent), set(left)
        ok = Counter(e["id"] for e in events if e["event"] == "end" and e.get("outcome") == "ok")
        self.sent = len(sent_ids)
        self.handled = len(sent_ids & set(ok))
        self.left = len(left_ids & sent_ids)  # never handled, still in SQS: counted, not lost
        self.lost = sent_ids - set(ok) - left_ids
        self.duplicated = {i: n - 1 for i, n in ok.items() if n > 1}  # handlings beyond one
        self.unknown = set(ok) - sent_ids  # handled but never sent by this test

    def figures(self) -> str:
        return (
            f"sent={self.sent} handled={self.handled} left_in_sqs={self.left} "
            f"lost={len(self.lost)} duplicated={sum(self.duplicated.values())}"
        )


def json_log(text: str) -> list[dict[str, Any]]:
    """The daemon's JSON log lines (log_format = "json"), each given `t` (epoch seconds)."""
    from datetime import datetime

    lines = []
    for raw in text.splitlines():
        if raw.startswith("{"):
            line = json.loads(raw)
            line["t"] = datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp()
            lines.append(line)
    return lines


def drain_queues(sqs: Any, urls: Ids, *, timeout_s: float = 30.0) -> set[str]:
    """Receive (and hide for 10 min) all that is left in `urls`, waiting for messages in
    flight to come back; returns their ids. For counting what a test left behind."""
    ids: set[str] = set()
    url_list = list(urls)

    def round_done() -> bool:
        hidden = 0
        for url in url_list:
            while got := sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=600
            ).get("Messages", []):
                ids.update(m["MessageId"] for m in got)
            hidden += queue_depth(sqs, url)[1]
        return hidden == len(ids)  # nothing in flight but what we hold

    wait_until(round_done, timeout_s=timeout_s, every_s=0.5, what="in-flight messages back")
    return ids


def is_fixed_point(
    owners: Mapping[str, str | None],
    queues: Iterable[str],
    members: Iterable[str],
    *,
    virtual_nodes: int = 150,
    load_factor: float = 1.10,
) -> bool:
    """Every queue owned by a member, and the assignment would move none of them: the
    cluster has settled (which owner holds what depends on history, not only on the view)."""
    live = set(members)
    current = {queue: owners.get(queue) for queue in queues}
    if any(owner not in live for owner in current.values()):
        return False
    held = {queue: owner for queue, owner in current.items() if owner is not None}
    planned = rebalance(
        list(current), live, held, virtual_nodes=virtual_nodes, load_factor=load_factor
    )
    return planned == held
