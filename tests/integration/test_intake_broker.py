"""The HTTP intake when the broker is away or its virtual host is empty: 503 at once, then back.

A real ``tasync intake`` process reaches the shared RabbitMQ through a TCP proxy that the test
cuts (the broker itself is never touched). Concurrent requests while the broker cannot be
reached are each answered 503 with ``Retry-After`` (how long each took is printed, not
asserted); after the proxy heals, the intake accepts alerts again without a restart, and they
are delivered.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.harness.intake import IntakeProcess
from tests.harness.tcp_proxy import CutMode, TcpProxy
from tests.network import Network
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

GOOD = {"source": "nms", "destination": "ops", "message": "fine"}


def delivered(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def proxied(broker_url: str) -> tuple[TcpProxy, str]:
    parts = urlsplit(broker_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    return proxy, proxy.url_for(parts.path.lstrip("/").replace("%2F", "/") or "/")


@pytest.mark.parametrize("mode", ["reset", "blackhole"])
def test_concurrent_requests_while_the_broker_is_unreachable_get_503_at_once(
        network: Network, broker_url: str, tmp_path: Path, mode: CutMode) -> None:
    network.start("a", role="master").wait_ready()
    out = tmp_path / "ops.jsonl"
    network.cli("config", "set", "destination", "ops", "--url", f"file://{out}")
    proxy, url = proxied(broker_url)
    intake = IntakeProcess(["--default-host", "a", "--broker", url], network.env,
                           tmp_path / "intake.stderr")
    try:
        if mode == "reset":  # connections made, then cut: each use fails at once
            intake.start()
            assert intake.request("POST", "/alerts", {**GOOD, "id": "before"})[0] == 202
            proxy.cut("reset")
        else:  # a partition from the start: every connection attempt hangs until its timeout
            proxy.cut("blackhole")
            intake.start()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(
                lambda i: intake.timed("POST", "/alerts", {**GOOD, "id": f"during-{i}"}),
                range(8)))
        times = sorted(round(t, 3) for t, *_ in answers)
        print(f"\n{mode}: 8 concurrent requests answered after {times} s")
        assert [status for _, status, _, _ in answers] == [503] * 8, answers
        assert all(h.get("retry-after", "").isdigit() for _, _, h, _ in answers)
        assert all("retry later" in a["error"] for *_, a in answers)
        health = intake.request("GET", "/healthz")[2]
        assert health["ok"] is True and health["intake"]["broker"] != "ok"

        proxy.heal()
        wait_for(lambda: intake.request("POST", "/alerts", {**GOOD, "id": "after"})[0] == 202,
                 what="the intake accepting alerts again", timeout_s=60)
        wait_for(lambda: "after" in delivered(out), what="the alert after the outage delivered")
        assert not {f"during-{i}" for i in range(8)} & set(delivered(out))
        assert intake.alive and "Traceback" not in intake.log()
    finally:
        intake.stop()
        proxy.close()


def test_a_virtual_host_without_the_topology_says_to_run_broker_setup(
        network: Network, broker_url: str, tmp_path: Path) -> None:
    intake = IntakeProcess(["--default-host", "a", "--broker", broker_url], network.env,
                           tmp_path / "intake.stderr").start()
    try:
        status, headers, answer = intake.request("POST", "/alerts", GOOD)
        assert status == 503 and headers["retry-after"].isdigit()
        assert "run `tasync broker setup`" in answer["error"], answer
        assert "unreachable" not in answer["error"]
        network.cli("broker", "setup")
        network.start("a", role="master").wait_ready()
        network.cli("config", "set", "destination", "ops", "--url",
                    f"file://{tmp_path / 'ops.jsonl'}")
        wait_for(lambda: intake.request("POST", "/alerts", {**GOOD, "id": "set-up"})[0] == 202,
                 what="alerts accepted once the topology exists", timeout_s=60)
        wait_for(lambda: "set-up" in delivered(tmp_path / "ops.jsonl"), what="delivery")
        assert "Traceback" not in intake.log()
    finally:
        intake.stop()
