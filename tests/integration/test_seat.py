"""The master's seat on a real broker: one holder at a time, freed when its connection ends."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tasync.broker import topology
from tasync.broker.errors import SeatLost
from tasync.broker.publisher import Outgoing
from tasync.broker.seat import MasterSeat
from tasync.broker.settings import Settings
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def seats(broker_url: str) -> Iterator[tuple[MasterSeat, MasterSeat]]:
    settings = Settings.from_url(broker_url)
    first, second = MasterSeat(settings, node="a"), MasterSeat(settings, node="b")
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def test_one_holder_at_a_time(seats: tuple[MasterSeat, MasterSeat]) -> None:
    a, b = seats
    assert a.take() and a.held
    assert not b.take() and not b.held
    a.check()
    a.release()
    assert not a.held
    assert b.take()
    with pytest.raises(SeatLost):
        a.check()


def test_a_broken_connection_frees_the_seat_and_its_holder_finds_out(
        seats: tuple[MasterSeat, MasterSeat]) -> None:
    a, b = seats
    assert a.take()
    raw = a.connection().connection  # the py-amqp connection under kombu's
    raw.transport.sock.shutdown(socket.SHUT_RDWR)  # as the broker dropping a hung process
    wait_for(lambda: b.take(), timeout_s=30, what="the seat to be free")
    wait_for(lambda: not a.held, timeout_s=10, what="a noticing it lost the seat")
    with pytest.raises(SeatLost):
        a.check()
    with pytest.raises(SeatLost):
        a.publish([Outgoing(exchange=topology.CONFIG_EXCHANGE, routing_key="", body=b"{}")])
    assert a.lost_reason


def test_publishing_needs_the_seat(seats: tuple[MasterSeat, MasterSeat]) -> None:
    a, b = seats
    assert a.take()
    assert not b.take()
    with pytest.raises(SeatLost):
        b.publish([Outgoing(exchange=topology.CONFIG_EXCHANGE, routing_key="", body=b"{}")])
    assert a.publish([Outgoing(exchange=topology.CONFIG_EXCHANGE, routing_key="",
                               body=b"{}")]) == 1
