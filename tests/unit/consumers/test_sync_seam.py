"""The sync consumer on the in-process broker: in order, a duplicate is a no-op, a gap is filled.

The consumer runs in its own thread on its own connection, exactly as in a node; the master is
played by publishing change batches to the config fanout (and, for a gap, to the change log
only, as if the node's queue had lost one).
"""

from __future__ import annotations

from collections.abc import Callable

from tasync.broker import topology
from tasync.broker.consumer import ConsumerLoop
from tasync.broker.events import Event
from tasync.broker.memory import MemoryBroker
from tasync.broker.settings import Settings
from tasync.broker.store import ApplyResult
from tasync.consumers.sync import SyncConsumer
from tests.unit.consumers.conftest import MakeContext, batch, change, events, publish
from tests.waiting import wait_for


def start_sync(make_context: MakeContext, run: Callable[[ConsumerLoop], ConsumerLoop]
               ) -> tuple[SyncConsumer, list[ApplyResult]]:
    ctx = make_context("b")
    applied: list[ApplyResult] = []
    sync = SyncConsumer(ctx, on_applied=applied.append)
    run(sync)
    assert sync.caught_up.is_set()
    return sync, applied


def test_batches_are_applied_in_seq_order_and_acknowledged(
        make_context: MakeContext, run: Callable[[ConsumerLoop], ConsumerLoop],
        memory_settings: Settings, memory_broker: MemoryBroker) -> None:
    sync, applied = start_sync(make_context, run)
    store = sync.ctx.store
    publish(memory_settings, batch(change(1, "d1"), change(2, "d2")))
    publish(memory_settings, batch(change(3, "d1", url="file:///tmp/again")))
    wait_for(lambda: store.last_seq == 3, timeout_s=10.0, what="seq 3 applied")
    assert store.get("destination", "d1") == {"url": "file:///tmp/again"}
    assert store.get("destination", "d2") == {"url": "file:///tmp/d2"}
    assert [r.last_seq for r in applied] == [2, 3]
    queue = topology.sync_queue("b")
    wait_for(lambda: memory_broker.unacked(queue) == 0, timeout_s=5.0, what="acks")
    assert memory_broker.queue_messages(queue) == []


def test_a_duplicate_batch_changes_nothing(
        make_context: MakeContext, run: Callable[[ConsumerLoop], ConsumerLoop],
        memory_settings: Settings, memory_broker: MemoryBroker) -> None:
    sync, applied = start_sync(make_context, run)
    store = sync.ctx.store
    first = batch(change(1, "d1"), change(2, "d2"))
    publish(memory_settings, first)
    wait_for(lambda: store.last_seq == 2, timeout_s=10.0, what="seq 2 applied")
    before = store.export_bytes()
    publish(memory_settings, first)
    wait_for(lambda: events(sync.ctx, Event.CHANGE_SKIPPED), timeout_s=10.0,
             what="the repeat skipped")
    assert store.export_bytes() == before and store.last_seq == 2
    assert len(applied) == 1  # the repeat told nobody that something changed
    queue = topology.sync_queue("b")
    wait_for(lambda: memory_broker.unacked(queue) == 0, timeout_s=5.0, what="acks")


def test_a_gap_is_detected_and_filled_from_the_change_log_before_applying(
        make_context: MakeContext, run: Callable[[ConsumerLoop], ConsumerLoop],
        memory_settings: Settings) -> None:
    sync, _applied = start_sync(make_context, run)
    store, connection = sync.ctx.store, sync.conn
    publish(memory_settings, batch(change(1, "d1")))
    wait_for(lambda: store.last_seq == 1, timeout_s=10.0, what="seq 1 applied")
    # Seq 2 reaches the change log but not the node's queue; seq 3 then arrives live.
    publish(memory_settings, batch(change(2, "d2")), exchange="",
            routing_key=topology.CHANGELOG_STREAM)
    publish(memory_settings, batch(change(3, "d3")))
    wait_for(lambda: store.last_seq == 3, timeout_s=15.0, what="seq 3 applied")
    gaps = events(sync.ctx, Event.CHANGE_GAP)
    assert [(g["expected"], g["got"]) for g in gaps] == [("2", "3")]
    assert [name for _k, name, _b in store.objects("destination")] == ["d1", "d2", "d3"]
    assert events(sync.ctx, Event.CHANGE_REPLAYED)  # seq 2 came from the log
    # Filled in place: no reconnect and catch-up, no redelivery of seq 3 to skip.
    assert sync.conn is connection and not events(sync.ctx, Event.CHANGE_SKIPPED)
