"""Self-checks of the fault-suite harness, so a failing fault test can trust its tools.

The proxy tests are fast and run by default against the system broker on 127.0.0.1:5672. The
cluster test boots three private nodes (~25 s) and is marked ``faults``.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator

import kombu
import pika
import pytest

from .rabbit_cluster import RabbitCluster, rabbit_cluster_fixture  # noqa: F401  (fixture)
from .tcp_proxy import TcpProxy

SYSTEM_BROKER = ("127.0.0.1", 5672)


def _system_broker_up() -> bool:
    try:
        with socket.create_connection(SYSTEM_BROKER, timeout=2):
            return True
    except OSError:
        return False


needs_system_broker = pytest.mark.skipif(
    not _system_broker_up(), reason="system RabbitMQ not listening on 127.0.0.1:5672"
)


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    with TcpProxy(*SYSTEM_BROKER) as p:
        yield p


def _round_trip(conn: kombu.Connection) -> None:
    """Declare a private queue, publish one message and read it back over CONN."""
    channel = conn.channel()
    try:
        name = channel.queue_declare("", exclusive=True, auto_delete=True).queue
        body = uuid.uuid4().hex
        channel.basic_publish(channel.prepare_message(body.encode()), exchange="", routing_key=name)
        deadline = time.monotonic() + 5
        message = None
        while message is None and time.monotonic() < deadline:
            message = channel.basic_get(name, no_ack=True)
        assert message is not None and message.body.decode() == body
    finally:
        channel.close()


# ------------------------------------------------------------------------------- TcpProxy


@needs_system_broker
def test_proxy_reset_cuts_connection_and_heal_lets_new_one_through(proxy: TcpProxy) -> None:
    with kombu.Connection(proxy.url_for("/"), connect_timeout=5) as conn:
        conn.connect()
        _round_trip(conn)
        assert proxy.active_connections == 1

        proxy.cut()
        assert proxy.active_connections == 0
        with pytest.raises(conn.connection_errors) as excinfo:
            _round_trip(conn)
        # A read timeout is an OSError too; it would mean the cut did not break anything.
        assert not isinstance(excinfo.value, TimeoutError)

    with (
        kombu.Connection(proxy.url_for("/"), connect_timeout=2) as refused,
        pytest.raises(refused.connection_errors),
    ):
        refused.connect()

    proxy.heal()
    with kombu.Connection(proxy.url_for("/"), connect_timeout=5) as conn:
        conn.connect()
        _round_trip(conn)


@needs_system_broker
def test_proxy_blackhole_starves_heartbeats_then_heals(proxy: TcpProxy) -> None:
    conn = kombu.Connection(proxy.url_for("/"), connect_timeout=5, heartbeat=1)
    try:
        conn.connect()
        _round_trip(conn)

        proxy.cut(mode="blackhole")
        assert proxy.active_connections == 1  # still open, only silent
        deadline = time.monotonic() + 10
        with pytest.raises(conn.connection_errors, match="heartbeat"):
            while time.monotonic() < deadline:
                conn.heartbeat_check()
                time.sleep(0.2)
    finally:
        # Not release(): its Connection.Close handshake would wait forever for a Close-Ok
        # that the partition swallows (py-amqp has no read timeout there). collect() drops
        # the socket without a handshake.
        conn.collect()

    proxy.heal()
    with kombu.Connection(proxy.url_for("/"), connect_timeout=5) as conn:
        conn.connect()
        _round_trip(conn)


@needs_system_broker
def test_proxy_short_blackhole_delays_but_keeps_bytes(proxy: TcpProxy) -> None:
    with kombu.Connection(proxy.url_for("/"), connect_timeout=5) as conn:
        conn.connect()
        channel = conn.channel()
        name = channel.queue_declare("", exclusive=True, auto_delete=True).queue
        proxy.cut(mode="blackhole")
        # Sent into the partition: held by the proxy, not lost.
        channel.basic_publish(channel.prepare_message(b"held"), exchange="", routing_key=name)
        time.sleep(0.3)
        proxy.heal()
        deadline = time.monotonic() + 5
        message = None
        while message is None and time.monotonic() < deadline:
            message = channel.basic_get(name, no_ack=True)
        assert message is not None and message.body == b"held"


# ------------------------------------------------------------------------------ RabbitCluster


def _queue_leader(cluster: RabbitCluster, vhost: str, queue: str) -> int:
    """Index of the node that leads quorum queue QUEUE."""
    out = cluster.rabbitmqctl(
        0, "list_queues", "-p", vhost, "name", "leader", "--formatter", "json"
    ).stdout
    rows = json.loads(out[out.find("[") :])
    leader = next(row["leader"] for row in rows if row["name"] == queue)
    return cluster.nodes.index(leader)


def _consume(conn: kombu.Connection, queue: str, count: int, timeout: float) -> list[str]:
    """Consume and ack until COUNT distinct bodies arrived; redeliveries are tolerated."""
    bodies: list[str] = []

    def on_message(message: kombu.Message) -> None:
        body = message.body  # py-amqp already decodes bodies that carry a content_encoding
        bodies.append(body.decode() if isinstance(body, bytes) else body)
        message.ack()

    deadline = time.monotonic() + timeout
    with conn.Consumer(
        kombu.Queue(queue, no_declare=True), on_message=on_message, prefetch_count=50
    ):
        while len(set(bodies)) < count and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:
                continue
    return bodies


@pytest.mark.faults
def test_quorum_queue_survives_sigkill_of_its_leader(rabbit_cluster: RabbitCluster) -> None:
    cluster = rabbit_cluster
    cluster.restore()
    vhost, queue = "harness-selfcheck", "selfcheck.quorum"
    cluster.add_vhost(vhost)

    # 100 persistent messages, each confirmed by the broker (pika, node 0).
    with pika.BlockingConnection(pika.URLParameters(cluster.url(0, vhost))) as publisher:
        channel = publisher.channel()
        channel.confirm_delivery()  # basic_publish now raises unless the broker acks
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        for n in range(100):
            channel.basic_publish(
                "",
                queue,
                f"m{n}".encode(),
                pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
                mandatory=True,
            )

    leader = _queue_leader(cluster, vhost, queue)
    killed_pid = cluster.kill_node(leader)
    assert killed_pid not in cluster.node_pids()
    assert cluster.node_pids()[leader] is None

    # A client given every URL, the dead node's first, must move on by itself.
    order = [leader, *(i for i in range(cluster.size) if i != leader)]
    with kombu.Connection(
        cluster.url_for_vhost(vhost, order=order),
        connect_timeout=5,
        transport_options={"confirm_publish": True},
    ) as conn:
        conn.ensure_connection(max_retries=10, interval_start=0, interval_step=0.5)
        bodies = _consume(conn, queue, 100, timeout=60)
        assert set(bodies) == {f"m{n}" for n in range(100)}

        producer = conn.Producer()
        for n in range(100, 150):
            producer.publish(
                f"m{n}", exchange="", routing_key=queue, delivery_mode=2, serializer="raw"
            )
        more = _consume(conn, queue, 50, timeout=30)
        assert set(more) == {f"m{n}" for n in range(100, 150)}

    cluster.start_node(leader)
    status = cluster.cluster_status()
    assert sorted(status["running_nodes"]) == sorted(cluster.nodes)
    assert all(pid is not None for pid in cluster.node_pids())
    cluster.delete_vhost(vhost)
