"""Following ``tasync.handled``: the alert ids every other node settled, for one duplicate window.

Each node appends one ``Handled`` record per settled batch to the stream (``settle.Settler``)
before it acknowledges the batch. Every node follows the stream on a connection and thread of
its own (a stream error closes its whole connection, which must not take the delivery worker's
subscriptions with it) and writes the ids of other nodes into the ``seen`` table of
``totals.db``, the table the delivery worker looks up before it delivers. So a repeat of an id
is judged against what the whole network delivered, whichever node of the list takes it.

Records are written in batches: whatever arrived together goes into one transaction (under
load a node settles small batches, by the hundred per second).

Where reading starts:

* the offset after the last record written to ``totals.db`` (in the same transaction as that
  record's ids), so a node that was killed or stopped reads exactly what it missed;
* a node that never read the stream, or whose last record is older than its window, starts at
  the stream's records of ``now - window``: a node that joins learns the window it needs.

Caught up: on each connect the watcher appends a marker record of its own and sets
``caught_up`` once it has read it back and written what came before it.
The delivery worker waits for that before it takes alerts (``DeliveryConsumer``), so a returning
node does not deliver an id another node delivered while it was away.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
import uuid
from typing import Any

import amqp

from tasync.broker import topology
from tasync.broker.alerts import Handled, decode_handled
from tasync.broker.connection import connection_user
from tasync.broker.consumer import ConsumerLoop, message_body
from tasync.broker.errors import MessageError
from tasync.broker.publisher import send
from tasync.broker.signing import SIGNATURE_HEADER
from tasync.consumers.context import NodeContext
from tasync.consumers.delivery.settle import MARKER_HEADER, RECORD_NODE_HEADER, handled_message
from tasync.consumers.totals import open_db, record_handled, stream_offset

log = logging.getLogger("tasync.delivery")

_MAX_RECORD_BYTES = 4 << 20
#: Most records written to ``totals.db`` in one transaction.
_WRITE_BATCH = 500


class HandledWatcher(ConsumerLoop):
    """Writes other nodes' settled ids into this node's duplicate window.

    Args:
        ctx: the node context (data dir, keyring to verify records, trail).
        window_s: the duplicate window: older records are read past, not written.

    Attributes:
        caught_up: set once every record published before this node connected has been read.
        records_read: records read by this process (own ones and markers included).
        ids_learned: ids of other nodes written to the window by this process.
    """

    def __init__(self, ctx: NodeContext, *, window_s: float) -> None:
        super().__init__(ctx.settings, prefetch=1000)
        self.name = f"tasync-handled-{ctx.node}"
        self.ctx = ctx
        self.node = ctx.node
        self.window_s = window_s
        self.caught_up = threading.Event()
        self.records_read = 0
        self.ids_learned = 0
        self.refused = 0
        self._db = open_db(ctx.data_dir)
        self._offset: int | None = None
        self._marker = ""
        self._pending: list[tuple[Handled, int]] = []  # read, not yet written
        self._marker_read = False

    def start_offset(self) -> int | dt.datetime:
        """Where to read from: after the last record written, else ``now - window``."""
        if self._offset is not None:
            return self._offset + 1
        stored = stream_offset(self._db, topology.HANDLED_STREAM)
        horizon = time.time() - self.window_s
        if stored is not None and stored[1] >= horizon:
            return stored[0] + 1
        # Timestamps address whole seconds and whole chunks: this may read a little earlier.
        return dt.datetime.fromtimestamp(max(horizon, 0.0), dt.UTC)

    def setup(self, channel: Any) -> None:
        """Declare the alert topology, read from ``start_offset``, and append a marker."""
        self._write()  # what the lost connection delivered: it is read from after it
        topology.declare_alerts(channel, self.settings)
        offset = self.start_offset()
        if isinstance(offset, dt.datetime):
            offset = offset.replace(microsecond=0)
        channel.basic_consume(topology.HANDLED_STREAM, no_ack=False, callback=self._on_message,
                              on_cancel=self.cancelled, arguments={"x-stream-offset": offset})
        self._marker = uuid.uuid4().hex
        send(channel, handled_message(Handled(node=self.node, at=time.time(),
                                              marker=self._marker), self.ctx.keyring),
             user_id=connection_user(self.conn))

    def _drain_until_stopped(self) -> None:
        """Read what the broker has sent, then write it in one transaction; repeat.

        Each node settles in small batches under load, so records arrive by the hundred per
        second; one SQLite transaction per record would cost the follower more than reading
        them.
        """
        assert self.conn is not None
        while not self.stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                self.conn.drain_events(timeout=self.poll_s)
                while len(self._pending) < _WRITE_BATCH:
                    self.conn.drain_events(timeout=0)
            self._write()
            if self._marker_read:  # only now: every record before the marker is written
                self.caught_up.set()
            self.conn.heartbeat_check()
            self.on_idle()

    def _write(self) -> None:
        """Write the ids of the records read since the last write, with the last offset."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        last, offset = pending[-1]
        self.ids_learned += record_handled(
            self._db, [record for record, _ in pending], stream=topology.HANDLED_STREAM,
            offset=offset, at=last.at, cutoff=time.time() - self.window_s)

    def _on_message(self, message: amqp.Message) -> None:
        self.channel.basic_ack(message.delivery_tag)
        self.records_read += 1
        headers = message.headers or {}
        position = headers.get("x-stream-offset")
        if not isinstance(position, int):
            return
        if headers.get(RECORD_NODE_HEADER) == self.node and not headers.get(MARKER_HEADER):
            # Our own ids are in the window already; the record only moves the offset.
            self._offset = position
            self._pending.append((Handled(node=self.node, at=time.time()), position))
            return
        try:
            body = message_body(message)
            if self.ctx.keyring is not None:
                self.ctx.keyring.verify(body, headers.get(SIGNATURE_HEADER))
            record = decode_handled(body, max_bytes=_MAX_RECORD_BYTES)
        except MessageError as exc:
            self.refused += 1
            self._offset = position
            log.warning("skipped a handled record at offset %d: %s", position, exc)
            return
        self._offset = position
        if record.marker == self._marker and record.node == self.node:
            self._marker_read = True
        # Our own ids are in the window already; the record still moves the offset.
        self._pending.append((record if record.node != self.node else Handled(
            node=record.node, at=record.at), position))

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop following the stream and close the local file."""
        super().stop(timeout_s)
        self._db.close()
