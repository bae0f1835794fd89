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
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import amqp
import amqp.exceptions
import amqp.protocol
import amqp.sasl
from kombu.transport import pyamqp

from tasync.broker.errors import NotEmulated

#: The pseudo-queue of RabbitMQ's direct reply-to.
REPLY_TO = "amq.rabbitmq.reply-to"
#: Arguments of ``queue_declare`` that are understood (or, for retention, accepted).
_QUEUE_ARGUMENTS = frozenset({
    "x-queue-type", "x-dead-letter-exchange", "x-dead-letter-routing-key",
    "x-dead-letter-strategy", "x-overflow", "x-max-age", "x-max-length-bytes",
    "x-stream-max-segment-size-bytes",
})
_CONSUMER_ARGUMENTS = frozenset({"x-priority", "x-stream-offset"})
_EXCHANGE_TYPES = frozenset({"direct", "fanout", "topic"})
_Event = Callable[[], None]


@dataclass
class _Stored:
    """A message as a queue holds it."""

    body: Any
    properties: dict[str, Any]
    exchange: str
    routing_key: str
    expires_at: float | None = None
    redelivered: bool = False
    deliveries: int = 0
    offset: int = 0
    timestamp: float = field(default_factory=time.time)


@dataclass(eq=False)
class _Consumer:
    tag: str
    channel: MemoryChannel
    queue: _Queue
    callback: Callable[[amqp.Message], None] | None
    on_cancel: Callable[[str], None] | None
    no_ack: bool
    priority: int
    prefetch: int
    cursor: int = 0  # streams: the next offset to deliver
    unacked: int = 0


@dataclass(eq=False)
class _Queue:
    name: str
    kind: str
    durable: bool
    auto_delete: bool
    owner: MemoryConnection | None
    arguments: dict[str, Any]
    ready: deque[_Stored] = field(default_factory=deque)
    log: list[_Stored] = field(default_factory=list)
    consumers: list[_Consumer] = field(default_factory=list)
    had_consumer: bool = False

    @property
    def message_count(self) -> int:
        return len(self.log) if self.kind == "stream" else len(self.ready)


@dataclass(eq=False)
class _Exchange:
    name: str
    type: str
    bindings: set[tuple[str, str]] = field(default_factory=set)  # (queue, routing key)


def _topic_match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_topic_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _topic_match(rest, words[1:])


def _error(cls: type[amqp.exceptions.AMQPError], code: str, text: str) -> Exception:
    """A py-amqp error as RabbitMQ words it (``NOT_FOUND - no queue 'q' in vhost 'v'``)."""
    exc: Exception = cls(reply_text=f"{code} - {text}")
    return exc


class MemoryBroker:
    """The exchanges, queues and connections of one virtual host; thread-safe.

    Tests read its state: ``queue_messages``, ``unacked``, ``bindings``, ``queue_names``.
    """

    def __init__(self, vhost: str) -> None:
        self.vhost = vhost
        self.lock = threading.RLock()
        self.exchanges: dict[str, _Exchange] = {
            name: _Exchange(name, kind) for name, kind in (
                ("", "direct"), ("amq.direct", "direct"), ("amq.fanout", "fanout"),
                ("amq.topic", "topic"))}
        self.queues: dict[str, _Queue] = {}
        self.connections: list[MemoryConnection] = []
        self.refuse_connections = False
        self._names = itertools.count(1)

    # -- what tests look at -------------------------------------------------------------------

    def queue_names(self) -> list[str]:
        """Every queue that exists now."""
        with self.lock:
            return sorted(self.queues)

    def queue_messages(self, name: str) -> list[amqp.Message]:
        """Copies of the messages ready in a queue (for a stream: its whole log), in order."""
        with self.lock:
            queue = self._queue(name)
            stored = queue.log if queue.kind == "stream" else list(queue.ready)
            return [self._message(s, queue) for s in stored]

    def unacked(self, name: str) -> int:
        """Messages of a queue delivered and not yet acknowledged or rejected."""
        with self.lock:
            return sum(1 for conn in self.connections for ch in conn.channels.values()
                       for _s, queue, _c in ch.unacked.values() if queue.name == name)

    def bindings(self, exchange: str) -> set[tuple[str, str]]:
        """``(queue, routing key)`` pairs bound to an exchange."""
        with self.lock:
            return set(self._exchange(exchange).bindings)

    def close_connections(self, reason: str = "closed by the in-process broker") -> None:
        """Close every connection as a broker restart would: its next call raises."""
        with self.lock:
            for conn in list(self.connections):
                conn.lose(reason)

    # -- declaring ----------------------------------------------------------------------------

    def _exchange(self, name: str) -> _Exchange:
        exchange = self.exchanges.get(name)
        if exchange is None:
            raise _error(amqp.exceptions.NotFound, "NOT_FOUND",
                         f"no exchange '{name}' in vhost '{self.vhost}'")
        return exchange

    def _queue(self, name: str, conn: MemoryConnection | None = None) -> _Queue:
        queue = self.queues.get(name)
        if queue is None:
            raise _error(amqp.exceptions.NotFound, "NOT_FOUND",
                         f"no queue '{name}' in vhost '{self.vhost}'")
        if queue.owner is not None and conn is not None and queue.owner is not conn:
            raise _error(amqp.exceptions.ResourceLocked, "RESOURCE_LOCKED",
                         f"cannot obtain exclusive access to locked queue '{name}' in vhost "
                         f"'{self.vhost}'")
        return queue

    def declare_exchange(self, name: str, kind: str, passive: bool) -> None:
        """Declare (or, passive, look up) an exchange."""
        with self.lock:
            if passive:
                self._exchange(name)
                return
            if kind not in _EXCHANGE_TYPES:
                raise NotEmulated(f"exchange type {kind!r} (only direct, fanout, topic)")
            existing = self.exchanges.get(name)
            if existing is not None and existing.type != kind:
                raise _error(amqp.exceptions.PreconditionFailed, "PRECONDITION_FAILED",
                             f"inequivalent arg 'type' for exchange '{name}' in vhost "
                             f"'{self.vhost}': received '{kind}' but current is "
                             f"'{existing.type}'")
            if existing is None:
                self.exchanges[name] = _Exchange(name, kind)

    def declare_queue(self, conn: MemoryConnection, name: str, *, passive: bool, durable: bool,
                      exclusive: bool, auto_delete: bool,
                      arguments: dict[str, Any] | None) -> tuple[str, int, int]:
        """Declare (or, passive, look up) a queue; ``(name, messages, consumers)``."""
        with self.lock:
            if passive:
                queue = self._queue(name, conn)
                return queue.name, queue.message_count, len(queue.consumers)
            arguments = dict(arguments or {})
            unknown = set(arguments) - _QUEUE_ARGUMENTS
            if unknown:
                raise NotEmulated(f"queue arguments {sorted(unknown)}")
            kind = str(arguments.get("x-queue-type", "classic"))
            if kind not in ("classic", "quorum", "stream"):
                raise NotEmulated(f"queue type {kind!r}")
            name = name or f"amq.gen-{next(self._names)}"
            if name not in self.queues:
                self.queues[name] = _Queue(name, kind, durable, auto_delete,
                                           conn if exclusive else None, arguments)
                self.exchanges[""].bindings.add((name, name))
            queue = self._queue(name, conn)  # another connection's exclusive queue is locked
            if queue.kind != kind:
                raise _error(amqp.exceptions.PreconditionFailed, "PRECONDITION_FAILED",
                             f"inequivalent arg 'x-queue-type' for queue '{name}' in vhost "
                             f"'{self.vhost}': received '{kind}' but current is "
                             f"'{queue.kind}'")
            return queue.name, queue.message_count, len(queue.consumers)

    def bind(self, queue: str, exchange: str, routing_key: str, *, bound: bool = True) -> None:
        """Bind (or with ``bound=False`` unbind) a queue to an exchange."""
        with self.lock:
            self._queue(queue)
            target = self._exchange(exchange)
            if bound:
                target.bindings.add((queue, routing_key))
            else:
                target.bindings.discard((queue, routing_key))

    def delete_queue(self, name: str) -> int:
        """Delete a queue, its bindings and its consumers (told by ``on_cancel``)."""
        with self.lock:
            queue = self.queues.pop(name, None)
            if queue is None:
                return 0
            for exchange in self.exchanges.values():
                exchange.bindings = {(q, k) for q, k in exchange.bindings if q != name}
            for consumer in list(queue.consumers):
                consumer.channel.forget_consumer(consumer, notify=True)
            return queue.message_count

    # -- routing and delivering ---------------------------------------------------------------

    def route(self, exchange_name: str, routing_key: str) -> list[_Queue]:
        """The queues a message to ``exchange_name`` with ``routing_key`` reaches."""
        exchange = self._exchange(exchange_name)
        words = routing_key.split(".")
        names = {queue for queue, key in exchange.bindings
                 if exchange.type == "fanout" or key == routing_key
                 or (exchange.type == "topic" and _topic_match(key.split("."), words))}
        return [self.queues[name] for name in sorted(names) if name in self.queues]

    def enqueue(self, queue: _Queue, stored: _Stored) -> None:
        """Add a message to a queue (held lock); a stream gives it the next offset."""
        if queue.kind == "stream":
            stored.offset = len(queue.log)
            queue.log.append(stored)
        else:
            queue.ready.append(stored)

    def dead_letter(self, queue: _Queue, stored: _Stored) -> None:
        """Route a rejected or expired message by its queue's ``x-dead-letter-exchange``."""
        exchange = queue.arguments.get("x-dead-letter-exchange")
        if exchange is None or exchange not in self.exchanges:
            return
        key = queue.arguments.get("x-dead-letter-routing-key", stored.routing_key)
        for target in self.route(exchange, key):
            self.enqueue(target, _Stored(stored.body, dict(stored.properties), exchange, key))

    def dispatch(self) -> None:
        """Hand ready messages to consumers with room in their prefetch window."""
        with self.lock:
            for queue in list(self.queues.values()):
                if queue.consumers:
                    self._dispatch_stream(queue) if queue.kind == "stream" \
                        else self._dispatch_queue(queue)

    def _dispatch_queue(self, queue: _Queue) -> None:
        now = time.monotonic()
        while queue.ready:
            head = queue.ready[0]
            if head.expires_at is not None and head.expires_at <= now:
                queue.ready.popleft()
                self.dead_letter(queue, head)
                continue
            room = [c for c in queue.consumers if not c.prefetch or c.unacked < c.prefetch]
            if not room:
                return
            best = max(c.priority for c in room)
            consumer = next(c for c in room if c.priority == best)
            queue.consumers.remove(consumer)  # round-robin among equals
            queue.consumers.append(consumer)
            consumer.channel.deliver(consumer, queue.ready.popleft())

    def _dispatch_stream(self, queue: _Queue) -> None:
        for consumer in queue.consumers:
            while consumer.cursor < len(queue.log) and consumer.unacked < consumer.prefetch:
                consumer.channel.deliver(consumer, queue.log[consumer.cursor])
                consumer.cursor += 1

    def _message(self, stored: _Stored, queue: _Queue) -> amqp.Message:
        properties = dict(stored.properties)
        headers = dict(properties.get("application_headers") or {})
        if queue.kind == "stream":
            headers["x-stream-offset"] = stored.offset
        elif queue.kind == "quorum" and stored.deliveries > 1:
            headers["x-delivery-count"] = stored.deliveries - 1
        if headers or "application_headers" in properties:
            properties["application_headers"] = headers
        return amqp.Message(stored.body, **properties)

    def stream_start(self, queue: _Queue, offset: Any) -> int:
        """Where a stream consumer starts for its ``x-stream-offset``."""
        if offset in (None, "next"):
            return len(queue.log)
        if offset == "first":
            return 0
        if offset == "last":
            return max(0, len(queue.log) - 1)
        if isinstance(offset, bool) or not isinstance(offset, int | dt.datetime):
            raise NotEmulated(f"x-stream-offset {offset!r}")
        if isinstance(offset, int):
            return min(max(0, offset), len(queue.log))
        since = offset.timestamp() if offset.tzinfo else offset.replace(
            tzinfo=dt.UTC).timestamp()
        return next((s.offset for s in queue.log if s.timestamp >= since), len(queue.log))


class MemoryChannel:
    """The py-amqp ``Channel`` calls tasync makes, on a ``MemoryBroker``."""

    def __init__(self, connection: MemoryConnection, channel_id: int) -> None:
        self.connection = connection
        self.channel_id = channel_id
        self.broker = connection.broker
        self.events: defaultdict[str, set[Callable[..., None]]] = defaultdict(set)
        self.is_open = True
        self.prefetch = 0
        self.confirming = False
        self.unacked: dict[int, tuple[_Stored, _Queue, _Consumer | None]] = {}
        self.consumers: dict[str, _Consumer] = {}
        self._delivery_tags = itertools.count(1)
        self._publish_tags = itertools.count(1)
        self._consumer_tags = itertools.count(1)
        self.reply_key = f"{REPLY_TO}.{id(self):x}"
        self.reply_consumer: _Consumer | None = None

    def _check_open(self) -> None:
        self.connection.check_open()
        if not self.is_open:
            raise amqp.exceptions.RecoverableConnectionError("channel already closed")

    def _guard(self, fn: Callable[[], Any]) -> Any:
        """Run a method; a channel error closes the channel, as the broker would."""
        self._check_open()
        with self.broker.lock:
            try:
                return fn()
            except amqp.exceptions.ChannelError:
                self._close()
                raise

    # -- declaring ----------------------------------------------------------------------------

    def exchange_declare(self, exchange: str, type: str, passive: bool = False,
                         durable: bool = False, auto_delete: bool = True, nowait: bool = False,
                         arguments: dict[str, Any] | None = None) -> None:
        """As py-amqp's; exchange arguments are not emulated."""
        if arguments:
            raise NotEmulated(f"exchange arguments {sorted(arguments)}")
        self._guard(lambda: self.broker.declare_exchange(exchange, type, passive))

    def queue_declare(self, queue: str = "", passive: bool = False, durable: bool = False,
                      exclusive: bool = False, auto_delete: bool = True, nowait: bool = False,
                      arguments: dict[str, Any] | None = None) -> Any:
        """As py-amqp's: a ``queue_declare_ok_t``."""
        name, count, consumers = self._guard(lambda: self.broker.declare_queue(
            self.connection, queue, passive=passive, durable=durable, exclusive=exclusive,
            auto_delete=auto_delete, arguments=arguments))
        return amqp.protocol.queue_declare_ok_t(name, count, consumers)

    def queue_bind(self, queue: str, exchange: str = "", routing_key: str = "",
                   nowait: bool = False, arguments: dict[str, Any] | None = None) -> None:
        """As py-amqp's."""
        self._guard(lambda: self.broker.bind(queue, exchange, routing_key))

    def queue_unbind(self, queue: str, exchange: str, routing_key: str = "",
                     nowait: bool = False, arguments: dict[str, Any] | None = None) -> None:
        """As py-amqp's."""
        self._guard(lambda: self.broker.bind(queue, exchange, routing_key, bound=False))

    def queue_delete(self, queue: str = "", if_unused: bool = False, if_empty: bool = False,
                     nowait: bool = False) -> int:
        """As py-amqp's, without its conditions; returns the messages dropped."""
        if if_unused or if_empty:
            raise NotEmulated("queue_delete with if_unused or if_empty")
        return int(self._guard(lambda: self.broker.delete_queue(queue)))

    def queue_purge(self, queue: str = "", nowait: bool = False) -> int:
        """As py-amqp's; returns the messages dropped."""
        def purge() -> int:
            target = self.broker._queue(queue, self.connection)
            count = len(target.ready)
            target.ready.clear()
            return count
        return int(self._guard(purge))

    # -- publishing ---------------------------------------------------------------------------

    def confirm_select(self, nowait: bool = False) -> None:
        """Confirm every later publish with a ``basic_ack`` event."""
        self._check_open()
        self.confirming = True

    def basic_publish(self, msg: amqp.Message, exchange: str = "", routing_key: str = "",
                      mandatory: bool = False, immediate: bool = False) -> None:
        """Route and store a message; returns and confirms come as events."""
        if immediate:
            raise NotEmulated("immediate publishing")
        self._guard(lambda: self._publish(msg, exchange, routing_key, mandatory))
        self.broker.dispatch()

    def _publish(self, msg: amqp.Message, exchange: str, routing_key: str,
                 mandatory: bool) -> None:
        properties = dict(msg.properties)
        user = properties.get("user_id")
        if user is not None and user != self.connection.user:
            raise _error(amqp.exceptions.PreconditionFailed, "PRECONDITION_FAILED",
                         f"user_id property set to '{user}' but authenticated user was "
                         f"'{self.connection.user}'")
        if properties.get("reply_to") == REPLY_TO:
            if self.reply_consumer is None:
                raise _error(amqp.exceptions.PreconditionFailed, "PRECONDITION_FAILED",
                             "fast reply consumer does not exist")
            properties["reply_to"] = self.reply_key
        tag = next(self._publish_tags) if self.confirming else 0
        body = msg.body.encode() if isinstance(msg.body, str) else bytes(msg.body)
        expiration = properties.get("expiration")
        expires_at = None if expiration is None else time.monotonic() + int(expiration) / 1000
        if exchange == "" and routing_key.startswith(REPLY_TO + "."):
            routed = _reply(self.broker, routing_key, body, properties)
        else:
            routed = False
            for queue in self.broker.route(exchange, routing_key):
                self.broker.enqueue(queue, _Stored(body, dict(properties), exchange, routing_key,
                                                   expires_at))
                routed = True
        if mandatory and not routed:
            returned = amqp.Message(body, **properties)
            self.connection.push(lambda: self._returned(returned, exchange, routing_key))
        if self.confirming:
            self.connection.push(lambda: self._emit("basic_ack", tag, False))

    def _returned(self, message: amqp.Message, exchange: str, routing_key: str) -> None:
        exc = amqp.exceptions.ChannelError(reply_text="NO_ROUTE", reply_code=312)
        handlers = self.events.get("basic_return")
        if not handlers:
            raise exc
        for handler in list(handlers):
            handler(exc, exchange, routing_key, message)

    def _emit(self, event: str, *args: Any) -> None:
        if self.is_open:
            for handler in list(self.events.get(event, ())):
                handler(*args)

    # -- consuming ----------------------------------------------------------------------------

    def basic_qos(self, prefetch_size: int, prefetch_count: int, a_global: bool) -> None:
        """The prefetch count of consumers started later on this channel."""
        if prefetch_size or a_global:
            raise NotEmulated("basic_qos with a size or global")
        self._check_open()
        self.prefetch = prefetch_count

    def basic_consume(self, queue: str = "", consumer_tag: str = "", no_local: bool = False,
                      no_ack: bool = False, exclusive: bool = False, nowait: bool = False,
                      callback: Callable[[amqp.Message], None] | None = None,
                      arguments: dict[str, Any] | None = None,
                      on_cancel: Callable[[str], None] | None = None) -> str:
        """Subscribe; deliveries run ``callback`` when the connection drains."""
        arguments = dict(arguments or {})
        unknown = set(arguments) - _CONSUMER_ARGUMENTS
        if unknown or exclusive:
            raise NotEmulated(f"consumer arguments {sorted(unknown) or 'exclusive'}")
        tag = consumer_tag or f"amq.ctag-{self.channel_id}-{next(self._consumer_tags)}"
        if queue == REPLY_TO:
            if not no_ack:
                raise _error(amqp.exceptions.PreconditionFailed, "PRECONDITION_FAILED",
                             "reply consumer cannot acknowledge")
            self.reply_consumer = _Consumer(tag, self, _Queue(REPLY_TO, "classic", False, True,
                                                              self.connection, {}),
                                            callback, on_cancel, True, 0, 0)
            self.consumers[tag] = self.reply_consumer
            return tag

        def consume() -> None:
            target = self.broker._queue(queue, self.connection)
            if target.kind == "stream" and (no_ack or not self.prefetch):
                raise _error(amqp.exceptions.PreconditionFailed, "PRECONDITION_FAILED",
                             "stream consumers need manual acknowledgement and a prefetch "
                             "count")
            consumer = _Consumer(tag, self, target, callback, on_cancel, no_ack,
                                 int(arguments.get("x-priority", 0)), self.prefetch)
            if target.kind == "stream":
                consumer.cursor = self.broker.stream_start(target,
                                                           arguments.get("x-stream-offset"))
            elif "x-stream-offset" in arguments:
                raise NotEmulated("x-stream-offset on a queue that is not a stream")
            target.consumers.append(consumer)
            target.had_consumer = True
            self.consumers[tag] = consumer
        self._guard(consume)
        self.broker.dispatch()
        return tag

    def basic_cancel(self, consumer_tag: str, nowait: bool = False) -> None:
        """Unsubscribe; what was delivered stays unacknowledged."""
        self._check_open()
        with self.broker.lock:
            consumer = self.consumers.get(consumer_tag)
            if consumer is not None:
                self.forget_consumer(consumer, notify=False)

    def forget_consumer(self, consumer: _Consumer, *, notify: bool) -> None:
        """Remove a consumer; an ``auto_delete`` queue goes with its last one."""
        self.consumers.pop(consumer.tag, None)
        if consumer is self.reply_consumer:
            self.reply_consumer = None
            return
        queue = consumer.queue
        if consumer in queue.consumers:
            queue.consumers.remove(consumer)
        if notify and consumer.on_cancel is not None:
            on_cancel = consumer.on_cancel
            self.connection.push(lambda: on_cancel(consumer.tag))
        if queue.auto_delete and queue.had_consumer and not queue.consumers \
                and self.broker.queues.get(queue.name) is queue:
            self.broker.delete_queue(queue.name)

    def deliver(self, consumer: _Consumer, stored: _Stored) -> None:
        """Give ``stored`` to ``consumer`` (held lock); it runs when the connection drains."""
        tag = next(self._delivery_tags)
        stored.deliveries += 1
        if not consumer.no_ack:
            self.unacked[tag] = (stored, consumer.queue, consumer)
            consumer.unacked += 1
        message = self.broker._message(stored, consumer.queue)
        message.channel = self
        message.delivery_info = {
            "consumer_tag": consumer.tag, "delivery_tag": tag,
            "redelivered": stored.redelivered, "exchange": stored.exchange,
            "routing_key": stored.routing_key}
        self.connection.push(lambda: self._run_consumer(consumer, message))

    def _run_consumer(self, consumer: _Consumer, message: amqp.Message) -> None:
        if not self.is_open:
            return  # closing the channel gave the message back
        if self.consumers.get(consumer.tag) is not consumer:
            self.basic_reject(message.delivery_tag, requeue=True)  # what py-amqp does
            return
        if consumer.callback is not None:
            consumer.callback(message)

    # -- settling -----------------------------------------------------------------------------

    def _settle(self, delivery_tag: int, multiple: bool, requeue: bool | None) -> None:
        """Ack (``requeue`` None), requeue, or drop / dead-letter deliveries."""
        if multiple:
            tags = sorted(t for t in self.unacked if t <= delivery_tag)
        elif delivery_tag in self.unacked:
            tags = [delivery_tag]
        else:
            tags = []
        if not tags and (delivery_tag or not multiple):
            raise _error(amqp.exceptions.PreconditionFailed, "PRECONDITION_FAILED",
                         f"unknown delivery tag {delivery_tag}")
        for tag in tags:
            stored, queue, consumer = self.unacked.pop(tag)
            if consumer is not None:
                consumer.unacked -= 1
            if requeue is None or queue.kind == "stream":
                continue
            if requeue:
                stored.redelivered = True
                queue.ready.appendleft(stored)
            else:
                self.broker.dead_letter(queue, stored)

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        """Acknowledge one delivery, or all up to it with ``multiple``."""
        self._guard(lambda: self._settle(delivery_tag, multiple, None))
        self.broker.dispatch()

    def basic_nack(self, delivery_tag: int, multiple: bool = False,
                   requeue: bool = True) -> None:
        """Refuse deliveries: back to the queue, or dead-lettered."""
        self._guard(lambda: self._settle(delivery_tag, multiple, requeue))
        self.broker.dispatch()

    def basic_reject(self, delivery_tag: int, requeue: bool = True) -> None:
        """Refuse one delivery: back to the queue, or dead-lettered."""
        self._guard(lambda: self._settle(delivery_tag, False, requeue))
        self.broker.dispatch()

    def basic_get(self, *_args: Any, **_kwargs: Any) -> None:
        """Not emulated."""
        raise NotEmulated("basic_get")

    def basic_recover(self, *_args: Any, **_kwargs: Any) -> None:
        """Not emulated."""
        raise NotEmulated("basic_recover")

    def tx_select(self) -> None:
        """Not emulated."""
        raise NotEmulated("transactions")

    def exchange_bind(self, *_args: Any, **_kwargs: Any) -> None:
        """Not emulated."""
        raise NotEmulated("exchange-to-exchange bindings")

    # -- closing ------------------------------------------------------------------------------

    def close(self, reply_code: int = 0, reply_text: str = "", method_sig: Any = None,
              argsig: str = "", args: Any = None) -> None:
        """Close the channel: its consumers end, its unacknowledged messages go back."""
        with self.broker.lock:
            self._close()
        self.broker.dispatch()

    def _close(self) -> None:
        """Cancel this channel's consumers and give its unacknowledged messages back."""
        if not self.is_open:
            return
        self.is_open = False
        for consumer in list(self.consumers.values()):
            self.forget_consumer(consumer, notify=False)
        for tag in sorted(self.unacked, reverse=True):
            stored, queue, _consumer = self.unacked.pop(tag)
            if queue.kind != "stream":
                stored.redelivered = True
                queue.ready.appendleft(stored)
        self.connection.channels.pop(self.channel_id, None)


def _reply(broker: MemoryBroker, routing_key: str, body: bytes,
           properties: dict[str, Any]) -> bool:
    """Deliver a direct reply-to answer to the channel that asked; dropped if it is gone."""
    for conn in broker.connections:
        for channel in conn.channels.values():
            consumer = channel.reply_consumer
            if channel.reply_key == routing_key and consumer is not None:
                channel.deliver(consumer, _Stored(body, dict(properties), "", routing_key))
                return True
    return False


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
        self._events: deque[_Event] = deque()
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

    def push(self, event: _Event) -> None:
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
            channel._close()
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
