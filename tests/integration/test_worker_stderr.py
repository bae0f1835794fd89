"""The worker says on stderr, at once and once, why it cannot work (journald, docker logs)."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path

import pytest

from tests.network import BrokerAdmin, NodeProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def run_until_retried(url: str, data_dir: Path, reason: str) -> str:
    """Start a worker on ``url``; once its file log shows the fault retried on several
    connections, stop it and return what it wrote to stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASYNC_")}
    node = NodeProcess(name="a", data_dir=data_dir, env=env, args=[
        sys.executable, "-m", "tasync.worker_cli", "--node", "a", "--data-dir", str(data_dir),
        "--broker", url])
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    node.start()
    try:
        wait_for(lambda: reason in node.log_path.read_text(), timeout_s=30,
                 what="the reason on stderr")
        log = data_dir / "tasync.log"
        wait_for(lambda: len({line.split(":")[2] for line in log.read_text().splitlines()
                              if reason in line and "tasync-" in line}) >= 3,
                 timeout_s=60, what="three connections retrying in tasync.log")
    finally:
        assert node.stop() == 0, "a clean stop after SIGTERM"
    return node.log_path.read_text()


@pytest.mark.parametrize("case", ["closed port", "no such vhost"])
def test_worker_reports_a_broken_broker_on_stderr_once(case: str, broker_admin: BrokerAdmin,
                                                       tmp_path: Path) -> None:
    with socket.socket() as reserved:  # bound, never listening: connections are refused
        reserved.bind(("127.0.0.1", 0))
        if case == "closed port":
            url = f"amqp://guest:guest@127.0.0.1:{reserved.getsockname()[1]}/%2F"
            reason = "Connection refused"
        else:
            url = broker_admin.url(f"t-missing-{uuid.uuid4().hex[:8]}")
            reason = "access to the virtual host refused"
        stderr = run_until_retried(url, tmp_path / "a", reason)
    problems = [line for line in stderr.splitlines() if reason in line]
    assert len(problems) == 1, stderr
    assert problems[0].startswith("a WARNING broker unreachable at amqp://guest:***@"), stderr
    lines = stderr.splitlines()
    assert lines[0] == "a INFO starting as backup (epoch 0, seq 0)"
    assert lines[-1] == "a INFO stopping"
    assert "Traceback" not in stderr and "guest:guest" not in stderr
