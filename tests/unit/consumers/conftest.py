"""A node's parts on the in-process broker: a context around a temporary directory, run a loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tasync.broker import messages, topology
from tasync.broker.audit import Trail, read_trail
from tasync.broker.connection import connect
from tasync.broker.consumer import ConsumerLoop
from tasync.broker.messages import Change, ChangeBatch
from tasync.broker.protocol import Role
from tasync.broker.publisher import ConfirmedPublisher, Outgoing
from tasync.broker.settings import Settings
from tasync.broker.store import NodeStore
from tasync.consumers.context import NodeContext
from tests.waiting import wait_for

MakeContext = Callable[..., NodeContext]


@pytest.fixture
def make_context(memory_settings: Settings, tmp_path: Path) -> Iterator[MakeContext]:
    """Build a node's context (store, trail) on the in-process broker; closed at the end."""
    made: list[NodeContext] = []

    def make(node: str = "b", *, role: Role = Role.BACKUP) -> NodeContext:
        data_dir = tmp_path / node
        store = NodeStore(data_dir, durable=False)
        store.set_meta(role=role)
        ctx = NodeContext(settings=memory_settings, node=node, data_dir=data_dir, store=store,
                          trail=Trail(data_dir, node))
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.store.close()


@pytest.fixture
def run() -> Iterator[Callable[[ConsumerLoop], ConsumerLoop]]:
    """Start a consumer loop in its own thread, as the node does; wait until it subscribed."""
    started: list[ConsumerLoop] = []

    def start(loop: ConsumerLoop) -> ConsumerLoop:
        started.append(loop)
        loop.start()
        wait_for(loop.connected.is_set, timeout_s=20.0, what=f"{loop.name} to subscribe")
        return loop

    yield start
    for loop in started:
        loop.stop_event.set()
    for loop in started:
        loop.stop()


def change(seq: int, name: str, *, epoch: int = 1, origin: str = "a",
           url: str | None = None) -> Change:
    """A ``set`` of destination ``name`` with ``seq``, as a master numbers it."""
    return Change(epoch=epoch, seq=seq, ts=time.time(), origin=origin, op="set",
                  kind="destination", name=name, body={"url": url or f"file:///tmp/{name}"})


def batch(*changes: Change) -> ChangeBatch:
    return ChangeBatch(epoch=changes[0].epoch, origin=changes[0].origin, changes=changes)


def publish(settings: Settings, item: ChangeBatch, *, exchange: str = topology.CONFIG_EXCHANGE,
            routing_key: str = "") -> None:
    """Publish one batch with confirms, as the master's relay does (to the config fanout)."""
    conn = connect(settings)
    try:
        ConfirmedPublisher(conn, timeout_s=5.0).publish(
            Outgoing(exchange=exchange, routing_key=routing_key, body=messages.encode(item)))
    finally:
        conn.release()


def events(ctx: NodeContext, name: str) -> list[dict[str, str]]:
    """The node's trail lines of one event."""
    return [line for line in read_trail(ctx.data_dir) if line.get("event") == name]
