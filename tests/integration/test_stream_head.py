"""The head query reads the change log as it stood, even while a master keeps writing to it.

A stream has no end over AMQP 0-9-1. The head query's read used to end only once the log fell
quiet for half a second, so a master committing every 0.2 s kept a recovering backup asking
until the master stopped: the fault soak caught two backups stuck that way for five minutes
after a broker-node kill, when their question to the master went unanswered and they read the
log instead (``tasync.broker.stream.log_head``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import amqp
import pytest

from tasync.broker import topology
from tasync.broker.connection import close_quietly, connect
from tasync.broker.epochs import EpochHistory
from tasync.broker.messages import Change, ChangeBatch, encode
from tasync.broker.settings import Settings
from tasync.broker.stream import log_head
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
BEFORE = 40  # changes in the log before the question


def batch(seq: int) -> bytes:
    change = Change(epoch=1, seq=seq, ts=1_000.0 + seq, origin="a", op="set",
                    kind="destination", name=f"d{seq}", body={"url": "file:///x"})
    return encode(ChangeBatch(epoch=1, origin="a", changes=(change,)))


class BusyMaster(threading.Thread):
    """Publishes one change to the log every 50 ms until stopped, as a busy master would."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="busy-master", daemon=True)
        self.settings = settings
        self.stop_event = threading.Event()
        self.seq = BEFORE
        self.started_writing = threading.Event()

    def run(self) -> None:
        conn = connect(self.settings, name="test-busy-master")
        try:
            channel = conn.channel()
            while not self.stop_event.wait(0.05):
                self.seq += 1
                channel.basic_publish(amqp.Message(batch(self.seq)),
                                      exchange=topology.CONFIG_EXCHANGE, routing_key="")
                self.started_writing.set()
        finally:
            close_quietly(conn)


@pytest.fixture
def settings(broker_url: str) -> Iterator[Settings]:
    settings = Settings.from_url(broker_url)
    conn = connect(settings, name="test-log-setup")
    try:
        channel = conn.channel()
        topology.declare_config(channel, settings)
        for seq in range(1, BEFORE + 1):
            channel.basic_publish(amqp.Message(batch(seq)), exchange=topology.CONFIG_EXCHANGE,
                                  routing_key="")
    finally:
        close_quietly(conn)
    yield settings


@pytest.mark.parametrize("known", [True, False], ids=["era-known", "era-unknown"])
def test_log_head_answers_while_a_master_keeps_writing(settings: Settings, known: bool) -> None:
    """Known era: the newest chunk answers. Unknown: the whole log is read, up to that chunk."""
    history = EpochHistory.from_list([[1, 0, "a"]] if known else [])
    master = BusyMaster(settings)
    master.start()
    answer: dict[str, Any] = {}
    try:
        master.started_writing.wait(30)

        def ask() -> None:
            answer["head"] = log_head(settings, history)

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        # A safety net against the hang this test is about, not a measure of speed.
        wait_for(lambda: not asker.is_alive(), timeout_s=60, what="log_head to answer")
    finally:
        master.stop_event.set()
        master.join(10)
    seq, learned = answer["head"]
    assert BEFORE < seq <= master.seq
    assert learned.max_epoch == 1
