"""The composition root: build clients and parts from Settings and link them.

Engine and coordination never import each other; this module passes the engine's
`set_owned` to the coordinator and the coordinator's `on_released` to the engine.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from sqsbalancerd.aws import (
    THROTTLING_CODES,
    AwsOptions,
    describe_error,
    dynamodb_client,
    error_code,
    is_transient,
    sqs_client,
)
from sqsbalancerd.clock import Clock, SystemClock
from sqsbalancerd.config import Settings
from sqsbalancerd.coordination.coordinator import DynamoCoordinator, ReceiveControl
from sqsbalancerd.coordination.loadsummary import LoadSummary, QueueSample
from sqsbalancerd.coordination.standalone import StandaloneCoordinator
from sqsbalancerd.coordination.table import CoordinationTable
from sqsbalancerd.dataplane import lean_or_plain
from sqsbalancerd.discovery import Discovery, DiscoveryLoop, DiscoveryResult, QueueInfo
from sqsbalancerd.engine.consumer import Engine, HandlerSet
from sqsbalancerd.engine.workers import Tracing
from sqsbalancerd.errors import AwsUnavailableError, ConfigError, SqsBalancerError
from sqsbalancerd.handler import resolve_handler, resolve_hook
from sqsbalancerd.loadsignals import LoadMeter
from sqsbalancerd.observability.backlog import BacklogSampler
from sqsbalancerd.observability.health import HealthReport, liveness, readiness
from sqsbalancerd.observability.http import HttpServer
from sqsbalancerd.observability.metrics import BacklogGauge, build_registry
from sqsbalancerd.observability.otel import OtelTelemetry
from sqsbalancerd.runtime import Runtime, ThreadSupervisor
from sqsbalancerd.stats import CoordinationStats, Stats, StatsSnapshot

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_sqs import SQSClient

logger = logging.getLogger(__name__)


# Connections the long-poll client keeps, beyond the workers': one per long poll in flight,
# that is per owned queue, up to the scale the daemon is built for (10,000 queues on one
# instance, with room). urllib3 opens them on demand and a cap costs a queue slot each, so a
# cap below what an instance owns saves nothing: past it every extra poll reconnects and
# urllib3 logs "Connection pool is full" (1,024 did at 10,000 queues). Discovery warns when
# more queues match than this.
MAX_POLL_CONNECTIONS = 16_384
_NAMED_WARNINGS = 10
ACK_READ_TIMEOUT_S = 5.0
ACK_MAX_ATTEMPTS = 1  # the acknowledger retries (engine/acks.py), not botocore
DISCOVERY_READ_TIMEOUT_S = 10.0
DISCOVERY_MAX_ATTEMPTS = 3
# A round's DynamoDB calls in flight at once when it makes many (a start-up, a takeover): the
# acquisitions, each conditional on its own row, and the reads of the shards that moved.
TABLE_CONCURRENCY = 8
# The coordinator's other calls, and `begin_drain`'s heartbeat from the main thread.
DYNAMODB_SPARE_CONNECTIONS = 4


class Coordinator(Protocol):
    def start(self) -> None: ...

    def on_discovered(self, result: DiscoveryResult) -> None: ...

    def on_released(self, queue_name: str) -> None: ...

    def begin_drain(self) -> None: ...

    def leave(self) -> None: ...

    def snapshot(self) -> CoordinationStats | None: ...


def resolve_handlers(settings: Settings) -> HandlerSet:
    """Resolve the default and every override handler now, so a typo fails at start."""
    default = resolve_handler(settings.handler) if settings.handler else None
    by_path = {o.handler: resolve_handler(o.handler) for o in settings.queue if o.handler}
    if default is None and not by_path:
        raise ConfigError("handler: no handler configured (use --handler MODULE:FUNCTION)")
    return HandlerSet(default=default, by_path=by_path)


def aws_options(settings: Settings, *, pool_connections: int) -> AwsOptions:
    assert settings.aws.region is not None
    return AwsOptions(
        region=settings.aws.region,
        endpoint_url=settings.aws.endpoint_url,
        max_pool_connections=pool_connections,
        read_timeout_s=settings.sqs.wait_time_seconds + 10.0,
    )


def long_poll_pool_size(settings: Settings) -> int:
    """Connections kept by the client of the long polls and the workers' calls."""
    return settings.workers.pool_size + MAX_POLL_CONNECTIONS


def ack_options(settings: Settings) -> AwsOptions:
    """The acks thread's client: deletes and visibility changes answer at once, so a hung one
    must not hold every pending ack for a long poll's read timeout (messages would reappear
    meanwhile). One attempt per call: the acks thread retries failures itself, per queue,
    with its own backoff; botocore's retries would stall every queue's acks behind one."""
    return replace(
        aws_options(settings, pool_connections=4),
        read_timeout_s=ACK_READ_TIMEOUT_S,
        max_attempts=ACK_MAX_ATTEMPTS,
    )


def discovery_options(settings: Settings) -> AwsOptions:
    """ListQueues and GetQueueAttributes answer at once: with the long polls' 30 s read
    timeout and five attempts, a start against an unreachable SQS said nothing for minutes."""
    return replace(
        aws_options(settings, pool_connections=settings.discovery.attribute_concurrency),
        read_timeout_s=DISCOVERY_READ_TIMEOUT_S,
        max_attempts=DISCOVERY_MAX_ATTEMPTS,
    )


def dynamodb_options(settings: Settings) -> AwsOptions:
    """Timeouts and retries well inside the fence margin: a slow call must not outlive it."""
    assert settings.aws.region is not None
    margin_s = settings.coordination.effective_fence_margin
    return AwsOptions(
        region=settings.aws.region,
        endpoint_url=settings.aws.endpoint_url,
        max_pool_connections=TABLE_CONCURRENCY + DYNAMODB_SPARE_CONNECTIONS,
        max_attempts=2,
        connect_timeout_s=max(0.5, min(2.0, margin_s / 4)),
        read_timeout_s=max(0.5, min(5.0, margin_s / 4)),
    )


class Application:
    """Everything `sqsbalancerd run` does, as parts the runtime can start and drain."""

    def __init__(
        self,
        settings: Settings,
        *,
        handlers: HandlerSet,
        clock: Clock | None = None,
        stats: Stats | None = None,
        sqs: SQSClient | None = None,
        dynamodb: DynamoDBClient | None = None,
        coordinator_factory: Callable[[Application], Coordinator] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.stats = stats or Stats()
        pool = long_poll_pool_size(settings)
        self.sqs = sqs or self._sqs_client(aws_options(settings, pool_connections=pool))
        # The acks thread retries by itself: a failure must reach it at once, not be re-sent.
        self.ack_sqs = (
            sqs if sqs is not None else self._sqs_client(ack_options(settings), resend_errors=False)
        )
        self.dynamodb = dynamodb
        discovery_sqs = sqs or sqs_client(discovery_options(settings), self.stats)
        self.discovery = Discovery(discovery_sqs, settings.discovery)
        self._handlers = handlers
        self._loops_stop = threading.Event()
        self._http_stop = threading.Event()
        self.http_port: int | None = None
        self.backlog = BacklogGauge()
        self.runtime: Runtime | None = None
        self.engine: Engine | None = None
        self.coordinator: Coordinator | None = None
        self._coordinator_factory = coordinator_factory
        self._last_discovery: DiscoveryResult | None = None

    def _sqs_client(self, options: AwsOptions, *, resend_errors: bool = True) -> SQSClient:
        client = sqs_client(options, self.stats)
        if not self.settings.sqs.lean_requests:
            return client
        return lean_or_plain(client, self.stats, resend_errors=resend_errors)

    # -- Service --------------------------------------------------------------------------

    def start(self, spawner: ThreadSupervisor, fail: Callable[[str], None]) -> None:
        # Every check that can end the start (the port, the hook, the table, our identity)
        # comes before the first receive: a failed start must not have consumed a batch.
        server = self._bind_http()
        self.http_port = server.port if server is not None else None
        try:
            self._start_parts(spawner, fail, server)
        except BaseException:
            if server is not None:
                server.close()
            raise

    def _start_parts(
        self, spawner: ThreadSupervisor, fail: Callable[[str], None], server: HttpServer | None
    ) -> None:
        self.engine = Engine(
            sqs=self.sqs,
            ack_sqs=self.ack_sqs,
            settings=self.settings,
            handlers=self._handlers,
            stats=self.stats,
            clock=self.clock,
            spawner=spawner,
            on_released=self._on_released,
            on_gone=self._on_queue_gone,
            tracing=self._otel_tracing(),
        )
        self.engine.start()
        self._run_hook(self.settings.on_startup)
        self.coordinator = self._make_coordinator(spawner, fail)
        loop = DiscoveryLoop(
            self.discovery,
            interval_s=self.settings.discovery.interval,
            on_result=self._on_discovered,
        )
        # Discover before joining: peers plan with us as soon as our row is there, and we
        # cannot tell dead-letter queues apart before every candidate's attributes are read
        # (concurrently: seconds at 10,000 queues, see discovery.py for the bound).
        self._first_discovery(loop)
        self.coordinator.start()
        try:
            spawner.spawn("discovery", loop.run, self._loops_stop)
            self._spawn_extras(spawner, server)
        except BaseException:
            # Registered but never consuming: deregister now rather than be judged dead later.
            self._leave_quietly()
            raise

    def _leave_quietly(self) -> None:
        assert self.coordinator is not None
        try:
            self.coordinator.leave()
        except Exception as exc:
            logger.warning("could not leave the cluster", extra={"error": describe_error(exc)})

    def _otel_tracing(self) -> Tracing | None:
        if not self.settings.observability.otel:
            return None
        telemetry = OtelTelemetry(self.snapshot, self._queue_urls)
        return telemetry.span

    def _queue_urls(self) -> dict[str, str]:
        result = self._last_discovery
        return {q.name: q.url for q in result.matched} if result else {}

    def _spawn_extras(self, spawner: ThreadSupervisor, server: HttpServer | None) -> None:
        """The HTTP endpoint (bound already; None: off) and the opt-in backlog sampler."""
        observability = self.settings.observability
        if observability.backlog_interval > 0:
            sampler = BacklogSampler(
                self.sqs,
                self.backlog,
                owned=self._owned_infos,
                interval_s=observability.backlog_interval,
            )
            spawner.spawn("backlog", sampler.run, self._loops_stop)
        if server is not None:
            spawner.spawn("http", server.serve, self._http_stop)

    def _bind_http(self) -> HttpServer | None:
        observability = self.settings.observability
        if not observability.http_port:
            return None
        try:
            return HttpServer(
                host=observability.http_host,
                port=observability.http_port,
                registry=build_registry(self.snapshot, self.backlog),
                liveness=self.liveness,
                readiness=self.readiness,
            )
        except OSError as exc:
            raise ConfigError(
                f"observability.http_port: cannot listen on "
                f"{observability.http_host}:{observability.http_port} ({exc.strerror}); "
                "a second instance on this host needs its own port "
                "(SQSBALANCERD_OBSERVABILITY__HTTP_PORT=9401) or http_port = 0 (HTTP off)"
            ) from None

    def _max_loop_age_s(self) -> float:
        # A poller sits in a long poll for up to wait_time_seconds, then backs off up to 30 s.
        return self.settings.sqs.wait_time_seconds + 45.0

    def liveness(self) -> HealthReport:
        return liveness(self.snapshot(), max_loop_age_s=self._max_loop_age_s())

    def readiness(self) -> HealthReport:
        return readiness(self.snapshot(), max_loop_age_s=self._max_loop_age_s())

    def _owned_infos(self) -> list[QueueInfo]:
        result = self._last_discovery
        owned = set(self.engine.owned()) if self.engine else set()
        return [q for q in result.matched if q.name in owned] if result else []

    def _make_coordinator(
        self, spawner: ThreadSupervisor, fail: Callable[[str], None]
    ) -> Coordinator:
        assert self.engine is not None
        if self._coordinator_factory is not None:
            return self._coordinator_factory(self)
        if self.settings.coordination.mode == "standalone":
            return StandaloneCoordinator(set_owned=self.engine.set_owned)
        return self._dynamo_coordinator(spawner, fail)

    def _dynamo_coordinator(
        self, spawner: ThreadSupervisor, fail: Callable[[str], None]
    ) -> Coordinator:
        assert self.engine is not None
        settings = self.settings
        table = CoordinationTable(
            self.dynamodb or dynamodb_client(dynamodb_options(settings), self.stats),
            table_name=settings.coordination.table_name,
            application=settings.application_name,
            clock=self.clock,
        )
        engine = self.engine
        return DynamoCoordinator(
            table=table,
            settings=settings.coordination,
            instance_id=settings.instance_id,
            region=settings.aws.region or "",
            clock=self.clock,
            set_owned=engine.set_owned,
            control=ReceiveControl(
                pause=engine.pause_receiving,
                resume=engine.resume_receiving,
                set_budget=engine.set_receive_budget,
                renewed=engine.notify_renewed,
            ),
            spawn=spawner.spawn,
            fail=fail,
            load_source=self._load_source(engine),
            table_concurrency=TABLE_CONCURRENCY,
            workers=settings.workers.pool_size,
            idle_source=engine.idle_figures,
        )

    def _load_source(self, engine: Engine) -> Callable[[], LoadSummary]:
        """The coordinator's once-an-epoch summary: the engine's rates, as loadsummary has it."""
        meter = LoadMeter(
            workers=self.settings.workers.pool_size,
            tau_s=self.settings.coordination.load_interval / 2,
        )

        def summary() -> LoadSummary:
            signals = meter.sample(
                self.clock.monotonic(), self.stats.load_totals(), owned=frozenset(engine.owned())
            )
            samples = tuple(
                QueueSample(q.queue, q.handler_s_per_s, q.messages_per_s, q.backlog)
                for q in signals.queues
            )
            return LoadSummary(signals.utilisation, samples)

        return summary

    def _first_discovery(self, loop: DiscoveryLoop) -> None:
        try:
            result = loop.run_once(strict=True)
        except SqsBalancerError:
            raise
        except Exception as exc:
            raise _sqs_unavailable(exc) from exc
        self._warn_about(result)

    def _warn_about(self, result: DiscoveryResult) -> None:
        if not result.matched:
            logger.warning("no queue matches yet; waiting for discovery to find one")
        if len(result.matched) > MAX_POLL_CONNECTIONS:
            logger.warning(
                "more queues match than the long-poll connection pool keeps: an instance "
                "owning more reconnects for every poll beyond it",
                extra={"count": len(result.matched), "connections": MAX_POLL_CONNECTIONS},
            )
        unprotected = [info.name for info in result.matched if not info.has_redrive_policy]
        if len(unprotected) > _NAMED_WARNINGS:  # one line, not one per queue, at 10,000 queues
            logger.warning(
                "queues have no redrive policy: a poison message retries forever",
                extra={"count": len(unprotected), "queues": unprotected[:_NAMED_WARNINGS]},
            )
            return
        for name in unprotected:
            logger.warning(
                "queue has no redrive policy: a poison message retries forever",
                extra={"queue": name},
            )

    def _on_discovered(self, result: DiscoveryResult) -> None:
        self._last_discovery = result
        assert self.coordinator is not None
        self.coordinator.on_discovered(result)

    def _on_queue_gone(self, queue_name: str) -> None:
        """A poller found its queue deleted: drop it from what discovery last found, so the
        coordinator removes its row instead of taking it again before the next refresh."""
        result = self._last_discovery
        if result is None or queue_name not in result.names:
            return  # already forgotten (several pollers of one queue report it)
        matched = tuple(q for q in result.matched if q.name != queue_name)
        self._on_discovered(replace(result, matched=matched))

    def _on_released(self, queue_name: str) -> None:
        if self.coordinator is not None:
            self.coordinator.on_released(queue_name)

    def stop_receiving(self) -> int:
        # The engine first: announcing `draining` is a DynamoDB call that may be slow.
        released = self.engine.stop_receiving() if self.engine else 0
        self._loops_stop.set()
        if self.coordinator is not None:
            self.coordinator.begin_drain()
        return released

    def wait_pollers(self, deadline_s: float, abort: threading.Event) -> bool:
        return self.engine.wait_pollers(deadline_s, abort) if self.engine else True

    def wait_handlers(self, deadline_s: float, abort: threading.Event) -> bool:
        return self.engine.wait_handlers(deadline_s, abort) if self.engine else True

    def abandon_running(self) -> int:
        return self.engine.abandon_running() if self.engine else 0

    def finish(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        if self.coordinator is not None:
            try:
                self.coordinator.leave()
            except Exception as exc:  # leaving is best effort: survivors time us out
                logger.warning(
                    "could not leave the cluster cleanly", extra={"error": describe_error(exc)}
                )
        self._run_hook(self.settings.on_shutdown)
        self._http_stop.set()

    def summary(self) -> dict[str, object]:
        snapshot = self.snapshot()
        summary: dict[str, object] = dict(snapshot.totals())
        summary["aws_calls"] = snapshot.aws_call_total
        summary["queues"] = len(snapshot.queues)
        return summary

    # -- views ----------------------------------------------------------------------------

    def snapshot(self) -> StatsSnapshot:
        if self.engine is None:
            return StatsSnapshot(
                self.settings.instance_id,
                (),
                (),
                0,
                self.settings.workers.pool_size,
                0,
                0,
                {},
                {},
                {},
                {},
            )
        snapshot = self.engine.snapshot(self.settings.instance_id)
        coordination = self.coordinator.snapshot() if self.coordinator else None
        if coordination is None:
            return snapshot
        return replace(snapshot, coordination=coordination)

    def _run_hook(self, path: str | None) -> None:
        hook = resolve_hook(path)
        if hook is None:
            return
        result: Any = hook()
        if inspect.isawaitable(result):
            bridge = self.engine.bridge if self.engine else None
            if bridge is not None:
                bridge.call(result)
            else:
                asyncio.run(_await(result))


def _sqs_unavailable(exc: Exception) -> AwsUnavailableError:
    """The first discovery failed after botocore's retries: say how, in one line."""
    code = error_code(exc) or ""
    if code in THROTTLING_CODES:
        return AwsUnavailableError(f"SQS throttled ListQueues: {describe_error(exc)}")
    if is_transient(exc) and not code:
        return AwsUnavailableError(f"SQS unreachable: {describe_error(exc)}")
    if is_transient(exc):
        return AwsUnavailableError(f"SQS failed ListQueues: {describe_error(exc)}")
    return AwsUnavailableError(f"SQS refused ListQueues: {describe_error(exc)}")


async def _await(awaitable: Any) -> Any:
    return await awaitable


def run_application(app: Application, *, install_signals: bool = True) -> Runtime:
    """Build the runtime for `app` (the caller calls .run())."""
    runtime = Runtime(
        app,
        clock=app.clock,
        shutdown_timeout_s=app.settings.shutdown.timeout,
        poll_wait_s=float(app.settings.sqs.wait_time_seconds),
        install_signals=install_signals,
    )
    app.runtime = runtime
    return runtime


def build_application(settings: Settings, *, install_signals: bool = True) -> Application:
    """Resolve handlers, wire the parts, and attach the runtime that will run them."""
    handlers = resolve_handlers(settings)
    resolve_hook(settings.on_startup)
    resolve_hook(settings.on_shutdown)
    application = Application(settings, handlers=handlers)
    run_application(application, install_signals=install_signals)
    return application
