"""close_quietly: closing a connection the broker already closed never opens another one."""

from __future__ import annotations

import amqp
from kombu import Connection

from tasync.broker.connection import close_quietly


class RecordingConnection(amqp.Connection):  # type: ignore[misc]
    """A py-amqp connection that records every attempt to connect instead of connecting."""

    attempts: list[str]

    def connect(self, callback: object = None) -> None:
        self.attempts.append(self.host)
        raise OSError("a unit test has no broker")


def test_closing_a_connection_the_broker_closed_does_not_connect_again() -> None:
    # After the broker's connection.close (a forced close, a node shutting down) py-amqp has
    # dropped its transport, exactly like this never-connected one; its ``transport`` property
    # would connect again, one stray broker connection and socket per reconnect of a worker.
    raw = RecordingConnection(host="127.0.0.1:1")
    raw.attempts = []
    conn = Connection("amqp://guest:guest@127.0.0.1:1//")
    conn._connection = raw
    close_quietly(conn)
    assert raw.attempts == []
    assert conn._connection is None  # released all the same
