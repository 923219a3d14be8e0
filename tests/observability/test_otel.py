"""OpenTelemetry: design-source metric names from the snapshot, spans linked to the sender."""

from __future__ import annotations

from datetime import UTC, datetime
from types import MappingProxyType

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sqsbalancerd.message import Message, plain_attributes
from sqsbalancerd.observability import otel
from sqsbalancerd.stats import QueueStats, StatsSnapshot


def message(attributes=None, message_attributes=None) -> Message:
    return Message(
        body="{}",
        message_id="m-1",
        receipt_handle="rh",
        queue_url="http://q/orders",
        queue_name="orders",
        receive_count=1,
        sent_at=datetime.now(UTC),
        attributes=MappingProxyType(attributes or {}),
        message_attributes=plain_attributes(message_attributes or {}),
    )


def snapshot() -> StatsSnapshot:
    return StatsSnapshot(
        "i",
        ("orders",),
        (QueueStats("orders", received=5, succeeded=3, failed=2),),
        0,
        1,
        0,
        0,
        {},
        {},
        {},
        {},
    )


@pytest.fixture
def providers(monkeypatch):
    from opentelemetry import metrics, trace

    reader = InMemoryMetricReader()
    exporter = InMemorySpanExporter()
    meter_provider = MeterProvider(metric_readers=[reader])
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(metrics, "get_meter", meter_provider.get_meter)
    monkeypatch.setattr(trace, "get_tracer", tracer_provider.get_tracer)
    yield reader, exporter
    meter_provider.shutdown()
    tracer_provider.shutdown()


def test_metrics_use_the_design_source_names_and_queue_url(providers):
    reader, _ = providers
    otel.OtelTelemetry(snapshot, lambda: {"orders": "http://q/orders"})
    data = reader.get_metrics_data()
    points = {
        m.name: [(p.value, dict(p.attributes)) for p in m.data.data_points]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    url = {"queue_url": "http://q/orders"}
    assert points["sqsbalancer.messages.received"] == [(5, url)]
    assert points["sqsbalancer.messages.processed"] == [(5, url)]
    assert points["sqsbalancer.messages.succeeded"] == [(3, url)]
    assert points["sqsbalancer.messages.failed"] == [(2, url)]


def test_span_links_to_the_xray_sender():
    header = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
    trace_id, span_id, sampled = otel.sender_context(message({"AWSTraceHeader": header}))
    assert trace_id == 0x5759E988BD862E3FE1BE46A994272793
    assert span_id == 0x53995C3F42CD8AD8
    assert sampled is True


def test_span_links_to_a_w3c_traceparent(providers):
    _, exporter = providers
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    telemetry = otel.OtelTelemetry(snapshot, dict)
    with telemetry.span(
        message(
            message_attributes={"traceparent": {"StringValue": traceparent, "DataType": "String"}}
        )
    ):
        pass
    [span] = exporter.get_finished_spans()
    assert span.name == "orders process"
    [link] = span.links
    assert link.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert link.context.span_id == 0xB7AD6B7169203331
    assert span.attributes["messaging.message.id"] == "m-1"


def test_no_sender_no_link(providers):
    _, exporter = providers
    with otel.OtelTelemetry(snapshot, dict).span(message()):
        pass
    [span] = exporter.get_finished_spans()
    assert list(span.links) == []
