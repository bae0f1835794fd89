"""An in-process broker for unit tests, selected by a ``memory://`` broker URL.

The consumers, the relay and the RPC client talk to py-amqp channels under kombu connections
(``tasync.broker.connection``). With ``Settings(broker_urls=("memory://guest@/<vhost>",))`` the same
``connect`` hands out a real kombu ``Connection`` whose transport is ``MemoryTransport``: its
channels keep exchanges, queues and messages in this process, so a test runs the production
code unchanged, without RabbitMQ and without a subprocess, and looks at the broker's state
(``broker_for``) to assert what was published, acknowledged or left. Each virtual host is one
``MemoryBroker``; a test takes a virtual host of its own and ``reset`` drops it.

What it emulates, as RabbitMQ 3.10 does it:

* exchanges ``direct``, ``fanout`` and ``topic`` (``*`` and ``#``), the default exchange, passive
  declares (``NOT_FOUND``) and a declare of another type (``PRECONDITION_FAILED``);
* queues: classic, quorum (``x-delivery-count`` on redelivery) and stream (``x-queue-type``);
  ``exclusive`` queues owned by one connection (``RESOURCE_LOCKED`` for any other, deleted
  when it closes), ``auto_delete`` after the last consumer leaves, ``message_count``;
* ``basic_publish`` with ``mandatory`` (a ``basic_return`` event), ``user_id`` checked against
  the connection's user, ``expiration`` (expired messages are dropped or dead-lettered);
* ``confirm_select``: every publish is confirmed with a ``basic_ack`` event once routed;
* ``basic_consume`` / ``basic_cancel`` with consumer priority (``x-priority``), round-robin
  among equals, per-consumer ``basic_qos`` prefetch; ``basic_ack`` (``multiple``),
  ``basic_nack`` and ``basic_reject`` with or without requeue (``x-dead-letter-exchange``);
  unacknowledged messages go back to their queue, redelivered, when their channel closes;
* streams: ``x-stream-offset`` ``first``, ``last`` (the last message), ``next``, an offset or a
  time, the ``x-stream-offset`` header on each delivery, prefetch and manual acks required;
* direct reply-to (``amq.rabbitmq.reply-to``) for requests and their answers;
* ``drain_events`` (one event per call, ``socket.timeout`` when none came in time) and a
  socket that is readable while events wait (``connection.transport.sock``, for ``select``).

What it does not emulate: retention of streams (``x-max-age`` and the size limits are
accepted and nothing is ever trimmed), queue length limits and overflow, message priorities,
``basic_get``, transactions, exchange-to-exchange bindings, the ``headers`` exchange,
heartbeats and blocked connections, permissions, clustering, and persistence (everything is
gone with the process). A channel error is raised by the call that caused it, also for
``basic_publish``, where RabbitMQ closes the channel asynchronously. Anything it does not
emulate raises ``tasync.broker.errors.NotEmulated`` instead of quietly behaving otherwise.

It is three modules, each built on the one below it, none importing one above:
``tasync.broker.memory_state`` holds a virtual host's exchanges, queues and messages
(``MemoryBroker``), ``tasync.broker.memory_channel`` the channels (``MemoryChannel``), and this
one the connection, the kombu transport and the virtual hosts of the process (``broker_for``).
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import amqp
import amqp.exceptions
import amqp.sasl
from kombu.transport import pyamqp

from tasync.broker.memory_channel import DrainEvent, MemoryChannel
from tasync.broker.memory_state import MemoryBroker

#: ``MemoryBroker`` too: tests name the broker they look at from here, beside ``broker_for``.
__all__ = ["MemoryBroker", "MemoryConnection", "MemoryTransport", "broker_for", "reset"]


class _Transport:
    """What code reads of a py-amqp transport: its socket, readable while events wait."""

    def __init__(self) -> None:
        self.sock, self._writer = socket.socketpair()
        self.sock.setblocking(False)
        self._writer.setblocking(False)
        self.signalled = False

    def signal(self) -> None:
        if not self.signalled:
            self.signalled = True
            with contextlib.suppress(OSError):
                self._writer.send(b"\0")

    def clear(self) -> None:
        if self.signalled:
            self.signalled = False
            with contextlib.suppress(OSError):
                while self.sock.recv(4096):
                    pass

    def close(self) -> None:
        self.sock.close()
        self._writer.close()
        self.signalled = True  # nothing is sent on a closed socket


class MemoryConnection:
    """The py-amqp ``Connection`` calls tasync makes (through kombu), on a ``MemoryBroker``."""

    def __init__(self, *, virtual_host: str | None = None, userid: str | None = None,
                 heartbeat: float = 0, **_options: Any) -> None:
        self.broker = broker_for(virtual_host or "/")
        self.user = userid or "guest"
        self.heartbeat = heartbeat
        self.authentication = (amqp.sasl.PLAIN(self.user, ""),)
        self.server_properties = {"product": "tasync in-process broker"}
        self.client: Any = None
        self.on_blocked: Callable[[str], None] | None = None
        self.on_unblocked: Callable[[], None] | None = None
        self.channels: dict[int, MemoryChannel] = {}
        self.transport = self._transport = _Transport()
        self._events: deque[DrainEvent] = deque()
        self._ready = threading.Condition(self.broker.lock)
        self._channel_ids = itertools.count(1)
        self._lost: str | None = None
        self.connected = False

    def connect(self) -> MemoryConnection:
        """Open the connection, unless the test made the broker refuse it."""
        with self.broker.lock:
            if self.broker.refuse_connections:
                raise ConnectionRefusedError("the in-process broker refuses connections")
            self.broker.connections.append(self)
            self.connected = True
        return self

    def check_open(self) -> None:
        """Raise as py-amqp does when the connection is closed or was lost."""
        if self._lost is not None:
            raise amqp.exceptions.ConnectionForced(self._lost)
        if not self.connected:
            raise amqp.exceptions.RecoverableConnectionError("connection already closed")

    def channel(self, channel_id: int | None = None) -> MemoryChannel:
        """A new channel."""
        self.check_open()
        with self.broker.lock:
            channel = MemoryChannel(self, channel_id or next(self._channel_ids))
            self.channels[channel.channel_id] = channel
            return channel

    def push(self, event: DrainEvent) -> None:
        """Queue an event for ``drain_events`` (held lock) and make the socket readable."""
        self._events.append(event)
        self.transport.signal()
        self._ready.notify_all()

    def drain_events(self, timeout: float | None = None) -> None:
        """Run the next event (a delivery, a confirm, a return); ``socket.timeout`` if none."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            while True:
                self.check_open()
                if self._events:
                    event = self._events.popleft()
                    if not self._events:
                        self.transport.clear()
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("timed out")
                self._ready.wait(remaining)
        event()

    def heartbeat_tick(self, rate: int = 2) -> None:
        """No heartbeats in a process; raises once the connection was lost."""
        self.check_open()

    def lose(self, reason: str) -> None:
        """The broker closed this connection (held lock): every later call raises."""
        self._lost = reason  # still "connected": a client notices when it next uses it
        self._release()
        self.transport.signal()  # a thread waiting in select() wakes up and finds it closed

    def close(self, *_args: Any, **_kwargs: Any) -> None:
        """Close the connection: its channels, and its exclusive queues."""
        with self.broker.lock:
            self._release()
            self.connected = False
            self.transport.close()
        self.broker.dispatch()

    collect = close

    def _release(self) -> None:
        if self in self.broker.connections:
            self.broker.connections.remove(self)
        for channel in list(self.channels.values()):
            channel.release()
        for name, queue in list(self.broker.queues.items()):
            if queue.owner is self:
                self.broker.delete_queue(name)
        self._events.clear()
        self._ready.notify_all()


class MemoryTransport(pyamqp.Transport):  # type: ignore[misc]
    """kombu's py-amqp transport with ``MemoryConnection`` in place of py-amqp's."""

    Connection = MemoryConnection
    driver_name = "tasync-memory"

    def establish_connection(self) -> MemoryConnection:
        """A connection to the virtual host of the URL, as its user."""
        client = self.client
        conn = MemoryConnection(virtual_host=client.virtual_host or "/", userid=client.userid,
                                heartbeat=client.heartbeat or 0)
        conn.client = client
        return conn.connect()



_BROKERS: dict[str, MemoryBroker] = {}
_BROKERS_LOCK = threading.Lock()


def broker_for(vhost: str) -> MemoryBroker:
    """The in-process broker of a virtual host, made on first use."""
    with _BROKERS_LOCK:
        if vhost not in _BROKERS:
            _BROKERS[vhost] = MemoryBroker(vhost)
        return _BROKERS[vhost]


def reset(vhost: str) -> None:
    """Drop a virtual host: its connections are closed, its queues and messages gone."""
    with _BROKERS_LOCK:
        broker = _BROKERS.pop(vhost, None)
    if broker is not None:
        broker.close_connections("the virtual host was reset")
