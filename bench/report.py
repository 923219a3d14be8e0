"""Markdown tables, the targets with their measured ratios, and the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PYTHON_OTHERS = ("batched", "naive", "pylib")
SQSB = ("sqsb", "sqsb-boto", "sqsb-base", "sqsb-ddb1", "sqsb-ddb3")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ok(results: dict[str, Any]) -> dict[str, Any]:
    return {k: r for k, r in results.items() if "skipped" not in r}


def drain_table(results: dict[str, Any]) -> str:
    ceiling = (results.get("ceiling") or {}).get("msgs_per_s")
    rows = []
    for r in results.values():
        if "skipped" in r:
            rows.append([r["label"], f"skipped: {r['skipped']}"] + [None] * 9)
            continue
        per = r["requests_per_msg"]
        ratio = r["msgs_per_s"] / ceiling if ceiling and r["msgs_per_s"] else None
        rows.append(
            [
                r["label"],
                r["msgs_per_s"],
                ratio,
                r["drain_s"] if r["drained"] else f"capped ({r['handled']:,}/{r['sent']:,})",
                r["cpu_s_per_1k"],
                r["peak_rss_mb"],
                per.get("sqs:total"),
                _split(per),
                r["duplicates"],
                r["lost"],
                r["emulator_cpu_s"],
            ]
        )
    header = [
        "consumer",
        "msgs/s",
        "x ceiling",
        "drain s",
        "CPU s /1k msgs",
        "peak RSS MB",
        "SQS req/msg",
        "by action",
        "dup",
        "lost",
        "emulator CPU s",
    ]
    return _table(header, rows)


def _split(per: dict[str, float]) -> str:
    short = {
        "ReceiveMessage": "recv",
        "DeleteMessageBatch": "delB",
        "DeleteMessage": "del",
        "ChangeMessageVisibilityBatch": "visB",
        "ChangeMessageVisibility": "vis",
    }
    parts = [
        f"{short.get(k[4:], k[4:])} {v:.3f}"
        for k, v in per.items()
        if k != "sqs:total" and v >= 0.001
    ]
    return ", ".join(parts)


def steady_table(results: dict[str, Any]) -> str:
    rows = []
    for r in _ok(results).values():
        rows.append(
            [
                r["label"],
                r["handled"],
                r["latency_ms_p50"],
                r["latency_ms_p99"],
                r["latency_ms_max"],
                r["requests_per_msg"].get("sqs:total"),
                r["cpu_s_per_1k"],
                r["peak_rss_mb"],
                r["duplicates"],
                r["lost"],
            ]
        )
    header = [
        "consumer",
        "handled",
        "p50 ms",
        "p99 ms",
        "max ms",
        "SQS req/msg",
        "CPU s /1k msgs",
        "peak RSS MB",
        "dup",
        "lost",
    ]
    return _table(header, rows)


def idle_table(idle: dict[str, Any]) -> str:
    rows = []
    for name in ("standalone", "dynamodb_few", "dynamodb_many_x3"):
        r = idle[name]
        rows.append(
            [
                name,
                r["queues"],
                r["instances"],
                r["sqs_per_queue_hour"],
                r["sqs_over_floor"],
                r["dynamodb_per_instance_minute"],
            ]
        )
    header = [
        "setup",
        "queues",
        "instances",
        "SQS req / queue / hour",
        "x floor",
        "DynamoDB req / instance / min",
    ]
    return _table(header, rows)


def scale_table(scale: dict[str, Any]) -> str:
    rows = [[p["queues"], p["rss_mb"], p["threads"]] for p in scale["points"]]
    return _table(["owned queues", "RSS MB", "threads"], rows)


def coordination_table(coordination: dict[str, Any]) -> str:
    rows = []
    for timings, r in coordination.items():
        for event in ("sigkill", "sigterm"):
            e = r.get(event) or {}
            rows.append(
                [
                    timings,
                    event.upper(),
                    e.get("victim_queues"),
                    e.get("owned_by_survivors_s"),
                    e.get("resumed_s"),
                    e.get("exited_s"),
                    e.get("exit_code"),
                ]
            )
    header = [
        "timings",
        "event",
        "queues moved",
        "owned by survivors s",
        "handled again s",
        "process exited s",
        "exit code",
    ]
    return _table(header, rows)


def profile_tables(profile: dict[str, Any]) -> str:
    parts = [
        "cProfile in every thread (bench/profile_daemon.py). Cumulative time is wall time and "
        "includes waiting (a worker's `take`, a poller's long poll); own time (tottime) is "
        "where the CPU goes. Profiling slows the daemon several-fold."
    ]
    for package, rows in profile["top"].items():
        parts.append(f"**{package}** (top {len(rows)}, all threads)\n")
        parts.append(
            _table(
                ["function", "file:line", "calls", "tottime s", "cumtime s"],
                [
                    [
                        r["function"],
                        f"{r['file']}:{r['line']}",
                        r["calls"],
                        r["tottime_s"],
                        r["cumtime_s"],
                    ]
                    for r in rows
                ],
            )
        )
    return "\n\n".join(parts)


# -- targets ----------------------------------------------------------------------------


def _best(
    results: dict[str, Any], keys: tuple[str, ...] | None, field: str, *, lowest: bool
) -> tuple[str | None, float | None]:
    pool = [
        (k, r.get(field))
        for k, r in _ok(results).items()
        if (keys is None or k in keys) and r.get(field) is not None
    ]
    if not pool:
        return None, None
    key, value = (min if lowest else max)(pool, key=lambda kv: kv[1])
    return key, value


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name, drained in results.get("throughput", {}).items():
        out += _drain_targets(name, drained)
    idle = results.get("idle")
    if idle:
        ratio = idle["standalone"]["sqs_over_floor"]
        out.append(
            _target(
                "idle SQS requests vs long-poll floor",
                ratio,
                1.02,
                lower=True,
                note=f"{idle['standalone']['queues']} queues, wait {idle['wait_s']} s",
            )
        )
        few, many = idle["dynamodb_few"], idle["dynamodb_many_x3"]
        rate = many["dynamodb_per_instance_minute"] / max(0.01, few["dynamodb_per_instance_minute"])
        out.append(
            _target(
                "DynamoDB req/instance/min, many ÷ few queues",
                rate,
                1.1,
                lower=True,
                note=f"{many['queues']} vs {few['queues']} queues",
            )
        )
    scale = results.get("scale")
    if scale and scale["points"]:
        top = scale["points"][-1]
        out.append(
            _target(f"RSS at {top['queues']} owned queues (MB)", top["rss_mb"], 200, lower=True)
        )
        out.append(
            _target(
                f"idle CPU at {top['queues']} owned queues (% of a core)",
                scale["idle_cpu_percent"],
                2.0,
                lower=True,
            )
        )
    return out


def _drain_targets(name: str, drained: dict[str, Any]) -> list[dict[str, Any]]:
    sqsb = drained.get("sqsb")
    if not sqsb or "skipped" in sqsb:
        return []
    out = []
    others = tuple(k for k in drained if k not in (*SQSB, "ceiling"))
    best_key, best_rate = _best(drained, others, "msgs_per_s", lowest=False)
    if best_rate:
        out.append(
            _target(
                f"{name}: msgs/s ÷ best other ({best_key})",
                sqsb["msgs_per_s"] / best_rate,
                1.0,
                lower=False,
            )
        )
    ceiling = (drained.get("ceiling") or {}).get("msgs_per_s")
    if ceiling:
        out.append(
            _target(
                f"{name}: msgs/s ÷ emulator ceiling", sqsb["msgs_per_s"] / ceiling, 0.8, lower=False
            )
        )
    cpu_key, cpu = _best(drained, PYTHON_OTHERS, "cpu_s_per_1k", lowest=True)
    if cpu:
        out.append(
            _target(
                f"{name}: CPU/1k ÷ best other Python ({cpu_key})",
                sqsb["cpu_s_per_1k"] / cpu,
                1.0,
                lower=True,
                note="stretch ≤ 0.5",
            )
        )
    out.append(
        _target(
            f"{name}: SQS requests per message",
            sqsb["requests_per_msg"]["sqs:total"],
            0.21,
            lower=True,
        )
    )
    return out


def _target(
    name: str, value: float, limit: float, *, lower: bool, note: str = ""
) -> dict[str, Any]:
    is_met = value <= limit if lower else value >= limit
    return {
        "target": name,
        "measured": round(value, 3),
        "limit": ("≤ " if lower else "≥ ") + f"{limit:g}",
        "met": is_met,
        "note": note,
    }


def targets_table(rows: list[dict[str, Any]]) -> str:
    return _table(
        ["target", "measured", "goal", "met", "note"],
        [
            [r["target"], r["measured"], r["limit"], "yes" if r["met"] else "**no**", r["note"]]
            for r in rows
        ],
    )


# -- everything -------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    parts: list[str] = []
    for name, drained in results.get("throughput", {}).items():
        parts += [f"### Throughput: {name}\n", drain_table(drained)]
    if "latency" in results:
        parts += [
            "### Latency at light load (send → handler start)\n",
            steady_table(results["latency"]),
        ]
    if "many_queues" in results:
        parts += ["### Many queues, light traffic\n", steady_table(results["many_queues"])]
    if "idle" in results:
        parts += ["### Idle\n", idle_table(results["idle"])]
    if "scale" in results:
        s = results["scale"]
        parts += [
            "### Scale: one process, many owned queues\n",
            scale_table(s),
            f"Idle CPU at {s['points'][-1]['queues']} queues: {s['idle_cpu_percent']} % "
            f"of a core over {s['idle_window_s']} s (emulator: "
            f"{s['emulator_cpu_percent']} %); urllib3 'pool is full' warnings: "
            f"{s['pool_full_warnings']}.",
        ]
    if "discovery" in results:
        d = results["discovery"]
        parts += [
            "### Discovery\n",
            _table(
                ["refresh", "queues matched", "seconds", "calls"],
                [[k, d[k]["matched"], d[k]["seconds"], d[k]["calls"]] for k in ("cold", "warm")],
            ),
        ]
    if "coordination" in results:
        parts += ["### Coordination\n", coordination_table(results["coordination"])]
    if "ring" in results:
        parts += ["### Ring simulation\n", results["ring"]["markdown"].strip()]
    if "profile" in results:
        parts += [
            "### Profile (sqsbalancerd standalone, 0 ms handler)\n",
            profile_tables(results["profile"]),
        ]
    parts += ["### Targets\n", targets_table(targets(results))]
    return "\n\n".join(parts) + "\n"


def plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG plots; none when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    throughput = results.get("throughput", {})
    if throughput:
        paths.append(_plot_throughput(plt, throughput, out_dir / "bench-throughput.png"))
        first = next(iter(throughput.values()))
        paths.append(_plot_calls(plt, first, out_dir / "bench-api-calls.png"))
    if results.get("scale", {}).get("points"):
        paths.append(_plot_rss(plt, results["scale"]["points"], out_dir / "bench-rss-queues.png"))
    return paths


def _plot_throughput(plt: Any, throughput: dict[str, Any], path: Path) -> Path:
    figure, axes = plt.subplots(2, len(throughput), figsize=(6 * len(throughput), 8), squeeze=False)
    for column, (name, drained) in enumerate(throughput.items()):
        ok = _ok(drained)
        labels = [r["label"].replace(" (", "\n(").replace(", ", ",\n") for r in ok.values()]
        colors = [
            "tab:green" if k in SQSB else "tab:gray" if k == "ceiling" else "tab:blue" for k in ok
        ]
        for row, (field, title) in enumerate(
            (("msgs_per_s", "msgs/s"), ("cpu_s_per_1k", "CPU s per 1,000 msgs"))
        ):
            axis = axes[row][column]
            axis.barh(labels, [r[field] or 0 for r in ok.values()], color=colors)
            axis.set_title(f"{name}: {title}")
            axis.invert_yaxis()
            axis.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _plot_calls(plt: Any, drained: dict[str, Any], path: Path) -> Path:
    ok = _ok(drained)
    actions = sorted({k for r in ok.values() for k in r["requests_per_msg"] if k != "sqs:total"})
    figure, axis = plt.subplots(figsize=(9, 5))
    left = [0.0] * len(ok)
    labels = [r["label"].replace(" (", "\n(") for r in ok.values()]
    for action in actions:
        values = [r["requests_per_msg"].get(action, 0) for r in ok.values()]
        axis.barh(labels, values, left=left, label=action.removeprefix("sqs:"))
        left = [a + b for a, b in zip(left, values, strict=True)]
    axis.axvline(0.2, color="black", linestyle=":", label="floor 0.2")
    axis.set_xlabel("SQS API calls per message")
    axis.invert_yaxis()
    axis.tick_params(axis="y", labelsize=7)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _plot_rss(plt: Any, points: list[dict[str, Any]], path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([p["queues"] for p in points], [p["rss_mb"] for p in points], marker="o")
    axis.axhline(200, color="red", linestyle=":", label="target 200 MB")
    axis.set_xlabel("owned queues (one process)")
    axis.set_ylabel("RSS MB")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
