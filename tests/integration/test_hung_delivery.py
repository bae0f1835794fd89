"""A delivering node that hangs (SIGSTOP) at the default settings: the next node takes over.

The broker only moves a hung node's alerts once it gives up on the node's connection, which
its heartbeat decides; the delivery connection's short default heartbeat makes that a matter
of about two seconds. The takeover delay is reported, never asserted.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest

from tasync.broker.alerts import Alert
from tasync.broker.settings import Settings
from tasync.producers.sender import AlertSender
from tests.network import Network
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
RATE_PER_S = 20
SECONDS = 8


def delivered(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_a_hung_delivering_node_is_taken_over_and_nothing_is_lost(
        network: Network, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    network.start("a", role="master").wait_ready()
    network.start("b").wait_ready()
    network.cli("config", "set", "destination", "out", "--url", f"file://{out}")
    network.cli("config", "set", "route", "r", "--host", "a", "--host", "b", "--wait-applied")
    ids = [f"hung-{i:04d}" for i in range(RATE_PER_S * SECONDS)]
    stopped_at: list[float] = []

    def send_steadily() -> None:
        with AlertSender(Settings.from_url(network.broker_url), name="steady") as sender:
            for index, alert_id in enumerate(ids):
                if index == RATE_PER_S * 2:  # two seconds in, a hangs
                    network.nodes["a"].signal(signal.SIGSTOP)
                    stopped_at.append(time.time())
                sender.send(Alert(id=alert_id, source="steady", target_kind="destination",
                                  target="out", text=f"alert {index}", hosts=("a", "b")))
                time.sleep(1 / RATE_PER_S)  # the load: a steady 20 alerts a second

    sending = threading.Thread(target=send_steadily)
    sending.start()
    try:
        sending.join(SECONDS * 4)
        wait_for(lambda: {r["id"] for r in delivered(out)} >= set(ids), timeout_s=60,
                 what="every alert delivered by b")
    finally:
        network.nodes["a"].signal(signal.SIGCONT)
    rows = delivered(out)
    assert {r["id"] for r in rows} >= set(ids), "an alert was lost"
    by_b_after = [float(r["delivered_at"]) for r in rows if r["node"] == "b"
                  and float(r["delivered_at"]) > stopped_at[0]]
    assert by_b_after, "b took nothing over"
    taken_over_s = min(by_b_after) - stopped_at[0]
    repeated = len(rows) - len({r["id"] for r in rows})
    (tmp_path.parent / "hung-delivery.txt").write_text(
        f"first delivery by b {taken_over_s:.2f} s after a stopped; {repeated} repeated\n")
    print(f"first delivery by b {taken_over_s:.2f} s after a hung; {repeated} ids repeated")
