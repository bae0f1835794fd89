"""A consumer loop whose connection the broker closes reconnects once, and only once, per loss.

RabbitMQ closes every connection of a node that stops, and ``rabbitmqctl close_connection``
does the same to one; each loss must cost the worker exactly one new connection, never a stray
one (with its socket and py-amqp objects) left behind for the garbage collector.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterator
from typing import Any

import amqp
import pytest

from tasync.broker.consumer import ConsumerLoop
from tasync.broker.settings import Settings
from tests.network import BrokerAdmin
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
ROUNDS = 3


class Probe(ConsumerLoop):
    name = "tasync-probe-reconnect"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.subscribed = 0

    def setup(self, channel: Any) -> None:
        channel.queue_declare("", exclusive=True)
        self.subscribed += 1


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every py-amqp connection attempt (a TCP connection to the broker) in this process."""
    attempts: list[int] = []
    original = amqp.Connection.connect

    def counting(self: amqp.Connection, *args: Any, **kwargs: Any) -> Any:
        attempts.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(amqp.Connection, "connect", counting)
    return attempts


@pytest.fixture
def probe(broker_url: str, connects: list[int]) -> Iterator[Probe]:
    loop = Probe(Settings.from_url(broker_url, heartbeat_s=0))
    loop.start()
    try:
        yield loop
    finally:
        loop.stop()


def probe_connection(broker_admin: BrokerAdmin, vhost: str) -> str | None:
    listed = broker_admin.rabbitmqctl("list_connections", "-p", vhost, "pid",
                                      "client_properties", "-q").splitlines()[1:]
    for line in listed:
        pid, props = line.split("\t", 1)
        if re.search(r'\{"connection_name","tasync-probe-reconnect"\}', props):
            return pid
    return None


def test_each_forced_close_costs_exactly_one_new_connection(
        probe: Probe, connects: list[int], broker_admin: BrokerAdmin, vhost: str) -> None:
    wait_for(lambda: probe.subscribed == 1 and probe.connected.is_set(), what="subscribed")
    for round_ in range(1, ROUNDS + 1):
        pid = wait_for(lambda: probe_connection(broker_admin, vhost), what="connection listed")
        assert pid is not None
        broker_admin.rabbitmqctl("close_connection", pid, "forced close (test)")

        def resubscribed(expected: int = round_ + 1) -> bool:
            return probe.subscribed == expected and probe.connected.is_set()

        wait_for(resubscribed, what=f"resubscribed after close {round_}")
    # One connection to start with and one per forced close: closing the broken connection
    # must not open another (py-amqp's ``transport`` property reconnects a closed connection).
    assert len(connects) == ROUNDS + 1


def test_a_lost_connection_is_freed_at_once(probe: Probe, broker_admin: BrokerAdmin,
                                            vhost: str) -> None:
    """Its objects refer to each other; the loop collects them rather than leave them waiting."""
    wait_for(lambda: probe.subscribed == 1 and probe.connected.is_set(), what="subscribed")
    assert probe.conn is not None
    lost = weakref.ref(probe.conn.connection)  # the py-amqp connection under kombu's
    pid = wait_for(lambda: probe_connection(broker_admin, vhost), what="connection listed")
    broker_admin.rabbitmqctl("close_connection", pid, "forced close (test)")
    wait_for(lambda: probe.subscribed == 2 and probe.connected.is_set(), what="resubscribed")
    assert lost() is None
