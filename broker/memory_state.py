"""The state of the in-process broker: the exchanges, queues and messages of a virtual host.

``MemoryBroker`` is one virtual host of the broker that ``tasync.broker.memory`` describes (what
it emulates and what not): it declares, binds, routes, dead-letters, and hands ready messages
to consumers. The channels and connections that call it are built on it
(``tasync.broker.memory_channel``, ``tasync.broker.memory``); it sees them only through
``ChannelView`` and ``ConnectionView``, the few calls it makes back to them (a delivery, a consumer
cancelled by a deleted queue, a connection lost by a restart), so this module imports neither
and the three read from the bottom up.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import amqp
import amqp.exceptions

from tasync.broker.errors import NotEmulated

#: Arguments of ``queue_declare`` that are understood (or, for retention, accepted).
_QUEUE_ARGUMENTS = frozenset({
    "x-queue-type", "x-dead-letter-exchange", "x-dead-letter-routing-key",
    "x-dead-letter-strategy", "x-overflow", "x-max-age", "x-max-length-bytes",
    "x-stream-max-segment-size-bytes",
})
_EXCHANGE_TYPES = frozenset({"direct", "fanout", "topic"})


@dataclass
class StoredMessage:
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
class MemoryConsumer:
    """A subscription to a queue, on the channel its deliveries go to."""

    tag: str
    channel: ChannelView
    queue: MemoryQueue
    callback: Callable[[amqp.Message], None] | None
    on_cancel: Callable[[str], None] | None
    no_ack: bool
    priority: int
    prefetch: int
    cursor: int = 0  # streams: the next offset to deliver
    unacked: int = 0


@dataclass(eq=False)
class MemoryQueue:
    """A queue: its ready messages (a stream: its log), its consumers; ``owner`` if exclusive."""

    name: str
    kind: str
    durable: bool
    auto_delete: bool
    owner: ConnectionView | None
    arguments: dict[str, Any]
    ready: deque[StoredMessage] = field(default_factory=deque)
    log: list[StoredMessage] = field(default_factory=list)
    consumers: list[MemoryConsumer] = field(default_factory=list)
    had_consumer: bool = False

    @property
    def message_count(self) -> int:
        """What ``queue_declare`` reports: the ready messages, or a stream's whole log."""
        return len(self.log) if self.kind == "stream" else len(self.ready)


@dataclass(eq=False)
class MemoryExchange:
    """An exchange of one of the emulated types, and the queues bound to it."""

    name: str
    type: str
    bindings: set[tuple[str, str]] = field(default_factory=set)  # (queue, routing key)


#: A delivery not yet settled: the message, the queue it came from, the consumer it went to.
Unacked = tuple[StoredMessage, MemoryQueue, MemoryConsumer | None]


class ChannelView(Protocol):
    """What the broker uses of a channel (``tasync.broker.memory_channel.MemoryChannel``)."""

    @property
    def reply_key(self) -> str:
        """The routing key that reaches this channel's direct reply-to consumer."""

    @property
    def reply_consumer(self) -> MemoryConsumer | None:
        """The channel's direct reply-to consumer, if it started one."""

    @property
    def unacked(self) -> Mapping[int, Unacked]:
        """The channel's deliveries not yet settled, by delivery tag."""

    def deliver(self, consumer: MemoryConsumer, stored: StoredMessage) -> None:
        """Give a message to one of the channel's consumers (held lock)."""

    def forget_consumer(self, consumer: MemoryConsumer, *, notify: bool) -> None:
        """Remove a consumer of the channel, telling its ``on_cancel`` when ``notify``."""


class ConnectionView(Protocol):
    """What the broker uses of a connection (``tasync.broker.memory.MemoryConnection``)."""

    @property
    def channels(self) -> Mapping[int, ChannelView]:
        """The connection's open channels, by channel id."""

    def lose(self, reason: str) -> None:
        """The broker closed the connection (held lock): every later call raises."""


def _topic_match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_topic_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _topic_match(rest, words[1:])


def amqp_error(cls: type[amqp.exceptions.AMQPError], code: str, text: str) -> Exception:
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
        self.exchanges: dict[str, MemoryExchange] = {
            name: MemoryExchange(name, kind) for name, kind in (
                ("", "direct"), ("amq.direct", "direct"), ("amq.fanout", "fanout"),
                ("amq.topic", "topic"))}
        self.queues: dict[str, MemoryQueue] = {}
        self.connections: list[ConnectionView] = []
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
            queue = self.find_queue(name)
            stored = queue.log if queue.kind == "stream" else list(queue.ready)
            return [self.as_message(s, queue) for s in stored]

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

    def _exchange(self, name: str) -> MemoryExchange:
        exchange = self.exchanges.get(name)
        if exchange is None:
            raise amqp_error(amqp.exceptions.NotFound, "NOT_FOUND",
                             f"no exchange '{name}' in vhost '{self.vhost}'")
        return exchange

    def find_queue(self, name: str, conn: ConnectionView | None = None) -> MemoryQueue:
        """The queue ``name``, as ``conn`` may use it (another's exclusive queue is locked)."""
        queue = self.queues.get(name)
        if queue is None:
            raise amqp_error(amqp.exceptions.NotFound, "NOT_FOUND",
                             f"no queue '{name}' in vhost '{self.vhost}'")
        if queue.owner is not None and conn is not None and queue.owner is not conn:
            raise amqp_error(amqp.exceptions.ResourceLocked, "RESOURCE_LOCKED",
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
                raise amqp_error(amqp.exceptions.PreconditionFailed, "PRECONDITION_FAILED",
                                 f"inequivalent arg 'type' for exchange '{name}' in vhost "
                                 f"'{self.vhost}': received '{kind}' but current is "
                                 f"'{existing.type}'")
            if existing is None:
                self.exchanges[name] = MemoryExchange(name, kind)

    def declare_queue(self, conn: ConnectionView, name: str, *, passive: bool, durable: bool,
                      exclusive: bool, auto_delete: bool,
                      arguments: dict[str, Any] | None) -> tuple[str, int, int]:
        """Declare (or, passive, look up) a queue; ``(name, messages, consumers)``."""
        with self.lock:
            if passive:
                queue = self.find_queue(name, conn)
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
                self.queues[name] = MemoryQueue(name, kind, durable, auto_delete,
                                                conn if exclusive else None, arguments)
                self.exchanges[""].bindings.add((name, name))
            queue = self.find_queue(name, conn)  # another connection's exclusive queue is locked
            if queue.kind != kind:
                raise amqp_error(amqp.exceptions.PreconditionFailed, "PRECONDITION_FAILED",
                                 f"inequivalent arg 'x-queue-type' for queue '{name}' in vhost "
                                 f"'{self.vhost}': received '{kind}' but current is "
                                 f"'{queue.kind}'")
            return queue.name, queue.message_count, len(queue.consumers)

    def bind(self, queue: str, exchange: str, routing_key: str, *, bound: bool = True) -> None:
        """Bind (or with ``bound=False`` unbind) a queue to an exchange."""
        with self.lock:
            self.find_queue(queue)
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

    def route(self, exchange_name: str, routing_key: str) -> list[MemoryQueue]:
        """The queues a message to ``exchange_name`` with ``routing_key`` reaches."""
        exchange = self._exchange(exchange_name)
        words = routing_key.split(".")
        names = {queue for queue, key in exchange.bindings
                 if exchange.type == "fanout" or key == routing_key
                 or (exchange.type == "topic" and _topic_match(key.split("."), words))}
        return [self.queues[name] for name in sorted(names) if name in self.queues]

    def enqueue(self, queue: MemoryQueue, stored: StoredMessage) -> None:
        """Add a message to a queue (held lock); a stream gives it the next offset."""
        if queue.kind == "stream":
            stored.offset = len(queue.log)
            queue.log.append(stored)
        else:
            queue.ready.append(stored)

    def dead_letter(self, queue: MemoryQueue, stored: StoredMessage) -> None:
        """Route a rejected or expired message by its queue's ``x-dead-letter-exchange``."""
        exchange = queue.arguments.get("x-dead-letter-exchange")
        if exchange is None or exchange not in self.exchanges:
            return
        key = queue.arguments.get("x-dead-letter-routing-key", stored.routing_key)
        for target in self.route(exchange, key):
            self.enqueue(target, StoredMessage(stored.body, dict(stored.properties), exchange, key))

    def dispatch(self) -> None:
        """Hand ready messages to consumers with room in their prefetch window."""
        with self.lock:
            for queue in list(self.queues.values()):
                if queue.consumers:
                    self._dispatch_stream(queue) if queue.kind == "stream" \
                        else self._dispatch_queue(queue)

    def _dispatch_queue(self, queue: MemoryQueue) -> None:
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

    def _dispatch_stream(self, queue: MemoryQueue) -> None:
        for consumer in queue.consumers:
            while consumer.cursor < len(queue.log) and consumer.unacked < consumer.prefetch:
                consumer.channel.deliver(consumer, queue.log[consumer.cursor])
                consumer.cursor += 1

    def as_message(self, stored: StoredMessage, queue: MemoryQueue) -> amqp.Message:
        """A copy of a stored message as ``queue`` hands it out, with the headers it adds."""
        properties = dict(stored.properties)
        headers = dict(properties.get("application_headers") or {})
        if queue.kind == "stream":
            headers["x-stream-offset"] = stored.offset
        elif queue.kind == "quorum" and stored.deliveries > 1:
            headers["x-delivery-count"] = stored.deliveries - 1
        if headers or "application_headers" in properties:
            properties["application_headers"] = headers
        return amqp.Message(stored.body, **properties)

    def reply(self, routing_key: str, body: bytes, properties: dict[str, Any]) -> bool:
        """Deliver a direct reply-to answer to the channel that asked (held lock).

        False (the answer is dropped) when that channel is gone.
        """
        for conn in self.connections:
            for channel in conn.channels.values():
                consumer = channel.reply_consumer
                if channel.reply_key == routing_key and consumer is not None:
                    stored = StoredMessage(body, dict(properties), "", routing_key)
                    channel.deliver(consumer, stored)
                    return True
        return False

    def stream_start(self, queue: MemoryQueue, offset: Any) -> int:
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
