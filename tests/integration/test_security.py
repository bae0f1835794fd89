"""Only allowed masters change anything; unsigned or forged changes never apply."""

from __future__ import annotations

import json
import time
from pathlib import Path

import amqp
import pytest

from tasync.broker import messages, topology
from tasync.broker.audit import read_trail
from tasync.broker.connection import connect
from tasync.broker.messages import Change, ChangeBatch
from tasync.broker.settings import Settings
from tasync.broker.signing import SIGNATURE_HEADER, KeyRing
from tests.harness import secret_registry
from tests.network import Network
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def trail_has(data_dir: Path, event: str, text: str = "") -> bool:
    return any(e["event"] == event and text in " ".join(e.values()) for e in read_trail(data_dir))


def rogue_publish(broker_url: str, node: str, name: str, seq: int) -> None:
    """Publish a change batch of origin ``node`` straight to the config fanout.

    A node cannot become a second master (the seat is taken), so this is what a rogue process
    with broker access to ``tasync.config`` could still do.
    """
    change = Change(epoch=1, seq=seq, ts=time.time(), origin=node, op="set",
                    kind="destination", name=name,
                    body={"url": "file:///x", "schedule": None, "subject": None})
    body = messages.encode(ChangeBatch(epoch=1, origin=node, changes=(change,)))
    conn = connect(Settings.from_url(broker_url))
    try:
        conn.channel().basic_publish(amqp.Message(body), exchange=topology.CONFIG_EXCHANGE,
                                     routing_key="")
    finally:
        conn.release()


def test_master_not_in_hosts_file_is_rejected(network: Network, tmp_path: Path,
                                              broker_url: str) -> None:
    hosts = tmp_path / "tasync.hosts"
    hosts.write_text("# who may act as sync master\n!rogue\na\n")
    network.start("a", role="master", args=("--hosts-file", str(hosts))).wait_ready()
    b = network.start("b", args=("--hosts-file", str(hosts)))
    b.wait_ready()
    c = network.start("c", args=("--master", "a"))
    c.wait_ready()
    network.cli("config", "set", "destination", "good", "--url", "file:///tmp/good",
                "--wait-applied")
    before = {n: network.export(n) for n in ("b", "c")}

    # A rogue refuses to start as master under a hosts file that denies it...
    refused = network.cli("--help", check=False)  # warm the interpreter cache
    assert refused.returncode == 0
    denied = network.start("rogue", role="master", args=("--hosts-file", str(hosts)))
    assert denied.proc is not None and denied.proc.wait(60) == 1
    assert "may not act as master" in denied.log_path.read_text()

    # ...started without one, it cannot take the master's seat from a and runs as a backup...
    rogue = network.start("rogue2", role="master")
    assert rogue.wait_ready()["role"] == "backup"
    assert trail_has(rogue.data_dir, "master.refused", "a")
    network.settle()  # it registered itself as a node, like any backup
    before = {n: network.export(n) for n in ("b", "c")}
    # ...and what a rogue publishes anyway is rejected by every backup with an allow-list.
    rogue_publish(broker_url, "rogue2", "evil", int(b.status()["applied_seq"]) + 1)
    for node in (b, c):
        wait_for(lambda node=node: trail_has(node.data_dir, "change.quarantined", "rogue2"),
                 timeout_s=30, what=f"{node.name} rejecting rogue2")
    assert {n: network.export(n) for n in ("b", "c")} == before
    network.cli("config", "set", "destination", "good2", "--url", "file:///tmp/g2")
    seq = network.nodes["a"].status()["applied_seq"]
    b.wait_seq(seq)
    c.wait_seq(seq)
    assert "good2" in json.loads(network.export("b"))["destination"]
    assert "evil" not in json.loads(network.export("c"))["destination"]


def _publish(broker_url: str, queue: str, body: bytes, headers: dict[str, object]) -> None:
    conn = connect(Settings.from_url(broker_url))
    try:
        conn.channel().basic_publish(amqp.Message(body, application_headers=headers),
                                     exchange="", routing_key=queue)
    finally:
        conn.release()


def test_unsigned_or_forged_changes_are_rejected(network: Network, tmp_path: Path,
                                                 broker_url: str) -> None:
    key_file = tmp_path / "cluster.key"
    key_file.write_text(KeyRing.generate("k1"))
    key_file.chmod(0o600)
    secret_registry.register("test_security's cluster key", KeyRing.load(key_file).keys[0][1].hex())
    args = ("--key-file", str(key_file))
    network.start("a", role="master", args=args).wait_ready()
    b = network.start("b", args=args)
    b.wait_ready()
    network.cli("config", "set", "destination", "d1", "--url", "file:///tmp/d1",
                "--wait-applied")
    seq = network.settle()
    forged = ChangeBatch(epoch=1, origin="a", changes=(Change(
        epoch=1, seq=seq + 1, ts=time.time(), origin="a", op="set", kind="destination",
        name="forged", body={"url": "file:///evil"}),))
    body = messages.encode(forged)
    other = KeyRing.parse(KeyRing.generate("k1"))
    _publish(broker_url, topology.sync_queue("b"), body, {})
    _publish(broker_url, topology.sync_queue("b"), body, {SIGNATURE_HEADER: other.sign(body)})
    _publish(broker_url, topology.sync_queue("b"), body + b" ", {
        SIGNATURE_HEADER: KeyRing.load(key_file).sign(body)})
    wait_for(lambda: sum(e["event"] == "change.quarantined" for e in read_trail(b.data_dir)) >= 3,
             timeout_s=30, what="three rejected changes")
    reasons = " ".join(e.get("reason", "") for e in read_trail(b.data_dir))
    assert "missing signature" in reasons and "bad signature" in reasons
    assert b.status()["applied_seq"] == seq
    network.cli("config", "set", "destination", "d2", "--url", "file:///tmp/d2",
                "--wait-applied")
    export = json.loads(network.export("b"))
    assert "forged" not in export["destination"] and "d2" in export["destination"]


def test_promote_refuses_a_node_its_hosts_file_denies(network: Network, tmp_path: Path) -> None:
    hosts = tmp_path / "tasync.hosts"
    hosts.write_text("a\n!c\n")
    network.start("a", role="master", args=("--hosts-file", str(hosts))).wait_ready()
    c = network.start("c", args=("--hosts-file", str(hosts)))
    c.wait_ready()
    out = network.cli("promote", "c", check=False)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("tasync: c may not act as master: denied by line 2 '!c'")
    assert len(out.stderr.strip().splitlines()) == 1
    assert trail_has(c.data_dir, "master.promotion_refused", "denied by line 2")
    roles = {r["node"]: r["role"] for r in network.status()}
    assert roles == {"a": "master", "c": "backup"}  # nobody was fenced
    network.cli("config", "set", "destination", "still", "--url", "file:///tmp/s",
                "--wait-applied")
