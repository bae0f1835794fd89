"""The channels of the in-process broker: the py-amqp ``Channel`` calls tasync makes.

A ``MemoryChannel`` turns each call into a change of its virtual host's state
(``tasync.broker.memory_state.MemoryBroker``) under the broker's lock, and raises the channel
errors RabbitMQ would, closing itself as RabbitMQ closes a channel. What the broker hands back
(deliveries, confirms, returns, cancellations) is queued on the connection and runs when it
drains, on the thread that drains it, as py-amqp's callbacks do. ``tasync.broker.memory``
describes what is emulated; its ``MemoryConnection`` makes the channels, and a channel uses it
through ``OwningConnection``, so this module does not import that one.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

import amqp
import amqp.exceptions
import amqp.protocol

from tasync.broker.errors import NotEmulated
from tasync.broker.memory_state import (
    ConnectionView,
    MemoryBroker,
    MemoryConsumer,
    MemoryQueue,
    StoredMessage,
    Unacked,
    amqp_error,
)

#: The pseudo-queue of RabbitMQ's direct reply-to.
REPLY_TO = "amq.rabbitmq.reply-to"
_CONSUMER_ARGUMENTS = frozenset({"x-priority", "x-stream-offset"})
#: What a channel queues on its connection, to run when the connection drains.
DrainEvent = Callable[[], None]


class OwningConnection(ConnectionView, Protocol):
    """What a channel uses of its connection (``tasync.broker.memory.MemoryConnection``)."""

    @property
    def broker(self) -> MemoryBroker:
        """The virtual host the connection is open on."""

    @property
    def user(self) -> str:
        """The user the connection authenticated as (``user_id`` is checked against it)."""

    @property
    def channels(self) -> dict[int, MemoryChannel]:
        """The connection's open channels, by channel id; a channel removes itself on close."""

    def check_open(self) -> None:
        """Raise as py-amqp does when the connection is closed or was lost."""

    def push(self, event: DrainEvent) -> None:
        """Queue an event for ``drain_events`` (held lock)."""


class MemoryChannel:
    """The py-amqp ``Channel`` calls tasync makes, on a ``MemoryBroker``."""

    def __init__(self, connection: OwningConnection, channel_id: int) -> None:
        self.connection = connection
        self.channel_id = channel_id
        self.broker = connection.broker
        self.events: defaultdict[str, set[Callable[..., None]]] = defaultdict(set)
        self.is_open = True
        self.prefetch = 0
        self.confirming = False
        self.unacked: dict[int, Unacked] = {}
        self.consumers: dict[str, MemoryConsumer] = {}
        self._delivery_tags = itertools.count(1)
        self._publish_tags = itertools.count(1)
        self._consumer_tags = itertools.count(1)
        self.reply_key = f"{REPLY_TO}.{id(self):x}"
        self.reply_consumer: MemoryConsumer | None = None

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
                self.release()
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
            target = self.broker.find_queue(queue, self.connection)
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
            raise amqp_error(amqp.exceptions.PreconditionFailed, "PRECONDITION_FAILED",
                             f"user_id property set to '{user}' but authenticated user was "
                             f"'{self.connection.user}'")
        if properties.get("reply_to") == REPLY_TO:
            if self.reply_consumer is None:
                raise amqp_error(amqp.exceptions.PreconditionFailed, "PRECONDITION_FAILED",
                                 "fast reply consumer does not exist")
            properties["reply_to"] = self.reply_key
        tag = next(self._publish_tags) if self.confirming else 0
        body = msg.body.encode() if isinstance(msg.body, str) else bytes(msg.body)
        expiration = properties.get("expiration")
        expires_at = None if expiration is None else time.monotonic() + int(expiration) / 1000
        if exchange == "" and routing_key.startswith(REPLY_TO + "."):
            routed = self.broker.reply(routing_key, body, properties)
        else:
            routed = False
            for queue in self.broker.route(exchange, routing_key):
                stored = StoredMessage(body, dict(properties), exchange, routing_key, expires_at)
                self.broker.enqueue(queue, stored)
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
                raise amqp_error(amqp.exceptions.PreconditionFailed, "PRECONDITION_FAILED",
                                 "reply consumer cannot acknowledge")
            replies = MemoryQueue(REPLY_TO, "classic", False, True, self.connection, {})
            self.reply_consumer = MemoryConsumer(tag, self, replies, callback, on_cancel,
                                                 no_ack=True, priority=0, prefetch=0)
            self.consumers[tag] = self.reply_consumer
            return tag

        def consume() -> None:
            target = self.broker.find_queue(queue, self.connection)
            if target.kind == "stream" and (no_ack or not self.prefetch):
                raise amqp_error(amqp.exceptions.PreconditionFailed, "PRECONDITION_FAILED",
                                 "stream consumers need manual acknowledgement and a prefetch "
                                 "count")
            consumer = MemoryConsumer(tag, self, target, callback, on_cancel, no_ack,
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

    def forget_consumer(self, consumer: MemoryConsumer, *, notify: bool) -> None:
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

    def deliver(self, consumer: MemoryConsumer, stored: StoredMessage) -> None:
        """Give ``stored`` to ``consumer`` (held lock); it runs when the connection drains."""
        tag = next(self._delivery_tags)
        stored.deliveries += 1
        if not consumer.no_ack:
            self.unacked[tag] = (stored, consumer.queue, consumer)
            consumer.unacked += 1
        message = self.broker.as_message(stored, consumer.queue)
        message.channel = self
        message.delivery_info = {
            "consumer_tag": consumer.tag, "delivery_tag": tag,
            "redelivered": stored.redelivered, "exchange": stored.exchange,
            "routing_key": stored.routing_key}
        self.connection.push(lambda: self._run_consumer(consumer, message))

    def _run_consumer(self, consumer: MemoryConsumer, message: amqp.Message) -> None:
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
            raise amqp_error(amqp.exceptions.PreconditionFailed, "PRECONDITION_FAILED",
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
            self.release()
        self.broker.dispatch()

    def release(self) -> None:
        """Close at once (held lock): cancel the consumers, give unacknowledged messages back.

        What ``close`` does under the lock, and what the connection does to each of its
        channels when it closes or is lost.
        """
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
