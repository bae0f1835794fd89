"""The delivery worker on the in-process broker: an alert consumed, delivered, acknowledged.

The worker runs as in a node (its thread, its host-list and handled-stream watchers on their own
connections); alerts come from ``tasync.producers.sender.AlertSender``, as ``tasync send`` sends
them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tasync.broker import topology
from tasync.broker.alerts import Alert
from tasync.broker.audit import read_trail
from tasync.broker.consumer import ConsumerLoop
from tasync.broker.events import Event
from tasync.broker.memory import MemoryBroker
from tasync.broker.messages import Change
from tasync.broker.settings import Settings
from tasync.consumers.context import NodeContext
from tasync.consumers.delivery.executor import RetryPolicy
from tasync.consumers.delivery.worker import DeliveryConsumer
from tasync.consumers.totals import Totals
from tasync.producers.sender import AlertSender
from tests.unit.consumers.conftest import MakeContext, batch
from tests.waiting import wait_for


@pytest.fixture
def node(make_context: MakeContext, run: Callable[[ConsumerLoop], ConsumerLoop],
         tmp_path: Path) -> Iterator[tuple[NodeContext, DeliveryConsumer]]:
    """Node ``b`` with a file destination that works and one whose directory is missing."""
    ctx = make_context("b")
    now = time.time()
    ctx.store.apply(batch(*[
        Change(epoch=1, seq=seq, ts=now, origin="a", op="set", kind=kind, name=name, body=body)
        for seq, (kind, name, body) in enumerate([
            ("node", "b", {}),
            ("destination", "ok", {"url": f"file://{tmp_path}/out.jsonl"}),
            ("destination", "broken", {"url": f"file://{tmp_path}/missing/out.jsonl"}),
        ], 1)]))
    worker = DeliveryConsumer(ctx, Totals(ctx, dedup_window_s=600.0), threads=2,
                              policy=RetryPolicy(attempts=1, backoff_s=0.01))
    run(worker)
    yield ctx, worker


def send(settings: Settings, alert_id: str, target: str) -> None:
    with AlertSender(settings, name="test", check=False) as sender:
        sender.send(Alert(id=alert_id, source="unit", target_kind="destination", target=target,
                          text="disk full", hosts=("b",)))


def settled(broker: MemoryBroker) -> bool:
    queue = topology.alert_queue(("b",))
    return (queue in broker.queue_names() and not broker.queue_messages(queue)
            and broker.unacked(queue) == 0)


def test_an_alert_is_delivered_to_its_file_and_acknowledged(
        node: tuple[NodeContext, DeliveryConsumer], memory_settings: Settings,
        memory_broker: MemoryBroker, tmp_path: Path) -> None:
    ctx, worker = node
    send(memory_settings, "alert-1", "ok")
    out = tmp_path / "out.jsonl"
    wait_for(out.exists, timeout_s=20.0, what="the file written")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(line["id"], line["text"]) for line in lines] == [("alert-1", "disk full")]
    wait_for(lambda: settled(memory_broker), timeout_s=10.0, what="the alert acknowledged")
    assert (worker.totals.lookup("alert-1") or {}).get("outcome") == "delivered"
    # The node told the network it handled the id, so no other node delivers it again.
    records = memory_broker.queue_messages(topology.HANDLED_STREAM)
    assert any(b"alert-1" in message.body for message in records)
    assert memory_broker.queue_messages(topology.DEAD_LETTER_QUEUE) == []
    assert [line["event"] for line in read_trail(ctx.data_dir)
            if line.get("id") == "alert-1"] == [Event.ALERT_DELIVERED]


def test_a_failing_destination_goes_to_the_dead_letters_with_its_reason(
        node: tuple[NodeContext, DeliveryConsumer], memory_settings: Settings,
        memory_broker: MemoryBroker) -> None:
    _ctx, worker = node
    send(memory_settings, "alert-2", "broken")
    dead = wait_for(lambda: memory_broker.queue_messages(topology.DEAD_LETTER_QUEUE),
                    timeout_s=20.0, what="a dead letter")
    assert len(dead) == 1 and b"alert-2" in dead[0].body
    headers = dead[0].headers or {}
    assert "cannot append to the file" in str(headers)
    wait_for(lambda: settled(memory_broker), timeout_s=10.0, what="the alert acknowledged")
    assert (worker.totals.lookup("alert-2") or {}).get("outcome") == "failed"


def test_subscriptions_follow_route_changes_and_ignore_other_kinds(
        node: tuple[NodeContext, DeliveryConsumer], monkeypatch: pytest.MonkeyPatch) -> None:
    ctx, worker = node
    idle, syncs = [0], [0]
    on_idle, sync = worker.on_idle, worker.subscriptions.sync

    def counted_idle() -> None:
        on_idle()
        idle[0] += 1

    def counted_sync() -> None:
        syncs[0] += 1
        sync()

    monkeypatch.setattr(worker, "on_idle", counted_idle)
    monkeypatch.setattr(worker.subscriptions, "sync", counted_sync)
    wait_for(lambda: idle[0] >= 3, timeout_s=10.0, what="the worker settled after its start")
    syncs[0] = 0
    now = time.time()
    ctx.store.apply(batch(Change(epoch=1, seq=4, ts=now, origin="a", op="set",
                                 kind="destination", name="more", body={"url": "file:///x"})))
    seen = idle[0]
    wait_for(lambda: idle[0] >= seen + 3, timeout_s=10.0, what="the worker idle after it")
    assert syncs == [0]  # a destination does not decide which lists the node consumes
    ctx.store.apply(batch(Change(epoch=1, seq=5, ts=now, origin="a", op="set", kind="route",
                                 name="r", body={"hosts": ["b", "c"]})))
    wait_for(lambda: "b.c" in worker.status()["lists"], timeout_s=10.0,
             what="the route's list consumed")
    assert syncs == [1]
