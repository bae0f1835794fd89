"""The demo's story, and the metrics endpoint, checked by state rather than by text.

The demo is the README's main job; it drives real workers through the public commands. Its
``--json`` summary reports what each step found, and this test holds the summary to the
story: the primary delivered first, the backup after the primary died, the recovered node is
identical, and the totals agree with the deliveries.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.network import BrokerAdmin, Network
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def demo_vhosts(broker_admin: BrokerAdmin) -> set[str]:
    listed = broker_admin.rabbitmqctl("list_vhosts", "--quiet", "--no-table-headers")
    return {v.strip() for v in listed.splitlines() if v.strip().startswith("tasync-demo-")}


def test_the_demo_tells_a_true_story(broker_url: str, broker_admin: BrokerAdmin) -> None:
    before = demo_vhosts(broker_admin)
    out = subprocess.run([sys.executable, "-m", "tasync", "demo", "--json",
                          "--broker", broker_url], capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    summary: dict[str, Any] = json.loads(out.stdout)

    assert summary["replicated"] is True
    assert summary["recovered"] is True
    # Before the failure each source's alerts went to the first node of its own route.
    assert summary["before_failover"]["remedy"] == {"a": 10}
    assert summary["before_failover"]["nms"] == {"b": 10}
    # After SIGKILL of a, remedy's next node b delivered every alert sent afterwards.
    assert summary["after_failover"]["remedy"] == {"b": 10}

    totals = {n["node"]: n["sources"] for n in summary["totals"]["nodes"]}
    assert totals["b"]["remedy"]["delivered"] == 10
    assert totals["b"]["remedy"]["taken_over"] == 10
    assert totals["b"]["nms"]["delivered"] == 10
    assert totals["a"]["remedy"]["delivered"] == 10
    # The demo removes the vhost it made for itself.
    assert demo_vhosts(broker_admin) - before == set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_answer_in_prometheus_format_and_move_with_alerts(network: Network,
                                                                  tmp_path: Path) -> None:
    port = free_port()
    network.start("a", role="master").wait_ready()
    network.start("b", args=("--metrics-port", str(port), "--metrics-source", "probe")
                  ).wait_ready()
    out = tmp_path / "ops.jsonl"
    network.cli("config", "set", "destination", "ops", "--url", f"file://{out}",
                "--wait-applied")
    before = scrape(port)
    assert before[("tasync_node_ready", (("node", "b"),))] == 1.0
    assert before[("tasync_is_master", (("node", "b"),))] == 0.0
    applied_key = ("tasync_changes_applied_total", (("node", "b"),))
    assert before[applied_key] >= 1.0

    for i in range(5):
        network.cli("send", "-i", "ops", "-m", f"metrics {i}", "--source", "probe",
                    "--host", "b", "--id", f"m-{i}")
    wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == 5,
             timeout_s=60, what="five alerts written by the file channel")

    label = (("node", "b"), ("source", "probe"))
    wait_for(lambda: scrape(port).get(("tasync_alerts_delivered_total", label)) == 5.0,
             timeout_s=30, what="the delivered counter to reach 5")
    after = scrape(port)
    assert after[("tasync_alerts_received_total", label)] == 5.0
    assert after.get(("tasync_alerts_failed_total", label), 0.0) == 0.0

    network.cli("config", "set", "destination", "ops2", "--url", f"file://{out}.2",
                "--wait-applied")
    assert scrape(port)[applied_key] > before[applied_key]
