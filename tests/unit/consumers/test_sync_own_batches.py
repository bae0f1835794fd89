"""The master's own batches on its own sync queue: skipped without decoding, and only those.

The master's relay publishes to the config fanout, which also feeds the master's own sync
queue. Its sync consumer recognises a body the relay encoded from its own rows and acknowledges
it without decoding; anything else, a forged header included, takes the full path, and a backup
always does. Each test counts the decodes and checks what the full path would have done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tasync.broker import messages, topology
from tasync.broker.connection import connect
from tasync.broker.consumer import ConsumerLoop
from tasync.broker.epochs import EpochHistory, Era
from tasync.broker.events import Event
from tasync.broker.memory import MemoryBroker
from tasync.broker.protocol import Role
from tasync.broker.publisher import ConfirmedPublisher, Outgoing
from tasync.broker.settings import Settings
from tasync.broker.store import ApplyResult
from tasync.consumers import sync as sync_module
from tasync.consumers.context import NodeContext
from tasync.consumers.sync import SyncConsumer
from tasync.producers.relay import ChangeRelay, batch_headers
from tests.unit.consumers.conftest import MakeContext, batch, change, events
from tests.waiting import wait_for

CHANGE_EVENTS = (Event.CHANGE_APPLIED, Event.CHANGE_SKIPPED, Event.CHANGE_REJECTED,
                 Event.CHANGE_QUARANTINED, Event.CHANGE_GAP)


class BrokerSeat:
    """The master's seat reduced to what the relay publishes with: confirmed publishes."""

    held = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sent: list[Outgoing] = []

    def publish(self, out: Any, *, window_bytes: int | None = None,
                on_confirmed: Callable[[int], None] | None = None) -> int:
        out = list(out)
        self.sent += out
        publish_raw(self.settings, out)
        return len(out)


class Always:
    """A relay that claims every body as its own: what a backup must not listen to."""

    def own_batch(self, body: bytes, *, epoch: int, last_seq: int) -> bool:
        return True


def publish_raw(settings: Settings, out: list[Outgoing]) -> None:
    conn = connect(settings)
    try:
        ConfirmedPublisher(conn, timeout_s=5.0).publish_many(out)
    finally:
        conn.release()


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every body the sync consumer decodes."""
    seen: list[bytes] = []
    real = sync_module.decode_entry

    def counting(body: bytes, *, max_bytes: int) -> Any:
        seen.append(body)
        return real(body, max_bytes=max_bytes)

    monkeypatch.setattr(sync_module, "decode_entry", counting)
    return seen


@pytest.fixture
def master(make_context: MakeContext, run: Callable[[ConsumerLoop], ConsumerLoop],
           memory_settings: Settings) -> Iterator[tuple[NodeContext, ChangeRelay, BrokerSeat,
                                                        list[ApplyResult]]]:
    """Master ``a`` of epoch 1 with seqs 1..3 committed, its relay and its sync consumer."""
    ctx = make_context("a", role=Role.MASTER)
    ctx.store.set_history(EpochHistory().learn(Era(1, 0, "a")))
    ctx.store.commit([change(seq, f"d{seq}") for seq in (1, 2, 3)])
    seat = BrokerSeat(memory_settings)
    relay = ChangeRelay(ctx.store, node="a", seat=seat,  # type: ignore[arg-type]
                        batch_max_changes=2)
    applied: list[ApplyResult] = []
    run(SyncConsumer(ctx, on_applied=applied.append, own=relay))
    yield ctx, relay, seat, applied


def drained(broker: MemoryBroker, node: str) -> Callable[[], bool]:
    queue = topology.sync_queue(node)
    return lambda: not broker.queue_messages(queue) and broker.unacked(queue) == 0


def change_events(ctx: NodeContext) -> list[dict[str, str]]:
    return [line for name in CHANGE_EVENTS for line in events(ctx, name)]


def test_the_masters_own_batches_are_acknowledged_without_decoding(
        master: tuple[NodeContext, ChangeRelay, BrokerSeat, list[ApplyResult]],
        memory_broker: MemoryBroker, decodes: list[bytes]) -> None:
    ctx, relay, seat, applied = master
    before = ctx.store.export_bytes()
    assert relay.publish_outbox() == 3
    assert [m.headers["last-seq"] for m in seat.sent] == [2, 3]
    assert {(m.headers["origin"], m.headers["epoch"]) for m in seat.sent} == {("a", 1)}
    wait_for(drained(memory_broker, "a"), timeout_s=10.0, what="both batches acknowledged")
    assert decodes == []
    assert applied == [] and change_events(ctx) == []
    assert ctx.store.export_bytes() == before and ctx.store.last_seq == 3


def test_a_repeat_of_an_own_batch_takes_the_full_path_and_changes_nothing(
        master: tuple[NodeContext, ChangeRelay, BrokerSeat, list[ApplyResult]],
        memory_settings: Settings, memory_broker: MemoryBroker, decodes: list[bytes]) -> None:
    ctx, relay, seat, applied = master
    relay.publish_outbox()
    wait_for(drained(memory_broker, "a"), timeout_s=10.0, what="the batches acknowledged")
    publish_raw(memory_settings, [seat.sent[0]])  # the same message again (a redelivery)
    wait_for(lambda: len(decodes) == 1, timeout_s=10.0, what="the repeat decoded")
    wait_for(drained(memory_broker, "a"), timeout_s=10.0, what="the repeat acknowledged")
    assert decodes == [seat.sent[0].body]
    assert applied == [] and change_events(ctx) == [] and ctx.store.last_seq == 3


def test_a_forged_header_does_not_hide_a_newer_epoch_from_the_master(
        master: tuple[NodeContext, ChangeRelay, BrokerSeat, list[ApplyResult]],
        memory_settings: Settings, memory_broker: MemoryBroker, decodes: list[bytes]) -> None:
    ctx, _relay, _seat, _applied = master
    # Node b's batch of epoch 2, dressed up as master a's own batch of epoch 1.
    foreign = batch(change(4, "x", epoch=2, origin="b"))
    body = messages.encode(foreign)
    publish_raw(memory_settings, [Outgoing(exchange=topology.CONFIG_EXCHANGE, routing_key="",
                                           body=body, headers=batch_headers(1, 3, 1, "a"))])
    wait_for(drained(memory_broker, "a"), timeout_s=10.0, what="the batch handled")
    assert decodes == [body]
    assert ctx.store.history.max_epoch == 2  # learned, as the full path does
    assert events(ctx, Event.ERA_LEARNED)


def test_an_own_body_from_an_earlier_epoch_takes_the_full_path(
        master: tuple[NodeContext, ChangeRelay, BrokerSeat, list[ApplyResult]],
        memory_broker: MemoryBroker, decodes: list[bytes]) -> None:
    ctx, relay, seat, applied = master
    # Encoded in epoch 1; by the time it is consumed the master has moved on to epoch 2.
    ctx.store.set_history(ctx.store.history.learn(Era(2, 3, "a")))
    relay.publish_outbox()
    wait_for(drained(memory_broker, "a"), timeout_s=10.0, what="the batches handled")
    assert decodes == [m.body for m in seat.sent]
    assert applied == [] and ctx.store.last_seq == 3


def test_a_backup_never_skips_whatever_the_headers_and_the_relay_say(
        make_context: MakeContext, run: Callable[[ConsumerLoop], ConsumerLoop],
        memory_settings: Settings, decodes: list[bytes]) -> None:
    ctx = make_context("b")
    ctx.store.apply(batch(change(1, "d1")))
    applied: list[ApplyResult] = []
    run(SyncConsumer(ctx, on_applied=applied.append, own=Always()))
    # Seq 2 under headers naming the backup itself, its epoch and a seq it holds: were the
    # headers and the relay believed, seq 2 would be lost here.
    body = messages.encode(batch(change(2, "d2")))
    publish_raw(memory_settings, [Outgoing(exchange=topology.CONFIG_EXCHANGE, routing_key="",
                                           body=body, headers=batch_headers(2, 1, 1, "b"))])
    # The store holds seq 2 a moment before the consumer reports it: wait for the report.
    wait_for(lambda: bool(applied), timeout_s=10.0, what="seq 2 applied and reported")
    assert decodes == [body] and [r.last_seq for r in applied] == [2]
    assert ctx.store.get("destination", "d2") is not None
