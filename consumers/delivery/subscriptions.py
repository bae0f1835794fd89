"""Which precedence-list queues a node consumes, kept in step with routes and host lists.

A node consumes every list that names it: named routes from its replicated store, ad-hoc lists
from the host-list stream, and lists it consumed before that still hold alerts. The last group
matters when a route's hosts change: the old list's queue may still hold alerts, so the node
keeps consuming it until it is empty, then lets it go ("retires" it). The lists ever consumed
are remembered in ``totals.db`` so that this also holds across a restart.

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

from broker import topology
from consumers.context import NodeContext
from consumers.delivery.hostlists import HostListWatcher
from consumers.totals import open_db

log = logging.getLogger("tasync.delivery")

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
        """Routes naming this node, ad-hoc lists naming it, and old lists not yet drained."""
        wanted: dict[str, tuple[str, ...]] = {}
        for _kind, _name, body in self.ctx.store.objects("route"):
            hosts = tuple(body.get("hosts", ()))
            if self.node in hosts:
                wanted[topology.precedence_key(hosts)] = hosts
        for hosts in self.hostlists.lists():
            wanted[topology.precedence_key(hosts)] = hosts
        for key, raw in self._db.execute("SELECT key, hosts FROM consumed").fetchall():
            if key in wanted:
                continue
            hosts = tuple(json.loads(raw))
            if self._queue_depth(hosts) == 0:
                self._db.execute("DELETE FROM consumed WHERE key=?", (key,))
                log.info("retired drained precedence list %s", key)
            else:
                wanted[key] = hosts
        return wanted

    def _queue_depth(self, hosts: tuple[str, ...]) -> int:
        """Messages in a list's queue; 0 when it does not exist."""
        try:
            ok = self._admin.queue_declare(topology.alert_queue(hosts), passive=True)
            return int(ok.message_count)
        except amqp.exceptions.NotFound:
            self._admin = self._conn.channel()
            return 0

    def _subscribe(self, key: str, hosts: tuple[str, ...]) -> None:
        position = hosts.index(self.node)
        try:
            name = topology.declare_alert_queue(self._admin, hosts)
        except amqp.exceptions.ChannelError as exc:
            # For example a queue declared by hand with other arguments: report, keep the rest.
            self._admin = self._conn.channel()
            self.ctx.trail.event("alert.list_error", list=key, reason=str(exc)[:200])
            return
        tag = self._channel.basic_consume(
            name, no_ack=False, callback=self.on_message,
            arguments={"x-priority": topology.consumer_priority(position, len(hosts))})
        self._by_key[key] = tag
        self._hosts_by_tag[tag] = hosts
        self._db.execute("INSERT OR IGNORE INTO consumed(key, hosts, since) VALUES(?, ?, ?)",
                         (key, json.dumps(list(hosts)), time.time()))
        log.info("consuming precedence list %s at position %d", key, position + 1)
