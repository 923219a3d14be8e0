"""Every consumer the bench compares, and how to start it as process(es) on a workload."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import REPO, child_env

NODE_DIR = REPO / "bench" / "node"
FAST_TIMINGS = {"HEARTBEAT_INTERVAL": "1", "HEARTBEAT_TIMEOUT": "4", "REBALANCE_DELAY": "1"}


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    key: str  # short, unique: used in file names and as the access key prefix
    label: str  # for tables
    kind: str  # "sqsbalancerd" | "python" | "node"
    module: str = ""  # python consumers: the module run with -m
    mode: str = "standalone"  # sqsbalancerd: coordination mode
    instances: int = 1
    args: tuple[str, ...] = ()
    is_ceiling: bool = False
    settings: tuple[tuple[str, str], ...] = ()  # sqsbalancerd: extra SQSBALANCERD_* variables

    @property
    def is_python(self) -> bool:
        return self.kind in ("sqsbalancerd", "python")

    @property
    def is_sqsbalancerd(self) -> bool:
        return self.kind == "sqsbalancerd"


CONSUMERS: tuple[ConsumerSpec, ...] = (
    ConsumerSpec(
        "ceiling",
        "emulator ceiling (receive 10 + batch delete)",
        "python",
        module="bench.consumers.ceiling",
        is_ceiling=True,
    ),
    ConsumerSpec("sqsb", "sqsbalancerd standalone", "sqsbalancerd"),
    ConsumerSpec(
        "sqsb-boto",
        "sqsbalancerd standalone, boto3 only (lean_requests off)",
        "sqsbalancerd",
        settings=(("SQSBALANCERD_SQS__LEAN_REQUESTS", "false"),),
    ),
    # The same, run from another checkout (BENCH_BASE_TREE, e.g. a `git worktree` of main):
    # before/after figures from one run, on the same emulator and the same load.
    ConsumerSpec("sqsb-base", "sqsbalancerd standalone, baseline tree", "sqsbalancerd"),
    ConsumerSpec("sqsb-ddb1", "sqsbalancerd dynamodb x1", "sqsbalancerd", mode="dynamodb"),
    ConsumerSpec(
        "sqsb-ddb3", "sqsbalancerd dynamodb x3", "sqsbalancerd", mode="dynamodb", instances=3
    ),
    ConsumerSpec(
        "batched", "boto3 batched thread pool", "python", module="bench.consumers.batched"
    ),
    ConsumerSpec(
        "naive", "boto3 naive loop (receive 1, delete 1)", "python", module="bench.consumers.naive"
    ),
    ConsumerSpec("pylib", "aws-sqs-consumer (PyPI)", "python", module="bench.consumers.pylib"),
    ConsumerSpec("node", "sqs-consumer (npm), handleMessage", "node"),
    ConsumerSpec("node-batch", "sqs-consumer (npm), handleMessageBatch", "node", args=("--batch",)),
)
BY_KEY = {spec.key: spec for spec in CONSUMERS}


def base_tree() -> Path:
    """The checkout `sqsb-base` runs from: BENCH_BASE_TREE."""
    return Path(os.environ.get("BENCH_BASE_TREE", "")).resolve()


def is_available(spec: ConsumerSpec) -> str | None:
    """None when it can run here, else why not."""
    if spec.key == "sqsb-base" and not (
        os.environ.get("BENCH_BASE_TREE") and (base_tree() / "sqsbalancerd").is_dir()
    ):
        return "BENCH_BASE_TREE is not a checkout of sqsbalancerd"
    if spec.kind == "node":
        if shutil.which("node") is None:
            return "node not installed"
        if not (NODE_DIR / "node_modules" / "sqs-consumer").is_dir():
            return "bench/node/node_modules missing (npm install failed or npm absent)"
    if spec.module == "bench.consumers.pylib":
        try:
            import aws_sqs_consumer  # noqa: F401
        except ImportError:
            return "aws-sqs-consumer not installed"
    return None


@dataclass
class Launch:
    """What one consumer run needs to start its processes."""

    endpoint: str
    run_id: str
    queue_prefix: str
    queue_urls: list[str]
    ids_file: Path
    log_dir: Path
    handler_ms: float = 0.0
    wait_s: int = 20
    is_fast_timings: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    profile_out: Path | None = None  # sqsbalancerd under bench.profile_daemon
    in_flight: int = 0  # handlers at once (workers.pool_size, --workers); 0: defaults

    def concurrency_args(self, spec: ConsumerSpec) -> tuple[list[str], dict[str, str]]:
        """How `in_flight` is told to a consumer that has a pool (see Plan)."""
        if not self.in_flight:
            return [], {}
        if spec.is_sqsbalancerd:
            return [], {"SQSBALANCERD_WORKERS__POOL_SIZE": str(self.in_flight)}
        if spec.module == "bench.consumers.batched":
            return ["--workers", str(self.in_flight)], {}
        return [], {}  # pylib: one handler per queue; node: every message of a batch at once

    def access_key(self, spec: ConsumerSpec, index: int) -> str:
        return f"{self.run_id}-{spec.key}-{index}"


def start(spec: ConsumerSpec, launch: Launch) -> list[subprocess.Popen[bytes]]:
    queues_file = launch.log_dir / f"{launch.run_id}-{spec.key}-queues.json"
    queues_file.write_text(json.dumps(launch.queue_urls))
    processes = []
    for index in range(spec.instances):
        command, extra = _command(spec, launch, index, queues_file)
        env = child_env(
            launch.access_key(spec, index),
            launch.endpoint,
            {
                "BENCH_IDS_FILE": str(launch.ids_file),
                "BENCH_HANDLER_MS": str(launch.handler_ms),
                **extra,
                **launch.extra_env,
            },
        )
        log = open(launch.log_dir / f"{launch.run_id}-{spec.key}-{index}.log", "wb")  # noqa: SIM115
        cwd = NODE_DIR if spec.kind == "node" else REPO
        if spec.key == "sqsb-base":
            cwd = base_tree()
            env["PYTHONPATH"] = str(cwd)  # its sqsbalancerd (and bench.handlers) first
        processes.append(
            subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        )
    return processes


def _command(
    spec: ConsumerSpec, launch: Launch, index: int, queues_file: Path
) -> tuple[list[str], dict[str, str]]:
    common = ["--endpoint", launch.endpoint, "--queues-file", str(queues_file)]
    common += ["--wait-s", str(launch.wait_s)]
    pool_args, pool_env = launch.concurrency_args(spec)
    if spec.kind == "node":
        return ["node", str(NODE_DIR / "consumer.mjs"), *common, *spec.args], {}
    if spec.kind == "python":
        return [sys.executable, "-m", spec.module, *common, *pool_args, *spec.args], {}
    env = {**sqsbalancerd_env(spec, launch, index), **pool_env}
    if launch.profile_out is not None:
        profiler = ["-m", "bench.profile_daemon", str(launch.profile_out)]
        return [sys.executable, *profiler, "run"], env
    return [sys.executable, "-m", "sqsbalancerd", "run"], env


def sqsbalancerd_env(spec: ConsumerSpec, launch: Launch, index: int) -> dict[str, str]:
    from sqsbalancerd.local import free_port

    env = {
        "SQSBALANCERD_HANDLER": "bench.handlers:handle",
        "SQSBALANCERD_INSTANCE_ID": f"{spec.key}-{index}",
        "SQSBALANCERD_APPLICATION_NAME": launch.run_id,
        "SQSBALANCERD_DISCOVERY__QUEUE_PATTERN": f"^{launch.queue_prefix}",
        "SQSBALANCERD_COORDINATION__MODE": spec.mode,
        "SQSBALANCERD_COORDINATION__TABLE_NAME": f"bench-{launch.run_id}",
        "SQSBALANCERD_SQS__WAIT_TIME_SECONDS": str(launch.wait_s),
        "SQSBALANCERD_SHUTDOWN__TIMEOUT": "10",
        "SQSBALANCERD_OBSERVABILITY__HTTP_PORT": str(free_port()),
        "SQSBALANCERD_OBSERVABILITY__LOG_FORMAT": "json",
    }
    if spec.mode == "dynamodb" and launch.is_fast_timings:
        env.update({f"SQSBALANCERD_COORDINATION__{k}": v for k, v in FAST_TIMINGS.items()})
    env.update(dict(spec.settings))
    return env
