"""The roles on the in-process broker: taking the seat at start, refusing it, stepping down.

The seat is the exclusive queue of ``tasync.broker.seat`` on a connection of its own; the relay is
played by an outbox that records the epoch marks it was asked to publish.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tasync.broker import topology
from tasync.broker.epochs import EpochHistory, EpochMark, Era
from tasync.broker.events import Event
from tasync.broker.memory import MemoryBroker
from tasync.broker.protocol import Role
from tasync.broker.seat import MasterSeat
from tasync.broker.settings import Settings
from tasync.consumers.context import NodeContext
from tasync.consumers.roles import Roles
from tasync.consumers.sync import SyncConsumer
from tests.unit.consumers.conftest import MakeContext, events


class RecordingOutbox:
    """The relay's part the roles use: what they asked it to publish."""

    def __init__(self) -> None:
        self.marks: list[EpochMark] = []

    def publish_outbox(self) -> int:
        return 0

    def publish_mark(self, mark: EpochMark) -> None:
        self.marks.append(mark)

    def wake(self) -> None:
        pass


@pytest.fixture
def seats(memory_settings: Settings) -> Iterator[list[MasterSeat]]:
    made: list[MasterSeat] = []
    yield made
    for seat in made:
        seat.close()


def roles_of(ctx: NodeContext, settings: Settings, seats: list[MasterSeat]
             ) -> tuple[Roles, RecordingOutbox]:
    seat = MasterSeat(settings, node=ctx.node)
    seats.append(seat)
    outbox = RecordingOutbox()
    return Roles(ctx, SyncConsumer(ctx), seat=seat, relay=outbox), outbox


def test_a_master_takes_the_seat_and_opens_the_first_era(
        make_context: MakeContext, memory_settings: Settings, memory_broker: MemoryBroker,
        seats: list[MasterSeat]) -> None:
    ctx = make_context("a", role=Role.MASTER)
    roles, outbox = roles_of(ctx, memory_settings, seats)
    roles.start(threading.Event())
    assert ctx.is_master and roles.seat.held and roles.keep_seat()
    assert topology.MASTER_SEAT in memory_broker.queue_names()
    assert [(m.epoch, m.origin) for m in outbox.marks] == [(1, "a")]


def test_a_second_master_finds_the_seat_taken_and_starts_as_backup(
        make_context: MakeContext, memory_settings: Settings, seats: list[MasterSeat]) -> None:
    first, _ = roles_of(make_context("a", role=Role.MASTER), memory_settings, seats)
    first.start(threading.Event())
    ctx = make_context("b", role=Role.MASTER)
    second, outbox = roles_of(ctx, memory_settings, seats)
    second.start(threading.Event())
    assert ctx.role is Role.BACKUP and not second.seat.held and outbox.marks == []
    assert events(ctx, Event.MASTER_REFUSED)


def test_a_newer_epoch_makes_the_master_step_down_and_free_the_seat(
        make_context: MakeContext, memory_settings: Settings, memory_broker: MemoryBroker,
        seats: list[MasterSeat]) -> None:
    ctx = make_context("a", role=Role.MASTER)
    roles, _outbox = roles_of(ctx, memory_settings, seats)
    roles.start(threading.Event())
    ctx.hooks.newer_epoch(EpochHistory((Era(1, 0, "a"), Era(2, 5, "c"))))
    assert ctx.role is Role.BACKUP and not roles.seat.held and not roles.keep_seat()
    assert topology.MASTER_SEAT not in memory_broker.queue_names()
    assert events(ctx, Event.MASTER_STEPPED_DOWN)
