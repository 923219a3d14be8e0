"""Sections that compare consumers: throughput (drain), latency and many queues (steady)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.consumers.registry import BY_KEY, is_available
from bench.harness import Harness
from bench.measure import EmulatorProcess
from bench.plan import Plan
from bench.runs import Setting, Workload, run_drain, run_steady

logger = logging.getLogger("bench")


def _setting(emulator: EmulatorProcess, plan: Plan, out: Path) -> Setting:
    return Setting(emulator, Harness(emulator.endpoint), out, wait_s=plan.wait_s, cap_s=plan.cap_s)


def _each(
    keys: tuple[str, ...],
    run: Callable[[Any], dict[str, Any]],
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for key in keys:
        spec = BY_KEY[key]
        missing = is_available(spec)
        if missing:
            logger.warning("skipping %s: %s", spec.label, missing)
            results[key] = {"consumer": key, "label": spec.label, "skipped": missing}
            continue
        logger.info("  %s", spec.label)
        results[key] = run(spec)
        logger.info("    %s", _brief(results[key]))
    return results


def _brief(result: dict[str, Any]) -> str:
    fields = ("handled", "msgs_per_s", "cpu_s_per_1k", "latency_ms_p50", "latency_ms_p99")
    shown = {k: result[k] for k in fields if result.get(k) is not None}
    shown["req/msg"] = result.get("requests_per_msg", {}).get("sqs:total")
    return " ".join(f"{k}={v}" for k, v in shown.items())


def throughput(emulator: EmulatorProcess, plan: Plan, out: Path) -> dict[str, Any]:
    setting = _setting(emulator, plan, out)
    results: dict[str, Any] = {}
    for handler_ms in plan.handler_ms:
        name = f"drain-{handler_ms:g}ms"
        logger.info(
            "throughput: %d queues x %d, handler %g ms", plan.queues, plan.per_queue, handler_ms
        )
        workload = Workload(
            name,
            plan.queues,
            per_queue=plan.per_queue,
            handler_ms=handler_ms,
            in_flight=plan.in_flight_per_queue * plan.queues,
        )
        results[name] = _each(plan.consumers, lambda spec, w=workload: run_drain(setting, spec, w))
    return results


def latency(emulator: EmulatorProcess, plan: Plan, out: Path) -> dict[str, Any]:
    setting = _setting(emulator, plan, out)
    workload = Workload(
        "latency",
        plan.latency_queues,
        rate_per_s=plan.latency_rate_per_s,
        duration_s=plan.latency_duration_s,
    )
    logger.info(
        "latency: %g msgs/s over %d queues for %g s",
        workload.rate_per_s,
        workload.queues,
        workload.duration_s,
    )
    return _each(plan.latency_consumers, lambda spec: run_steady(setting, spec, workload))


def many_queues(emulator: EmulatorProcess, plan: Plan, out: Path) -> dict[str, Any]:
    setting = _setting(emulator, plan, out)
    workload = Workload(
        "many",
        plan.many_queues,
        rate_per_s=plan.many_rate_per_s,
        duration_s=plan.many_duration_s,
    )
    logger.info(
        "many queues: %g msgs/s over %d queues for %g s",
        workload.rate_per_s,
        workload.queues,
        workload.duration_s,
    )
    return _each(plan.many_consumers, lambda spec: run_steady(setting, spec, workload))
