"""Run fault mixes over many seeds and say which invariants broke (`python simreport.py`).

Each mix targets one defect of issue 11; the report lists, per mix, how many schedules
broke each invariant and the first seeds that did (replay one with `simfaults.run`).
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

from simfaults import coordination, run
from simworld import Settings, quiet

MIXES: dict[str, dict[str, Any]] = {
    "2 vanished member row (hand delete)": {"kinds": ("delete_member_row",)},
    "2 vanished member row (TTL, wall clock a day behind)": {"kinds": ("wall_behind",)},
    "3 DynamoDB outage": {"kinds": ("outage",)},
    "4 one instance partitioned from DynamoDB": {"kinds": ("partition_one",)},
    "5 throttled writes": {"kinds": ("throttle",)},
    "6 discovery skew (queues come and go)": {"kinds": ("queue_add", "queue_del")},
    "8 config skew (virtual_nodes, load_factor)": {
        "kinds": ("join",),
        "settings": Settings(
            coordination=coordination(),
            skewed={"i02": {"virtual_nodes": 40, "load_factor": 1.5}},
        ),
    },
    "8 lease missing or a string": {"kinds": ("corrupt_lease",)},
    "8 ownership row deleted by hand": {"kinds": ("delete_ownership_row",)},
    "8 queue deleted while owned": {"kinds": ("queue_del",)},
    "all faults": {},
}


def report(seeds: range, mixes: dict[str, dict[str, Any]] = MIXES) -> str:
    lines = []
    for name, options in mixes.items():
        broken: Counter[str] = Counter()
        first: dict[str, list[str]] = {}
        for seed in seeds:
            result = run(seed, **options)
            for kind in sorted(result.kinds):
                broken[kind] += 1
                example = next(v for v in result.violations if v.kind == kind)
                first.setdefault(kind, [])
                if len(first[kind]) < 3:
                    first[kind].append(f"seed {seed}: {example}")
        lines.append(f"## {name}: {len(seeds)} seeds")
        if not broken:
            lines.append("- no invariant broken")
        for kind, count in sorted(broken.items()):
            lines.append(f"- {kind}: {count} schedules")
            lines.extend(f"  - {text}" for text in first[kind])
    return "\n".join(lines)


if __name__ == "__main__":
    quiet(None)
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    print(report(range(count)))
