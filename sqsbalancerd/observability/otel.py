"""Optional OpenTelemetry: the design source's metric names and a span per handled message.

Needs the `otel` extra and `observability.otel = true`. We use the global providers of the
OpenTelemetry API: configure the SDK and exporters as usual (e.g. run under
`opentelemetry-instrument`, or set the providers in an `on_startup` hook).

Metrics are observable counters read from the same in-process snapshot as /metrics, so the
hot path pays nothing for them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from sqsbalancerd.errors import ConfigError
from sqsbalancerd.message import Message
from sqsbalancerd.stats import StatsSnapshot

METRIC_COUNTERS = {
    "sqsbalancer.messages.received": ("received",),
    "sqsbalancer.messages.processed": ("succeeded", "failed"),
    "sqsbalancer.messages.succeeded": ("succeeded",),
    "sqsbalancer.messages.failed": ("failed",),
}
_XRAY = re.compile(r"Root=1-([0-9a-f]{8})-([0-9a-f]{24});Parent=([0-9a-f]{16})(?:;Sampled=(\d))?")
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def sender_context(message: Message) -> tuple[int, int, bool] | None:
    """(trace id, span id, sampled) of the sender, from AWSTraceHeader or a traceparent."""
    header = message.attributes.get("AWSTraceHeader", "")
    match = _XRAY.search(header)
    if match:
        trace_id = int(match.group(1) + match.group(2), 16)
        return trace_id, int(match.group(3), 16), match.group(4) == "1"
    attribute = message.message_attributes.get("traceparent")
    value = attribute if isinstance(attribute, str) else ""
    match = _TRACEPARENT.match(value)
    if match:
        flags = int(match.group(3), 16)
        return int(match.group(1), 16), int(match.group(2), 16), bool(flags & 1)
    return None


class OtelTelemetry:
    def __init__(
        self, snapshot: Callable[[], StatsSnapshot], queue_urls: Callable[[], dict[str, str]]
    ) -> None:
        try:
            from opentelemetry import metrics, trace
        except ImportError:
            raise ConfigError(
                "observability.otel: OpenTelemetry is not installed "
                '(pip install "sqsbalancerd[otel]")'
            ) from None
        self._trace = trace
        self._tracer = trace.get_tracer("sqsbalancerd")
        self._snapshot = snapshot
        self._queue_urls = queue_urls
        meter = metrics.get_meter("sqsbalancerd")
        for name, fields in METRIC_COUNTERS.items():
            meter.create_observable_counter(
                name,
                callbacks=[self._observer(fields)],
                unit="{message}",
                description=f"messages {name.rsplit('.', 1)[1]}",
            )

    def _observer(self, fields: tuple[str, ...]) -> Callable[[Any], Iterable[Any]]:
        from opentelemetry.metrics import Observation

        def observe(_options: Any) -> Iterable[Any]:
            urls = self._queue_urls()
            for queue in self._snapshot().queues:
                value = sum(getattr(queue, f) for f in fields)
                yield Observation(value, {"queue_url": urls.get(queue.queue, queue.queue)})

        return observe

    @contextlib.contextmanager
    def span(self, message: Message) -> Iterator[None]:
        """A consumer span per message, linked to the sender's trace when it sent one."""
        links = []
        sender = sender_context(message)
        if sender is not None:
            trace_id, span_id, sampled = sender
            flags = self._trace.TraceFlags(self._trace.TraceFlags.SAMPLED if sampled else 0)
            context = self._trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)
            links.append(self._trace.Link(context))
        attributes = {
            "messaging.system": "aws_sqs",
            "messaging.destination.name": message.queue_name,
            "messaging.message.id": message.message_id,
            "messaging.operation.type": "process",
        }
        with self._tracer.start_as_current_span(
            f"{message.queue_name} process",
            kind=self._trace.SpanKind.CONSUMER,
            links=links,
            attributes=attributes,
        ):
            yield
