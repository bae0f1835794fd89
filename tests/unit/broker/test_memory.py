"""The in-process broker (broker/memory.py) behaves as RabbitMQ does for the calls tasync makes.

Each test drives it through ``tasync.broker.connection.connect`` with a ``memory://`` URL, as the
production code does, and checks the broker's state or what the client saw.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from typing import Any

import amqp
import amqp.exceptions
import pytest
from kombu import Connection

from tasync.broker import topology
from tasync.broker.connection import connect
from tasync.broker.errors import ConfigError, NoAnswer, NotEmulated
from tasync.broker.memory import MemoryBroker, MemoryConnection
from tasync.broker.messages import Reply
from tasync.broker.publisher import ConfirmedPublisher, Outgoing, Unroutable
from tasync.broker.rpc import RpcClient, reply_to
from tasync.broker.settings import Settings


def drain(conn: Connection, limit: int = 100) -> int:
    """Run every event waiting on ``conn``; how many ran."""
    for count in range(limit):
        try:
            conn.drain_events(timeout=0)
        except TimeoutError:
            return count
    return limit


def consume(channel: Any, queue: str, **kwargs: Any) -> list[amqp.Message]:
    got: list[amqp.Message] = []
    channel.basic_consume(queue, callback=got.append, **kwargs)
    return got


@pytest.fixture
def conn(memory_settings: Settings) -> Connection:
    connection = connect(memory_settings)
    yield connection
    connection.release()


def test_connect_hands_out_a_kombu_connection_over_the_memory_transport(
        conn: Connection, memory_broker: MemoryBroker) -> None:
    assert isinstance(conn, Connection)
    assert isinstance(conn.connection, MemoryConnection)
    assert conn.connection.broker is memory_broker
    conn.release()
    assert memory_broker.connections == []


def test_memory_cannot_be_mixed_with_real_brokers() -> None:
    with pytest.raises(ConfigError, match="cannot be mixed"):
        connect(Settings(broker_urls=("memory://", "amqp://localhost")))


@pytest.mark.parametrize(("kind", "binding", "key", "routed"), [
    ("direct", "a.b", "a.b", True), ("direct", "a.b", "a.c", False),
    ("fanout", "", "anything", True),
    ("topic", "node.*", "node.a", True), ("topic", "node.*", "node.a.b", False),
    ("topic", "#", "x.y", True), ("topic", "a.#.z", "a.z", True), ("topic", "a.#.z", "a.b", False),
])
def test_exchanges_route_as_their_type_says(conn: Connection, memory_broker: MemoryBroker,
                                           kind: str, binding: str, key: str,
                                           routed: bool) -> None:
    channel = conn.channel()
    channel.exchange_declare("x", kind, durable=True, auto_delete=False)
    channel.queue_declare("q", durable=True, auto_delete=False)
    channel.queue_bind("q", "x", binding)
    channel.basic_publish(amqp.Message(b"m"), exchange="x", routing_key=key)
    assert len(memory_broker.queue_messages("q")) == int(routed)


def test_passive_declares_of_what_is_missing_close_the_channel(conn: Connection) -> None:
    channel = conn.channel()
    with pytest.raises(amqp.exceptions.NotFound, match="no exchange 'nope'"):
        channel.exchange_declare("nope", "direct", passive=True)
    with pytest.raises(amqp.exceptions.RecoverableConnectionError):
        channel.queue_declare("q")
    with pytest.raises(amqp.exceptions.NotFound, match="no queue 'q'"):
        conn.channel().queue_declare("q", passive=True)
    assert topology.missing_for_alerts(conn.connection) == f"exchange {topology.ALERTS_EXCHANGE}"


def test_confirms_and_mandatory_returns_reach_the_confirmed_publisher(
        conn: Connection, memory_broker: MemoryBroker) -> None:
    channel = conn.channel()
    channel.exchange_declare("x", "direct", durable=True, auto_delete=False)
    channel.queue_declare("q", durable=True, auto_delete=False)
    channel.queue_bind("q", "x", "k")
    publisher = ConfirmedPublisher(conn, timeout_s=2.0)
    assert publisher.publish_many([Outgoing(exchange="x", routing_key="k", body=b"1"),
                                   Outgoing(exchange="x", routing_key="k", body=b"2")]) == 2
    bodies = [m.body for m in memory_broker.queue_messages("q")]
    assert bodies == [b"1", b"2"]
    assert memory_broker.queue_messages("q")[0].properties["user_id"] == "guest"
    with pytest.raises(Unroutable, match="'other'"):
        publisher.publish(Outgoing(exchange="x", routing_key="other", body=b"3",
                                   mandatory=True))


def test_a_user_id_that_is_not_the_connections_user_is_refused(conn: Connection) -> None:
    channel = conn.channel()
    with pytest.raises(amqp.exceptions.PreconditionFailed, match="user_id"):
        channel.basic_publish(amqp.Message(b"m", user_id="mallory"), exchange="",
                              routing_key="q")


def test_prefetch_priority_ack_reject_and_close(conn: Connection,
                                                memory_broker: MemoryBroker) -> None:
    producer = conn.channel()
    producer.queue_declare("q", durable=True, auto_delete=False,
                           arguments={"x-queue-type": "quorum"})
    for n in range(4):
        producer.basic_publish(amqp.Message(str(n).encode()), exchange="", routing_key="q")
    low, high = conn.channel(), conn.channel()
    low.basic_qos(0, 10, False)
    high.basic_qos(0, 2, False)
    got_low = consume(low, "q", arguments={"x-priority": 1})
    got_high = consume(high, "q", arguments={"x-priority": 2})
    drain(conn)
    # Both were there when the first message went: the first consumer took all it could;
    # then the higher priority wins whatever it has room for.
    assert len(got_low) == 4 and got_high == []
    assert memory_broker.unacked("q") == 4
    low.basic_ack(got_low[1].delivery_tag, multiple=True)
    low.basic_reject(got_low[2].delivery_tag, requeue=True)
    drain(conn)
    assert [m.body for m in got_high] == [b"2"]
    assert got_high[0].delivery_info["redelivered"] is True
    assert got_high[0].headers["x-delivery-count"] == 1
    low.close()  # message 3 goes back, to the only consumer left
    drain(conn)
    assert [m.body for m in got_high] == [b"2", b"3"]
    with pytest.raises(amqp.exceptions.PreconditionFailed, match="unknown delivery tag"):
        high.basic_ack(99)


def test_reject_without_requeue_dead_letters(conn: Connection,
                                             memory_broker: MemoryBroker) -> None:
    channel = conn.channel()
    channel.exchange_declare("dlx", "fanout", durable=True, auto_delete=False)
    channel.queue_declare("dead", durable=True, auto_delete=False)
    channel.queue_bind("dead", "dlx", "")
    channel.queue_declare("q", durable=True, auto_delete=False,
                          arguments={"x-queue-type": "quorum", "x-dead-letter-exchange": "dlx"})
    channel.basic_publish(amqp.Message(b"m"), exchange="", routing_key="q")
    got = consume(channel, "q")
    drain(conn)
    channel.basic_reject(got[0].delivery_tag, requeue=False)
    assert [m.body for m in memory_broker.queue_messages("dead")] == [b"m"]
    assert memory_broker.queue_messages("q") == [] and memory_broker.unacked("q") == 0


def test_exclusive_queues_are_locked_and_go_with_their_connection(
        memory_settings: Settings, memory_broker: MemoryBroker) -> None:
    first, second = connect(memory_settings), connect(memory_settings)
    first.channel().queue_declare("seat", exclusive=True, auto_delete=True)
    with pytest.raises(amqp.exceptions.ResourceLocked):
        second.channel().queue_declare("seat", exclusive=True, auto_delete=True)
    with pytest.raises(amqp.exceptions.ResourceLocked):
        second.channel().queue_declare("seat", passive=True)
    first.release()
    assert "seat" not in memory_broker.queue_names()
    second.channel().queue_declare("seat", exclusive=True, auto_delete=True)
    second.release()


def test_streams_start_where_the_offset_says(conn: Connection,
                                            memory_broker: MemoryBroker) -> None:
    channel = conn.channel()
    channel.queue_declare("log", durable=True, auto_delete=False,
                          arguments={"x-queue-type": "stream", "x-max-age": "1D"})
    for n in range(3):
        channel.basic_publish(amqp.Message(str(n).encode()), exchange="", routing_key="log")
    channel.basic_qos(0, 10, False)
    seen: dict[Any, list[amqp.Message]] = {}
    for offset in ("first", "last", "next", 1, dt.datetime(2000, 1, 1)):
        seen[offset] = consume(channel, "log", arguments={"x-stream-offset": offset})
    drain(conn)
    bodies = {k: [m.body for m in v] for k, v in seen.items()}
    assert bodies == {"first": [b"0", b"1", b"2"], "last": [b"2"], "next": [], 1: [b"1", b"2"],
                      dt.datetime(2000, 1, 1): [b"0", b"1", b"2"]}
    assert [m.headers["x-stream-offset"] for m in seen["first"]] == [0, 1, 2]
    channel.basic_publish(amqp.Message(b"3"), exchange="", routing_key="log")
    drain(conn)
    assert [m.body for m in seen["next"]] == [b"3"]
    assert len(memory_broker.queue_messages("log")) == 4  # a stream keeps what was read
    with pytest.raises(amqp.exceptions.PreconditionFailed, match="stream consumers"):
        conn.channel().basic_consume("log", callback=print)


def test_direct_reply_to_answers_the_asking_channel(memory_settings: Settings) -> None:
    server, client = connect(memory_settings), connect(memory_settings)
    channel = server.channel()
    topology.declare_control(channel)
    channel.queue_declare("tasync.control.a", exclusive=True, auto_delete=True)
    channel.queue_bind("tasync.control.a", topology.CONTROL_EXCHANGE, topology.node_key("a"))

    def answer(message: amqp.Message) -> None:
        reply_to(channel, message, Reply(ok=True, node="a", data={"pong": True}))
        channel.basic_ack(message.delivery_tag)

    channel.basic_consume("tasync.control.a", callback=answer)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                server.drain_events(timeout=0.05)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        rpc = RpcClient(client, sender="test")
        assert rpc.call_one(topology.node_key("a"), "ping", timeout_s=2.0) == {"pong": True}
        with pytest.raises(NoAnswer, match="no running node answers to 'master'"):
            rpc.call_one(topology.MASTER, "head", timeout_s=2.0)
    finally:
        stop.set()
        thread.join(2.0)
        server.release()
        client.release()


def test_a_lost_connection_raises_on_its_next_use(conn: Connection,
                                                  memory_broker: MemoryBroker) -> None:
    memory_broker.close_connections("gone")
    with pytest.raises(amqp.exceptions.ConnectionForced, match="gone"):
        conn.drain_events(timeout=0)
    memory_broker.refuse_connections = True
    with pytest.raises(Exception, match="unreachable"):
        connect(Settings(broker_urls=(f"memory://guest@/{memory_broker.vhost}",),
                         connect_retry_s=0.0))


@pytest.mark.parametrize("call", [
    lambda ch: ch.basic_get("q"),
    lambda ch: ch.exchange_declare("h", "headers"),
    lambda ch: ch.queue_declare("q", arguments={"x-max-length": 10}),
    lambda ch: ch.basic_qos(0, 1, True),
])
def test_what_is_not_emulated_says_so(conn: Connection, call: Any) -> None:
    with pytest.raises(NotEmulated):
        call(conn.channel())
