"""The master's seat: a lock the broker holds for at most one node, and the master's publisher.

Epochs fence a master that has been replaced, but two nodes could still both believe they own
the newest epoch: two promotions at once, a node started with ``--role master`` by mistake, an
old master restarted after a planned switchover. The seat makes "who is master" a fact the
broker decides, once, for the whole network:

* The seat is the exclusive queue ``tasync.master.seat``. RabbitMQ lets exactly one connection
  declare an exclusive queue; every other connection's declare fails with ``RESOURCE_LOCKED``,
  and the broker deletes the queue when the owner's connection ends: a clean close, a crash,
  or a hung process whose heartbeats stopped (measured on RabbitMQ 3.10: about 2 s after a
  SIGSTOP with a 1 s heartbeat, 3-5 s with 2 s).
* The connection that holds the seat is also the one the master publishes its changes on.
  The broker confirms a change only after the change log holds it, and it can only confirm on
  a connection that is still open, so a confirm received on the seat's connection proves the
  change was in the log before any other node could take the seat. A promotion takes the
  seat first and reads the log after: it always drains every change a master reported.
* A keep-alive thread answers heartbeats while the owner is busy elsewhere (validating or
  committing a large import can keep the control thread away for many seconds), so only a
  process that is really stopped, or cut off, loses the seat.

The lock is a classic queue, local to the broker node the master is connected to. In a
RabbitMQ cluster that node's loss ends the master's connection, and with it the seat; a
network partition between broker nodes is left to RabbitMQ's partition handling
(``pause_minority`` closes the minority's connections).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import amqp.exceptions
from kombu import Connection

from tasync.broker import topology
from tasync.broker.connection import RECOVERABLE, close_quietly, connect, describe
from tasync.broker.errors import SeatLost
from tasync.broker.publisher import ConfirmedPublisher, Outgoing
from tasync.broker.settings import Settings

log = logging.getLogger("tasync.seat")


class MasterSeat:
    """One node's hold on the master's seat, and its confirmed publisher while it holds it.

    Thread-safe: the control thread publishes and checks, the keep-alive thread keeps the
    connection alive between uses, and the node's other threads read ``held``.

    Args:
        settings: broker settings; ``seat_heartbeat_s`` is the heartbeat of the seat's
            connection, which bounds how long a hung master keeps the seat.
        node: the node that sits on it (shown in the broker's connection list).
    """

    def __init__(self, settings: Settings, *, node: str) -> None:
        self.settings = settings
        self.node = node
        self._lock = threading.RLock()
        self._conn: Connection | None = None
        self._publisher: ConfirmedPublisher | None = None
        #: The channel ``check`` asks on, kept open: opening and closing one per check were two
        #: more round trips, and the master checks before every request it answers as master.
        self._check_channel: Any = None
        self._held = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Why the seat was last lost, for the trail and the operator.
        self.lost_reason = ""

    @property
    def held(self) -> bool:
        """Whether this node holds the seat as far as it knows (``check`` asks the broker)."""
        return self._held.is_set()

    # -- taking and giving up ---------------------------------------------------------------

    def take(self) -> bool:
        """Try to take the seat; True when this node holds it now (also when it already did).

        Raises:
            BrokerUnreachable: no broker URL answered.
            OSError, amqp errors: the connection broke while asking.
        """
        with self._lock:
            if self.held:
                return True
            conn = connect(self.settings, name=f"tasync-seat-{self.node}",
                           heartbeat_s=self.settings.seat_heartbeat_s, retry_s=5.0)
            try:
                channel = conn.channel()
                channel.queue_declare(topology.MASTER_SEAT, exclusive=True, auto_delete=True)
                topology.declare_config(channel, self.settings)  # what a master publishes to
            except amqp.exceptions.ResourceLocked:
                close_quietly(conn)
                return False
            except BaseException:
                close_quietly(conn)
                raise
            self._conn = conn
            self._check_channel = channel
            self._publisher = ConfirmedPublisher(conn, timeout_s=self.settings.confirm_timeout_s)
            self.lost_reason = ""
            self._held.set()
        self._start_keepalive()
        log.info("took the master's seat")
        return True

    def release(self) -> None:
        """Give the seat up: close its connection, so the broker frees it at once."""
        with self._lock:
            was_held = self.held
            self._drop("released")
        if was_held:
            log.info("released the master's seat")

    def close(self) -> None:
        """Release the seat and stop the keep-alive thread (the node is stopping)."""
        self._stop.set()
        self.release()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def _drop(self, reason: str) -> None:
        """Forget the connection (held lock); the broker frees the seat when it closes."""
        self._held.clear()
        if reason != "released":
            self.lost_reason = reason
        conn, self._conn, self._publisher = self._conn, None, None
        self._check_channel = None
        close_quietly(conn)

    # -- using it ---------------------------------------------------------------------------

    def check(self) -> None:
        """Ask the broker whether this connection still holds the seat (one round trip).

        A process that was stopped for a while cannot tell from its own state that the broker
        dropped its connection meanwhile; this asks before it acts as master.

        Raises:
            SeatLost: the seat is not (or no longer) this node's.
        """
        with self._lock:
            conn = self._require()
            try:
                if self._check_channel is None:
                    self._check_channel = conn.channel()
                self._check_channel.queue_declare(topology.MASTER_SEAT, passive=True)
            except (*RECOVERABLE, amqp.exceptions.AMQPError) as exc:
                self._drop(f"the broker no longer holds it for this node ({describe(exc)})")
                raise SeatLost(self.lost_reason) from None

    def publish(self, outgoing: Iterable[Outgoing], *, window_bytes: int | None = None,
                on_confirmed: Callable[[int], None] | None = None) -> int:
        """Publish on the seat's connection and return once the broker confirmed every message.

        ``window_bytes`` and ``on_confirmed`` as ``ConfirmedPublisher.publish_many``; the
        callback runs with the seat's lock held, so it must not wait for other locks.

        Raises:
            SeatLost: the connection broke (the seat went with it); what ``on_confirmed`` was
                told is confirmed, nothing else.
            PublishError: the broker refused a message or did not confirm in time.
        """
        with self._lock:
            self._require()
            assert self._publisher is not None
            try:
                return self._publisher.publish_many(outgoing, window_bytes=window_bytes,
                                                    on_confirmed=on_confirmed)
            except RECOVERABLE as exc:
                self._drop(f"its connection broke while publishing ({describe(exc)})")
                raise SeatLost(self.lost_reason) from None

    def _require(self) -> Connection:
        if not self.held or self._conn is None:
            raise SeatLost(self.lost_reason or f"{self.node} does not hold the master's seat")
        return self._conn

    # -- keep-alive -------------------------------------------------------------------------

    def _start_keepalive(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._keepalive, name=f"tasync-seat-{self.node}",
                                        daemon=True)
        self._thread.start()

    def _keepalive(self) -> None:
        """Read the seat's connection and send heartbeats, a few times per heartbeat interval."""
        interval_s = max(0.05, self.settings.seat_heartbeat_s / 4)
        while not self._stop.wait(interval_s):
            with self._lock:
                if self._conn is None:
                    continue
                try:
                    with contextlib.suppress(TimeoutError):
                        self._conn.drain_events(timeout=0)
                    self._conn.heartbeat_check()
                except RECOVERABLE as exc:
                    self._drop(f"its connection was lost ({describe(exc)})")
                    log.warning("lost the master's seat: %s", self.lost_reason)

    def connection(self) -> Any:
        """The seat's connection, for tests that need to break it."""
        return self._conn
