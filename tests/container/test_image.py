"""The built image, run with podman: `.ci/container` builds it and sets SQSB_IMAGE.

As ECS runs it: the image's own user (non-root), a read-only root filesystem with no tmpfs,
configuration through the environment; SIGTERM (the image's STOPSIGNAL) must drain and exit
0, and the image's HEALTHCHECK (the ECS task definition's health check) must pass against
the running daemon.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import json_log, queue_depth, wait_until

from sqsbalancerd import __version__
from sqsbalancerd.local import DUMMY_ENV, create_queues, free_port, send_messages

IMAGE = os.environ.get("SQSB_IMAGE", "")
pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(not IMAGE, reason="SQSB_IMAGE unset: .ci/container builds and runs it"),
]
ROOT = Path(__file__).resolve().parent.parent.parent
# runc: crun refuses this machine's hybrid cgroup layout. Limits below the host's hard ones:
# podman's defaults exceed them, and raising a hard limit needs CAP_SYS_RESOURCE.
PODMAN = ["podman", "--runtime", "runc"]
RUN = [
    "run",
    "--network=host",  # the moto server listens on the host's loopback
    "--read-only",
    "--read-only-tmpfs=false",  # as ECS's readonlyRootFilesystem: not even /tmp is writable
    "--ulimit=nofile=4096:4096",
    "--ulimit=nproc=4096:4096",
]


def podman(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )


def test_help_and_version() -> None:
    helped = podman(*RUN, "--rm", IMAGE, "--help")
    assert helped.returncode == 0, helped.stderr
    assert "Usage: sqsbalancerd" in helped.stdout
    version = podman(*RUN, "--rm", IMAGE, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"sqsbalancerd {__version__}"


def _healthcheck_commands() -> list[list[str]]:
    """The image's HEALTHCHECK and the ECS task definition's, without their CMD tag."""
    inspected = podman("image", "inspect", "--format", "{{json .Config.Healthcheck}}", IMAGE)
    image_test = json.loads(inspected.stdout)["Test"]
    task = json.loads((ROOT / "deploy" / "ecs-task-definition.json").read_text())
    ecs_test = task["containerDefinitions"][0]["healthCheck"]["command"]
    assert image_test[0] == ecs_test[0] == "CMD"
    return [image_test[1:], ecs_test[1:]]


@pytest.fixture
def container_name() -> Iterator[str]:
    name = f"sqsb-ci-{os.getpid()}"
    yield name
    podman("rm", "--force", "--time", "0", name)


def _daemon_env(endpoint: str, port: int) -> list[str]:
    env = {
        **DUMMY_ENV,
        "AWS_ENDPOINT_URL": endpoint,
        "SQSBALANCERD_HANDLER": "sqsbalancerd.demo_handler:handle",
        "SQSBALANCERD_DISCOVERY__QUEUE_PATTERN": "^orders-",
        "SQSBALANCERD_COORDINATION__HEARTBEAT_INTERVAL": "1",
        "SQSBALANCERD_COORDINATION__HEARTBEAT_TIMEOUT": "3",
        "SQSBALANCERD_COORDINATION__REBALANCE_DELAY": "1",
        "SQSBALANCERD_SQS__WAIT_TIME_SECONDS": "1",
        "SQSBALANCERD_OBSERVABILITY__HTTP_HOST": "127.0.0.1",
        "SQSBALANCERD_OBSERVABILITY__HTTP_PORT": str(port),
    }
    return [f"--env={key}={value}" for key, value in env.items()]


@pytest.mark.timeout(240)
def test_daemon_in_the_image_handles_messages_and_exits_0_on_sigterm(
    endpoint: str, sqs: Any, container_name: str, tmp_path: Path
) -> None:
    urls = create_queues(sqs, ["orders-1", "orders-2"], dead_letter=False)
    for url in urls.values():
        send_messages(sqs, url, (json.dumps({"n": n, "work_s": 0}) for n in range(20)))
    log = tmp_path / "container.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*PODMAN, *RUN, f"--name={container_name}", *_daemon_env(endpoint, free_port()), IMAGE],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: all(queue_depth(sqs, url) == (0, 0) for url in urls.values()),
            timeout_s=90,
            what=f"both queues drained by the container; log: {log.read_text()[-2000:]}",
        )
        uid = podman("exec", container_name, "id", "-u")
        assert uid.stdout.strip() == "10001", uid.stderr  # the image's USER, not root
        touched = podman("exec", container_name, "touch", "/app/written")
        assert touched.returncode != 0 and "Read-only file system" in touched.stderr
        for command in _healthcheck_commands():
            wait_until(
                lambda command=command: podman("exec", container_name, *command).returncode == 0,
                timeout_s=30,
                what=f"{command} passes in the container",
            )
        stopped = podman("stop", "--time", "60", container_name, timeout_s=90)
        assert stopped.returncode == 0, stopped.stderr
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    last = [line for line in json_log(log.read_text()) if line.get("msg") == "stopped"]
    assert len(last) == 1, log.read_text()[-3000:]
    assert last[0]["exit_code"] == 0
    assert last[0]["succeeded"] == last[0]["deleted"] == 40
