"""Shared fixtures: dummy AWS credentials everywhere, a moto server on loopback, daemons."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from sqsbalancerd.local import DUMMY_ENV, LocalEmulator

TESTS_DIR = Path(__file__).parent


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never reach real AWS: dummy keys, a region, no instance-metadata probing."""
    for key in list(os.environ):
        if key.startswith(("SQSBALANCERD_", "AWS_")):
            monkeypatch.delenv(key)
    for key, value in DUMMY_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(autouse=True)
def no_leftover_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = threading.Event()
    for _ in range(50):
        left = [t for t in threading.enumerate() if t not in before and t.name.startswith("sqsb-")]
        if not left:
            return
        deadline.wait(0.1)
    raise AssertionError(f"threads left running: {[t.name for t in left]}")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[LocalEmulator]:
    with LocalEmulator(port=0) as emulator:
        yield emulator


@pytest.fixture
def endpoint(moto_server: LocalEmulator) -> str:
    """The moto server's URL, with its state reset for this test."""
    request = urllib.request.Request(
        f"{moto_server.endpoint_url}/moto-api/reset", method="POST", data=b""
    )
    urllib.request.urlopen(request, timeout=10).close()
    return moto_server.endpoint_url


@pytest.fixture
def sqs(endpoint: str) -> Any:
    return boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture
def dynamodb(endpoint: str) -> Any:
    return boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1")


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def terminate(self) -> None:
        self.proc.terminate()

    def wait(self, timeout_s: float = 60.0) -> int:
        """The exit code; a daemon still running after `timeout_s` fails with its log."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            tail = "\n".join(self.log().splitlines()[-40:])
            raise AssertionError(
                f"daemon still running {timeout_s:g} s later; last log lines:\n{tail}"
            ) from None


@dataclass
class DaemonFactory:
    endpoint: str
    tmp_path: Path
    started: list[Daemon] = field(default_factory=list)

    @property
    def events_path(self) -> Path:
        return self.tmp_path / "events.jsonl"

    def env(
        self, extra: dict[str, str] | None = None, *, unset: tuple[str, ...] = ()
    ) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SQSBALANCERD_")}
        env.update(DUMMY_ENV)
        env.update(
            {
                "AWS_ENDPOINT_URL": self.endpoint,
                "PYTHONPATH": str(TESTS_DIR),
                "SQSB_TEST_EVENTS": str(self.events_path),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra or {})
        for key in unset:  # e.g. the dummy keys, for a daemon given credentials another way
            env.pop(key, None)
        return env

    def start(
        self,
        *args: str,
        config: str | None = None,
        env: dict[str, str] | None = None,
        name: str = "d",
        unset: tuple[str, ...] = (),
    ) -> Daemon:
        command = [sys.executable, "-m", "sqsbalancerd", "run", *args]
        if config is not None:
            path = self.tmp_path / f"{name}-{len(self.started)}.toml"
            path.write_text(config)
            command += ["--config", str(path)]
        log_path = self.tmp_path / f"{name}-{len(self.started)}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env=self.env(env, unset=unset),
                cwd=self.tmp_path,
            )
        daemon = Daemon(proc, log_path)
        self.started.append(daemon)
        return daemon

    def run_cli(
        self, *args: str, env: dict[str, str] | None = None, timeout_s: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sqsbalancerd", *args],
            capture_output=True,
            text=True,
            env=self.env(env),
            cwd=self.tmp_path,
            timeout=timeout_s,
        )


@pytest.fixture
def daemons(endpoint: str, tmp_path: Path) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(endpoint, tmp_path)
    yield factory
    for daemon in factory.started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(timeout=10)
