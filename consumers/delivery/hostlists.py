"""Learning ad-hoc precedence lists from the durable ``tasync.hostlists`` stream.

Whoever creates a list's queue appends a ``HostList`` record to the stream first: a sender for
an ad-hoc list (``tasync.producers.sender``), a node for a route's list (``subscriptions``). Each
node reads the stream from its start on every connect, keeps every list in ``totals.db``, tells the
delivery worker to subscribe to those that name it, and watches all of them for being stranded
(``lists``). A stream rather than a queue, because every node, including one that joins next
year, must see every record, and a record must never be consumed away.

The watcher runs on its own connection: a stream error closes the whole connection (measured on
RabbitMQ 3.10), which must not take the delivery worker's subscriptions with it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import amqp

from tasync.broker import messages, topology
from tasync.broker.alerts import HostList
from tasync.broker.consumer import ConsumerLoop, message_body
from tasync.broker.errors import MessageError
from tasync.consumers.context import NodeContext
from tasync.consumers.totals import open_db

log = logging.getLogger("tasync.delivery")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hostlists (
    key TEXT PRIMARY KEY, hosts TEXT NOT NULL, learned_at REAL NOT NULL);
"""
_MAX_RECORD_BYTES = 64 << 10


class HostListWatcher(ConsumerLoop):
    """Follows the host-list stream and remembers every list it names.

    Args:
        ctx: the node context.
        on_change: called (from the watcher's thread) when a new list naming this node appears.
    """

    def __init__(self, ctx: NodeContext, *, on_change: Callable[[], None]) -> None:
        super().__init__(ctx.settings, prefetch=1000)
        self.name = f"tasync-hostlists-{ctx.node}"
        self.node = ctx.node
        self.on_change = on_change
        self._db = open_db(ctx.data_dir)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        rows = self._db.execute("SELECT hosts FROM hostlists").fetchall()
        self._lists: dict[str, tuple[str, ...]] = {}
        for (raw,) in rows:
            hosts = tuple(json.loads(raw))
            self._lists[topology.precedence_key(hosts)] = hosts
        self.records_read = 0

    def lists(self) -> list[tuple[str, ...]]:
        """Every recorded list that includes this node, learned now or before a restart."""
        with self._lock:
            return [hosts for hosts in self._lists.values() if self.node in hosts]

    def all_lists(self) -> list[tuple[str, ...]]:
        """Every recorded list of the network, whichever nodes it names."""
        with self._lock:
            return list(self._lists.values())

    def knows(self, hosts: tuple[str, ...]) -> bool:
        """Whether a record of ``hosts`` has been read."""
        with self._lock:
            return topology.precedence_key(hosts) in self._lists

    def setup(self, channel: Any) -> None:
        """Declare the alert topology (the stream included) and read the stream from its start."""
        topology.declare_alerts(channel)
        channel.basic_consume(topology.HOSTLISTS_QUEUE, no_ack=False, callback=self._on_message,
                              arguments={"x-stream-offset": "first"})

    def _on_message(self, message: amqp.Message) -> None:
        self.channel.basic_ack(message.delivery_tag)
        self.records_read += 1
        try:
            record = messages.decode(message_body(message), max_bytes=_MAX_RECORD_BYTES,
                                     expect="hostlist")
        except MessageError as exc:
            log.warning("skipped an invalid host-list record: %s", exc)
            return
        self.learn(record)

    def learn(self, record: HostList) -> bool:
        """Remember ``record``; returns whether it was new."""
        key = topology.precedence_key(record.hosts)
        with self._lock:
            if key in self._lists:
                return False
            self._lists[key] = record.hosts
            self._db.execute(
                "INSERT OR IGNORE INTO hostlists(key, hosts, learned_at) VALUES(?, ?, ?)",
                (key, json.dumps(list(record.hosts)), time.time()))
        if self.node in record.hosts:
            log.info("learned precedence list %s", key)
            self.on_change()
        return True

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop following the stream and close the local file."""
        super().stop(timeout_s)
        with self._lock:
            self._db.close()
