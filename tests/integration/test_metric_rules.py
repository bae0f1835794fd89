"""The documented Prometheus rules, run by promtool on what real nodes' metrics answered.

Each scenario breaks a real network (a hung backup, a dead master), scrapes every node's
``/metrics`` as Prometheus would (a scrape that fails is ``up 0``), turns the samples into the
input of a ``promtool test rules`` unit test and checks which alerts fire: exactly the ones
the failure should raise, none on a healthy network. promtool's rule tests need no Prometheus
server; ``promtool check metrics`` lints each scrape too.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import amqp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tasync.broker import topology
from tasync.broker.connection import close_quietly, connect
from tasync.broker.settings import Settings
from tests.docs_blocks import blocks
from tests.harness.rabbit_env import free_ports
from tests.network import Network
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("promtool") is None,
                       reason="promtool not installed (Debian package prometheus; "
                              "scripts/setup.sh --test installs it as root)"),
]

#: The rule file as docs/operations.md gives it.
RULES = next(b.text for b in blocks("operations.md") if b.info[1:] == ["prometheus-rules"])
#: Every alert the rules define.
ALERTS = [r["alert"] for g in yaml.safe_load(RULES)["groups"] for r in g["rules"]]
Series = dict[str, float]  # 'name{labels}' -> value


def scrape(instance: str, port: int) -> tuple[Series, str | None]:
    """One scrape as Prometheus would store it (with ``job``, ``instance`` and ``up``)."""
    labels = f'job="tasync",instance="{instance}"'
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except (OSError, urllib.error.URLError):
        return {f"up{{{labels}}}": 0.0}, None
    series: Series = {f"up{{{labels}}}": 1.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            pairs = [f'{k}="{v}"' for k, v in sorted(sample.labels.items())]
            series[f"{sample.name}{{{','.join([labels, *pairs])}}}"] = sample.value
    return series, text


def check_metrics(text: str) -> None:
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def firing(tmp_path: Path, series: Series, expected: dict[str, list[dict[str, str]]]) -> None:
    """Run the rules over ``series`` held for 30 minutes; exactly ``expected`` must fire."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "rules.yml").write_text(RULES)
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": name, "values": f"{value:g}x30"}
                             for name, value in sorted(series.items())],
            "alert_rule_test": [{"eval_time": "20m", "alertname": alert,
                                 "exp_alerts": [{"exp_labels": labels,
                                                 "exp_annotations": annotations(alert, labels)}
                                                for labels in expected.get(alert, [])]}
                                for alert in ALERTS],
        }],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    out = subprocess.run(["promtool", "test", "rules", "test.yml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def rule(alert: str) -> dict[str, Any]:
    found: dict[str, Any] = next(r for g in yaml.safe_load(RULES)["groups"] for r in g["rules"]
                                 if r["alert"] == alert)
    return found


def severity(alert: str) -> str:
    return str(rule(alert)["labels"]["severity"])


def annotations(alert: str, labels: dict[str, str]) -> dict[str, str]:
    """The rule's annotations with ``{{ $labels.X }}`` filled as Prometheus would."""
    return {key: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""),
                        text) for key, text in rule(alert).get("annotations", {}).items()}


def scrape_all(network: Network, ports: dict[str, int]) -> Series:
    series: Series = {}
    for name, port in ports.items():
        scraped, text = scrape(name, port)
        if text is not None:
            check_metrics(text)
        series.update(scraped)
    return series


def start(network: Network) -> dict[str, int]:
    ports = dict(zip(("a", "b", "c"), free_ports(3), strict=True))
    network.start("a", role="master", args=("--metrics-port", str(ports["a"]))).wait_ready()
    backups = [network.start(name, args=("--metrics-port", str(ports[name])))
               for name in ("b", "c")]  # the backups boot side by side
    for node in backups:
        node.wait_ready()
    return ports


def silent_for(series: Series, peer: str) -> float:
    ages = [v for k, v in series.items()
            if k.startswith("tasync_peer_seen_age_seconds{") and f'peer="{peer}"' in k]
    return min(ages, default=0.0)


def scrape_until_silent(network: Network, ports: dict[str, int], peer: str) -> Series:
    """Scrape until no node has heard ``peer`` for over 10 s; the last scrapes' samples."""
    series: Series = {}

    def silent() -> bool:
        series.update(scrape_all(network, ports))
        return silent_for(series, peer) > 10
    wait_for(silent, timeout_s=60, what=f"{peer} silent for 10 s")
    return series


def test_rules_fire_on_real_failures_and_not_on_a_healthy_network(
        network: Network, tmp_path: Path) -> None:
    ports = start(network)

    def everyone_heard() -> bool:
        series = scrape_all(network, ports)
        ages = [v for k, v in series.items() if k.startswith("tasync_peer_seen_age_seconds{")]
        return len(ages) == 9 and max(ages) < 3
    wait_for(everyone_heard, timeout_s=30, what="every node hearing every beacon")
    firing(tmp_path / "healthy", scrape_all(network, ports), {})

    # A hung backup: its endpoint no longer answers, its peers stop hearing it.
    c = network.nodes["c"]
    c.signal(signal.SIGSTOP)
    try:
        hung = scrape_until_silent(network, ports, "c")
        firing(tmp_path / "hung", hung, {
            "TasyncNodeSilent": [{"peer": "c", "severity": severity("TasyncNodeSilent")}],
            "TasyncNodeUnreachable": [{"job": "tasync", "instance": "c",
                                       "severity": severity("TasyncNodeUnreachable")}],
        })
    finally:
        c.signal(signal.SIGCONT)

    # A dead master: nobody is master, and its peers stop hearing it.
    wait_for(lambda: silent_for(scrape_all(network, ports), "c") < 3, timeout_s=60,
             what="c heard again")
    network.nodes["a"].kill()
    firing(tmp_path / "dead-master", scrape_until_silent(network, ports, "a"), {
        "TasyncNoMaster": [{"severity": severity("TasyncNoMaster")}],
        "TasyncNodeSilent": [{"peer": "a", "severity": severity("TasyncNodeSilent")}],
        "TasyncNodeUnreachable": [{"job": "tasync", "instance": "a",
                                   "severity": severity("TasyncNodeUnreachable")}],
    })


def test_rules_of_states_a_test_cannot_cause_on_a_shared_broker(
        network: Network, tmp_path: Path) -> None:
    """Lag and a stuck outbox need a broker alarm or a slowed node: a real scrape, one value set.

    The samples are a healthy network's real scrape; only the one gauge the failure moves is
    set to what it would read, so the rule is still checked against real label sets.
    """
    ports = start(network)
    healthy: Series = {}

    def lag_known_everywhere() -> bool:
        healthy.update(scrape_all(network, ports))
        return sum(k.startswith("tasync_lag_changes{") for k in healthy) == 3
    wait_for(lag_known_everywhere, timeout_s=30, what="every node knowing its lag")
    lagging = {k: (42.0 if k.startswith("tasync_lag_changes{") and 'node="c"' in k else v)
               for k, v in healthy.items()}
    assert lagging != healthy
    firing(tmp_path / "lag", lagging, {"TasyncNodeBehind": [{
        "job": "tasync", "instance": "c", "node": "c", "severity": severity("TasyncNodeBehind")}]})
    stuck = {k: (7.0 if k.startswith("tasync_outbox_pending_changes{") else v)
             for k, v in healthy.items()}
    assert stuck != healthy
    firing(tmp_path / "outbox", stuck, {"TasyncOutboxStuck": [{
        "job": "tasync", "instance": "a", "node": "a",
        "severity": severity("TasyncOutboxStuck")}]})


def test_rules_see_a_stranded_list_and_dead_letters(network: Network, tmp_path: Path) -> None:
    ports = start(network)
    network.nodes["c"].kill()
    network.cli("config", "set", "destination", "out", "--url", f"file://{tmp_path}/out.jsonl")
    # A mail destination without a recipient fails at once, and for good: a dead letter.
    network.cli("config", "set", "destination", "broken", "--url", "smtp://127.0.0.1:1/")
    network.cli("send", "-i", "out", "-m", "waits for c", "--host", "c", check=False)
    network.cli("send", "-i", "broken", "-m", "cannot be mailed", "--host", "a")
    # A message no node can accept goes to the quarantine.
    conn = connect(Settings.from_url(network.broker_url))
    try:
        conn.channel().basic_publish(amqp.Message(b"not an alert"),
                                     exchange=topology.ALERTS_EXCHANGE, routing_key="a")
    finally:
        close_quietly(conn)
    trouble: Series = {}

    def seen() -> bool:
        trouble.update(scrape_all(network, ports))
        stranded = [v for k, v in trouble.items()
                    if k.startswith("tasync_list_stranded{") and 'list="c"' in k]
        dead = [v for k, v in trouble.items() if k.startswith("tasync_dead_letter_messages{")]
        refused = [v for k, v in trouble.items() if k.startswith("tasync_quarantine_messages{")]
        return max(stranded, default=0) > 0 and max(dead, default=0) > 0 \
            and max(refused, default=0) > 0 and silent_for(trouble, "c") > 10
    wait_for(seen, timeout_s=90, what="a stranded list, dead letters, quarantine, c silent")
    firing(tmp_path / "trouble", trouble, {
        "TasyncListStranded": [{"list": "c", "severity": severity("TasyncListStranded")}],
        "TasyncDeadLetters": [{"severity": severity("TasyncDeadLetters")}],
        "TasyncQuarantine": [{"severity": severity("TasyncQuarantine")}],
        "TasyncNodeSilent": [{"peer": "c", "severity": severity("TasyncNodeSilent")}],
        "TasyncNodeUnreachable": [{"job": "tasync", "instance": "c",
                                   "severity": severity("TasyncNodeUnreachable")}],
    })
