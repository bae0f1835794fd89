"""Settling a batch of alerts: what the broker must hold before they are acknowledged.

When the delivery worker has finished a batch, three kinds of message must be safe on the
broker before it acknowledges the alerts: one ``Handled`` record listing the ids and outcomes
(to ``tasync.handled``, so every node judges repeats by it), the dead-letter copy of each
failed alert (with the reason in its headers), and the quarantine copy of each refused one.
The ``Settler`` publishes them on a confirm-mode channel of the worker's own connection without
waiting, and acknowledges the batch's alerts when the broker has confirmed all of them. The
worker's loop already reads every frame of that connection, so confirms arrive between two
deliveries and the consumer thread never blocks on a round trip: one publish per batch, not a
wait per alert.

If the broker refuses one of them (a ``nack``, or a ``return`` because a queue was deleted),
the batch's alerts are handed back (``requeue``) instead of acknowledged: the broker delivers
them again, the node finds their ids in its own window, and settles them once more (a
delivered id is announced again, a failed one gets its dead-letter copy again), so nothing is
lost and nothing is delivered twice. A lost connection drops what was pending: those alerts
were never acknowledged and come back the same way.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tasync.broker import topology
from tasync.broker.alerts import OUTCOME_LETTERS, Handled, encode_handled
from tasync.broker.connection import connection_user
from tasync.broker.publisher import Outgoing, confirm_channel, send
from tasync.broker.signing import SIGNATURE_HEADER, KeyRing

log = logging.getLogger("tasync.delivery")

#: Called once a batch is settled: True when the broker confirmed everything (acknowledge the
#: alerts), False when it refused something (hand them back).
Done = Callable[[bool], None]


@dataclass
class _Batch:
    done: Done
    outstanding: set[int] = field(default_factory=set)
    failed: bool = False


#: The node a ``tasync.handled`` record comes from, readable without decoding its body: a
#: node skips its own records (their ids are in its window already) at the cost of a header.
RECORD_NODE_HEADER = "x-tasync-record-node"
#: Set on a catch-up marker record, which its node must decode even though it is its own.
MARKER_HEADER = "x-tasync-marker"


def handled_message(record: Handled, keyring: KeyRing | None) -> Outgoing:
    """``record`` as a message to ``tasync.handled``: signed when keyed, its node in a header."""
    body = encode_handled(record)
    headers: dict[str, object] = {RECORD_NODE_HEADER: record.node}
    if record.marker:
        headers[MARKER_HEADER] = 1
    if keyring is not None:
        headers[SIGNATURE_HEADER] = keyring.sign(body)
    return Outgoing(exchange="", routing_key=topology.HANDLED_STREAM, body=body,
                    headers=headers, mandatory=True)


class Settler:
    """Publishes a batch's record and copies with confirms, then settles its alerts.

    Not thread-safe: used from the delivery worker's thread, on that worker's connection.

    Args:
        conn: the worker's connection (a channel of its own is opened on it).
        node: this node's name, written into every record.
        keyring: signs records when the network has a cluster key.
    """

    def __init__(self, conn: Any, *, node: str, keyring: KeyRing | None) -> None:
        self.node = node
        self.keyring = keyring
        self.user_id = connection_user(conn)
        self.channel = confirm_channel(conn, on_ack=self._on_ack, on_nack=self._on_nack,
                                       on_return=self._on_return)
        self._next_tag = 1
        self._by_tag: dict[int, _Batch] = {}
        self._order: deque[int] = deque()
        self._returned = False
        self.records_published = 0

    @property
    def pending(self) -> int:
        """Publishes not confirmed yet."""
        return len(self._by_tag)

    def settle(self, *, handled: list[tuple[str, str]], copies: list[Outgoing],
               done: Done) -> None:
        """Publish a record of ``handled`` and ``copies``; call ``done`` once all are confirmed.

        With nothing to publish, ``done(True)`` at once.
        """
        outgoing = list(copies)
        if handled:
            outgoing.append(self.record(handled))
        if not outgoing:
            done(True)
            return
        batch = _Batch(done=done)
        # Every tag is the batch's before the first publish: py-amqp may read confirms while it
        # publishes (``basic_publish`` drains events on a connection that can be blocked), and
        # an early confirm must not find the batch complete.
        first = self._next_tag
        for tag in range(first, first + len(outgoing)):
            batch.outstanding.add(tag)
            self._by_tag[tag] = batch
            self._order.append(tag)
        self._next_tag += len(outgoing)
        for message in outgoing:
            send(self.channel, message, user_id=self.user_id)

    def record(self, handled: list[tuple[str, str]]) -> Outgoing:
        """The ``tasync.handled`` message listing ``(id, outcome)`` pairs, signed if keyed."""
        self.records_published += 1
        return handled_message(Handled(
            node=self.node, at=time.time(), ids=tuple(i for i, _ in handled),
            outcomes="".join(OUTCOME_LETTERS[o] for _, o in handled)), self.keyring)

    def _confirm(self, tag: int, multiple: bool, *, ok: bool) -> None:
        if self._returned:  # a return precedes the ack of the message it returns
            ok, self._returned = False, False
        tags = []
        if multiple:
            while self._order and self._order[0] <= tag:
                tags.append(self._order.popleft())
        else:
            tags.append(tag)
        for one in tags:
            batch = self._by_tag.pop(one, None)
            if batch is None:
                continue
            batch.outstanding.discard(one)
            batch.failed |= not ok
            if not batch.outstanding:
                if batch.failed:
                    log.error("the broker refused part of a settlement; handing its alerts back")
                batch.done(not batch.failed)
        while self._order and self._order[0] not in self._by_tag:
            self._order.popleft()

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._confirm(tag, multiple, ok=True)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._confirm(tag, multiple, ok=False)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        log.error("no queue for %r on %r: the alert topology is incomplete",
                  routing_key, exchange)
        self._returned = True
