"""A real Alertmanager notifying a real intake in front of a real tasync network.

Alertmanager (Debian's ``prometheus-alertmanager``; skipped with the reason where it is not
installed) has one webhook receiver pointing at ``tasync intake``'s ``/alertmanager``; the
intake reaches the broker through a TCP proxy the test can cut. Alerts are posted to
Alertmanager's API as Prometheus posts them. What the ``ops`` file destination receives is
checked per notification: an alert id is ``am-<fingerprint>-<status>-<tag>``, where the tag
names the notification, so every tag must hold each alert of its notification exactly once.

* firing, grouped: one notification of three alerts, three deliveries with their own subjects
  and their labels and annotations as fields;
* a reminder after ``repeat_interval``: delivered once more, with new ids;
* resolved: delivered at the resolved priority;
* 1,500 alerts in one group, notified while the intake cannot reach the broker: Alertmanager
  retries after the 503s, and once the proxy heals every alert is delivered once per
  notification it is in, none missing; its log shows failed attempts that were retried, not a
  deadline that expired.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.harness import alertmanager
from tests.harness.alertmanager import Alertmanager
from tests.harness.intake import IntakeProcess
from tests.harness.tcp_proxy import TcpProxy
from tests.network import Network
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(alertmanager.binary() is None, reason=alertmanager.MISSING)]

REPEAT_S = 12
RETRY_WINDOW_S = 5


@dataclass
class Setup:
    am: Alertmanager
    intake: IntakeProcess
    proxy: TcpProxy
    out: Path

    def lines(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(x) for x in self.out.read_text().splitlines() if x.endswith("}")]

    def of(self, alertname: str) -> list[dict[str, Any]]:
        return [x for x in self.lines() if x.get("labels", {}).get("alertname") == alertname]


def by_notification(lines: list[dict[str, Any]]) -> dict[str, Counter[str]]:
    """tag -> how often each alert (instance) of that notification was delivered."""
    tags: dict[str, Counter[str]] = defaultdict(Counter)
    for line in lines:
        tags[line["id"].rsplit("-", 1)[1]][line["labels"]["instance"]] += 1
    return tags


def config(url: str) -> dict[str, Any]:
    return {
        "route": {"receiver": "tasync", "group_by": ["alertname"], "group_wait": "1s",
                  "group_interval": "2s", "repeat_interval": "1h",
                  "routes": [{"matchers": ["alertname=DiskFull"],
                              "repeat_interval": f"{REPEAT_S}s"}]},
        "receivers": [{"name": "tasync", "webhook_configs": [
            {"url": url, "send_resolved": True, "max_alerts": 0}]}],
    }


@pytest.fixture
def setup(network: Network, broker_url: str, tmp_path: Path) -> Iterator[Setup]:
    network.start("a", role="master").wait_ready()
    out = tmp_path / "ops.jsonl"
    network.cli("config", "set", "destination", "ops", "--url", f"file://{out}")
    parts = urlsplit(broker_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    intake = IntakeProcess(["--default-host", "a", "--retry-window", str(RETRY_WINDOW_S),
                            "--broker", proxy.url_for(parts.path.lstrip("/").replace("%2F", "/"))],
                           network.env, tmp_path / "intake.stderr").start()
    am = Alertmanager(tmp_path / "am", config(
        f"http://{intake.address}/alertmanager?destination=ops&source=prometheus"))
    try:
        am.start()
        yield Setup(am, intake, proxy, out)
        assert intake.alive and "Traceback" not in intake.log()
    finally:
        am.stop()
        intake.stop()
        proxy.close()


def disk(instance: str) -> dict[str, Any]:
    return {"labels": {"alertname": "DiskFull", "instance": instance, "severity": "critical"},
            "annotations": {"summary": f"disk on {instance} 98% full",
                            "runbook_url": "https://wiki.example.com/disk"},
            "generatorURL": "http://prometheus:9090/graph?g0.expr=disk"}


def whole_notifications(setup: Setup, status: str,
                        hosts: list[str]) -> list[list[dict[str, Any]]]:
    """The lines of each ``status`` notification that holds every one of ``hosts``, in order.

    Alertmanager groups alerts as it ingests them; on a loaded machine its first flush may
    hold only some of one post's alerts (as in the 1,500-alert test below), and in a
    notification of one alert no label tells the alerts apart, so its subject names none. The
    next flush holds them all.
    """
    tags: dict[str, list[dict[str, Any]]] = {}
    for line in setup.of("DiskFull"):
        if f"-{status}-" in line["id"]:
            tags.setdefault(line["id"].rsplit("-", 1)[1], []).append(line)
    return [lines for lines in tags.values()
            if sorted(x["labels"]["instance"] for x in lines) == sorted(hosts)]


def test_firing_grouped_repeated_and_resolved(setup: Setup) -> None:
    hosts = ["db1", "db2", "db3"]
    setup.am.post([disk(h) for h in hosts])
    first = wait_for(lambda: next(iter(whole_notifications(setup, "firing", hosts)), None),
                     what="a notification of all three delivered", timeout_s=60)
    assert {x["subject"] for x in first} == {f"[FIRING] DiskFull instance={h}" for h in hosts}
    assert {x["priority"] for x in first} == {9}
    assert first[0]["annotations"]["runbook_url"] == "https://wiki.example.com/disk"
    assert first[0]["annotations"]["generatorURL"].startswith("http://prometheus:9090/")
    assert first[0]["labels"]["severity"] == "critical"

    wait_for(lambda: len(whole_notifications(setup, "firing", hosts)) >= 2,
             what="a reminder after repeat_interval", timeout_s=REPEAT_S * 4)
    setup.am.post([disk(h) for h in hosts], resolved=True)
    resolved = wait_for(lambda: next(iter(whole_notifications(setup, "resolved", hosts)), None),
                        what="a resolved notice of all three", timeout_s=60)
    assert sorted(x["subject"] for x in resolved) == [f"[RESOLVED] DiskFull instance={h}"
                                                       for h in hosts]
    assert {x["priority"] for x in resolved} == {1}

    lines = setup.of("DiskFull")
    notifications = by_notification(lines)
    for tag, counts in notifications.items():  # each alert once per notification it is in
        assert set(counts.values()) == {1} and set(counts) <= set(hosts), (tag, counts)
    whole = {t for t, counts in notifications.items() if counts == Counter(hosts)
             and any(f"-firing-{t}" in x["id"] for x in lines)}
    assert len(whole) >= 2, "the first notification and at least one reminder, all three each"
    assert len({x["id"] for x in lines}) == len(lines)


def test_1500_alerts_in_one_group_during_a_broker_outage(setup: Setup) -> None:
    instances = [f"h{i:04d}" for i in range(1500)]
    setup.proxy.cut("reset")
    setup.am.post([{"labels": {"alertname": "Bulk", "instance": i, "severity": "warning"},
                    "annotations": {"summary": f"load on {i}"}} for i in instances])
    # Heal after three refused attempts: within the deadline Alertmanager gives one flush
    # (10 s), so the outage shows as attempts that failed and were retried.
    wait_for(lambda: setup.intake.log().count("could not queue alerts") >= 3,
             what="three attempts refused while the broker is away", timeout_s=60)
    setup.proxy.heal()
    # Alertmanager may flush a first notification with the alerts ingested by then (on a
    # loaded machine, 1,408 of them) and, one group_interval later, one with all of them.
    wait_for(lambda: max((len(c) for c in by_notification(setup.of("Bulk")).values()),
                         default=0) == 1500,
             what="a notification of all 1,500 alerts delivered", timeout_s=120)
    wait_for(lambda: "Notify success" in setup.am.log(), what="Alertmanager's success line")
    lines = setup.of("Bulk")
    notifications = by_notification(lines)
    # Each alert is delivered once per notification it is in.
    assert all(set(counts.values()) == {1} for counts in notifications.values()), \
        {tag: counts.most_common(2) for tag, counts in notifications.items()}
    assert max(len(counts) for counts in notifications.values()) == 1500
    assert {x["labels"]["instance"] for x in lines} == set(instances)
    assert {x["priority"] for x in lines} == {6}
    log = setup.am.log()
    failed = [x for x in log.splitlines() if "Notify attempt failed" in x]
    assert failed and all("unexpected status code 503" in x for x in failed), failed[:3]
    assert any("Notify success" in x and "attempts=1" not in x for x in log.splitlines())
    assert "context deadline exceeded" not in log
    assert "Notify for alerts failed" not in log
