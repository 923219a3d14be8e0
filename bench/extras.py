"""The ring simulation (bench/ring_sim.py, called as is) and the hot-path profile."""

from __future__ import annotations

import json
import logging
import pstats
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.consumers.registry import BY_KEY
from bench.harness import Harness
from bench.measure import REPO, EmulatorProcess
from bench.plan import Plan
from bench.runs import Setting, Workload, run_drain

logger = logging.getLogger("bench")
PROFILE_TOP = 15


def ring(emulator: EmulatorProcess, plan: Plan, out: Path) -> dict[str, Any]:
    json_path = out / "ring_sim.json"
    command = [sys.executable, "-m", "bench.ring_sim", *plan.ring_args, "--json", str(json_path)]
    logger.info("ring simulation: %s", " ".join(command[2:]))
    answer = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, check=True, timeout=900
    )
    return {
        "args": list(plan.ring_args),
        "markdown": answer.stdout,
        "numbers": json.loads(json_path.read_text()),
    }


def profile(emulator: EmulatorProcess, plan: Plan, out: Path) -> dict[str, Any]:
    """sqsbalancerd standalone on the 0 ms drain workload, every thread under cProfile."""
    setting = Setting(
        emulator, Harness(emulator.endpoint), out, wait_s=plan.wait_s, cap_s=plan.cap_s * 3
    )
    workload = Workload("profile", plan.queues, per_queue=plan.profile_per_queue)
    prof_path = out / "sqsbalancerd.prof"
    logger.info(
        "profile: sqsbalancerd standalone under cProfile, %d x %d messages",
        plan.queues,
        plan.profile_per_queue,
    )
    result = run_drain(setting, BY_KEY["sqsb"], workload, profile_out=prof_path)
    return {"run": result, "prof": str(prof_path), "top": top_entries(prof_path)}


def top_entries(path: Path, count: int = PROFILE_TOP) -> dict[str, list[dict[str, Any]]]:
    """Top entries inside sqsbalancerd/ and botocore/, by cumulative and by own time.

    Cumulative time is wall time and includes waiting (a worker's `take`, a poller's long
    poll); own time (tottime) is where the CPU goes.
    """
    stats = pstats.Stats(str(path))
    rows = []
    for (filename, line, function), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "file": filename,
                "line": line,
                "function": function,
                "calls": calls,
                "tottime_s": round(tottime, 3),
                "cumtime_s": round(cumtime, 3),
            }
        )
    tops: dict[str, list[dict[str, Any]]] = {}
    for package in ("sqsbalancerd", "botocore"):
        mine = [dict(r) for r in rows if f"/{package}/" in r["file"]]
        for row in mine:
            row["file"] = row["file"].split(f"/{package}/", 1)[1]
        for key in ("cumtime_s", "tottime_s"):
            ranked = sorted(mine, key=lambda r, k=key: r[k], reverse=True)[:count]
            tops[f"{package} by {key.removesuffix('_s')}"] = ranked
    return tops
