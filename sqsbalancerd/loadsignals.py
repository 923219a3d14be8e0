"""Load signals: per owned queue, decayed rates of handler time, messages and full receives.

Read once a heartbeat from the cumulative figures `Stats` keeps anyway (handler-duration
histograms, received counters, receive fullness), so the hot path pays nothing extra beyond
one counter per receive call. Rates are exponentially decayed (time constant `tau_s`, half
a planning epoch: the summary weighs the epoch's second half most): a burst is not a trend,
and a queue that stopped decays to zero instead of vanishing. A queue's first interval is
taken as it is, undamped: a queue just taken over must not read as idle for an epoch (its
new owner has no history of it, and the planner would place it by count).

- handler-s/s: handler time spent on a queue per second (what the planner balances);
- messages/s: messages received per second;
- fullness: the fraction of receives that came back full, the cheap backlog signal (a
  queue whose receives are full has more waiting than we take);
- utilisation: handler-s/s summed over the queues over the worker count (busy fraction).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqsbalancerd.stats import LoadTotals

TAU_S = 30.0  # half the default planning epoch (app.py passes half of load_interval)


@dataclass(frozen=True, slots=True)
class QueueRates:
    queue: str
    handler_s_per_s: float
    messages_per_s: float
    fullness: float  # share of receives that came back full, 0..1
    # A backlog figure for the planner: the sampled depth when one is known, else the
    # full receives per minute (it grows while we fall behind).
    backlog: int


@dataclass(frozen=True, slots=True)
class LoadSignals:
    utilisation: float
    workers: int
    queues: tuple[QueueRates, ...] = ()


@dataclass(slots=True)
class _Rate:
    handler: float = 0.0
    messages: float = 0.0
    receives: float = 0.0
    full: float = 0.0


@dataclass(slots=True)
class LoadMeter:
    workers: int
    tau_s: float = TAU_S
    _last: dict[str, LoadTotals] = field(default_factory=dict)
    _rates: dict[str, _Rate] = field(default_factory=dict)
    _last_s: float | None = None

    def sample(
        self,
        now_s: float,
        totals: Mapping[str, LoadTotals],
        *,
        owned: frozenset[str] | None = None,
        depths: Mapping[str, int] | None = None,
    ) -> LoadSignals:
        """Fold the figures since the last sample into the rates; the signals now.

        ``owned``: report only these queues (a queue given up keeps decaying here but is no
        longer ours to report). ``depths``: sampled visible-message counts, when known.
        """
        last_s, self._last_s = self._last_s, now_s
        dt = None if last_s is None else now_s - last_s
        if dt is not None and dt > 0:
            alpha = 1.0 - math.exp(-dt / self.tau_s)
            for queue in sorted(set(totals) | set(self._rates)):
                self._fold(queue, totals.get(queue), dt, alpha)
        self._last = dict(totals)
        return self._signals(owned, depths or {})

    def _fold(self, queue: str, now: LoadTotals | None, dt: float, alpha: float) -> None:
        before = self._last.get(queue, LoadTotals())
        is_gone = now is None
        now = now or before
        # Counters restart when a queue is forgotten: a figure below the last is all new.
        handler = _delta(now.handler_s, before.handler_s)
        messages = _delta(now.received, before.received)
        receives = _delta(now.receives, before.receives)
        full = _delta(now.full_receives, before.full_receives)
        if queue not in self._rates:
            alpha = 1.0  # no history: the first interval as it is
        rate = self._rates.setdefault(queue, _Rate())
        rate.handler += alpha * (handler / dt - rate.handler)
        rate.messages += alpha * (messages / dt - rate.messages)
        rate.receives += alpha * (receives / dt - rate.receives)
        rate.full += alpha * (full / dt - rate.full)
        if is_gone and rate.handler < 1e-6 and rate.receives < 1e-6:
            del self._rates[queue]  # gone and decayed: forget it

    def _signals(self, owned: frozenset[str] | None, depths: Mapping[str, int]) -> LoadSignals:
        queues = []
        busy = 0.0
        for queue, rate in sorted(self._rates.items()):
            busy += rate.handler
            if owned is not None and queue not in owned:
                continue
            fullness = rate.full / rate.receives if rate.receives > 1e-9 else 0.0
            backlog = depths.get(queue, round(rate.full * 60))
            queues.append(
                QueueRates(queue, rate.handler, rate.messages, min(1.0, fullness), backlog)
            )
        utilisation = min(1.0, busy / max(1, self.workers))
        return LoadSignals(utilisation, self.workers, tuple(queues))


def _delta(now: float, before: float) -> float:
    return now - before if now >= before else now
