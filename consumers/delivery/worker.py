"""The delivery worker: one consumer per precedence list that names this node.

Each list ``a.b.c`` has one quorum queue; every node of the list consumes it with consumer
priority by position, so the broker hands alerts to the first live node and moves queued and
unacknowledged ones to the next node when a connection dies (design section 3). Overflow works
the same way: when the first node's prefetch window is full, the next node gets the surplus.

Per alert: decode and check it (bad ones go to the quarantine queue), drop it if its id was
already handled within the window, deliver it on a thread pool (a slow webhook must not hold up
a file write or the heartbeat), then, back on the consumer thread, record totals and the id in
one SQLite transaction and only then acknowledge it. A failed alert is rejected without requeue
and lands in the dead-letter queue through the list queue's dead-letter exchange.

Which lists: named routes from the replicated store, ad-hoc lists from the host-list stream, and
lists consumed before that still hold alerts (a route whose hosts changed keeps its old queue
drained). The runtime calls ``config_changed`` after each applied configuration batch.
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
from dataclasses import dataclass
from typing import Any

import amqp
import amqp.exceptions

from broker import topology
from broker.alerts import MAX_ALERT_BYTES, Alert, decode_alert
from broker.allowlist import ALERT_HOSTS_FILE, AllowList
from broker.consumer import ConsumerLoop, message_body
from broker.errors import MessageError
from broker.signing import SENDER_HEADER, SIGNATURE_HEADER
from consumers.admission import Admission
from consumers.context import NodeContext
from consumers.delivery.executor import (
    FAILED,
    RETRY,
    Aborted,
    Executor,
    Outcome,
    Progress,
    RetryPolicy,
)
from consumers.delivery.hostlists import HostListWatcher
from consumers.delivery.subscriptions import Subscriptions
from consumers.quarantine import quarantine
from consumers.totals import Totals

log = logging.getLogger("tasync.delivery")

BATCH_MAX = 500
STOP_GRACE_S = 5.0
RETIRE_CHECK_S = 60.0
SEQ_CHECK_S = 0.5


@dataclass(frozen=True)
class _Job:
    tag: int
    generation: int
    alert: Alert
    hosts: tuple[str, ...]
    position: int
    redelivered: bool


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
        super().__init__(ctx.settings)
        self.name = f"tasync-delivery-{ctx.node}"
        self.ctx = ctx
        self.node = ctx.node
        self.totals = totals
        self.executor = Executor(node=ctx.node, store=ctx.store, trail=ctx.trail,
                                 policy=policy or RetryPolicy.from_env(),
                                 wait=self.stop_event.wait)
        self.hostlists = HostListWatcher(ctx, on_change=self.config_changed)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="delivery")
        self._done: queue.SimpleQueue[tuple[_Job, Outcome | None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._changed = threading.Event()
        self._incoming: list[amqp.Message] = []
        self._acks: list[int] = []
        self._unsettled: set[int] = set()
        self.subscriptions = Subscriptions(ctx, self.hostlists, on_message=self._on_message)
        self._inflight_ids: set[str] = set()
        self._inflight = 0
        self._generation = 0
        self._last_retire = time.monotonic()
        self._last_seq_check = 0.0
        self._seen_seq = -1
        if senders is None and (ctx.data_dir / ALERT_HOSTS_FILE).exists():
            senders = AllowList.load(ctx.data_dir / ALERT_HOSTS_FILE)
        self.admission = Admission(senders=senders)

    # -- runtime API --------------------------------------------------------------------------

    def start(self) -> threading.Thread:
        """Start following host lists and consuming alerts, each on its own connection."""
        self.hostlists.start()
        return super().start()

    def stop(self, timeout_s: float = STOP_GRACE_S + 2.0) -> None:
        """Stop taking alerts, let running deliveries finish (bounded), then close."""
        self.hostlists.stop()
        super().stop(timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def config_changed(self) -> None:
        """Re-read routes and lists soon; thread-safe, called after each applied config batch."""
        self._changed.set()

    def control_handlers(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        """Control-request handlers this worker answers: ``totals`` and ``delivery``."""
        return {
            "totals": lambda args: self.totals.report(since=args.get("since")),
            "delivery": lambda _args: self.status(),
        }

    def status(self) -> dict[str, Any]:
        """Subscribed lists and work in progress, for ``status`` and tests."""
        return {"node": self.node, "connected": self.connected.is_set(),
                "lists": self.subscriptions.keys(), "inflight": self._inflight}

    # -- subscriptions ------------------------------------------------------------------------

    def setup(self, channel: Any) -> None:
        """Declare the alert topology and subscribe to every list that names this node."""
        self._generation += 1
        self._incoming.clear()
        self._acks.clear()
        self._unsettled.clear()
        topology.declare_alerts(channel)
        topology.declare_control(channel)
        self._changed.clear()
        self.subscriptions.reset(self._conn(), channel)
        self.subscriptions.sync()

    def on_idle(self) -> None:
        """Re-subscribe after a configuration change; retire drained old lists now and then.

        Besides ``config_changed``, the store's seq is looked at twice a second: the master
        commits its own changes without an "applied" event, and a missed call must not leave
        a route unconsumed.
        """
        now = time.monotonic()
        if now - self._last_seq_check >= SEQ_CHECK_S:
            self._last_seq_check = now
            seq = self.ctx.store.last_seq
            if seq != self._seen_seq:
                self._seen_seq = seq
                self._changed.set()
        if self._changed.is_set() or now - self._last_retire > RETIRE_CHECK_S:
            self._changed.clear()
            self._last_retire = now
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

    def _conn(self) -> Any:
        """The live connection, typed loosely: kombu's methods carry no annotations."""
        assert self.conn is not None
        return self.conn

    def _wait(self, timeout_s: float) -> None:
        """Sleep until the broker sends something or a delivery finishes, or ``timeout_s``.

        ``drain_events`` can only wait on the AMQP socket; waiting on the wake-up pipe as well
        lets a finished delivery be acknowledged at once, which keeps the prefetch window moving.
        """
        sock = self._conn().connection.transport.sock
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
        seen = self.totals.seen(alert.id for _, alert in decoded)
        for message, alert in decoded:
            info = message.delivery_info
            if alert.id in seen or alert.id in self._inflight_ids:
                self.totals.count(alert.source, duplicates=1)
                self._acks.append(info["delivery_tag"])
                continue
            hosts = self.subscriptions.hosts_of(info["consumer_tag"]) or alert.hosts
            position = hosts.index(self.node) if self.node in hosts else 0
            job = _Job(info["delivery_tag"], self._generation, alert, hosts, position,
                       bool(info.get("redelivered")))
            self._inflight_ids.add(alert.id)
            self._inflight += 1
            self.totals.count(alert.source, received=1, redelivered=int(job.redelivered))
            self._start(job)

    def _start(self, job: _Job) -> None:
        """Deliver to local files right here; hand anything slower, or a retry, to the pool.

        Python threads share one interpreter lock, so a pool only pays for work that waits
        (network, backoff); a file append is faster done inline than handed over.
        """
        prepared = self.executor.prepare(job.alert)
        if isinstance(prepared, Outcome):
            self._done.put((job, prepared))
            return
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
        except Aborted:
            outcome = None
        except Exception as exc:
            log.exception("delivery of alert %s crashed", job.alert.id)
            outcome = Outcome(FAILED, failed={job.alert.target: f"internal error: {exc!r}"})
        self._done.put((job, outcome))
        self._wake()

    def _collect(self) -> None:
        settle: list[tuple[_Job, bool]] = []
        while True:
            try:
                job, outcome = self._done.get_nowait()
            except queue.Empty:
                break
            self._inflight -= 1
            self._inflight_ids.discard(job.alert.id)
            if outcome is not None:
                self._account(job, outcome)
                settle.append((job, outcome.status == FAILED))
        if not settle and not self._acks:
            return
        try:
            self.totals.flush()
        except sqlite3.Error:
            log.exception("could not write totals; acknowledging anyway (delivery happened)")
        acks, self._acks = self._acks, []
        for job, failed in settle:
            if job.generation != self._generation:
                continue  # its channel is gone; the broker has already handed it out again
            if failed:
                self.channel.basic_reject(job.tag, requeue=False)
                self._unsettled.discard(job.tag)
            else:
                acks.append(job.tag)
        self._ack(acks)

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
        self.totals.count(alert.source, **{outcome.status: 1}, taken_over=int(taken_over))
        self.totals.mark_seen(alert.id, outcome.status)
        if taken_over:
            self.ctx.trail.event("alert.taken_over", id=alert.id, source=alert.source,
                                 list=".".join(job.hosts), first=job.hosts[0],
                                 redelivered=int(job.redelivered))
        if outcome.status == FAILED:
            self.ctx.trail.event("alert.dead_lettered", id=alert.id, source=alert.source,
                                 target=alert.target, queue=topology.DEAD_LETTER_QUEUE,
                                 reason=outcome.reason[:500])

    def _quarantine(self, message: amqp.Message, reason: str) -> None:
        info = message.delivery_info
        self.ctx.trail.event("alert.refused", list=info.get("routing_key"), reason=reason[:300])
        quarantine(self.channel, message, reason=reason, node=self.node,
                   source=str(info.get("routing_key", "")))
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

