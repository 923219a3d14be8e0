"""What thousands of waiting long polls do to the emulator's other answers (issue 16).

    python -m bench.status_long_polls --queues 2000 --switch-interval 0.005,0.1 [--quiet]

Per switch interval: moto's server in a child process whose interpreter hands the GIL over
every that many seconds (0.005 is CPython's default), `--queues` empty queues and as many
ownership rows (bench.emulator is not used: nothing else of moto is changed). The reads
`status` makes (the member rows, every ownership row, ListQueues) are timed once on the idle
server, then again while a load process long-polls every queue (WaitTimeSeconds 20, a
thread each, as the daemons do). `--quiet` repeats each run with moto's empty-queue long polls
made quiet (bench.moto_patch.quiet_long_polls: no wake every second), which tells the cost
of those wake-ups from that of the requests. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import boto3
import botocore.config

from sqsbalancerd.clock import SystemClock
from sqsbalancerd.coordination.table import CoordinationTable, MemberRecord
from sqsbalancerd.discovery import LIST_PAGE_SIZE
from sqsbalancerd.local import DUMMY_ENV, LOOPBACK, free_port

_SERVER = (
    "import sys; sys.setswitchinterval(float(sys.argv[3])); from moto.server import main; "
    "from bench import moto_patch; sys.argv[4] == '1' and moto_patch.quiet_long_polls(); "
    "main(['-H', sys.argv[1], '-p', sys.argv[2]])"
)
_WARM_UP_S = 22.0  # every long poll started and past its first 20 s


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.status_long_polls")
    parser.add_argument("--queues", type=int, default=2000)
    parser.add_argument("--switch-interval", default="0.005,0.1")
    parser.add_argument("--quiet", action="store_true", help="also with quiet long polls")
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        return _long_poll_everything(args.endpoint)
    quiet = (False, True) if args.quiet else (False,)
    runs = [_run(args.queues, float(s), q) for s in args.switch_interval.split(",") for q in quiet]
    print(json.dumps({"queues": args.queues, "runs": runs}, indent=2))
    return 0


def _run(size: int, switch_interval_s: float, is_quiet: bool) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, **DUMMY_ENV}
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SERVER,
            LOOPBACK,
            str(port),
            str(switch_interval_s),
            str(int(is_quiet)),
        ],
        env=env,
    )
    endpoint = f"http://{LOOPBACK}:{port}"
    load = None
    try:
        _wait_for_port(port)
        sqs, table = _fill(endpoint, size)
        idle = _time_reads(sqs, table)
        load = subprocess.Popen(
            [sys.executable, "-m", "bench.status_long_polls", "--load", "--endpoint", endpoint],
            env=env,
        )
        threading.Event().wait(_WARM_UP_S)
        busy = _time_reads(sqs, table)
    finally:
        for proc in (load, server):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    return {
        "switch_interval_s": switch_interval_s,
        "quiet_long_polls": is_quiet,
        "idle": idle,
        "long_polls": busy,
    }


def _wait_for_port(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            threading.Event().wait(0.2)
    raise RuntimeError(f"the emulator did not listen on port {port}")


def _fill(endpoint: str, size: int) -> tuple[Any, CoordinationTable]:
    config = botocore.config.Config(read_timeout=300, retries={"max_attempts": 1})
    sqs = boto3.client("sqs", endpoint_url=endpoint, config=config)
    dynamodb = boto3.client("dynamodb", endpoint_url=endpoint, config=config)
    table = CoordinationTable(dynamodb, table_name="t", application="a", clock=SystemClock())
    table.ensure(create=True, region="us-east-1")
    now = time.time()
    table.create_member(MemberRecord("m1", "h", "active", 1, "e", 1, now, now))
    for index in range(size):
        name = f"lp-{index:05d}"
        url = sqs.create_queue(QueueName=name)["QueueUrl"]
        table.acquire(name, url, owner="m1", previous=None, now_wall=now)
    return sqs, table


def _time_reads(sqs: Any, table: CoordinationTable) -> dict[str, float]:
    def list_all() -> None:
        kwargs: dict[str, Any] = {"MaxResults": LIST_PAGE_SIZE, "QueueNamePrefix": "lp-"}
        while token := sqs.list_queues(**kwargs).get("NextToken"):
            kwargs["NextToken"] = token

    reads: dict[str, Callable[[], object]] = {
        "members_s": table.members,
        "ownership_s": table.ownership,
        "list_queues_s": list_all,
    }
    timings = {}
    for name, read in reads.items():
        started = time.perf_counter()
        read()
        timings[name] = round(time.perf_counter() - started, 3)
    return timings


def _long_poll_everything(endpoint: str) -> int:
    config = botocore.config.Config(
        max_pool_connections=20_000, read_timeout=120, retries={"max_attempts": 1}
    )
    sqs = boto3.client("sqs", endpoint_url=endpoint, config=config)
    urls: list[str] = []
    kwargs: dict[str, Any] = {"MaxResults": LIST_PAGE_SIZE, "QueueNamePrefix": "lp-"}
    while True:
        page = sqs.list_queues(**kwargs)
        urls += page.get("QueueUrls", [])
        if not page.get("NextToken"):
            break
        kwargs["NextToken"] = page["NextToken"]

    pause = threading.Event()

    def poll(url: str) -> None:
        while True:
            try:
                sqs.receive_message(QueueUrl=url, WaitTimeSeconds=20)
            except Exception:  # a load generator: keep polling
                pause.wait(1.0)

    threading.stack_size(256 * 1024)
    for url in urls:
        threading.Thread(target=poll, args=(url,), daemon=True).start()
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
