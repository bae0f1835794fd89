"""Confirmed publishing in bulk (broker/publisher.py) against the real broker.

Every replicated change and every alert is reported as committed or accepted only after these
confirms, so the publisher must count them exactly: all acks before it returns, every nack as a
refusal, every returned mandatory message as unroutable.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tasync.broker.connection import close_quietly, connect
from tasync.broker.errors import PublishError
from tasync.broker.publisher import ConfirmedPublisher, Outgoing, Unroutable
from tasync.broker.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def conn(broker_url: str) -> Iterator[Any]:
    connection = connect(Settings.from_url(broker_url))
    try:
        yield connection
    finally:
        close_quietly(connection)


def to_queue(name: str, count: int) -> list[Outgoing]:
    return [Outgoing(exchange="", routing_key=name, body=b'{"n": %d}' % i) for i in range(count)]


def test_bulk_publish_returns_once_every_message_is_confirmed(conn: Any) -> None:
    channel = conn.channel()
    channel.queue_declare("bulk", durable=True, auto_delete=False)
    publisher = ConfirmedPublisher(conn, window=100)

    assert publisher.publish_many(to_queue("bulk", 5000)) == 5000

    assert channel.queue_declare("bulk", passive=True).message_count == 5000
    # Nothing is left waiting, so the next call starts from a clean window.
    assert not publisher._pending and not publisher._sent
    assert publisher.publish_many(to_queue("bulk", 10)) == 10


def test_refused_messages_are_counted_and_raised(conn: Any) -> None:
    channel = conn.channel()
    channel.queue_declare("full", durable=True, auto_delete=False,
                          arguments={"x-max-length": 10, "x-overflow": "reject-publish"})
    publisher = ConfirmedPublisher(conn, window=16)

    with pytest.raises(PublishError, match="refused 40 of 50"):
        publisher.publish_many(to_queue("full", 50))

    assert channel.queue_declare("full", passive=True).message_count == 10


def test_mandatory_message_without_a_queue_is_unroutable(conn: Any) -> None:
    publisher = ConfirmedPublisher(conn)
    with pytest.raises(Unroutable, match="nowhere"):
        publisher.publish(Outgoing(exchange="amq.direct", routing_key="nowhere", body=b"{}",
                                   mandatory=True))
