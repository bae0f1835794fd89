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
4. look at the queue's consumers: none means no listed server consumes it. The sender then
   records the list again (whatever created its queue, its nodes learn it) and gives them a
   moment; if still nobody consumes it, it asks the network which nodes of the list run, so
   the warning it prints is true: "no server of a b is running", or that a running node does
   not consume the list. Neither is an error: the alert waits in the queue.

Steps 1 and 2 run once per list and process. Before anything is published, names are checked
against the configuration of the master (or, when no master answers, of any live node), and the
network's alert policy is asked (``alert_policy``: whether alerts must be signed, which key ids
verify, and whether this sender's signature of a random challenge verifies), so an unknown
destination, group, route or node, an unsigned alert, a retired key or a wrong secret is a
clear error (``SendRefused``) instead of an alert every node quarantines. With every node down
nothing can be checked; the alert is still queued, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import amqp.exceptions

from tasync.broker import messages, topology
from tasync.broker.alerts import (
    CLIENT_HEADER,
    POLICY_CHALLENGE_PREFIX,
    REQUEUED_BY_HEADER,
    Alert,
    HostList,
    decode_alert,
    encode_alert,
    validated,
)
from tasync.broker.connection import RECOVERABLE, BlockedGuard, close_quietly, ensure
from tasync.broker.errors import (
    ConfigError,
    NoAnswer,
    PublishError,
    RemoteError,
    SendRefused,
)
from tasync.broker.publisher import ConfirmedPublisher, Outgoing, Unroutable
from tasync.broker.rpc import RpcClient
from tasync.broker.settings import Settings, cache_dir_from_env
from tasync.broker.signing import SENDER_HEADER, SIGNATURE_HEADER, KeyRing

log = logging.getLogger("tasync.sender")

#: How long the first send to a new list waits for the list's nodes to subscribe.
NEW_LIST_GRACE_S = 1.0
#: How long a sender trusts the network's alert policy before asking again (keys rotate).
POLICY_TTL_S = 60.0
#: How long the nodes of a list nobody consumes have to say that they run.
LIVENESS_TIMEOUT_S = 1.0
#: How long a sender keeps its verdict on a list nobody consumes (who runs, the warning)
#: before asking the network again. Alerts to a list whose nodes are all down are queued
#: durably; without this each of them would wait ``LIVENESS_TIMEOUT_S`` for nodes that do not
#: answer, and an intake taking a stream of them would pass one a second.
STRANDED_RECHECK_S = 5.0


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
        self._policy: dict[str, Any] | None = None
        self._policy_at = -POLICY_TTL_S
        self._announced: set[str] = set()
        #: Lists nobody consumed when last asked: precedence key -> (when, the warning).
        self._stranded: dict[str, tuple[float, str | None]] = {}

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

    def _client(self) -> RpcClient:
        if self._rpc is None:
            self._rpc = RpcClient(self._conn, sender=f"sender@{self.name}")
        return self._rpc

    def _ask(self, op: str, args: dict[str, Any]) -> dict[str, Any] | None:
        """The master's answer to ``op``, else any live node's; None when nobody answers."""
        rpc = self._client()
        try:
            return rpc.call_one(topology.MASTER, op, args, timeout_s=self.rpc_timeout_s)
        except (NoAnswer, RemoteError):
            pass
        try:
            replies = rpc.call(topology.ALL, op, args, expect=1,
                               timeout_s=min(self.rpc_timeout_s, 1.0))
        except NoAnswer:
            return None
        return next((reply.data for reply in replies if reply.ok), None)

    def _show(self, args: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Objects from the master, else from any live node; None when nobody answers."""
        data = self._ask("show", args)
        return None if data is None else list(data.get("objects", []))

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

    def check_policy(self, warnings: list[str], *, signature: str | None = None) -> None:
        """Find out what the network requires of an alert, and refuse what it would refuse.

        Asked once per ``POLICY_TTL_S`` (a key rotation reaches a long-running sender). The
        answer names key ids only, never secrets; the challenge catches a wrong secret
        under a current key id. ``signature`` judges an alert signed elsewhere (a requeued
        dead letter keeps its signature) instead of this sender's key.

        Raises:
            SendRefused: the network requires signed alerts and this one would not verify.
        """
        if not self.check:
            return
        if self._policy is None or time.monotonic() - self._policy_at > POLICY_TTL_S:
            challenge = secrets.token_hex(16)
            args: dict[str, Any] = {"challenge": challenge}
            if self.keyring is not None:
                args["signature"] = self.keyring.sign(POLICY_CHALLENGE_PREFIX
                                                      + challenge.encode())
            self._policy = self._ask("alert_policy", args)
            self._policy_at = time.monotonic()
        policy = self._policy
        if policy is None:
            warnings.append("no node answered: names and signing were not checked")
            return
        if not policy.get("signed"):
            return
        node = policy.get("node", "the network")
        current = [str(k) for k in policy.get("key_ids", [])]
        if signature is None and self.keyring is None:
            raise SendRefused(f"{node} accepts signed alerts only: give --key-file or "
                              "$TASYNC_CLUSTER_KEY_FILE (nothing was sent)")
        key_id = (signature or "").partition(":")[0] if signature else (
            self.keyring.signing_key_id if self.keyring else "")
        if key_id not in current:
            raise SendRefused(f"key {key_id!r} is not one {node} accepts (current: "
                              f"{', '.join(current) or 'none'}): a retired or foreign key "
                              "(nothing was sent)")
        verdict = policy.get("challenge")
        if signature is None and verdict != "ok":
            raise SendRefused(f"{node} does not verify this key file's signature with key "
                              f"{key_id!r} ({verdict}): the secret differs from the "
                              "network's (nothing was sent)")

    # -- sending ------------------------------------------------------------------------------

    def send(self, alert: Alert) -> SendResult:
        """Check and publish one alert; returns once the broker confirmed it.

        Raises:
            InvalidObject: the alert is invalid (empty text, too long, bad names).
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
        return self._send([(a, self._outgoing(a)) for a in checked], signature=None)

    def resend(self, body: bytes, headers: dict[str, Any], *, requeued_by: str) -> SendResult:
        """Send a dead letter again through the normal path, as ``tasync dead requeue`` does.

        The alert keeps its bytes, so its id and its signature (when this sender has no key
        of its own) stay valid; ``requeued_by`` names who asked, and the delivering node
        writes it to its trail.

        Raises:
            MessageError: ``body`` is not a valid alert.
            SendRefused, ConfigError, PublishError: as for ``send``.
        """
        alert = decode_alert(body)
        out = self._outgoing(alert, body=body)
        out.headers[REQUEUED_BY_HEADER] = requeued_by
        kept = headers.get(SIGNATURE_HEADER)
        signature = None
        if self.keyring is None and isinstance(kept, str) and kept:
            out.headers[SIGNATURE_HEADER] = signature = kept
        return self._send([(alert, out)], signature=signature)

    def _send(self, pairs: list[tuple[Alert, Outgoing]], *, signature: str | None
              ) -> SendResult:
        checked = [alert for alert, _ in pairs]
        warnings: list[str] = []

        def prepare() -> None:
            self.check_policy(warnings, signature=signature)
            for alert in checked:
                self.check_names(alert, warnings)
                self._ensure_list(alert.hosts)

        self._run(prepare)
        outgoing = [out for _, out in pairs]
        self._run(lambda: self._publish(outgoing))
        lists = list(dict.fromkeys(a.hosts for a in checked))
        consumers = min((self._run(lambda h=h: self._consumers(h)) for h in lists), default=0)
        if lists and consumers == 0:
            consumers, warning = self._run(lambda: self._nobody_consumes(lists[0]))
            if warning:
                warnings.append(warning)
        return SendResult(ids=[a.id for a in checked], hosts=lists[0] if lists else (),
                          consumers=consumers, warnings=list(dict.fromkeys(warnings)))

    def _nobody_consumes(self, hosts: tuple[str, ...]) -> tuple[int, str | None]:
        """Nobody consumes a list's queue: tell its nodes again, then say truly who runs.

        Returns the consumers seen last and the warning to print (None once one consumes).
        """
        key = topology.precedence_key(hosts)
        known = self._stranded.get(key)
        if known is not None and time.monotonic() - known[0] < STRANDED_RECHECK_S:
            return 0, known[1]
        count, warning = self._judge_stranded(hosts, key)
        if not count:
            self._stranded[key] = (time.monotonic(), warning)
        return count, warning

    def _judge_stranded(self, hosts: tuple[str, ...], key: str) -> tuple[int, str | None]:
        """``_nobody_consumes`` without its memory: announce the list, wait, ask who runs."""
        if key not in self._announced:
            self._announced.add(key)
            self._record_list(hosts)
            count = self._await_consumers(hosts, NEW_LIST_GRACE_S)
            if count:
                return count, None
        running = self._running(hosts)
        if running is None or not running:
            return 0, (f"no server of {' '.join(hosts)} is running: the alert is queued "
                       "durably and will be delivered when one of them starts")
        return 0, (f"{' '.join(running)} {'runs' if len(running) == 1 else 'run'} but "
                   f"{'does' if len(running) == 1 else 'do'} not consume {key} yet: the alert "
                   "is queued durably; `tasync status` shows the list as stranded until then")

    def _running(self, hosts: tuple[str, ...]) -> list[str] | None:
        """The nodes of ``hosts`` that answer now (None: the question could not be asked)."""
        expect = len(self._nodes) if self._nodes else None
        try:
            replies = self._client().call(topology.ALL, "delivery", expect=expect,
                                          timeout_s=LIVENESS_TIMEOUT_S)
        except NoAnswer:
            return []
        answered = {reply.node for reply in replies}
        return [h for h in hosts if h in answered]

    def _outgoing(self, alert: Alert, *, body: bytes | None = None) -> Outgoing:
        body = encode_alert(alert) if body is None else body
        headers: dict[str, Any] = {SENDER_HEADER: socket.gethostname(), CLIENT_HEADER: self.name}
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
            self._pub().publish(self._list_record(hosts))
            self._announced.add(key)
            channel = self._conn.channel()
            try:
                topology.declare_alert_queue(channel, hosts)
            finally:
                channel.close()
            log.info("created precedence list %s", key)
            self._await_consumers(hosts, NEW_LIST_GRACE_S)
        self._ready_lists.add(key)

    def _list_record(self, hosts: tuple[str, ...]) -> Outgoing:
        record = HostList(hosts=hosts, sender=self.name)
        return Outgoing(exchange="", routing_key=topology.HOSTLISTS_QUEUE,
                        body=messages.encode(record))

    def _record_list(self, hosts: tuple[str, ...]) -> None:
        """Append a list's record again, for a queue its nodes do not consume.

        Best effort: a sender allowed to publish to ``tasync.alerts`` only may not write it
        (the nodes record the lists they create themselves, so that is rare).
        """
        try:
            self._pub().publish(self._list_record(hosts))
        except (amqp.exceptions.ChannelError, PublishError) as exc:
            self._publisher = None  # a refusal closes the publisher's channel
            log.info("could not record list %s again: %s", " ".join(hosts), exc)

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
        self.path = cache_dir_from_env() / "routes.json"

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
