"""The shipped Grafana dashboard and Prometheus rules against a real Prometheus.

A `sqsbalancerd run` process consumes queues on a moto server while Prometheus (the Debian
package; .ci/run installs it) scrapes it; every query of deploy/grafana/sqsbalancerd.json
must then parse and return at least one series, so the dashboard and the metrics cannot
drift apart. The rules file is checked and unit-tested with promtool.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import Feeder, wait_until

from sqsbalancerd.local import create_queues, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "sqsbalancerd.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "rules.test.yml"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
MISSING = "Prometheus is not installed (apt-get install -y prometheus; .ci/run installs it)"
QUEUES = ["dash-a", "dash-b", "dash-c"]
IDLE_QUEUE = "dash-idle"  # never sent to: it idles (sqs.idle_latency)
RATE_INTERVAL = "15s"  # $__rate_interval: a few 1 s scrapes may fail on a loaded box


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target, rows' nested panels included."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    found = []
    for panel in [*panels, *(p for row in panels for p in row.get("panels", []))]:
        found += [(panel["title"], t["expr"]) for t in panel.get("targets", [])]
    return found


def template_queries() -> list[tuple[str, str]]:
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    return [(v["name"], v["query"]["query"]) for v in variables if v["type"] == "query"]


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's $name and ${name} replaced by concrete values; an unknown one fails."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"no value for template variable ${name} in {expr}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def label_values_as_query(query: str) -> tuple[str, str]:
    """label_values(selector, label) -> (selector, label), to run as an instant query."""
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
    assert match, f"unsupported variable query {query!r}"
    return match.group(1), match.group(2)


class Prometheus:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # a 400 carries the parse error
            return json.loads(exc.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    """Starts Prometheus on 127.0.0.1 scraping one target every second; stops it after."""
    started: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{json.dumps(str(RULES))}]\n"
            "scrape_configs:\n"
            "  - job_name: sqsbalancerd\n"
            f"    static_configs: [{{targets: [{json.dumps(target)}]}}]\n"
        )
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        started.append(proc)
        server = Prometheus(f"http://127.0.0.1:{port}")
        wait_until(server.is_ready, timeout_s=30, every_s=0.2, what="Prometheus ready")
        return server

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def daemon_config(port: int) -> str:
    return f"""
handler = "handlers:record"
instance_id = "dash-1"
[coordination]
heartbeat_interval = 1
heartbeat_timeout = 4
rebalance_delay = 1
balance = "load"
load_interval = 1
[discovery]
queue_pattern = "^dash-"
interval = 1
[sqs]
wait_time_seconds = 1
[observability]
http_port = {port}
log_format = "json"
backlog_interval = 1
[[queue]]
match = "^dash-idle$"
idle_latency = 2
"""


def missing_series(server: Prometheus, values: dict[str, str]) -> list[str]:
    """Dashboard and variable queries that return no series yet (parse errors raise)."""
    missing = [
        f"{title}: {expr}"
        for title, expr in dashboard_queries()
        if not server.query(substitute(expr, values))
    ]
    for name, query in template_queries():
        selector, label = label_values_as_query(substitute(query, values))
        if not any(label in s["metric"] for s in server.query(selector)):
            missing.append(f"variable {name}: {query}")
    return missing


def assert_idle_queue_shows(server: Prometheus, daemons: Any, config: Path) -> None:
    """The queue never sent to idles: /metrics (through Prometheus) and `status` say so."""
    wait_until(
        lambda: server.query("sqsbalancerd_idling_queues == 1"),
        timeout_s=30,
        every_s=0.5,
        what="the idle queue idling",
    )
    [sample] = server.query("sqsbalancerd_estimated_sqs_requests_per_hour")
    # Three busy queues at the 1 s floor, the idle one 1 s poll + 2 s apart.
    assert float(sample["value"][1]) == 3 * 3600 + 3600 / 3
    status = daemons.run_cli("status", "--config", str(config), "--json")
    [instance] = json.loads(status.stdout)["instances"]
    assert instance["idling_queues"] == 1, status.stdout
    assert instance["sqs_requests_per_hour"] == 3 * 3600 + 3600 / 3


def wait_for_series(
    server: Prometheus, values: dict[str, str], daemon: Any, *, timeout_s: float
) -> list[str]:
    """Until every query returns series (a bounded poll): what still returns none."""
    deadline = time.monotonic() + timeout_s
    missing = missing_series(server, values)
    while missing and time.monotonic() < deadline:
        tail = "\n".join(daemon.log().splitlines()[-5:])
        assert daemon.proc.poll() is None, f"the daemon exited; its last lines:\n{tail}"
        time.sleep(1.0)  # the next scrape: Prometheus has no event to wait on
        missing = missing_series(server, values)
    return missing


@pytest.mark.skipif(PROMETHEUS is None, reason=MISSING)
def test_every_dashboard_query_returns_series_from_a_running_daemon(
    sqs, daemons, endpoint, prometheus_for
):
    urls = create_queues(sqs, QUEUES)
    create_queues(sqs, [IDLE_QUEUE])
    # Enough work that every queue shows handler time (queue_load needs 0.05 handler-s/s).
    body = lambda n: json.dumps({"n": n, "sleep": 0.02, "fail_once": n % 25 == 0})  # noqa: E731
    feeder = Feeder(endpoint, urls, total=30_000, depth=20, body=body).start()
    port = free_port()
    daemon = daemons.start(config=daemon_config(port))
    target = f"127.0.0.1:{port}"
    server = prometheus_for(target)
    values = {"instance": target, "queue": QUEUES[0], "__rate_interval": RATE_INTERVAL}
    try:
        assert dashboard_queries(), "no queries found in the dashboard"
        missing = wait_for_series(server, values, daemon, timeout_s=90)
        targets = server.get("/api/v1/targets")["data"]["activeTargets"]
        errors = [t.get("lastError") for t in targets]
        assert missing == [], f"scrape errors {errors}; queries without series:\n" + "\n".join(
            missing
        )
        feeder.check()
        rules = server.get("/api/v1/rules")["data"]["groups"]
        assert [r["health"] for g in rules for r in g["rules"]] == ["ok"] * 7, rules
        # A recording rule has series from its first evaluation after two scrapes of the SQS
        # calls: on a loaded box that came after the dashboard's own queries had them.
        wait_until(
            lambda: server.query("instance:sqsbalancerd_sqs_requests_per_hour:rate5m"),
            timeout_s=30,
            every_s=1.0,
            what="the SQS requests-per-hour recording rule's series",
        )
        assert_idle_queue_shows(server, daemons, daemons.tmp_path / "d-0.toml")
    finally:
        feeder.stop()
        daemon.terminate()
    assert daemon.wait(timeout_s=30) == 0, daemon.log()


@pytest.mark.skipif(PROMTOOL is None, reason=MISSING)
def test_rules_pass_promtool_check_and_their_unit_tests():
    check = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    tested = subprocess.run(
        [str(PROMTOOL), "test", "rules", RULES_TEST.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=RULES_TEST.parent,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_substitution_covers_every_template_variable_the_dashboard_uses():
    used = {
        name
        for _, expr in dashboard_queries() + template_queries()
        for pair in re.findall(r"\$\{(\w+)\}|\$(\w+)", expr)
        for name in pair
        if name
    }
    assert used == {"instance", "queue", "__rate_interval"}
