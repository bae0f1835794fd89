"""Sending alerts: check, make sure the list's queue exists, publish with confirms.

``tasync send``, the HTTP intake and any Python integration use ``AlertSender``. A send returns
once the broker confirmed the alert into the list's quorum queue: from then on it survives the
sender, every node of the list, and the loss of a broker node. Order of a first send to a list:

1. append a ``HostList`` record to the ``tasync.hostlists`` stream (confirmed), so the list's
   nodes learn it durably (they subscribe within milliseconds when running, at start otherwise);
2. declare the list's queue, so the alert can never be unroutable;
3. publish the alert (confirmed, ``mandatory``);
   Between 2 and 3, a send that created the list waits (at most ``NEW_LIST_GRACE_S``) for the
   list's nodes to subscribe, so the first alerts go to the first node, not the quickest one;
4. look at the queue's consumers: none means no listed server is alive, which is reported but is
   not an error: the alert waits in the queue until one of them starts.

Steps 1 and 2 run once per list and process. Names are checked against the configuration of
the master (or, when no master answers, of any live node): an unknown destination, group, route
or node is a clear error before anything is queued. With every node down nothing can be
checked; the alert is still queued, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import amqp.exceptions

from broker import messages, topology
from broker.alerts import Alert, HostList, encode_alert, validated
from broker.connection import RECOVERABLE, BlockedGuard, close_quietly, ensure
from broker.errors import ConfigError, NoAnswer, PublishError, RemoteError
from broker.publisher import ConfirmedPublisher, Outgoing, Unroutable
from broker.rpc import RpcClient
from broker.settings import Settings
from broker.signing import SENDER_HEADER, SIGNATURE_HEADER, KeyRing

log = logging.getLogger("tasync.sender")

ENV_CACHE_DIR = "TASYNC_CACHE_DIR"
#: How long the first send to a new list waits for the list's nodes to subscribe.
NEW_LIST_GRACE_S = 1.0


@dataclass
class SendResult:
    """What a send did.

    Attributes:
        ids: the alert ids published (one for ``send``).
        hosts: the precedence list.
        consumers: nodes consuming the list's queue right after the publish (0: none alive).
        warnings: things the user should know that did not stop the send.
    """

    ids: list[str]
    hosts: tuple[str, ...]
    consumers: int = 0
    warnings: list[str] = field(default_factory=list)


def parse_hosts(values: Iterable[str]) -> tuple[str, ...]:
    """A precedence list from ``--host`` values, each of which may hold several names.

    ``--host a --host b``, ``--host "a b"`` and ``--host a,b`` all mean ``(a, b)``.

    Raises:
        ConfigError: a name is invalid or appears twice.
    """
    hosts = tuple(h for value in values for h in value.replace(",", " ").split())
    topology.precedence_key(hosts)
    return hosts


class AlertSender:
    """Publishes alerts over one connection, failing over between broker URLs; not thread-safe.

    Args:
        settings: broker settings (several URLs are tried in order).
        name: who is sending, shown in node logs and the host-list record.
        keyring: signs each alert when set (nodes with a key verify it).
        check: look names up on the master before sending (turn off only for benchmarks).
        rpc_timeout_s: how long a look-up waits for the master.
    """

    def __init__(self, settings: Settings, *, name: str | None = None,
                 keyring: KeyRing | None = None, check: bool = True,
                 rpc_timeout_s: float = 3.0) -> None:
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.keyring = keyring
        self.check = check
        self.rpc_timeout_s = rpc_timeout_s
        self._conn: Any = None
        self._publisher: ConfirmedPublisher | None = None
        self._rpc: RpcClient | None = None
        self._ready_lists: set[str] = set()
        self._nodes: set[str] | None = None
        self._known_targets: set[tuple[str, str]] = set()
        self._guard: BlockedGuard | None = None

    def close(self) -> None:
        """Close the connection."""
        if self._guard is not None:
            self._guard.cancel()
        close_quietly(self._conn)
        self._conn = self._publisher = self._rpc = self._guard = None

    def __enter__(self) -> AlertSender:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- the connection -----------------------------------------------------------------------

    def _run(self, fn: Any) -> Any:
        """Run ``fn()`` on a live connection, reconnecting (next URL) after a loss.

        Raises:
            PublishError: the broker blocked the connection (a resource alarm) for longer
                than the confirm timeout; a send fails then instead of hanging.
        """
        def attempt(conn: Any) -> Any:
            if conn is not self._conn:
                if self._guard is not None:
                    self._guard.cancel()
                self._conn, self._publisher, self._rpc = conn, None, None
                self._guard = BlockedGuard(conn, self.settings.confirm_timeout_s)
                self._ready_lists.clear()
            try:
                return fn()
            except RECOVERABLE:
                if self._guard is not None and self._guard.expired:
                    raise PublishError(
                        "the broker blocked publishing for more than "
                        f"{self._guard.limit_s:g} s (a disk or memory alarm, see the broker's "
                        "log); the alert may not have been queued") from None
                raise
        result, self._conn = ensure(self.settings, attempt, name="tasync-sender",
                                    conn=self._conn)
        return result

    def _pub(self) -> ConfirmedPublisher:
        if self._publisher is None:
            self._publisher = ConfirmedPublisher(self._conn,
                                                 timeout_s=self.settings.confirm_timeout_s)
        return self._publisher

    # -- look-ups -----------------------------------------------------------------------------

    def _show(self, args: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Objects from the master, else from any live node; None when nobody answers."""
        if self._rpc is None:
            self._rpc = RpcClient(self._conn, sender=f"sender@{self.name}")
        try:
            data = self._rpc.call_one(topology.MASTER, "show", args, timeout_s=self.rpc_timeout_s)
            return list(data.get("objects", []))
        except (NoAnswer, RemoteError):
            pass
        try:
            replies = self._rpc.call(topology.ALL, "show", args, expect=1,
                                     timeout_s=min(self.rpc_timeout_s, 1.0))
        except NoAnswer:
            return None
        for reply in replies:
            if reply.ok:
                return list(reply.data.get("objects", []))
        return None

    def resolve_route(self, route: str) -> tuple[str, ...]:
        """The hosts of a named route, from the master; from a local cache when nobody answers.

        Raises:
            ConfigError: the route does not exist, or nobody answered and it was never cached.
        """
        objects = self._run(lambda: self._show({"kind": "route", "name": route}))
        cache = _RouteCache()
        if objects is None:
            cached = cache.get(route)
            if cached is None:
                raise ConfigError(f"cannot resolve route {route!r}: no node answered; "
                                  "name the servers with --host A B instead")
            return cached
        if not objects:
            raise ConfigError(f"unknown route {route!r}")
        hosts = tuple(objects[0]["body"]["hosts"])
        cache.put(route, hosts)
        return hosts

    def check_names(self, alert: Alert, warnings: list[str]) -> None:
        """Check that the target and every host exist; warn when nobody can tell.

        Raises:
            ConfigError: an unknown destination, group or node.
        """
        if not self.check:
            return
        if self._nodes is None:
            objects = self._show({"kind": "node"})
            if objects is None:
                warnings.append("no node answered: names were not checked")
                return
            self._nodes = {str(o["name"]) for o in objects}
        unknown = [h for h in alert.hosts if h not in self._nodes]
        if unknown:
            known = ", ".join(sorted(self._nodes)) or "none"
            raise ConfigError(f"unknown node {unknown[0]!r} in the host list "
                              f"(known nodes: {known})")
        key = (alert.target_kind, alert.target)
        if key not in self._known_targets:
            objects = self._show({"kind": alert.target_kind, "name": alert.target})
            if objects is None:
                warnings.append("no node answered: names were not checked")
                return
            if not objects:
                raise ConfigError(f"unknown {alert.target_kind} {alert.target!r}")
            self._known_targets.add(key)

    # -- sending ------------------------------------------------------------------------------

    def send(self, alert: Alert) -> SendResult:
        """Check and publish one alert; returns once the broker confirmed it.

        Raises:
            ValidationError: the alert is invalid (empty text, too long, bad names).
            ConfigError: an unknown destination, group or node.
            BrokerUnreachable: no broker URL answered.
            PublishError: the broker refused the alert or did not confirm it in time.
        """
        return self.send_many([alert])

    def send_many(self, alerts: Sequence[Alert]) -> SendResult:
        """Check and publish several alerts, many in flight at once; all of one sender call.

        Every alert is checked before the first is published, so a bad one sends nothing.
        """
        checked = [validated(a) for a in alerts]
        warnings: list[str] = []

        def prepare() -> None:
            for alert in checked:
                self.check_names(alert, warnings)
                self._ensure_list(alert.hosts)

        self._run(prepare)
        outgoing = [self._outgoing(a) for a in checked]
        self._run(lambda: self._publish(outgoing))
        lists = list(dict.fromkeys(a.hosts for a in checked))
        consumers = min((self._run(lambda h=h: self._consumers(h)) for h in lists), default=0)
        if lists and consumers == 0:
            warnings.append(f"no server of {' '.join(lists[0])} is running: the alert is "
                            "queued durably and will be delivered when one of them starts")
        return SendResult(ids=[a.id for a in checked], hosts=lists[0] if lists else (),
                          consumers=consumers, warnings=list(dict.fromkeys(warnings)))

    def _outgoing(self, alert: Alert) -> Outgoing:
        body = encode_alert(alert)
        headers: dict[str, Any] = {SENDER_HEADER: socket.gethostname()}
        if self.keyring is not None:
            headers[SIGNATURE_HEADER] = self.keyring.sign(body)
        return Outgoing(exchange=topology.ALERTS_EXCHANGE,
                        routing_key=topology.precedence_key(alert.hosts), body=body,
                        headers=headers, message_id=alert.id, mandatory=True)

    def _publish(self, outgoing: list[Outgoing]) -> None:
        try:
            self._pub().publish_many(outgoing)
        except Unroutable:
            # The queue was deleted after we declared it: declare again and publish again
            # (the nodes deliver an id once, so the repeated alerts are harmless).
            self._ready_lists.clear()
            for item in outgoing:
                self._ensure_list(tuple(item.routing_key.split(".")))
            self._pub().publish_many(outgoing)

    def _ensure_list(self, hosts: tuple[str, ...]) -> None:
        key = topology.precedence_key(hosts)
        if key in self._ready_lists:
            return
        if self._queue_info(hosts) is None:
            channel = self._conn.channel()
            try:
                topology.declare_alerts(channel)
            finally:
                channel.close()
            record = HostList(hosts=hosts, sender=self.name)
            self._pub().publish(Outgoing(exchange="", routing_key=topology.HOSTLISTS_QUEUE,
                                         body=messages.encode(record)))
            channel = self._conn.channel()
            try:
                topology.declare_alert_queue(channel, hosts)
            finally:
                channel.close()
            log.info("created precedence list %s", key)
            self._await_consumers(hosts, NEW_LIST_GRACE_S)
        self._ready_lists.add(key)

    def _queue_info(self, hosts: tuple[str, ...]) -> tuple[int, int] | None:
        """``(messages, consumers)`` of a list's queue, or None when it does not exist."""
        channel = self._conn.channel()
        try:
            ok = channel.queue_declare(topology.alert_queue(hosts), passive=True)
        except amqp.exceptions.NotFound:
            return None
        else:
            channel.close()
        return int(ok.message_count), int(ok.consumer_count)

    def _consumers(self, hosts: tuple[str, ...]) -> int:
        """Nodes consuming a list's queue right now."""
        info = self._queue_info(hosts)
        return info[1] if info else 0

    def _await_consumers(self, hosts: tuple[str, ...], grace_s: float) -> int:
        """Give the nodes of a list just created a moment to subscribe before the first alert.

        Otherwise whichever node reads the host-list record first would take the first alerts,
        even when it is not first in the list. Bounded: a node that is down costs this wait
        once, on the first use of a list anywhere in the network.
        """
        deadline = time.monotonic() + grace_s
        while True:
            count = self._consumers(hosts)
            if count >= len(hosts) or time.monotonic() >= deadline:
                return count
            time.sleep(0.02)


class _RouteCache:
    """Routes last seen on the master, so ``--route`` still works while every node is down."""

    def __init__(self) -> None:
        base = os.environ.get(ENV_CACHE_DIR) or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tasync")
        self.path = Path(base) / "routes.json"

    def _load(self) -> dict[str, list[str]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, route: str) -> tuple[str, ...] | None:
        hosts = self._load().get(route)
        return tuple(hosts) if isinstance(hosts, list) and hosts else None

    def put(self, route: str, hosts: tuple[str, ...]) -> None:
        data = self._load()
        if data.get(route) == list(hosts):
            return
        data[route] = list(hosts)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            log.debug("could not write the route cache", exc_info=True)
