"""Sizes of the skew scenarios, full and quick."""

from __future__ import annotations

from dataclasses import dataclass

SKEW_SECTIONS = ("neighbours", "zipf", "fanout", "idle", "cpu", "profile")


@dataclass
class SkewPlan:
    sections: tuple[str, ...] = SKEW_SECTIONS
    cap_s: float = 60.0
    repeats: int = 2  # neighbours and cpu: interleaved rounds, best kept
    scrape: bool = True  # sqsbalancerd's /metrics every 50 ms (costs it a little CPU)
    # Quiet emulator (bench.emulator --scale): an empty queue's long poll sleeps until a
    # send or its end instead of waking every second (moto's loop); the same for everyone.
    quiet_emulator: bool = False
    hot_messages: int = 3000
    neighbours: tuple[int, ...] = (0, 50, 200, 500)
    neighbour_contenders: tuple[str, ...] = ("after", "before", "batched")
    peers: tuple[str, ...] = ("ceiling",)  # also at 0 and 200 neighbours
    zipf_queues: int = 100
    zipf_messages: int = 3000
    zipf_contenders: tuple[str, ...] = ("after", "before", "batched", "ceiling")
    fanout_queues: int = 1000
    fanout_each: int = 10
    fanout_cap_s: float = 120.0  # pool 10 x 10 ms: 10,000 messages need 10 s at best
    fanout_contenders: tuple[str, ...] = ("after", "before", "batched")
    idle_queues: int = 2000  # 5,000: --idle-queues 5000 --quiet-emulator (issue 12, 4th pass)
    idle_window_s: float = 20.0
    idle_contenders: tuple[str, ...] = ("after", "before")
    cpu_loads: tuple[tuple[float, int], ...] = ((0.0, 1000), (10.0, 600), (50.0, 200))
    cpu_contenders: tuple[str, ...] = ("after", "before", "batched", "pylib", "ceiling")


def full_plan() -> SkewPlan:
    return SkewPlan()


def quick_plan() -> SkewPlan:
    """Every section once, small: proves the harness; the ratios are rough."""
    return SkewPlan(
        sections=SKEW_SECTIONS[:-1],  # no profile
        cap_s=30.0,
        repeats=1,
        hot_messages=1000,
        neighbours=(0, 200),
        peers=(),
        zipf_messages=500,
        zipf_contenders=("after", "before"),
        fanout_queues=200,
        fanout_contenders=("after", "before"),
        idle_queues=300,
        idle_window_s=5.0,
        idle_contenders=("after",),
        cpu_loads=((0.0, 200),),
        cpu_contenders=("after", "batched"),
    )
