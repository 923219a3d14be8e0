"""Load-aware against count-based balancing, end to end (issue 13).

    python -m bench.loadbalance_e2e                  # both modes, about four minutes
    python -m bench.loadbalance_e2e --messages 3000  # smaller

One moto server on 127.0.0.1 (an ephemeral port) per mode; three `sqsbalancerd run`
processes sharing its DynamoDB table; 60 queues, one of which gets half the messages; the
handler (bench/handlers.py) sleeps 20 ms. The daemons start first and settle (every queue
owned), then the messages go in: the cold queues' all at once, the hot queue's topped up to
stay shallow (moto slows with depth). Reported per mode: drain time (first send to last
handler call) against the ideal (total handler time / total workers), messages lost (ids
sent never handled), ids handled twice and whether any two calls of one id overlapped
(closer than the visibility timeout: SQS's own redelivery is allowed), and per-instance
utilisation over time (handler time per second over workers), plotted.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import boto3

from bench.measure import EmulatorProcess
from sqsbalancerd.local import emulator_env, free_port

REPO = Path(__file__).resolve().parent.parent
QUEUES = 60
INSTANCES = 3
VISIBILITY_S = 30
HOT_DEPTH = 80  # the hot queue is topped up to at most this many visible messages
TIMINGS = {
    "HEARTBEAT_INTERVAL": "1",
    "HEARTBEAT_TIMEOUT": "4",
    "REBALANCE_DELAY": "1",
    "LOAD_INTERVAL": "5",
    "LOAD_MIN_DWELL": "10",
}


@dataclass
class ModeResult:
    mode: str
    messages: int
    workers: int
    handler_ms: float
    ideal_s: float
    drain_s: float | None = None
    lost: int = 0
    handled_twice: int = 0
    overlapping: int = 0  # ids handled twice within the visibility timeout
    handled_by: dict[str, int] = field(default_factory=dict)
    utilisation: dict[str, list[float]] = field(default_factory=dict)  # per second

    @property
    def ratio(self) -> float | None:
        return None if self.drain_s is None else self.drain_s / self.ideal_s


class Emulator:
    """The bench emulator (bench/emulator.py: moto patched for speed, empty long polls
    quiet) in a child process; the daemons and the producer share it. Stock moto wakes
    every waiting long poll each second: with 180 of them it, not the balancing, set the
    drain time at 20 ms handlers."""

    def __init__(self, log_path: Path) -> None:
        self.process = EmulatorProcess(patch=True, log_path=log_path, scale=True).start()
        self.url = self.process.endpoint

    def client(self, service: str) -> Any:
        return boto3.client(
            service,  # type: ignore[call-overload]
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def stop(self) -> None:
        self.process.stop()


def _daemon(
    emulator: Emulator, mode: str, index: int, workers: int, handler_ms: float, out: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **emulator_env(emulator.url),
        "PYTHONPATH": str(REPO),
        "BENCH_IDS_FILE": str(out / f"{mode}-i{index}.ids"),
        "BENCH_HANDLER_MS": str(handler_ms),
        "SQSBALANCERD_HANDLER": "bench.handlers:handle",
        "SQSBALANCERD_INSTANCE_ID": f"i{index}",
        "SQSBALANCERD_APPLICATION_NAME": f"lb-{mode}",
        "SQSBALANCERD_DISCOVERY__QUEUE_PATTERN": "^lb-",
        "SQSBALANCERD_COORDINATION__TABLE_NAME": "bench-loadbalance",
        "SQSBALANCERD_COORDINATION__BALANCE": mode,  # "load" is the default
        "SQSBALANCERD_WORKERS__POOL_SIZE": str(workers),
        "SQSBALANCERD_SQS__WAIT_TIME_SECONDS": "5",
        "SQSBALANCERD_SHUTDOWN__TIMEOUT": "10",
        "SQSBALANCERD_OBSERVABILITY__LOG_FORMAT": "json",
        "SQSBALANCERD_OBSERVABILITY__HTTP_PORT": str(free_port()),
        **{f"SQSBALANCERD_COORDINATION__{k}": v for k, v in TIMINGS.items()},
    }
    log = (out / f"{mode}-i{index}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "sqsbalancerd", "run"], env=env, stdout=log, stderr=log
    )


def _owned(dynamodb: Any, application: str) -> int:
    """Base ownership rows naming an owner: every queue owned once it reaches QUEUES."""
    owned = 0
    for item in _scan(dynamodb):
        sk, pk = item["sk"]["S"], item["pk"]["S"]
        if pk.startswith(f"app#{application}#") and sk.startswith("queue#") and "owner" in item:
            owned += "#r" not in sk.removeprefix("queue#")
    return owned


def _scan(dynamodb: Any) -> list[dict[str, Any]]:
    try:
        pages = dynamodb.get_paginator("scan").paginate(TableName="bench-loadbalance")
        return [item for page in pages for item in page["Items"]]
    except Exception:
        return []  # the table is not there yet


def _wait(predicate: Any, timeout_s: float, every_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        threading.Event().wait(every_s)
    return False


def _send_all(sqs: Any, url: str, count: int, sent: list[str]) -> None:
    for start in range(0, count, 10):
        entries = [{"Id": str(i), "MessageBody": "x"} for i in range(min(10, count - start))]
        answer = sqs.send_message_batch(QueueUrl=url, Entries=entries)
        sent.extend(e["MessageId"] for e in answer.get("Successful", []))


def _top_up(
    emulator: Emulator, url: str, count: int, sent: list[str], stop: threading.Event
) -> None:
    """Keep the hot queue shallow: fill it in the emulator's process while it holds fewer
    than HOT_DEPTH. (Batches of SendMessageBatch from this one thread topped it up at about
    120 msgs/s: below what three owners drain, so the producer set the load-aware time.)"""
    sqs = emulator.client("sqs")
    name = url.rsplit("/", 1)[-1]
    left = count
    while left > 0 and not stop.is_set():
        attributes = sqs.get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
        )["Attributes"]
        room = HOT_DEPTH - int(attributes["ApproximateNumberOfMessages"])
        if room < 20:
            stop.wait(0.02)
            continue
        batch = min(left, room)
        ids, _ = emulator.process.fill(name, batch)
        sent.extend(ids)
        left -= batch


def _records(out: Path, mode: str) -> list[tuple[str, str, float]]:
    """(instance, message id, handler start) from every daemon's id file."""
    found = []
    for index in range(INSTANCES):
        path = out / f"{mode}-i{index}.ids"
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 2:
                    found.append((f"i{index}", parts[0], float(parts[1])))
    return found


def run_mode(mode: str, *, messages: int, workers: int, handler_ms: float, out: Path) -> ModeResult:
    total_workers = INSTANCES * workers
    result = ModeResult(
        mode, messages, total_workers, handler_ms, messages * handler_ms / 1000 / total_workers
    )
    emulator = Emulator(out / f"{mode}-emulator.log")
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        sqs = emulator.client("sqs")
        attributes = {"VisibilityTimeout": str(VISIBILITY_S)}
        urls = [
            sqs.create_queue(QueueName=f"lb-{i:02d}", Attributes=attributes)["QueueUrl"]
            for i in range(QUEUES)
        ]
        daemons = [_daemon(emulator, mode, i, workers, handler_ms, out) for i in range(INSTANCES)]
        dynamodb = emulator.client("dynamodb")
        if not _wait(lambda: _owned(dynamodb, f"lb-{mode}") >= QUEUES, 90):
            raise RuntimeError(f"{mode}: the daemons did not own every queue within 90 s")
        sent: list[str] = []
        cold = messages // 2
        per_cold = cold // (QUEUES - 1)
        hot = messages - per_cold * (QUEUES - 1)
        started = time.time()
        stop = threading.Event()
        producer = threading.Thread(target=_top_up, args=(emulator, urls[0], hot, sent, stop))
        producer.start()
        for url in urls[1:]:
            _send_all(sqs, url, per_cold, sent)
        timeout_s = 20 * result.ideal_s + 60
        _wait(lambda: len({r[1] for r in _records(out, mode)}) >= messages, timeout_s, 0.5)
        stop.set()
        producer.join(timeout=30)
        _judge(result, _records(out, mode), set(sent), started)
    finally:
        for daemon in daemons:
            daemon.send_signal(signal.SIGTERM)
        for daemon in daemons:
            try:
                daemon.wait(timeout=40)
            except subprocess.TimeoutExpired:
                daemon.kill()
        emulator.stop()
    return result


def _judge(
    result: ModeResult, records: list[tuple[str, str, float]], sent: set[str], started: float
) -> None:
    by_id: dict[str, list[float]] = {}
    for _, message_id, at in records:
        by_id.setdefault(message_id, []).append(at)
    result.lost = len(sent - set(by_id))
    twice = {i: sorted(t) for i, t in by_id.items() if len(t) > 1}
    result.handled_twice = len(twice)
    result.overlapping = sum(
        any(b - a < VISIBILITY_S for a, b in itertools.pairwise(t)) for t in twice.values()
    )
    if records and not result.lost:
        result.drain_s = max(at for _, _, at in records) + result.handler_ms / 1000 - started
    end = int(max((at for _, _, at in records), default=started) - started) + 1
    per_instance = result.workers // INSTANCES
    for index in range(INSTANCES):
        name = f"i{index}"
        busy = [0.0] * end
        for instance, _, at in records:
            if instance == name and at >= started:
                busy[int(at - started)] += result.handler_ms / 1000
        result.utilisation[name] = [round(b / per_instance, 3) for b in busy]
        result.handled_by[name] = sum(1 for r in records if r[0] == name)


def plot(results: list[ModeResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        len(results), 1, figsize=(9, 3.2 * len(results)), sharex=True, squeeze=False
    )
    for axis, result in zip(axes[:, 0], results, strict=True):
        for name, series in sorted(result.utilisation.items()):
            axis.plot(range(len(series)), series, label=name)
        ratio = "" if result.ratio is None else f", drain {result.ratio:.2f}x ideal"
        axis.set_title(f"{result.mode}-based{ratio}")
        axis.set_ylabel("utilisation")
        axis.set_ylim(0, 1.3)
        axis.legend(loc="upper right")
    axes[-1, 0].set_xlabel("seconds since the first send")
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--workers", type=int, default=4, help="pool size of each daemon")
    parser.add_argument("--handler-ms", type=float, default=20.0)
    parser.add_argument("--modes", default="count,load")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    out = args.out or REPO / "bench" / "results" / f"loadbalance-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in args.modes.split(","):
        result = run_mode(
            mode, messages=args.messages, workers=args.workers, handler_ms=args.handler_ms, out=out
        )
        results.append(result)
        ratio = "n/a" if result.ratio is None else f"{result.ratio:.2f}"
        print(
            f"{mode:>5}: drain {result.drain_s} s, ideal {result.ideal_s:.1f} s, ratio {ratio}, "
            f"lost {result.lost}, handled twice {result.handled_twice} "
            f"(overlapping {result.overlapping}), by instance {result.handled_by}",
            flush=True,
        )
    summary = [{**asdict(r), "ratio": r.ratio} for r in results]
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    plot(results, out / "utilisation.png")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
