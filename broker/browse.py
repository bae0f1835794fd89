"""Looking at the messages of a queue without taking them away.

AMQP 0-9-1 has no "peek": ``tasync dead list`` and ``tasync quarantine list`` consume with
manual acknowledgements and close the channel without acknowledging, which hands every message
back. What that does, measured on RabbitMQ 3.10 with quorum queues (the dead-letter and
quarantine queues are quorum queues):

* nothing is lost, and the messages handed back come first again, in their order;
* each message's ``x-delivery-count`` header goes up by one per look (a quorum queue counts
  every return) and its ``redelivered`` flag is set. A delivery limit on the queue
  (``x-delivery-limit``, none by default on 3.10) would therefore drop a message after that many
  looks: tasync never sets one on these queues, and an operator must not add one by policy;
* a consumer of the queue at the same time would compete for the messages; nothing in tasync
  consumes them.

A look is bounded (``limit``): it takes at most that many messages and stops after the count
the queue had when it started, so it ends even while messages keep arriving. To take a message
away for good (``tasync dead requeue``), ``ack`` it before closing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import amqp
import amqp.exceptions

from tasync.broker.consumer import message_body
from tasync.broker.errors import MessageError

#: How long a look waits for the next message before it takes the queue as read.
IDLE_S = 0.5


@dataclass(frozen=True)
class Browsed:
    """One message seen in a queue.

    Attributes:
        body: the bytes as published (or as much of them as could be read).
        headers: its application headers.
        message_id: its AMQP message id, if any.
        delivery_count: how often the queue handed it out before (``x-delivery-count``).
        tag: its delivery tag on the browsing channel (for ``QueueBrowser.ack``).
    """

    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    delivery_count: int = 0
    tag: int = 0


class QueueBrowser:
    """Reads up to ``limit`` messages of ``queue`` on a channel of ``conn``.

    ``close`` hands back every message not acknowledged.

    Args:
        conn: a connected kombu connection.
        queue: the queue's name.
        limit: most messages to read.
    """

    def __init__(self, conn: Any, queue: str, *, limit: int) -> None:
        self.conn = conn
        self.queue = queue
        self.limit = max(1, limit)
        self.channel = conn.channel()
        #: Messages ready in the queue when the look started (0 when it does not exist).
        self.total = 0
        self._seen: list[Browsed] = []

    def read(self) -> list[Browsed]:
        """Every message up to the limit, oldest first.

        Raises:
            amqp.exceptions.NotFound: the queue does not exist.
        """
        ok = self.channel.queue_declare(self.queue, passive=True)
        self.total = int(ok.message_count)
        wanted = min(self.total, self.limit)
        if wanted == 0:
            return []
        self.channel.basic_qos(0, wanted, False)
        self.channel.basic_consume(self.queue, no_ack=False, callback=self._take)
        quiet_since = time.monotonic()
        count = 0
        while len(self._seen) < wanted and time.monotonic() - quiet_since < IDLE_S:
            with contextlib.suppress(TimeoutError):
                self.conn.drain_events(timeout=0.1)
            if len(self._seen) != count:
                count, quiet_since = len(self._seen), time.monotonic()
        return list(self._seen[:wanted])

    def _take(self, message: amqp.Message) -> None:
        headers = dict(message.properties.get("application_headers") or {})
        try:
            body = message_body(message)
        except MessageError:
            body = str(message.body).encode("utf-8", "replace")
        count = headers.get("x-delivery-count")
        message_id = message.properties.get("message_id")
        self._seen.append(Browsed(
            body=body, headers=headers,
            message_id=message_id if isinstance(message_id, str) and message_id else None,
            delivery_count=count if isinstance(count, int) else 0,
            tag=message.delivery_info["delivery_tag"]))

    def ack(self, browsed: Browsed) -> None:
        """Take ``browsed`` out of the queue for good."""
        self.channel.basic_ack(browsed.tag)

    def close(self) -> None:
        """Close the channel: every message not acknowledged goes back to the queue."""
        with contextlib.suppress(Exception):
            self.channel.close()


@contextlib.contextmanager
def browse(conn: Any, queue: str, *, limit: int) -> Iterator[QueueBrowser]:
    """A ``QueueBrowser`` that hands back what it did not acknowledge when the block ends."""
    browser = QueueBrowser(conn, queue, limit=limit)
    try:
        yield browser
    finally:
        browser.close()
