"""Replication under faults: SIGKILL of master or backup, broker restart, hostile queue input."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import amqp
import pytest

from tasync.broker import messages, topology
from tasync.broker.messages import Change, ChangeBatch
from tests.harness.rabbit_cluster import RabbitCluster, unavailable_reason
from tests.integration.test_replication import assert_identical, start_trio, write_import
from tests.network import Network, applied_seqs
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


class ImportLoop(threading.Thread):
    """Runs imports of ``size`` objects one after another, recording which were reported done."""

    def __init__(self, network: Network, tmp: Path, *, parts: int, size: int) -> None:
        super().__init__(daemon=True)
        self.network, self.tmp, self.parts, self.size = network, tmp, parts, size
        self.committed: list[str] = []
        self.failed: list[str] = []

    def run(self) -> None:
        for part in range(self.parts):
            prefix = f"p{part:02d}-"
            path = write_import(self.tmp / f"{prefix}.json", self.size, prefix=prefix)
            out = self.network.cli("config", "import", str(path), "--json", "--timeout", "60",
                                   check=False)
            (self.committed if out.returncode == 0 else self.failed).append(prefix)


def assert_no_seq_applied_twice(network: Network, names: tuple[str, ...]) -> None:
    for name in names:
        seqs = applied_seqs(network.root / name)
        assert len(seqs) == len(set(seqs)), f"{name} applied some seq twice"


def assert_committed_present(network: Network, prefixes: list[str], size: int) -> None:
    export = json.loads(network.export("b"))
    for prefix in prefixes:
        names = [n for n in export["destination"] if n.startswith(prefix)]
        assert len(names) == size, f"import {prefix} reported committed but incomplete"


def test_master_sigkill_mid_import_loses_nothing(network: Network, tmp_path: Path) -> None:
    start_trio(network)
    loop = ImportLoop(network, tmp_path, parts=20, size=500)
    loop.start()
    wait_for(lambda: len(loop.committed) >= 4, timeout_s=120, what="four imports committed")
    network.nodes["a"].kill()
    network.start("a").wait_ready()  # role comes back from its store
    loop.join(600)
    assert loop.committed, "no import was reported committed"
    seq = network.nodes["a"].status()["applied_seq"]
    for name in ("b", "c"):
        network.nodes[name].wait_seq(seq, timeout_s=120)
    assert_identical(network)
    assert_committed_present(network, loop.committed, 500)
    assert_no_seq_applied_twice(network, ("b", "c"))


def test_backup_sigkill_mid_apply_catches_up(network: Network, tmp_path: Path) -> None:
    start_trio(network)
    loop = ImportLoop(network, tmp_path, parts=10, size=1000)
    loop.start()
    b = network.nodes["b"]
    wait_for(lambda: (b.status() or {}).get("applied_seq", 0) > 1500, timeout_s=120,
             what="b applying")
    b.kill()
    loop.join(600)
    assert not loop.failed
    network.start("b").wait_ready()
    seq = network.nodes["a"].status()["applied_seq"]
    network.nodes["b"].wait_seq(seq)
    network.nodes["c"].wait_seq(seq)
    assert_identical(network)
    assert_no_seq_applied_twice(network, ("b", "c"))


@pytest.fixture
def private_network(tmp_path: Path) -> Iterator[tuple[Network, RabbitCluster]]:
    """A network on a one-node RabbitMQ of its own, which the test may stop and start.

    The broker at 127.0.0.1:5672 is shared by everyone on the machine: stopping it would drop
    every connection there for seconds. A private node boots in a few seconds.
    """
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no private RabbitMQ node: {reason}")
    with RabbitCluster(1) as broker:
        broker.add_vhost("restart")
        net = Network(broker_url=broker.url_for_vhost("restart"), root=tmp_path)
        try:
            yield net, broker
        finally:
            net.close()


def test_broker_restart_mid_import(private_network: tuple[Network, RabbitCluster],
                                   tmp_path: Path) -> None:
    network, broker = private_network
    start_trio(network)
    loop = ImportLoop(network, tmp_path, parts=12, size=500)
    loop.start()
    wait_for(lambda: len(loop.committed) >= 2, timeout_s=120, what="two imports committed")
    broker.stop_app(0)
    try:
        wait_for(lambda: len(loop.failed) >= 1 or not loop.is_alive(), timeout_s=120,
                 what="an import failing while the broker is down")
    finally:
        broker.start_app(0)
    loop.join(600)
    network.cli("config", "set", "destination", "after-restart", "--url", "file:///tmp/x",
                "--timeout", "120")
    seq = network.nodes["a"].status()["applied_seq"]
    for name in ("b", "c"):
        network.nodes[name].wait_seq(seq, timeout_s=180)
    assert_identical(network)
    assert_committed_present(network, loop.committed, 500)
    assert_no_seq_applied_twice(network, ("b", "c"))


def _publish_raw(broker_url: str, queue: str, body: bytes) -> None:
    from tasync.broker.connection import connect
    from tasync.broker.settings import Settings

    conn = connect(Settings.from_url(broker_url))
    try:
        conn.channel().basic_publish(amqp.Message(body, delivery_mode=2), exchange="",
                                     routing_key=queue)
    finally:
        conn.release()


def test_hostile_queue_input_is_quarantined(network: Network, broker_url: str) -> None:
    start_trio(network)
    network.cli("config", "set", "destination", "d1", "--url", "file:///tmp/x",
                "--wait-applied")
    b = network.nodes["b"]
    seq = b.status()["applied_seq"]
    before = network.export("b")
    old = ChangeBatch(epoch=1, origin="a", changes=(Change(
        epoch=1, seq=seq, ts=0.0, origin="a", op="set", kind="destination", name="d1",
        body={"url": "file:///evil"}),))
    bodies = [b"{not json", json.dumps({"v": 99, "type": "changes"}).encode(),
              json.dumps({"v": 1, "type": "changes", "epoch": 1}).encode(),
              messages.encode(old)]
    for body in bodies:
        _publish_raw(broker_url, topology.sync_queue("b"), body)

    def trail_events() -> list[dict[str, str]]:
        from tasync.broker.audit import read_trail
        return read_trail(b.data_dir)

    wait_for(lambda: sum(e["event"] == "change.quarantined" for e in trail_events()) >= 3,
             timeout_s=30, what="three quarantine lines")
    wait_for(lambda: any(e["event"] == "change.skipped" for e in trail_events()),
             timeout_s=30, what="the replayed change skipped")
    assert b.alive
    assert network.export("b") == before
    network.cli("config", "set", "destination", "d2", "--url", "file:///tmp/y",
                "--wait-applied")
    assert_identical(network)
    reasons = [e["reason"] for e in trail_events() if e["event"] == "change.quarantined"]
    assert any("malformed JSON" in r for r in reasons)
    assert any("schema version" in r for r in reasons)
    assert wait_for(lambda: queue_depth(broker_url, topology.QUARANTINE_QUEUE) == 3,
                    timeout_s=30, what="three messages in quarantine")


def queue_depth(broker_url: str, queue: str) -> int:
    """Messages ready in ``queue``, asked over AMQP (rabbitmqctl's numbers lag for quorum)."""
    from tasync.broker.connection import connect
    from tasync.broker.settings import Settings

    conn = connect(Settings.from_url(broker_url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).message_count)
    finally:
        conn.release()
