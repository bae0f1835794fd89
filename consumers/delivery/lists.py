"""Watching every precedence list's queue: a list whose alerts nobody takes is stranded.

A list is stranded when its queue holds alerts and no node consumes it: every node of the list
is down, hung past its heartbeat, or was removed. The alerts are safe in the queue, but nobody
delivers them until a node of the list returns, so an operator must know. Every node watches
every list the network knows (routes, the host-list stream, lists it consumed), not only its
own: the nodes of a stranded list are by definition not there to report it.

The checks are passive declares (no permission needed, nothing changes on the broker) made
every ``Settings.list_check_s`` from the delivery worker's thread, on a channel of its
connection. The latest result is kept as an immutable ``ListsReport`` that the control server
(``lists`` requests), the metrics and ``tasync status`` read from other threads. The trail gets
``alert.list_stranded`` when a list becomes stranded and ``alert.list_recovered`` when it no
longer is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import amqp.exceptions

from tasync.broker import topology
from tasync.broker.audit import Trail
from tasync.broker.events import Event


@dataclass(frozen=True)
class ListState:
    """One precedence list's queue as last seen.

    Attributes:
        key: the routing key (``a.b``).
        hosts: the nodes, first one first.
        messages: alerts waiting in the queue (not counting those nodes hold unacknowledged).
        consumers: nodes consuming it.
        exists: whether the queue exists (a record may precede its queue by a moment).
    """

    key: str
    hosts: tuple[str, ...]
    messages: int = 0
    consumers: int = 0
    exists: bool = True

    @property
    def stranded(self) -> bool:
        """Alerts are waiting and no node takes them."""
        return self.exists and self.messages > 0 and self.consumers == 0

    def to_dict(self) -> dict[str, Any]:
        """The ``lists`` answer's form of this state."""
        return {"list": self.key, "hosts": list(self.hosts), "messages": self.messages,
                "consumers": self.consumers, "exists": self.exists,
                "stranded": self.stranded}


@dataclass(frozen=True)
class ListsReport:
    """Every list's state, and the depths of the dead-letter and quarantine queues.

    ``checked_at`` is 0 until the first check; a depth is None when it could not be read.
    """

    checked_at: float = 0.0
    lists: tuple[ListState, ...] = ()
    dead_letters: int | None = None
    quarantined: int | None = None
    consumed_here: frozenset[str] = field(default_factory=frozenset)

    def to_dict(self, node: str) -> dict[str, Any]:
        """The answer to a ``lists`` control request."""
        return {"node": node, "checked_at": self.checked_at,
                "lists": [dict(s.to_dict(), consumed_here=s.key in self.consumed_here)
                          for s in self.lists],
                "dead_letters": self.dead_letters, "quarantined": self.quarantined}


class ListMonitor:
    """Checks every known list's queue now and then; the latest report is ``report``.

    Args:
        node: this node's name (for the report).
        trail: where transitions to and from stranded are written.
        known: returns every list the node knows of, whatever nodes it names.
        consumed: returns the routing keys this node consumes now.
        every_s: how often ``tick`` checks.
    """

    def __init__(self, node: str, trail: Trail, *,
                 known: Callable[[], Iterable[tuple[str, ...]]],
                 consumed: Callable[[], Iterable[str]], every_s: float) -> None:
        self.node = node
        self.trail = trail
        self.known = known
        self.consumed = consumed
        self.every_s = every_s
        self.report = ListsReport()
        self._conn: Any = None
        self._channel: Any = None
        self._next = 0.0
        self._wanted = threading.Event()
        self._done = threading.Condition()
        self._stranded: set[str] = set()

    def reset(self, conn: Any) -> None:
        """Use ``conn`` from now on (a new connection after a reconnect)."""
        self._conn, self._channel = conn, None
        self._next = 0.0

    def tick(self) -> None:
        """Check now if it is time, or someone asked for a fresh report; else do nothing."""
        if self._conn is None:
            return
        if not self._wanted.is_set() and time.monotonic() < self._next:
            return
        self._wanted.clear()
        self._next = time.monotonic() + self.every_s
        self.check()

    def fresh(self, timeout_s: float) -> ListsReport:
        """A report checked after this call, or the latest one after ``timeout_s``.

        Safe from any thread: the check runs in the worker's thread at its next idle moment.
        """
        asked = time.time()
        self._wanted.set()
        with self._done:
            self._done.wait_for(lambda: self.report.checked_at >= asked, timeout=timeout_s)
        return self.report

    def check(self) -> ListsReport:
        """Look at every list's queue, the dead letters and the quarantine; keep the report."""
        unique = {topology.precedence_key(h): tuple(h) for h in self.known()}
        states = tuple(self._state(key, hosts) for key, hosts in sorted(unique.items()))
        report = ListsReport(checked_at=time.time(), lists=states,
                             dead_letters=self._depth(topology.DEAD_LETTER_QUEUE),
                             quarantined=self._depth(topology.QUARANTINE_QUEUE),
                             consumed_here=frozenset(self.consumed()))
        self._note(report)
        with self._done:
            self.report = report
            self._done.notify_all()
        return report

    def _note(self, report: ListsReport) -> None:
        """Trail lines for lists that became stranded or stopped being stranded."""
        now = {s.key: s for s in report.lists if s.stranded}
        for key in sorted(set(now) - self._stranded):
            self.trail.event(Event.ALERT_LIST_STRANDED, list=key, messages=now[key].messages)
        for key in sorted(self._stranded - set(now)):
            self.trail.event(Event.ALERT_LIST_RECOVERED, list=key)
        self._stranded = set(now)

    def _declare(self, queue: str) -> tuple[int, int] | None:
        """``(messages, consumers)`` of ``queue``, or None when it does not exist."""
        if self._channel is None:
            self._channel = self._conn.channel()
        try:
            ok = self._channel.queue_declare(queue, passive=True)
        except amqp.exceptions.NotFound:
            self._channel = None  # the refusal closed the channel
            return None
        return int(ok.message_count), int(ok.consumer_count)

    def _state(self, key: str, hosts: tuple[str, ...]) -> ListState:
        seen = self._declare(topology.alert_queue(hosts))
        if seen is None:
            return ListState(key=key, hosts=hosts, exists=False)
        return ListState(key=key, hosts=hosts, messages=seen[0], consumers=seen[1])

    def _depth(self, queue: str) -> int | None:
        seen = self._declare(queue)
        return None if seen is None else seen[0]
