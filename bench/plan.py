"""The sizes of every section, for the full run and for the seconds-long smoke run."""

from __future__ import annotations

from dataclasses import dataclass, field

ALL_SECTIONS = (
    "throughput",
    "latency",
    "many_queues",
    "idle",
    "scale",
    "discovery",
    "coordination",
    "ring",
    "profile",
)

THROUGHPUT_CONSUMERS = (
    "ceiling",
    "sqsb",
    "sqsb-boto",
    "sqsb-ddb1",
    "sqsb-ddb3",
    "batched",
    "naive",
    "pylib",
    "node",
    "node-batch",
)


@dataclass
class Plan:
    is_smoke: bool = False
    sections: tuple[str, ...] = ALL_SECTIONS
    consumers: tuple[str, ...] = THROUGHPUT_CONSUMERS
    wait_s: int = 20  # WaitTimeSeconds for every consumer
    cap_s: float = 45.0  # longest one consumer may take to drain a workload
    # throughput: queues x messages each, per handler time
    queues: int = 4
    per_queue: int = 5000
    handler_ms: tuple[float, ...] = (0.0, 10.0)
    # Messages a consumer may run at once, the same for every consumer that can be told
    # (bench/README.md "Equal concurrency"): 10 per queue, what node-batch runs by design
    # (a batch of ten per queue, all at once). sqsbalancerd gets it as workers.pool_size,
    # batched as --workers. 0: every consumer with its own default (sqsbalancerd 10).
    in_flight_per_queue: int = 10
    # The emulator's HTTP for every section (bench/emulator.py --http); throughput runs once
    # per entry, names after the first suffixed ("drain-0ms-close").
    emulator_http: tuple[str, ...] = ("keepalive",)
    # latency at light load
    latency_consumers: tuple[str, ...] = ("sqsb", "batched", "pylib", "node", "node-batch")
    latency_queues: int = 4
    latency_rate_per_s: float = 10.0
    latency_duration_s: float = 12.0
    # many queues, light traffic
    many_consumers: tuple[str, ...] = ("sqsb", "batched", "pylib", "node-batch")
    many_queues: int = 100
    many_rate_per_s: float = 50.0
    many_duration_s: float = 15.0
    # idle
    idle_queues: int = 100
    idle_few_queues: int = 4
    idle_window_s: float = 120.0
    idle_fast_timings: bool = False
    # scale
    scale_steps: tuple[int, ...] = (1, 100, 250, 500, 1000)
    scale_idle_s: float = 30.0
    scale_settle_s: float = 3.0
    discovery_queues: int = 5000
    # coordination
    coordination_queues: int = 12
    coordination_default_timings: bool = False
    ring_args: tuple[str, ...] = ("--budget-s", "45")
    profile_per_queue: int = 5000
    extra: dict[str, str] = field(default_factory=dict)


def smoke_plan() -> Plan:
    return Plan(
        is_smoke=True,
        sections=(
            "throughput",
            "latency",
            "idle",
            "scale",
            "discovery",
            "coordination",
            "ring",
        ),
        consumers=("ceiling", "sqsb", "sqsb-ddb1", "batched", "naive"),
        wait_s=1,
        cap_s=20.0,
        queues=2,
        per_queue=50,
        handler_ms=(0.0,),
        latency_consumers=("sqsb",),
        latency_queues=2,
        latency_rate_per_s=10.0,
        latency_duration_s=1.0,
        many_consumers=("sqsb",),
        many_queues=5,
        many_rate_per_s=10.0,
        many_duration_s=1.0,
        idle_queues=4,
        idle_few_queues=2,
        idle_window_s=2.0,
        idle_fast_timings=True,
        scale_steps=(1, 5),
        scale_idle_s=2.0,
        scale_settle_s=1.0,
        discovery_queues=30,
        coordination_queues=4,
        ring_args=("--quick",),
        profile_per_queue=200,
    )
