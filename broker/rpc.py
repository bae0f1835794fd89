"""Requests over the control exchange with replies through RabbitMQ's direct reply-to.

The CLI asks one node (``node.<name>``), the master (``master``) or every node (``all``) and
collects the answers; a request to a routing key no running node binds comes back as a
``basic.return`` at once, so "no master is running" is reported immediately, not after a
timeout. A request to one named node is sent again for a few seconds first: that node's
control queue is exclusive to its connection, so it is briefly unbound whenever the node
reconnects (a missed heartbeat on a busy machine), and "the node is down" would be wrong.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import amqp
from kombu import Connection

from tasync.broker import messages, topology
from tasync.broker.connection import connection_user
from tasync.broker.errors import MessageError, NoAnswer, RemoteError
from tasync.broker.messages import Reply, Request

REPLY_TO = "amq.rabbitmq.reply-to"

#: How long a request to one named node is re-sent while no queue is bound for it.
NODE_UNROUTED_GRACE_S = 5.0
_RESEND_INTERVAL_S = 0.25


class RpcClient:
    """Sends requests and gathers replies on one channel of ``conn``.

    Args:
        conn: a connected kombu connection.
        sender: who is asking (shown in the answering node's log).
        max_bytes: largest reply accepted (an export can be large).
    """

    def __init__(self, conn: Connection, *, sender: str, max_bytes: int = 256 << 20) -> None:
        self.conn = conn
        self.sender = sender
        self.max_bytes = max_bytes
        self.channel = conn.channel()
        self.channel.events["basic_return"].add(self._on_return)
        self.channel.basic_consume(REPLY_TO, no_ack=True, callback=self._on_reply)
        self._replies: dict[str, list[Reply]] = {}
        self._returned: set[str] = set()
        self._sent_at: dict[str, float] = {}
        #: The broker-validated identity of every request (telaconf.hosts checks it).
        self.user_id = connection_user(conn)

    def _on_reply(self, message: amqp.Message) -> None:
        corr = message.properties.get("correlation_id")
        if corr not in self._replies:
            return
        try:
            reply = messages.decode(message.body, max_bytes=self.max_bytes, expect="reply")
        except MessageError:
            return
        self._replies[corr].append(reply)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        corr = message.properties.get("correlation_id")
        if corr:
            self._returned.add(corr)

    def send(self, corr: str, routing_key: str, body: bytes, *, ttl_s: float) -> None:
        """Publish one request, ``mandatory`` so that an unbound key comes back at once."""
        props: dict[str, Any] = {"user_id": self.user_id} if self.user_id else {}
        self.channel.basic_publish(
            amqp.Message(body, content_type="application/json", reply_to=REPLY_TO,
                         correlation_id=corr, expiration=str(int(ttl_s * 1000)), **props),
            exchange=topology.CONTROL_EXCHANGE, routing_key=routing_key, mandatory=True,
        )
        self._sent_at.setdefault(corr, time.monotonic())

    def check_routed(self, corr: str, routing_key: str, body: bytes, *, ttl_s: float,
                     grace_s: float | None = None, pause_s: float = _RESEND_INTERVAL_S) -> None:
        """Resend a returned request within its grace (after ``pause_s``); else raise ``NoAnswer``.

        The grace is how long "nobody is bound for this key" is taken as a passing state:
        ``NODE_UNROUTED_GRACE_S`` for one node (it may be reconnecting), none for the master
        or every node, unless the caller gives one (an idempotent request that waits for a
        master to come back).
        """
        if corr not in self._returned:
            return
        self._returned.discard(corr)
        first = self._sent_at.get(corr, 0.0)
        if grace_s is None:
            grace_s = 0.0 if routing_key in (topology.MASTER, topology.ALL) \
                else NODE_UNROUTED_GRACE_S
        if time.monotonic() - first >= grace_s:
            raise NoAnswer(f"no running node answers to {routing_key!r}")
        time.sleep(pause_s)
        self.send(corr, routing_key, body, ttl_s=ttl_s)

    def call(self, routing_key: str, op: str, args: dict[str, Any] | None = None, *,
             timeout_s: float, expect: int | None = 1, resend_s: float | None = None,
             unrouted_grace_s: float | None = None) -> list[Reply]:
        """Send one request and return the replies that came in time.

        The connection's heartbeats are kept while waiting, however long the wait.

        Args:
            routing_key: ``topology.MASTER``, ``topology.ALL`` or ``topology.node_key(n)``.
            op: the request name.
            args: request arguments.
            timeout_s: how long to wait in all.
            expect: return as soon as this many replies arrived; ``None`` waits the full time.
            resend_s: send the request again this often while no reply came (only for
                requests that are idempotent by their request id: a node that was stopped,
                or whose queue vanished with its connection, gets another copy).
            unrouted_grace_s: see ``check_routed``.

        Raises:
            NoAnswer: nobody is subscribed to ``routing_key`` or nobody answered in time.
        """
        corr = uuid.uuid4().hex
        self._replies[corr] = []
        body = messages.encode(Request(op=op, sender=self.sender, args=args or {}))
        self.send(corr, routing_key, body, ttl_s=timeout_s)
        now = time.monotonic()
        deadline = now + timeout_s
        sent_at = now
        routed = False  # a copy reached a queue: a node had the key, so wait for it to return
        try:
            while now < deadline:
                self.check_routed(corr, routing_key, body, ttl_s=deadline - now,
                                  grace_s=deadline - now if routed else unrouted_grace_s)
                if expect is not None and len(self._replies[corr]) >= expect:
                    break
                if resend_s is not None and now - sent_at >= resend_s:
                    routed = True  # not returned in all that time: it was routed
                    self.send(corr, routing_key, body, ttl_s=deadline - now)
                    sent_at = now
                wait_s = min(0.25, max(0.01, deadline - now))
                with contextlib.suppress(TimeoutError):
                    self.conn.drain_events(timeout=wait_s)
                self.conn.heartbeat_check()
                now = time.monotonic()
            replies = self._replies[corr]
        finally:
            self.forget(corr)
        if not replies and expect:
            raise NoAnswer(f"no answer to {op!r} from {routing_key!r} within {timeout_s:g} s")
        return replies

    def call_window(self, routing_key: str, requests: Sequence[tuple[str, dict[str, Any]]], *,
                    window: int, timeout_s: float, on_answer: Callable[[int, dict[str, Any]], None],
                    resend_s: float | None = None,
                    unrouted_grace_s: float | None = None) -> None:
        """Send ``requests`` to one node with up to ``window`` unanswered at a time.

        One request at a time waits a whole round trip (and the node's work on it) between
        requests; a window keeps the node busy while the answers travel back. Each request has
        a correlation id of its own, so answers may come in any order; ``on_answer(i, data)``
        is called once for request ``i`` when its first answer arrives (a re-sent request's
        second answer is ignored). The requests must be idempotent, like ``call``'s re-sent
        ones: when no answer to any of them came for ``resend_s`` (the node stopped, or its
        queue went with its connection), every unanswered one is sent again. A node that is
        answering is busy with the window, not lost, so its queue is not filled with copies.

        Raises:
            RemoteError: a request failed (the first failure; the rest are dropped unanswered).
            NoAnswer: as ``call``: nobody is bound, or the answers did not all come in time.
        """
        deadline = time.monotonic() + timeout_s
        pending: dict[str, _InFlight] = {}
        todo = iter(enumerate(requests))
        last_heard = time.monotonic()
        try:
            while True:
                while len(pending) < window and (item := next(todo, None)) is not None:
                    index, (op, args) = item
                    flight = _InFlight(index, op, messages.encode(
                        Request(op=op, sender=self.sender, args=args)))
                    self._replies[flight.corr] = []
                    pending[flight.corr] = flight
                    self.send(flight.corr, routing_key, flight.body,
                              ttl_s=deadline - time.monotonic())
                if not pending:
                    return
                now = time.monotonic()
                if now >= deadline:
                    first = min(pending.values(), key=lambda f: f.index)
                    raise NoAnswer(f"no answer to {first.op!r} from {routing_key!r} within "
                                   f"{timeout_s:g} s")
                if self._collect(pending, on_answer):
                    last_heard = now
                    continue
                self._route_window(pending, routing_key, ttl_s=deadline - now,
                                   unrouted_grace_s=unrouted_grace_s)
                if resend_s is not None and now - last_heard >= resend_s:
                    last_heard = now
                    for flight in pending.values():
                        flight.routed = True  # not returned in all that time: it was routed
                        self.send(flight.corr, routing_key, flight.body, ttl_s=deadline - now)
                with contextlib.suppress(TimeoutError):
                    self.conn.drain_events(timeout=min(0.25, max(0.01, deadline - now)))
                self.conn.heartbeat_check()
        finally:
            for corr in pending:
                self.forget(corr)

    def _route_window(self, pending: dict[str, _InFlight], routing_key: str, *, ttl_s: float,
                      unrouted_grace_s: float | None) -> None:
        """``check_routed`` for every request of a window, pausing once for all that came back.

        A request that reached a queue before (``routed``) waits for its node to return within
        the whole deadline, as in ``call``.
        """
        returned = any(corr in self._returned for corr in pending)
        for flight in pending.values():
            self.check_routed(flight.corr, routing_key, flight.body, ttl_s=ttl_s, pause_s=0.0,
                              grace_s=ttl_s if flight.routed else unrouted_grace_s)
        if returned:
            time.sleep(_RESEND_INTERVAL_S)  # once for the window, not once a request

    def _collect(self, pending: dict[str, _InFlight],
                 on_answer: Callable[[int, dict[str, Any]], None]) -> bool:
        """Hand over the answers that arrived; True if there were any."""
        answered = [corr for corr in pending if self._replies[corr]]
        for corr in answered:
            flight = pending.pop(corr)
            reply = self._replies[corr][0]
            self.forget(corr)
            if not reply.ok:
                raise RemoteError(reply.error or f"{reply.node} failed without a reason",
                                  error_type=reply.error_type, data=reply.data)
            on_answer(flight.index, reply.data)
        return bool(answered)

    def forget(self, corr: str) -> None:
        """Drop the bookkeeping of a finished request; late replies are then ignored."""
        self._replies.pop(corr, None)
        self._returned.discard(corr)
        self._sent_at.pop(corr, None)

    def call_one(self, routing_key: str, op: str, args: dict[str, Any] | None = None, *,
                 timeout_s: float, resend_s: float | None = None,
                 unrouted_grace_s: float | None = None) -> dict[str, Any]:
        """Send a request to one node and return its data, raising ``RemoteError`` on failure."""
        reply = self.call(routing_key, op, args, timeout_s=timeout_s, expect=1,
                          resend_s=resend_s, unrouted_grace_s=unrouted_grace_s)[0]
        if not reply.ok:
            raise RemoteError(reply.error or f"{reply.node} failed without a reason",
                              error_type=reply.error_type, data=reply.data)
        return reply.data


@dataclass
class _InFlight:
    """One request of ``RpcClient.call_window`` that is not answered yet."""

    index: int
    op: str
    body: bytes
    corr: str = ""
    routed: bool = False

    def __post_init__(self) -> None:
        self.corr = self.corr or uuid.uuid4().hex


def reply_to(channel: Any, request_message: amqp.Message, reply: Reply) -> None:
    """Answer a request on the channel it arrived on (direct reply-to needs no queue)."""
    target = request_message.properties.get("reply_to")
    if not target:
        return
    channel.basic_publish(
        amqp.Message(messages.encode(reply), content_type="application/json",
                     correlation_id=request_message.properties.get("correlation_id")),
        exchange="", routing_key=target,
    )
