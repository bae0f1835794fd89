"""Confirmed publishing that stays fast in bulk: many messages in flight, confirms collected.

One confirm round trip per message caps a client near 2,000 msg/s on this class of machine
(docs/architecture.md); keeping a window of messages in flight and counting ``basic.ack`` frames as
they come reaches the broker's own rate. The py-amqp channel already delivers ack, nack and
return frames as events, so no second client library is needed for this.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import amqp
from kombu import Connection

from broker.connection import connection_user
from broker.errors import PublishError


@dataclass(frozen=True, kw_only=True)
class Outgoing:
    """One message to publish.

    ``user_id`` left ``None`` means the connection's own user (``ConfirmedPublisher``).
    """

    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    mandatory: bool = False
    persistent: bool = True
    user_id: str | None = None


def confirm_channel(conn: Any, *, on_ack: Callable[[int, bool], None],
                    on_nack: Callable[[int, bool], None],
                    on_return: Callable[..., None]) -> Any:
    """A new channel of ``conn`` in confirm mode, its ack, nack and return frames handled.

    py-amqp delivers those frames as channel events while the connection's events are drained.
    """
    channel = conn.channel()
    channel.confirm_select()
    channel.events["basic_ack"].add(on_ack)
    channel.events["basic_nack"].add(on_nack)
    channel.events["basic_return"].add(on_return)
    return channel


def send(channel: Any, message: Outgoing, *, user_id: str | None) -> None:
    """``basic.publish`` of ``message`` on ``channel``, as JSON, with the broker-checked user.

    ``user_id`` is the connection's user (``message.user_id`` wins when set); the confirm, if
    the channel is in confirm mode, is the caller's to wait for.
    """
    props: dict[str, Any] = {
        "content_type": "application/json",
        "delivery_mode": 2 if message.persistent else 1,
        "message_id": message.message_id,
        "application_headers": message.headers,
    }
    user = message.user_id or user_id
    if user:
        props["user_id"] = user
    channel.basic_publish(amqp.Message(message.body, **props), exchange=message.exchange,
                          routing_key=message.routing_key, mandatory=message.mandatory)


class Unroutable(PublishError):
    """A mandatory message reached no queue (for example: no node holds that role)."""


class ConfirmedPublisher:
    """Publishes on its own confirm-mode channel of ``conn``; not thread-safe.

    Args:
        conn: a connected kombu connection; best one used by no consumer, because waiting for
            confirms dispatches every frame of the connection.
        timeout_s: how long the last confirm of a call may take.
        window: most messages in flight before the publisher waits for confirms.

    Every message carries the connection's broker user as ``user_id`` (when it is certain,
    ``broker.connection.connection_user``), so the broker vouches for who published it and
    receivers can check that identity against their allow-lists.
    """

    def __init__(self, conn: Connection, *, timeout_s: float = 30.0, window: int = 1000) -> None:
        self.conn = conn
        self.timeout_s = timeout_s
        self.window = window
        self.channel = confirm_channel(conn, on_ack=self._on_ack, on_nack=self._on_nack,
                                       on_return=self._on_return)
        self._next_tag = 1
        self._pending: set[int] = set()
        # Tags in the order sent (increasing), so a multiple ack settles a prefix without
        # scanning the whole window; entries settled singly are dropped when reached.
        self._sent: deque[int] = deque()
        self._nacked = 0
        self._returned: list[str] = []
        self.user_id = connection_user(conn)

    def _settle(self, tag: int, multiple: bool) -> None:
        if multiple:
            while self._sent and self._sent[0] <= tag:
                self._pending.discard(self._sent.popleft())
            return
        self._pending.discard(tag)
        while self._sent and self._sent[0] not in self._pending:
            self._sent.popleft()

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        before = len(self._pending)
        self._settle(tag, multiple)
        self._nacked += before - len(self._pending)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        self._returned.append(routing_key)

    def publish(self, message: Outgoing) -> None:
        """Publish one message and wait for its confirm."""
        self.publish_many([message])

    def publish_many(self, messages: Iterable[Outgoing]) -> int:
        """Publish all ``messages`` in order and return once the broker confirmed every one.

        Raises:
            PublishError: a message was nacked or a confirm did not arrive in time.
            Unroutable: a mandatory message reached no queue.
            OSError, amqp errors: the connection broke; the caller reconnects and repeats.
        """
        self._nacked = 0
        self._returned = []
        count = 0
        for message in messages:
            while len(self._pending) >= self.window:
                self._drain(time.monotonic() + self.timeout_s)
            self._send(message)
            count += 1
        deadline = time.monotonic() + self.timeout_s
        while self._pending:
            self._drain(deadline)
        if self._nacked:
            raise PublishError(f"the broker refused {self._nacked} of {count} messages")
        if self._returned:
            raise Unroutable(f"no queue is bound for {self._returned[0]!r}")
        return count

    def _send(self, message: Outgoing) -> None:
        send(self.channel, message, user_id=self.user_id)
        self._pending.add(self._next_tag)
        self._sent.append(self._next_tag)
        self._next_tag += 1

    def _drain(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PublishError(
                f"{len(self._pending)} messages not confirmed within {self.timeout_s:g} s"
            )
        try:
            self.conn.drain_events(timeout=min(remaining, 1.0))
        except TimeoutError:
            self.conn.heartbeat_check()
