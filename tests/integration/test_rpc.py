"""Requests over the control exchange (broker/rpc.py) against the real broker.

A node's control queue is exclusive to its connection, so while the node reconnects nothing is
bound for it. A request to that node is sent again for a few seconds rather than reported as
"the node is down"; a request to the master, with no master at all, still fails at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tasync.broker import topology
from tasync.broker.connection import close_quietly, connect
from tasync.broker.errors import NoAnswer
from tasync.broker.messages import Reply
from tasync.broker.rpc import RpcClient, reply_to
from tasync.broker.settings import Settings
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


class CountingClient(RpcClient):
    """Counts the requests it publishes, so a test can see the re-sends."""

    sends = 0

    def send(self, corr: str, routing_key: str, body: bytes, *, ttl_s: float) -> None:
        self.sends += 1
        super().send(corr, routing_key, body, ttl_s=ttl_s)


@pytest.fixture
def client(broker_url: str) -> Iterator[CountingClient]:
    settings = Settings.from_url(broker_url)
    conn = connect(settings)
    topology.declare_control(conn.channel())
    try:
        yield CountingClient(conn, sender="test")
    finally:
        close_quietly(conn)


def late_node(broker_url: str, client: CountingClient, answered: threading.Event) -> None:
    """A node that binds its control queue only after a request found nothing bound."""
    wait_for(lambda: client.sends >= 2, timeout_s=10, what="the request to be re-sent")
    conn = connect(Settings.from_url(broker_url))
    try:
        channel = conn.channel()
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).queue
        channel.queue_bind(queue, topology.CONTROL_EXCHANGE, topology.node_key("late"))

        def answer(message: Any) -> None:
            reply_to(channel, message, Reply(ok=True, node="late", data={"pong": 1}))
            answered.set()

        channel.basic_consume(queue, no_ack=True, callback=answer)
        while not answered.is_set():
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                continue
    finally:
        close_quietly(conn)


def test_a_request_to_a_reconnecting_node_is_sent_again_until_it_answers(
        broker_url: str, client: CountingClient) -> None:
    answered = threading.Event()
    node = threading.Thread(target=late_node, args=(broker_url, client, answered), daemon=True)
    node.start()
    data = client.call_one(topology.node_key("late"), "ping", timeout_s=30)
    node.join(10)
    assert data == {"pong": 1}
    assert client.sends >= 2


def test_a_request_to_a_missing_master_fails_at_once(client: CountingClient) -> None:
    with pytest.raises(NoAnswer, match="no running node answers to 'master'"):
        client.call(topology.MASTER, "status", timeout_s=30)
    assert client.sends == 1


def test_a_node_that_never_comes_is_reported_after_the_grace(client: CountingClient) -> None:
    with pytest.raises(NoAnswer, match=r"no running node answers to 'node\.ghost'"):
        client.call(topology.node_key("ghost"), "status", timeout_s=30)
    assert client.sends > 1
