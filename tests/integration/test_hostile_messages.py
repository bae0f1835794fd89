"""Thousands of hostile messages through the broker into a running node.

A master ``a`` and a backup ``b`` run as real worker processes with a cluster key, ``--master a``
and a ``telalert.hosts`` given with ``--alert-hosts-file``. Hypothesis draws 4,000 messages that
no node may accept (``tests.harness.hostile``): malformed, truncated, wrong types, wrong schema
versions, unknown and missing fields, messages of other types, denied origins and senders, bad
signatures, plus a few oversized ones. They are published in bulk with publisher confirms into
``b``'s sync queue and into the queue of the precedence list ``b``, where ``b``'s sync and
delivery consumers take them. Then:

* both workers are still running, and still work: a later change applies and a later alert is
  delivered;
* every hostile message is in ``tasync.quarantine`` exactly once, with a reason that fits what
  was wrong with it, and ``b``'s trail has one line for each;
* ``b``'s export, seq and checksum and the delivered file are exactly what they were before.

One worker run and one bulk publish keep this within the default suite's budget.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import amqp
import pytest

from tasync.broker import messages, topology
from tasync.broker.alerts import MAX_ALERT_BYTES
from tasync.broker.allowlist import AllowList
from tasync.broker.audit import read_trail
from tasync.broker.connection import close_quietly, connect
from tasync.broker.epochs import EpochMark
from tasync.broker.errors import MessageError
from tasync.broker.fastdecode import decode_entry
from tasync.broker.messages import ChangeBatch
from tasync.broker.publisher import ConfirmedPublisher, Outgoing
from tasync.broker.settings import Settings
from tasync.broker.signing import SIGNATURE_HEADER, KeyRing
from tasync.consumers.admission import Admission
from tests.harness import hostile, secret_registry
from tests.network import Network
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

SYNC_COUNT = 2_000
ALERT_COUNT = 2_000
FUZZ_HEADER = "x-fuzz-index"
#: What the quarantine reason must mention, by kind of hostile message.
REASONS = {
    "garbage": ("malformed", "schema version", "invalid", "unexpected"),
    "json": ("malformed", "schema version"),
    "truncated": ("malformed JSON",),
    "wrong-type": ("invalid", "unexpected message type"),
    "wrong-version": ("schema version",),
    "missing-field": ("schema version", "invalid", "unexpected message type"),
    "unknown-field": ("invalid", "Unknown field"),
    "wrong-message-type": ("unexpected", "invalid"),
    "denied-origin": ("may not act as master",),
    "denied-sender": ("may not send alerts",),
    "bad-signature": ("signature", "unknown key id"),
    "oversized": ("oversized",),
}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _quarantine_count(broker_url: str) -> int:
    conn = connect(Settings.from_url(broker_url))
    try:
        return int(conn.channel().queue_declare(topology.QUARANTINE_QUEUE, passive=True)
                   .message_count)
    finally:
        close_quietly(conn)


def _read_quarantine(broker_url: str, count: int) -> list[dict[str, Any]]:
    """The headers of ``count`` quarantined messages (consumed, so the queue ends empty)."""
    conn = connect(Settings.from_url(broker_url))
    got: list[dict[str, Any]] = []
    try:
        channel = conn.channel()
        channel.basic_qos(0, 1000, False)
        channel.basic_consume(topology.QUARANTINE_QUEUE, no_ack=True, callback=lambda m: got.append(
            dict(m.properties.get("application_headers") or {})))

        def drained() -> bool:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.5)
            return len(got) >= count

        wait_for(drained, timeout_s=120, what=f"{count} quarantined messages read",
                 interval_s=0)
    finally:
        close_quietly(conn)
    return got


def _publish(broker_url: str, messages: list[Outgoing]) -> None:
    conn = connect(Settings.from_url(broker_url))
    try:
        ConfirmedPublisher(conn, timeout_s=120).publish_many(messages)
    finally:
        close_quietly(conn)


def _network(network: Network, tmp_path: Path) -> tuple[KeyRing, Path]:
    key_file = tmp_path / "cluster.key"
    key_file.write_text(KeyRing.generate("fuzz"))
    key_file.chmod(0o600)
    ring = KeyRing.load(key_file)
    secret_registry.register("the hostile test's cluster key", ring.keys[0][1].hex())
    alert_hosts = tmp_path / "telalert.hosts"
    alert_hosts.write_text("# who may send alerts\n!evil-host\nguest\n")
    network.env["TASYNC_CLUSTER_KEY_FILE"] = str(key_file)
    network.start("a", role="master", args=("--master", "a")).wait_ready()
    network.start("b", args=("--master", "a", "--alert-hosts-file", str(alert_hosts))).wait_ready()
    return ring, alert_hosts


def test_hostile_messages_are_quarantined_and_change_nothing(network: Network, tmp_path: Path,
                                                             broker_url: str) -> None:
    ring, _ = _network(network, tmp_path)
    delivered = tmp_path / "ops.jsonl"
    network.cli("config", "set", "destination", "ops", "--url", f"file://{delivered}",
                "--wait-applied")
    network.cli("send", "-i", "ops", "-m", "before", "--host", "b")
    wait_for(lambda: len(_lines(delivered)) == 1, what="the first alert delivered")
    b = network.nodes["b"]
    before = {"export": network.export("b"), "status": b.status(), "file": _lines(delivered)}
    assert before["status"] is not None
    next_seq = int(before["status"]["applied_seq"]) + 1

    sync = hostile.draw_many(hostile.sync_message(
        sign=ring.sign, allowed="a", denied="rogue", next_seq=next_seq), SYNC_COUNT)
    alerts = hostile.draw_many(hostile.alert_message(
        sign=ring.sign, hosts=("b",), target="ops", sender="tasync-test",
        denied_sender="evil-host"), ALERT_COUNT)
    sync += [hostile.oversized(hostile.batch_dict(origin="a", seq=next_seq), 4 << 20, ring.sign)
             for _ in range(2)]
    alerts += [hostile.oversized(hostile.alert_dict(hosts=("b",), target="ops"), MAX_ALERT_BYTES,
                                 ring.sign, {"x-tasync-sender": "tasync-test"}) for _ in range(2)]
    assert len(sync) + len(alerts) >= SYNC_COUNT + ALERT_COUNT
    thrown = sync + alerts
    outgoing = [
        Outgoing(exchange="", routing_key=topology.sync_queue("b"), body=m.body,
                 headers={**m.headers, FUZZ_HEADER: i})
        for i, m in enumerate(sync)
    ] + [
        Outgoing(exchange=topology.ALERTS_EXCHANGE, routing_key=topology.precedence_key(["b"]),
                 body=m.body, headers={**m.headers, FUZZ_HEADER: len(sync) + i}, mandatory=True)
        for i, m in enumerate(alerts)
    ]
    _publish(broker_url, outgoing)

    wait_for(lambda: _quarantine_count(broker_url) >= len(thrown), timeout_s=180,
             what=f"{len(thrown)} hostile messages quarantined", interval_s=0.5)
    quarantined = _read_quarantine(broker_url, len(thrown))
    indexes = Counter(int(h[FUZZ_HEADER]) for h in quarantined)
    assert indexes == Counter(range(len(thrown))), "each message quarantined exactly once"
    wrong = []
    for headers in quarantined:
        index = int(headers[FUZZ_HEADER])
        message = thrown[index]
        reason = str(headers.get("x-tasync-reason", ""))
        if not any(word in reason for word in REASONS[message.category]):
            wrong.append(f"{message.category}: {reason!r} for {message.body[:120]!r}")
        expect = topology.sync_queue("b") if index < len(sync) else "b"
        assert headers["x-tasync-source-queue"] == expect
    assert not wrong, f"{len(wrong)} reasons do not fit:\n" + "\n".join(wrong[:20])

    trail = Counter(e["event"] for e in read_trail(b.data_dir))
    assert trail["change.quarantined"] == len(sync) and trail["alert.refused"] == len(alerts)
    assert all(node.alive for node in network.nodes.values())
    after = b.status() or {}
    assert network.export("b") == before["export"]
    assert (after["applied_seq"], after["checksum"]) == (before["status"]["applied_seq"],
                                                         before["status"]["checksum"])
    assert _lines(delivered) == before["file"]

    # Still working: a change applies and an alert is delivered after all that.
    network.cli("config", "set", "destination", "after", "--url", "file:///tmp/after.jsonl",
                "--wait-applied")
    assert "after" in json.loads(network.export("b"))["destination"]
    network.cli("send", "-i", "ops", "-m", "after", "--host", "b")
    wait_for(lambda: len(_lines(delivered)) == 2, what="a later alert delivered")
    assert json.loads(_lines(delivered)[-1])["text"] == "after"
    assert _quarantine_count(broker_url) == 0


def test_hostile_strategies_never_draw_an_acceptable_message() -> None:
    """The premise of the test above, checked offline against the decoders the node uses."""
    ring = KeyRing.parse(KeyRing.generate("k1"))
    admission = Admission(masters=AllowList.single("a"),
                          senders=AllowList.parse("!evil-host\nguest\n"))
    for message in hostile.draw_many(hostile.sync_message(
            sign=ring.sign, allowed="a", denied="rogue", next_seq=5), 1500):
        with pytest.raises(MessageError):
            item = decode_entry(message.body, max_bytes=4 << 20)
            if not isinstance(item, ChangeBatch | EpochMark):
                raise MessageError("not for a sync queue")
            ring.verify(message.body, message.headers.get(SIGNATURE_HEADER))
            admission.admit_batch(ChangeBatch(epoch=1, origin=item.origin, changes=()),
                                  amqp.Message(b"", user_id="guest"))
    for message in hostile.draw_many(hostile.alert_message(
            sign=ring.sign, hosts=("b",), target="ops", sender="x", denied_sender="evil-host"),
            1500):
        with pytest.raises(MessageError):
            ring.verify(message.body, message.headers.get(SIGNATURE_HEADER))
            messages.decode(message.body, max_bytes=MAX_ALERT_BYTES, expect="alert")
            admission.admit_alert(message.headers.get("x-tasync-sender"),
                                  amqp.Message(b"", user_id="guest"))
