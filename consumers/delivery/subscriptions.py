"""Which precedence-list queues a node consumes, kept in step with routes and host lists.

A node consumes every list that names it, for good: named routes from its replicated store,
lists recorded on the host-list stream, and lists it consumed before (remembered in
``totals.db`` across restarts). A list is never let go: when a route's hosts change, its old
list's queue still exists, and a later ``--host`` send to that list finds the queue, so it
announces nothing; an idle subscription costs the broker nothing worth saving, a stranded
alert costs a page. The queue of a route's list is declared by the nodes, which record it on
the host-list stream first, so every node of the list learns it even after the route changed
or was deleted, and even a node rebuilt from nothing.

Each subscription uses consumer priority by position (``topology.consumer_priority``): the
broker then serves the first live node of the list and moves everything to the next one when
a connection dies.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import amqp
import amqp.exceptions

from tasync.broker import messages, topology
from tasync.broker.alerts import HostList
from tasync.broker.errors import TopologyMissing
from tasync.broker.events import Event
from tasync.consumers.context import NodeContext
from tasync.consumers.delivery.hostlists import HostListWatcher
from tasync.consumers.totals import open_db

log = logging.getLogger("tasync.delivery")

#: The one configuration kind the subscriptions are derived from (``routes``).
ROUTE_KIND = "route"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS consumed (key TEXT PRIMARY KEY, hosts TEXT NOT NULL, since REAL);
"""


class Subscriptions:
    """The consumer tags of one node's alert subscriptions on its current channel.

    Used from the delivery worker's thread only.

    Args:
        ctx: the node context (store for routes, trail for errors, data dir).
        hostlists: the watcher that knows the ad-hoc lists naming this node.
        on_message: the callback every subscription delivers to.
    """

    def __init__(self, ctx: NodeContext, hostlists: HostListWatcher, *,
                 on_message: Callable[[amqp.Message], None]) -> None:
        self.ctx = ctx
        self.node = ctx.node
        self.hostlists = hostlists
        self.on_message = on_message
        self._db = open_db(ctx.data_dir)
        self._db.executescript(_SCHEMA)
        self._by_key: dict[str, str] = {}
        self._hosts_by_tag: dict[str, tuple[str, ...]] = {}
        self._conn: Any = None
        self._channel: Any = None
        self._admin: Any = None

    def reset(self, conn: Any, channel: Any) -> None:
        """Start over on a new connection: the old channel's subscriptions are gone."""
        self._by_key.clear()
        self._hosts_by_tag.clear()
        self._conn = conn
        self._channel = channel
        # Declares and passive checks run on a channel of their own: a refused declare closes
        # its channel, which must not be the one that carries the subscriptions.
        self._admin = conn.channel()

    def keys(self) -> list[str]:
        """The routing keys (``a.b``) of the lists consumed now."""
        return sorted(self._by_key)

    def hosts_of(self, consumer_tag: str) -> tuple[str, ...] | None:
        """The list a subscription belongs to."""
        return self._hosts_by_tag.get(consumer_tag)

    def cancel_all(self) -> None:
        """Stop every subscription (a clean stop: nothing new arrives, running work finishes)."""
        for tag in list(self._hosts_by_tag):
            self._channel.basic_cancel(tag)

    def sync(self) -> None:
        """Subscribe to newly wanted lists and cancel lists no longer wanted."""
        wanted = self.wanted()
        for key, hosts in wanted.items():
            if key not in self._by_key:
                self._subscribe(key, hosts)
        for key in [k for k in self._by_key if k not in wanted]:
            tag = self._by_key.pop(key)
            self._hosts_by_tag.pop(tag, None)
            self._channel.basic_cancel(tag)
            log.info("unsubscribed from precedence list %s", key)

    def wanted(self) -> dict[str, tuple[str, ...]]:
        """Routes naming this node, recorded lists naming it, and every list it consumed."""
        wanted: dict[str, tuple[str, ...]] = {}
        for hosts in self.routes():
            if self.node in hosts:
                wanted[topology.precedence_key(hosts)] = hosts
        for hosts in self.hostlists.lists():
            wanted[topology.precedence_key(hosts)] = hosts
        for key, raw in self._db.execute("SELECT key, hosts FROM consumed").fetchall():
            wanted.setdefault(key, tuple(json.loads(raw)))
        return wanted

    def routes(self) -> list[tuple[str, ...]]:
        """The precedence lists of every named route in the replicated configuration."""
        return [tuple(body.get("hosts", ()))
                for _k, _n, body in self.ctx.store.objects(ROUTE_KIND)]

    def _announce(self, hosts: tuple[str, ...]) -> None:
        """Record a list on the host-list stream unless it is recorded already.

        A route's queue is created by its nodes; the record makes it a list like any other, so
        its nodes keep learning it after the route changed, from the stream alone.
        """
        if self.hostlists.knows(hosts):
            return
        record = HostList(hosts=hosts, sender=f"node {self.node}")
        self._admin.basic_publish(
            amqp.Message(messages.encode(record), delivery_mode=2,
                         content_type="application/json"),
            exchange="", routing_key=topology.HOSTLISTS_QUEUE)

    def _subscribe(self, key: str, hosts: tuple[str, ...]) -> None:
        position = hosts.index(self.node)
        try:
            self._announce(hosts)
            name = topology.declare_alert_queue(self._admin, hosts)
        except (amqp.exceptions.ChannelError, TopologyMissing) as exc:
            # For example a queue declared by hand with other arguments: report, keep the rest.
            self._admin = self._conn.channel()
            self.ctx.trail.event(Event.ALERT_LIST_ERROR, list=key, reason=str(exc)[:200])
            return
        tag = self._channel.basic_consume(
            name, no_ack=False, callback=self.on_message,
            arguments={"x-priority": topology.consumer_priority(position, len(hosts))})
        self._by_key[key] = tag
        self._hosts_by_tag[tag] = hosts
        self._db.execute("INSERT OR IGNORE INTO consumed(key, hosts, since) VALUES(?, ?, ?)",
                         (key, json.dumps(list(hosts)), time.time()))
        log.info("consuming precedence list %s at position %d", key, position + 1)
