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

from tasync.broker import frames
from tasync.broker.connection import connection_user
from tasync.broker.errors import PublishError

#: Frames gathered before one write to the socket: a window of small alerts goes in a few
#: writes, and the broker starts on the first of them while the rest are encoded.
FLUSH_BYTES = 128 << 10


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


def _properties(message: Outgoing, user_id: str | None) -> dict[str, Any]:
    """What every tasync message carries: JSON, its id and headers, the broker-checked user.

    ``user_id`` is the connection's user; ``message.user_id`` wins when set.
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
    return props


def send(channel: Any, message: Outgoing, *, user_id: str | None) -> None:
    """``basic.publish`` of ``message`` on ``channel``, through the channel's own client.

    The confirm, if the channel is in confirm mode, is the caller's to wait for.
    """
    channel.basic_publish(amqp.Message(message.body, **_properties(message, user_id)),
                          exchange=message.exchange, routing_key=message.routing_key,
                          mandatory=message.mandatory)


def encode(channel: amqp.Channel, message: Outgoing, *, user_id: str | None) -> bytes:
    """The frames ``send`` would write for ``message`` on ``channel`` (``tasync.broker.frames``)."""
    return frames.encode_publish(
        channel=channel.channel_id, frame_max=channel.connection.frame_max,
        exchange=message.exchange, routing_key=message.routing_key,
        mandatory=message.mandatory, body=message.body,
        props=frames.properties(_properties(message, user_id)))


class Unroutable(PublishError):
    """A mandatory message reached no queue (for example: no node holds that role)."""


class ConfirmedPublisher:
    """Publishes on its own confirm-mode channel of ``conn``; not thread-safe.

    Args:
        conn: a connected kombu connection; best one used by no consumer, because waiting for
            confirms dispatches every frame of the connection.
        timeout_s: how long the publisher waits for the next confirm before it gives up; a
            long call that keeps receiving confirms never times out.
        window: most messages in flight before the publisher waits for confirms.

    Every message carries the connection's broker user as ``user_id`` (when it is certain,
    ``tasync.broker.connection.connection_user``), so the broker vouches for who published it and
    receivers can check that identity against their allow-lists.
    """

    def __init__(self, conn: Connection, *, timeout_s: float = 30.0, window: int = 1000) -> None:
        self.conn = conn
        self.timeout_s = timeout_s
        self.window = window
        self.channel = confirm_channel(conn, on_ack=self._on_ack, on_nack=self._on_nack,
                                       on_return=self._on_return)
        self._next_tag = 1
        #: Unconfirmed tags (in the order sent) and their body sizes.
        self._pending: dict[int, int] = {}
        self._pending_bytes = 0
        self._settled = 0
        self._call_first_tag = 1
        self._first_nacked: int | None = None
        # Tags in the order sent (increasing), so a multiple ack settles a prefix without
        # scanning the whole window; entries settled singly are dropped when reached.
        self._sent: deque[int] = deque()
        self._nacked = 0
        self._returned: list[str] = []
        self.user_id = connection_user(conn)
        #: Encoded frames not yet written (only on a py-amqp channel; ``memory://`` has none).
        self._out: list[bytes] | None = [] if isinstance(self.channel, amqp.Channel) else None
        self._out_bytes = 0

    def _settle(self, tag: int, multiple: bool) -> None:
        self._settled += 1
        if multiple:
            while self._sent and self._sent[0] <= tag:
                self._pending_bytes -= self._pending.pop(self._sent.popleft(), 0)
            return
        self._pending_bytes -= self._pending.pop(tag, 0)
        while self._sent and self._sent[0] not in self._pending:
            self._sent.popleft()

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        before = len(self._pending)
        first = next(iter(self._pending), tag) if multiple else tag
        if self._first_nacked is None or first < self._first_nacked:
            self._first_nacked = first
        self._settle(tag, multiple)
        self._nacked += before - len(self._pending)

    @property
    def confirmed_in_order(self) -> int:
        """How many messages of the current (or last) call the broker confirmed, in order.

        The first ``n`` messages were all confirmed, none refused: what a caller that
        publishes a sequence may mark done even when the call failed further on.
        """
        upto = next(iter(self._pending), self._next_tag)
        if self._first_nacked is not None:
            upto = min(upto, self._first_nacked)
        return max(0, upto - self._call_first_tag)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        self._returned.append(routing_key)

    def publish(self, message: Outgoing) -> None:
        """Publish one message and wait for its confirm."""
        self.publish_many([message])

    def publish_many(self, messages: Iterable[Outgoing], *, window_bytes: int | None = None,
                     on_confirmed: Callable[[int], None] | None = None) -> int:
        """Publish all ``messages`` in order and return once the broker confirmed every one.

        Args:
            messages: consumed lazily, so a caller may generate them as it goes.
            window_bytes: also keep at most this many body bytes unconfirmed (a single
                larger message still goes, alone).
            on_confirmed: called with ``confirmed_in_order`` whenever confirms arrive.

        Raises:
            PublishError: a message was nacked, or no confirm arrived for ``timeout_s``.
            Unroutable: a mandatory message reached no queue.
            OSError, amqp errors: the connection broke; the caller reconnects and repeats.
        """
        self._nacked = 0
        self._returned = []
        self._first_nacked = None
        self._call_first_tag = self._next_tag
        count = 0
        for message in messages:
            while self._pending and (len(self._pending) >= self.window or (
                    window_bytes is not None
                    and self._pending_bytes + len(message.body) > window_bytes)):
                self._await_confirms(on_confirmed)
            self._send(message)
            count += 1
        while self._pending:
            self._await_confirms(on_confirmed)
        if self._nacked:
            raise PublishError(f"the broker refused {self._nacked} of {count} messages")
        if self._returned:
            raise Unroutable(f"no queue is bound for {self._returned[0]!r}")
        return count

    def _await_confirms(self, on_confirmed: Callable[[int], None] | None) -> None:
        """Wait until at least one more confirm (or nack) arrived, at most ``timeout_s``."""
        self._flush()
        before = self._settled
        deadline = time.monotonic() + self.timeout_s
        while self._settled == before:
            self._drain(deadline)
        if on_confirmed is not None:
            on_confirmed(self.confirmed_in_order)

    def _send(self, message: Outgoing) -> None:
        if self._out is None:
            send(self.channel, message, user_id=self.user_id)
        else:
            data = encode(self.channel, message, user_id=self.user_id)
            self._out.append(data)
            self._out_bytes += len(data)
            if self._out_bytes >= FLUSH_BYTES:
                self._flush()
        self._pending[self._next_tag] = len(message.body)
        self._pending_bytes += len(message.body)
        self._sent.append(self._next_tag)
        self._next_tag += 1

    def _flush(self) -> None:
        """Write the gathered frames in one piece (the channel's connection must be open)."""
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        self._out_bytes = 0
        connection = self.channel.connection
        if connection is None:
            raise amqp.exceptions.RecoverableConnectionError("connection already closed")
        connection.transport.write(data)

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
