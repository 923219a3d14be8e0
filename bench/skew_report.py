"""Tables (with ratios from the same run) and the neighbours plot for `python -m bench.skew`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench.skew")
PLOT = "bench-skew-neighbours.png"
PYTHON_PEERS = ("batched", "pylib")  # "the best Python consumer": least CPU of these


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ratio(top: Any, bottom: Any) -> str:
    if not top or not bottom:
        return "—"
    return f"{top / bottom:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _calls(result: dict[str, Any]) -> Any:
    return result.get("requests_per_msg", {}).get("sqs:total")


def _integrity(result: dict[str, Any]) -> str:
    drained = "" if result.get("drained") else ", NOT drained"
    return f"{result.get('lost', '?')}/{result.get('duplicates', '?')}{drained}"


def _check(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def neighbours_tables(section: dict[str, Any]) -> list[str]:
    alone, crowded = section.get("0", {}), section.get("200", {})
    after = crowded.get("after", {}).get("msgs_per_s")
    rows = []
    for key, result in crowded.items():
        own = alone.get(key, {}).get("msgs_per_s")
        startup = sum(v for k, v in result["startup_requests"].items() if k.startswith("sqs:"))
        rows.append(
            [
                f"`{key}`",
                _num(own),
                _num(result.get("msgs_per_s")),
                _ratio(result.get("msgs_per_s"), own),
                _ratio(after, result.get("msgs_per_s")),
                _num(_calls(result), 3),
                str(startup),
                _num(result.get("cpu_s_per_1k"), 2),
                _num(result.get("drain_s")),
                _integrity(result),
            ]
        )
    header = [
        "contender",
        "msgs/s alone",
        "msgs/s, 200 idle",
        "÷ own alone",
        "after ÷ this",
        "SQS calls/msg",
        "start-up calls",
        "CPU s/1k",
        "drain s",
        "lost/dup",
    ]
    lines = _table(header, rows)
    result = crowded.get("after")
    if result:
        ratio = (after or 0) / (alone.get("after", {}).get("msgs_per_s") or 1)
        # The ceiling skips the handler's sleep: a yardstick for the emulator, not a baseline.
        others = [
            r.get("msgs_per_s") or 0 for k, r in crowded.items() if k not in ("after", "ceiling")
        ]
        lines += [
            "",
            f"Targets: ≥ 0.9x its rate alone: {ratio:.2f}x ({_check(ratio >= 0.9)}); "
            f"≥ every baseline: {_check(all((after or 0) >= o for o in others))}; "
            f"≤ 0.21 calls/msg: {_num(_calls(result), 3)} "
            f"({_check((_calls(result) or 9) <= 0.21)}).",
        ]
    return lines


def sweep_table(section: dict[str, Any]) -> list[str]:
    keys = ["after", "before", "batched"]
    rows = []
    for count, results in section.items():
        row = [count] + [_num(results.get(k, {}).get("msgs_per_s")) for k in keys]
        after = results.get("after", {}).get("msgs_per_s")
        row += [_ratio(after, results.get(k, {}).get("msgs_per_s")) for k in keys[1:]]
        row += [_num(results.get("after", {}).get("cpu_s_per_1k"), 2)]
        row += [_num(results.get("after", {}).get("emulator_cpu_s"), 1)]
        rows.append(row)
    header = ["idle neighbours", *[f"{k} msgs/s" for k in keys]]
    header += ["after ÷ before", "after ÷ batched"]
    return _table([*header, "after CPU s/1k", "emulator CPU s (after's run)"], rows)


def plot_neighbours(section: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    counts = sorted(int(c) for c in section)
    figure, axes = plt.subplots(figsize=(7, 4))
    for key in ("after", "before", "batched"):
        values = [section[str(c)].get(key, {}).get("msgs_per_s") for c in counts]
        points = [(c, v) for c, v in zip(counts, values, strict=True) if v]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=key)
    axes.set_xlabel("idle neighbour queues")
    axes.set_ylabel("hot queue msgs/s (pool 50, 20 ms handler)")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def zipf_table(section: dict[str, Any]) -> list[str]:
    after = section.get("after", {}).get("drain_s")
    rows = [
        [
            f"`{key}`",
            _num(r.get("msgs_per_s")),
            _num(r.get("drain_s")),
            _ratio(r.get("drain_s"), after),
            _num(_calls(r), 3),
            _num(r.get("cpu_s_per_1k"), 2),
            _integrity(r),
        ]
        for key, r in section.items()
        if isinstance(r, dict)
    ]
    header = ["contender", "msgs/s", "fill → drained s", "this ÷ after (time)", "SQS calls/msg"]
    return _table([*header, "CPU s/1k", "lost/dup"], rows)


def fanout_table(section: dict[str, Any]) -> list[str]:
    bound = section.get("bound_held")
    rows = [
        [
            f"`{key}`",
            _num(r.get("peak_held")),
            _num(bound) if key == "after" else "none",
            _num(r.get("peak_busy")),
            _num(r.get("peak_rss_mb")),
            f"{r.get('handled')}/{r.get('sent')}",
            _num(r.get("fill_s")),
            _num(r.get("drain_s")),
            _num(r.get("msgs_per_s")),
            _num(_calls(r), 3),
            _integrity(r),
        ]
        for key, r in section.items()
        if isinstance(r, dict)
    ]
    header = ["contender", "peak held (not started)", "bound", "peak busy", "peak RSS MB"]
    header += ["handled/sent", "fill s", "drain s"]
    return _table([*header, "msgs/s", "SQS calls/msg", "lost/dup"], rows)


def idle_table(section: dict[str, Any]) -> list[str]:
    rows = [
        [
            f"`{key}`",
            str(r["queues"]),
            "yes" if r["polled_all"] else f"no ({r['receives_at_start']})",
            _num(r["polling_s"]),
            _num(r["rss_mb"]),
            str(r["threads"]),
            _num(r["idle_cpu_percent"], 2),
            _num(r["emulator_cpu_percent"]),
            _num(r["create_s"]),
        ]
        for key, r in section.items()
    ]
    header = ["contender", "queues", "polled all", "start → all polled s", "RSS MB", "threads"]
    return _table([*header, "idle CPU %", "emulator CPU %", "queue creation s"], rows)


def cpu_tables(section: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    summary = []
    for handler, results in section.items():
        after = results.get("after", {})
        peers = [results[k] for k in PYTHON_PEERS if k in results and results[k].get("drained")]
        best = min(peers, key=lambda r: r.get("cpu_s_per_1k") or 9e9, default=None)
        rows = [
            [
                f"`{key}`",
                _num(r.get("msgs_per_s")),
                _num(r.get("cpu_s_per_1k"), 3),
                _ratio(after.get("cpu_s_per_1k"), r.get("cpu_s_per_1k")),
                _ratio(after.get("msgs_per_s"), r.get("msgs_per_s")),
                _num(_calls(r), 3),
                _integrity(r),
            ]
            for key, r in results.items()
        ]
        header = ["contender", "msgs/s", "CPU s/1k", "after ÷ this (CPU)", "after ÷ this (msgs/s)"]
        lines += [f"**{handler} ms handler**", ""]
        lines += [*_table([*header, "SQS calls/msg", "lost/dup"], rows), ""]
        if best is not None:
            ratio = (after.get("cpu_s_per_1k") or 0) / (best.get("cpu_s_per_1k") or 1)
            faster = all(
                (after.get("msgs_per_s") or 0) >= (results[k].get("msgs_per_s") or 0)
                for k in PYTHON_PEERS
                if k in results
            )
            summary.append(
                [
                    handler,
                    f"`{best['consumer']}`",
                    f"{ratio:.2f}x",
                    _check(ratio <= 0.5),
                    _check(faster),
                ]
            )
    header = ["handler ms", "best Python peer (CPU)", "after CPU ÷ best", "≤ 0.5x"]
    header += ["msgs/s ≥ peers"]
    return lines + _table(header, summary)


def top_entries(path: Path, count: int = 30) -> list[str]:
    """The profile's heaviest functions by own time, in sqsbalancerd/, botocore/, urllib3/."""
    import io
    import pstats

    if not path.exists():
        return [f"no profile at {path}"]
    stream = io.StringIO()
    stats = pstats.Stats(str(path), stream=stream).sort_stats("tottime")
    stats.print_stats(r"sqsbalancerd|botocore|urllib3|threading|http", count)
    return [line for line in stream.getvalue().splitlines() if line.strip()][-count - 1 :]


def render(results: dict[str, Any], plot_dir: Path) -> str:
    sections = results["sections"]
    parts: list[str] = [f"Load average when each section started: {results.get('load')}", ""]
    builders = {
        "neighbours": ("1. One hot queue among 200 idle (pool 50, 20 ms)", neighbours_tables),
        "zipf": ("2. Zipf-like spread over 100 queues (pool 50, 20 ms)", zipf_table),
        "fanout": ("3. Fan-out: 10 messages to each of 1,000 idle queues", fanout_table),
        "idle": ("4. Owned idle queues in one process", idle_table),
        "cpu": ("6. CPU per 1,000 messages, 4 queues, pool 10", cpu_tables),
    }
    for name, (title, build) in builders.items():
        if name in sections:
            parts += [f"### {title}", "", *build(sections[name]), ""]
        if name == "neighbours" and name in sections:
            parts += ["### 5. Hot queue msgs/s against idle neighbours", ""]
            parts += [*sweep_table(sections[name]), ""]
            if plot_neighbours(sections[name], plot_dir / PLOT):
                parts += [f"![msgs/s against idle neighbours]({PLOT})", ""]
    for name, title in PROFILES.items():
        if name in sections:
            run = sections[name]["run"]
            parts += [f"### {title}", ""]
            parts += [f"Under cProfile (slower than unprofiled): {_brief(run)}.", ""]
            parts += ["```", *sections[name]["top"], "```", ""]
    return "\n".join(parts)


PROFILES = {
    "profile": "Profile: `after`, hot queue with 200 idle neighbours (own time)",
    "profile-fanout": "Profile: `after`, fan-out 10 x 1,000 queues (own time)",
}


def _brief(result: dict[str, Any]) -> str:
    return (
        f"{result.get('handled')}/{result.get('sent')} handled, "
        f"{_num(result.get('msgs_per_s'))} msgs/s, drain {_num(result.get('drain_s'))} s, "
        f"CPU {_num(result.get('cpu_s_total'))} s in all"
    )


def write_docs(results: dict[str, Any], docs: Path) -> None:
    """The tables into docs/bench-skew.md between its markers; the plot beside it."""
    page = docs / "bench-skew.md"
    tables = render(results, plot_dir=docs)
    begin, end = "<!-- skew tables: begin -->", "<!-- skew tables: end -->"
    text = page.read_text() if page.exists() else f"{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    page.write_text(f"{head}{begin}\n{tables}\n{end}{tail}")
    (docs.parent / "bench" / "results" / "skew-last.json").write_text(json.dumps(results))
    logger.info("wrote %s", page)
