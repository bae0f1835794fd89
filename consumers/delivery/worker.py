"""The delivery worker: one consumer per precedence list that names this node.

Each list ``a.b.c`` has one quorum queue; every node of the list consumes it with consumer
priority by position, so the broker hands alerts to the first live node and moves queued and
unacknowledged ones to the next node when a connection dies. Overflow works
the same way: when the first node's prefetch window is full, the next node gets the surplus.

Per alert: decode and check it (bad ones go to the quarantine queue), drop it if its id was
already handled within the window by any node of the network (``handled``), deliver it on a
thread pool (a slow webhook must not hold up a file write or the heartbeat), then, back on the
consumer thread, record totals and the id in one SQLite transaction, publish one record of the
batch's ids to ``tasync.handled`` (and the dead-letter copies of failed alerts, with their
reason), and acknowledge the batch once the broker confirmed those (``settle``).

Which lists: every list that names this node, for good (``subscriptions``). It waits to take
alerts until it has read the handled stream up to now, so a node that returns knows what the
others delivered meanwhile. Of the replicated configuration only the routes decide which lists
it consumes, so it subscribes again when the store's routes changed (``NodeStore.kind_version``,
an in-memory count the worker reads at every idle moment), not after every change; the host-list
watcher calls ``config_changed`` when it learns a list naming this node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import amqp
import amqp.exceptions

from tasync.broker import topology
from tasync.broker.alerts import (
    CLIENT_HEADER,
    MAX_ALERT_BYTES,
    POLICY_CHALLENGE_PREFIX,
    REQUEUED_BY_HEADER,
    Alert,
    decode_alert,
)
from tasync.broker.allowlist import ALERT_HOSTS_FILE, AllowList
from tasync.broker.consumer import ConsumerLoop, message_body
from tasync.broker.errors import DeliveryAborted, MessageError
from tasync.broker.events import Event
from tasync.broker.protocol import ControlOp
from tasync.broker.publisher import Outgoing
from tasync.broker.readahead import buffered
from tasync.broker.signing import SENDER_HEADER, SIGNATURE_HEADER
from tasync.consumers.admission import Admission
from tasync.consumers.context import NodeContext
from tasync.consumers.delivery.executor import (
    FAILED,
    RETRY,
    Executor,
    Outcome,
    Progress,
    RetryPolicy,
)
from tasync.consumers.delivery.handled import HandledWatcher
from tasync.consumers.delivery.hostlists import HostListWatcher
from tasync.consumers.delivery.lists import ListMonitor
from tasync.consumers.delivery.settle import Settler
from tasync.consumers.delivery.subscriptions import ROUTE_KIND, Subscriptions
from tasync.consumers.delivery.trace import trail_lines
from tasync.consumers.quarantine import alert_identity, dead_copy, quarantine_copy
from tasync.consumers.totals import Tally, Totals

log = logging.getLogger("tasync.delivery")

BATCH_MAX = 500
STOP_GRACE_S = 5.0
RESYNC_S = 60.0
#: How long a ``lists`` request waits for a check made after it arrived.
LISTS_FRESH_S = 2.0


@dataclass(frozen=True)
class _Job:
    message: amqp.Message
    tag: int
    generation: int
    alert: Alert
    hosts: tuple[str, ...]
    position: int
    redelivered: bool


@dataclass
class _Settlement:
    """What one ``_collect`` settles: ids for the record, copies to publish, tags to ack."""

    handled: list[tuple[str, str]] = field(default_factory=list)
    copies: list[Outgoing] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)


class DeliveryConsumer(ConsumerLoop):
    """Consumes this node's precedence-list queues and delivers their alerts.

    Args:
        ctx: the node context.
        totals: where counts and the duplicate window are kept.
        policy: retries; by default from ``$TASYNC_DELIVERY_*`` (see ``RetryPolicy.from_env``).
        threads: deliveries running at once.
        senders: who may send alerts (``telalert.hosts``): the worker's ``--alert-hosts-file``,
            else ``<data-dir>/telalert.hosts`` when it exists, else everybody.
    """

    def __init__(self, ctx: NodeContext, totals: Totals, *, policy: RetryPolicy | None = None,
                 threads: int = 8, senders: AllowList | None = None) -> None:
        super().__init__(ctx.settings, heartbeat_s=ctx.settings.delivery_heartbeat_s)
        self.name = f"tasync-delivery-{ctx.node}"
        self.ctx = ctx
        self.node = ctx.node
        self.totals = totals
        self.executor = Executor(node=ctx.node, store=ctx.store, trail=ctx.trail,
                                 policy=policy or RetryPolicy.from_env(),
                                 wait=self.stop_event.wait, defer_trail=True,
                                 config_seq=lambda: ctx.store.last_seq)
        self._tally = Tally()
        self.hostlists = HostListWatcher(ctx, on_change=self.config_changed)
        self.handled = HandledWatcher(ctx, window_s=totals.dedup_window_s)
        self.settler: Settler | None = None
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="delivery")
        self._done: queue.SimpleQueue[tuple[_Job, Outcome | None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._changed = threading.Event()
        self._incoming: list[amqp.Message] = []
        self._acks: list[int] = []
        self._copies: list[Outgoing] = []
        self._announce: list[tuple[str, str]] = []
        self._unsettled: set[int] = set()
        self.subscriptions = Subscriptions(ctx, self.hostlists, on_message=self._on_message)
        self.lists = ListMonitor(ctx.node, ctx.trail, known=self._known_lists,
                                 consumed=self.subscriptions.keys,
                                 every_s=ctx.settings.list_check_s)
        self._inflight_ids: set[str] = set()
        self._inflight = 0
        self._generation = 0
        self._gate_deadline: float | None = None
        self._gate_passed = False
        self._last_resync = time.monotonic()
        self._seen_routes = -1
        if senders is None and (ctx.data_dir / ALERT_HOSTS_FILE).exists():
            senders = AllowList.load(ctx.data_dir / ALERT_HOSTS_FILE)
        self.admission = Admission(senders=senders)

    # -- runtime API --------------------------------------------------------------------------

    def start(self) -> threading.Thread:
        """Start following host lists, handled ids and alerts, each on its own connection."""
        self.hostlists.start()
        self.handled.start()
        return super().start()

    def stop(self, timeout_s: float = STOP_GRACE_S + 2.0) -> None:
        """Stop taking alerts, let running deliveries finish (bounded), then close."""
        self.hostlists.stop()
        super().stop(timeout_s)
        self.handled.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def config_changed(self) -> None:
        """Re-read routes and lists soon; thread-safe (the host-list watcher's new lists)."""
        self._changed.set()

    def control_handlers(self) -> dict[ControlOp, Callable[[dict[str, Any]], dict[str, Any]]]:
        """Control-request handlers this worker answers.

        ``totals`` (counts by source), ``delivery`` (this worker's state), ``lists`` (every
        list's queue, stranded ones, dead-letter and quarantine depths), ``alert_policy``
        (what a sender must do to be accepted) and ``trace`` (one alert's trail lines).
        """
        return {
            ControlOp.TOTALS: lambda args: self.totals.report(since=args.get("since"),
                                                             series=args.get("series")),
            ControlOp.DELIVERY: lambda _args: self.status(),
            ControlOp.LISTS: lambda _args: self.lists.fresh(LISTS_FRESH_S).to_dict(self.node),
            ControlOp.ALERT_POLICY: self.policy,
            ControlOp.TRACE: self.trace,
        }

    def status(self) -> dict[str, Any]:
        """Subscribed lists and work in progress, for ``status`` and tests."""
        return {"node": self.node, "connected": self.connected.is_set(),
                "lists": self.subscriptions.keys(), "inflight": self._inflight,
                "dedup_caught_up": self.handled.caught_up.is_set()}

    def policy(self, args: dict[str, Any]) -> dict[str, Any]:
        """What this node requires of an alert, for a sender to check before it publishes.

        Never a secret: whether alerts must be signed, the key ids that verify, and whether
        the sender's signature of ``args["challenge"]`` verifies here (a right key id with a
        wrong secret is caught before any alert is refused).
        """
        ring = self.ctx.keyring
        answer: dict[str, Any] = {"node": self.node, "signed": ring is not None,
                                  "key_ids": list(ring.key_ids) if ring else [],
                                  "senders_restricted": self.admission.senders is not None}
        challenge = args.get("challenge")
        if ring is not None and isinstance(challenge, str) and 0 < len(challenge) <= 128:
            try:
                ring.verify(POLICY_CHALLENGE_PREFIX + challenge.encode(), args.get("signature"))
                answer["challenge"] = "ok"
            except MessageError as exc:
                answer["challenge"] = str(exc)
        return answer

    def trace(self, args: dict[str, Any]) -> dict[str, Any]:
        """This node's trail lines about one alert id, and what its duplicate window holds."""
        alert_id = args.get("id")
        if not isinstance(alert_id, str) or not alert_id:
            raise MessageError("trace needs an alert id")
        return {"node": self.node, "lines": trail_lines(self.ctx.data_dir, alert_id),
                "seen": self.totals.lookup(alert_id)}

    def _known_lists(self) -> list[tuple[str, ...]]:
        """Every list of the network this node knows: recorded, routes, consumed."""
        lists = [*self.hostlists.all_lists(), *self.subscriptions.routes(),
                 *self.subscriptions.wanted().values()]
        return [hosts for hosts in lists if hosts]

    # -- subscriptions ------------------------------------------------------------------------

    def setup(self, channel: Any) -> None:
        """Declare the alert topology; subscribe once the handled stream has been read.

        The first connection waits (up to ``Settings.handled_catch_up_s``) until the handled
        watcher has read every record published before it started; later reconnects do not,
        the window was current a moment ago.
        """
        self._generation += 1
        self._incoming.clear()
        self._acks.clear()
        self._copies.clear()
        self._announce.clear()
        self._unsettled.clear()
        topology.declare_alerts(channel, self.settings)
        topology.declare_control(channel)
        self._changed.clear()
        self.settler = Settler(self._conn(), node=self.node, keyring=self.ctx.keyring)
        self.subscriptions.reset(self._conn(), channel)
        self.lists.reset(self._conn())
        if not self._gate_passed:
            self._gate_deadline = time.monotonic() + self.settings.handled_catch_up_s
        self._open_gate()

    def _open_gate(self) -> bool:
        """Subscribe if the handled stream is read up to now (or its wait is over)."""
        if self._gate_deadline is None or self.handled.caught_up.is_set():
            self._gate_deadline = None
        elif time.monotonic() >= self._gate_deadline:
            self._gate_deadline = None
            self.ctx.trail.event(Event.ALERT_DEDUP_BEHIND, reason="the handled stream was not read "
                                 "up to now in time; taking alerts anyway")
        else:
            return False
        self._gate_passed = True
        self.subscriptions.sync()
        return True

    def on_idle(self) -> None:
        """Re-subscribe after a change of routes or lists, check the lists' queues now and then.

        The routes are followed through the store's count of route writes, read here at every
        idle moment: it moves with a backup's applied batches, the master's own commits, a
        replay and a snapshot alike, and changes of other kinds leave the subscriptions alone.
        A resync every ``RESYNC_S`` remains as a backstop.
        """
        self.lists.tick()
        now = time.monotonic()
        if self._gate_deadline is not None and not self._open_gate():
            return
        routes = self.ctx.store.kind_version(ROUTE_KIND)
        if routes != self._seen_routes:
            self._seen_routes = routes
            self._changed.set()
        if self._changed.is_set() or now - self._last_resync > RESYNC_S:
            self._changed.clear()
            self._last_resync = now
            self.subscriptions.sync()

    # -- the loop -----------------------------------------------------------------------------

    def _drain_until_stopped(self) -> None:
        """Drain in batches; on stop, cancel subscriptions and finish running deliveries."""
        assert self.conn is not None
        while not self.stop_event.is_set():
            self._pump(0.0 if self._acks else self.poll_s)
            self.on_idle()
        self.subscriptions.cancel_all()
        deadline = time.monotonic() + STOP_GRACE_S
        while self._inflight and time.monotonic() < deadline:
            self._pump(self.poll_s, dispatch=False)
        self._collect()
        while self.settler is not None and self.settler.pending and time.monotonic() < deadline:
            self._pump(0.1, dispatch=False)  # the last confirms, so the last acks go out

    def _conn(self) -> Any:
        """The live connection, typed loosely: kombu's methods carry no annotations."""
        assert self.conn is not None
        return self.conn

    def _wait(self, timeout_s: float) -> None:
        """Sleep until the broker sends something or a delivery finishes, or ``timeout_s``.

        ``drain_events`` can only wait on the AMQP socket; waiting on the wake-up pipe as well
        lets a finished delivery be acknowledged at once, which keeps the prefetch window moving.
        """
        conn = self._conn()
        if buffered(conn):  # frames already read off the socket: select would not see them
            return
        sock = conn.connection.transport.sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        readable, _, _ = select.select([sock, self._wake_r], [], [], timeout_s)
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 65536)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _pump(self, timeout_s: float, *, dispatch: bool = True) -> None:
        conn = self._conn()
        self._wait(timeout_s)
        try:
            while len(self._incoming) < BATCH_MAX:
                conn.drain_events(timeout=0)
        except TimeoutError:
            pass
        if dispatch:
            self._dispatch()
        else:
            self._incoming.clear()  # stopping: left unacknowledged, the broker hands them on
        self._collect()
        conn.heartbeat_check()

    def _on_message(self, message: amqp.Message) -> None:
        self._unsettled.add(message.delivery_info["delivery_tag"])
        self._incoming.append(message)

    def _dispatch(self) -> None:
        batch, self._incoming = self._incoming, []
        decoded: list[tuple[amqp.Message, Alert]] = []
        for message in batch:
            try:
                decoded.append((message, self._decode(message)))
            except MessageError as exc:
                self._quarantine(message, str(exc))
            except Exception as exc:  # a poison message must not wedge the node
                log.exception("could not judge an alert; quarantining it")
                self._quarantine(message, f"unreadable message ({type(exc).__name__})")
        if not decoded:
            return
        self.executor.refresh_plans()
        seen = self.totals.seen_outcomes(alert.id for _, alert in decoded)
        for message, alert in decoded:
            info = message.delivery_info
            known = seen.get(alert.id)
            taken_anew = (known is None or known[0] == "failed") \
                and alert.id not in self._inflight_ids
            if taken_anew and self._requeued(message, alert):
                known = None  # an operator sent a dead letter (or a refused alert) again: new
            if known is not None or alert.id in self._inflight_ids:
                self._duplicate(message, alert, known)
                continue
            hosts = self.subscriptions.hosts_of(info["consumer_tag"]) or alert.hosts
            position = hosts.index(self.node) if self.node in hosts else 0
            job = _Job(message, info["delivery_tag"], self._generation, alert, hosts, position,
                       bool(info.get("redelivered")))
            self._inflight_ids.add(alert.id)
            self._inflight += 1
            self._tally.add(alert.source, "received")
            if job.redelivered:
                self._tally.add(alert.source, "redelivered")
            self._start(job)
        self._tally.add_to(self.totals)  # received now, not when the batch is settled

    def _requeued(self, message: amqp.Message, alert: Alert) -> bool:
        """Whether ``message`` was sent again by a person; audited with who asked.

        A dead letter (``tasync dead requeue``, the console) or a quarantined alert (the
        console) sent again carries who asked; the node that takes it as new writes
        ``alert.requeued`` with the name, whether the id failed before or was never taken (a
        refused alert leaves no outcome).
        """
        headers = message.properties.get("application_headers") or {}
        who = headers.get(REQUEUED_BY_HEADER)
        if not isinstance(who, str) or not who:
            return False
        self.ctx.trail.event(Event.ALERT_REQUEUED, id=alert.id, source=alert.source, by=who[:200],
                             list=message.delivery_info.get("routing_key"))
        return True

    def _duplicate(self, message: amqp.Message, alert: Alert,
                   known: tuple[str, str | None] | None) -> None:
        """Drop a repeat of a settled id, with a trail line saying who settled it.

        A repeat the broker redelivers to the node that settled it means that node's
        settlement did not complete (its connection broke, the broker refused the record):
        it settles it once more, so the record and a failed alert's dead-letter copy exist.
        """
        info = message.delivery_info
        self._tally.add(alert.source, "duplicates")
        outcome, by = known if known is not None else ("in delivery", None)
        self.ctx.trail.defer(Event.ALERT_DUPLICATE, id=alert.id, source=alert.source,
                             list=info.get("routing_key"), first=by or self.node,
                             outcome=outcome)
        if known is not None and by is None and info.get("redelivered"):
            self._announce.append((alert.id, outcome))
            if outcome == FAILED:
                self._copies.append(dead_copy(message, reason="failed before; see the trail",
                                              node=self.node, attempts=0))
        self._acks.append(info["delivery_tag"])

    def _start(self, job: _Job) -> None:
        """Deliver to local files right here; hand anything slower, or a retry, to the pool.

        Python threads share one interpreter lock, so a pool only pays for work that waits
        (network, backoff); a file append is faster done inline than handed over.
        """
        prepared = self.executor.prepare(job.alert)
        if isinstance(prepared, Outcome):
            self._done.put((job, prepared))
            return
        prepared.trail.update(self._trail_fields(job))
        if self.executor.is_local(prepared):
            try:
                outcome = self.executor.run(job.alert, prepared, max_rounds=1)
            except Exception as exc:
                log.exception("delivery of alert %s crashed", job.alert.id)
                outcome = Outcome(FAILED, failed={job.alert.target: f"internal error: {exc!r}"})
            if outcome.status != RETRY:
                self._done.put((job, outcome))
                return
            prepared = outcome.progress or prepared
        self._pool.submit(self._run, job, prepared)

    def _trail_fields(self, job: _Job) -> dict[str, Any]:
        """Who sent the alert and when it was made: ``tasync trace`` reads them back."""
        headers = job.message.properties.get("application_headers") or {}
        sender = headers.get(CLIENT_HEADER) or headers.get(SENDER_HEADER)
        return {"sender": str(sender)[:100] if sender else None,
                "created_at": f"{job.alert.created_at:.3f}"}

    def _decode(self, message: amqp.Message) -> Alert:
        if self.ctx.keyring is not None:
            headers = message.properties.get("application_headers") or {}
            self.ctx.keyring.verify(message_body(message), headers.get(SIGNATURE_HEADER))
        # marshmallow judges anything unusual; well-formed alerts skip its ~80 µs.
        alert = decode_alert(message_body(message), max_bytes=MAX_ALERT_BYTES)
        headers = message.properties.get("application_headers") or {}
        sender = headers.get(SENDER_HEADER)
        self.admission.admit_alert(sender if isinstance(sender, str) else None, message)
        return alert

    def _run(self, job: _Job, progress: Progress) -> None:
        outcome: Outcome | None
        try:
            outcome = self.executor.run(job.alert, progress)
        except DeliveryAborted:
            outcome = None
        except Exception as exc:
            log.exception("delivery of alert %s crashed", job.alert.id)
            outcome = Outcome(FAILED, failed={job.alert.target: f"internal error: {exc!r}"})
        self._done.put((job, outcome))
        self._wake()

    def _collect(self) -> None:
        """Account for finished deliveries and settle them with the waiting acks, as one batch.

        The batch's ids go into one ``tasync.handled`` record, failed alerts into the
        dead-letter queue with their reason; the alerts are acknowledged when the broker has
        confirmed both (``Settler``).
        """
        if self._done.empty() and not (self._acks or self._announce or self._copies):
            return
        batch = _Settlement(handled=self._announce, copies=self._copies, acks=self._acks)
        self._announce, self._copies, self._acks = [], [], []
        while True:
            try:
                job, outcome = self._done.get_nowait()
            except queue.Empty:
                break
            self._finished(job, outcome, batch)
        self.ctx.trail.flush()  # the batch's lines are in the file before its acks go out
        if not batch.acks and not batch.handled:
            return
        try:
            self._tally.add_to(self.totals)
            self.totals.flush()
        except sqlite3.Error:
            log.exception("could not write totals; acknowledging anyway (delivery happened)")
        generation = self._generation

        def done(confirmed: bool) -> None:
            if generation == self._generation:
                self._settled(batch, confirmed)

        assert self.settler is not None
        self.settler.settle(handled=batch.handled, copies=batch.copies, done=done)

    def _finished(self, job: _Job, outcome: Outcome | None, batch: _Settlement) -> None:
        """Account for one finished delivery and add it to the batch being settled."""
        self._inflight -= 1
        self._inflight_ids.discard(job.alert.id)
        if outcome is None:
            return  # stopping in a retry wait: unacknowledged, the broker hands it on
        self._account(job, outcome)
        batch.handled.append((job.alert.id, outcome.status))
        if job.generation != self._generation:
            return  # its channel is gone: the broker hands it out again, as a duplicate
        batch.acks.append(job.tag)
        if outcome.status == FAILED:
            batch.copies.append(dead_copy(job.message, reason=outcome.reason or "failed",
                                          node=self.node, attempts=outcome.rounds))
            batch.dead.append(job.alert.source)

    def _settled(self, batch: _Settlement, confirmed: bool) -> None:
        """The broker holds the batch's record and copies: acknowledge; else hand back."""
        if not confirmed:
            self._unsettled.difference_update(batch.acks)
            for tag in batch.acks:
                self.channel.basic_reject(tag, requeue=True)
            return
        for source in batch.dead:
            self.totals.count(source, dead_lettered=1)
        self._ack(batch.acks)

    def _ack(self, tags: list[int]) -> None:
        """Acknowledge ``tags``: one ``multiple`` ack for those below every unsettled tag.

        A multiple ack covers every earlier tag of the channel, so it may only reach up to the
        lowest tag still being delivered, retried, or deliberately left unacknowledged.
        """
        self._unsettled.difference_update(tags)
        low = min(self._unsettled, default=None)
        below = [t for t in tags if low is None or t < low]
        if below:
            self.channel.basic_ack(max(below), multiple=True)
        for tag in tags:
            if low is not None and tag > low:
                self.channel.basic_ack(tag)

    def _account(self, job: _Job, outcome: Outcome) -> None:
        alert = job.alert
        taken_over = outcome.status == "delivered" and job.position > 0
        self._tally.add(alert.source, outcome.status)
        self.totals.mark_seen(alert.id, outcome.status)
        if taken_over:
            self._tally.add(alert.source, "taken_over")
            self.ctx.trail.defer(Event.ALERT_TAKEN_OVER, id=alert.id, source=alert.source,
                                 list=".".join(job.hosts), first=job.hosts[0],
                                 redelivered=int(job.redelivered))
        if outcome.status == FAILED:
            self.ctx.trail.defer(Event.ALERT_DEAD_LETTERED, id=alert.id, source=alert.source,
                                 target=alert.target, queue=topology.DEAD_LETTER_QUEUE,
                                 attempts=outcome.rounds, reason=outcome.reason[:500])

    def _quarantine(self, message: amqp.Message, reason: str) -> None:
        """Refuse a message: a copy to the quarantine queue (confirmed before the ack)."""
        info = message.delivery_info
        alert_id, source = alert_identity(message)
        self.ctx.trail.defer(Event.ALERT_REFUSED, id=alert_id, source=source,
                             list=info.get("routing_key"), reason=reason[:300])
        self._tally.add(source, "refused")
        self._copies.append(quarantine_copy(message, reason=reason, node=self.node,
                                            source=str(info.get("routing_key", ""))))
        log.warning("quarantined a message from %s: %s", info.get("routing_key"), reason)
        self._acks.append(info["delivery_tag"])

    def run(self) -> None:
        """The base loop, with unexpected errors logged instead of silently ending the thread."""
        while not self.stop_event.is_set():
            try:
                super().run()
            except Exception:
                log.exception("%s: unexpected error; restarting the consumer", self.name)
                self.stop_event.wait(1.0)
            else:
                return

