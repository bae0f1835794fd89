"""The sync worker: applies configuration changes in seq order, exactly once, and catches up.

Changes arrive on the node's own quorum queue ``tasync.sync.<node>``. Each batch is decoded,
authenticated, judged by the eras (``tasync.broker.epochs``: a stale master's changes are rejected
and audited) and applied idempotently by seq (``NodeStore.apply``). Epoch marks arrive the same way,
in order with the changes, and teach the node a promotion. A batch that starts past the next
expected seq reveals a gap (the queue was lost, or the node is new): the missing changes are
read from the change-log stream, or a snapshot is installed when the log no longer reaches
back (``tasync.consumers.recovery``). Before subscribing, the worker runs the same recovery, so it
reports ready only once it holds everything committed before it started.

One lock serialises applying: this consumer's deliveries, and recovery, replay and promotion
requests that the control server runs in its own thread.

The master's own queue carries its own batches back to it. Judged and applied, each would be
skipped by seq, so while it is the master the node skips them without decoding: when the
headers name it as origin, its current epoch and a last seq it holds, and the relay confirms
the body is byte for byte one it encoded from its own committed rows (``own_batch``). Headers
alone are never trusted (they are not signed); a backup always takes the full path.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import amqp

from tasync.broker import topology
from tasync.broker.consumer import ConsumerLoop, message_body
from tasync.broker.epochs import EpochMark
from tasync.broker.errors import GapError, MessageError, TasyncError
from tasync.broker.events import Event
from tasync.broker.fastdecode import decode_entry
from tasync.broker.messages import ChangeBatch
from tasync.broker.signing import SIGNATURE_HEADER
from tasync.broker.store import ApplyResult
from tasync.consumers.context import NodeContext
from tasync.consumers.quarantine import quarantine
from tasync.consumers.recovery import Recovery

log = logging.getLogger("tasync.sync")
#: How often a diverged node that could not recover tries again.
RETRY_S = 10.0


class OwnBatches(Protocol):
    """What the sync consumer needs of the master's relay (``tasync.producers.relay``)."""

    def own_batch(self, body: bytes, *, epoch: int, last_seq: int) -> bool:
        """Whether ``body`` is one of this node's own batches of ``epoch`` up to ``last_seq``."""


class SyncConsumer(ConsumerLoop):
    """Consumes ``tasync.sync.<node>``; ``on_applied`` is called after every applied batch.

    ``own`` (the node's relay) recognises the master's own batches, which it then skips
    without decoding; without it every batch takes the full path.
    """

    name = "tasync-sync"

    def __init__(self, ctx: NodeContext, *,
                 on_applied: Callable[[ApplyResult], None] | None = None,
                 admit: Callable[[ChangeBatch, amqp.Message], None] | None = None,
                 own: OwnBatches | None = None) -> None:
        super().__init__(ctx.settings)
        self.ctx = ctx
        self.name = f"tasync-sync-{ctx.node}"
        self.on_applied = on_applied or (lambda _r: None)
        self.own = own
        #: Set once the start-up catch-up is done; the node is ready when its control server
        #: also listens (``tasync.node``).
        self.caught_up = threading.Event()
        #: Security check of a decoded batch (origin allowed, user id); raises MessageError.
        #: An epoch mark is checked as an empty batch of its origin and epoch.
        self.admit = admit or (lambda _b, _m: None)
        self.lock = threading.RLock()
        self.recovery = Recovery(ctx, self)
        self._last_failure = ""
        self._next_retry = 0.0

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the apply lock; while waiting, keep this thread's connection alive."""
        own_thread = threading.current_thread() is self._thread
        while not self.lock.acquire(timeout=1.0):
            if own_thread and self.conn is not None:
                self.conn.heartbeat_check()
        try:
            yield
        finally:
            self.lock.release()

    # -- consuming ----------------------------------------------------------------------------

    def setup(self, channel: Any) -> None:
        """Declare the topology and the node's queue, recover, then subscribe."""
        topology.declare_all(channel, self.settings)
        topology.declare_sync_queue(channel, self.ctx.node)
        if not self.ctx.is_master:
            try:
                self.recovery.recover(reason="start")
            except TasyncError as exc:
                if str(exc) != self._last_failure:
                    self._last_failure = str(exc)
                    self.ctx.trail.event(Event.RECOVERY_FAILED, reason=str(exc))
                raise
        self.caught_up.set()
        channel.basic_consume(topology.sync_queue(self.ctx.node), callback=self._on_message,
                              on_cancel=self.cancelled)

    def on_idle(self) -> None:
        """A node found diverged outside a delivery (a step-down) recovers here, now and then."""
        if (self.ctx.store.diverged and not self.ctx.is_master
                and time.monotonic() >= self._next_retry):
            self._next_retry = time.monotonic() + RETRY_S
            try:
                with self.locked():
                    self.recovery.recover(reason="diverged")
            except TasyncError as exc:
                log.warning("cannot recover yet: %s; trying again in %g s", exc, RETRY_S)

    def _on_message(self, message: amqp.Message) -> None:
        if self._is_own_applied(message):
            self.channel.basic_ack(message.delivery_tag)
            return
        try:
            item = self._decode(message)
        except Exception as exc:  # a poison message must not wedge the node: quarantine it
            if not isinstance(exc, MessageError):
                log.exception("could not judge a message; quarantining it")
                exc = MessageError(f"unreadable message ({type(exc).__name__})")
            quarantine(self.channel, message, reason=str(exc), node=self.ctx.node,
                       source=topology.sync_queue(self.ctx.node))
            self.ctx.trail.event(Event.CHANGE_QUARANTINED, queue=topology.sync_queue(self.ctx.node),
                                 reason=str(exc))
            self.channel.basic_ack(message.delivery_tag)
            return
        with self.locked():
            if isinstance(item, EpochMark):
                self.accept_mark(item)
            else:
                self._apply_live(item)
            if self.ctx.store.diverged and not self.ctx.is_master:
                self.recovery.recover(reason="diverged")
        self.channel.basic_ack(message.delivery_tag)

    def _is_own_applied(self, message: amqp.Message) -> bool:
        """Whether ``message`` is the master's own batch, which the full path would only skip.

        The headers are a hint anyone who may publish could forge, so they only pick the
        candidates: the body must also be one the relay encoded from this node's rows of the
        same epoch (``OwnBatches``). Such a body decodes to changes of this node's current era,
        all at or below its last seq: judged, the era owns them; applied, each is skipped by
        seq, with no trail line for one's own origin and no ``on_applied``. Role, epoch and
        seq are read under the store's lock, which a step-down or promotion also takes; the
        body is hashed before, outside it.
        """
        if self.own is None:
            return False
        headers = message.properties.get("application_headers") or {}
        epoch, last_seq = headers.get("epoch"), headers.get("last-seq")
        if (headers.get("origin") != self.ctx.node or type(epoch) is not int
                or type(last_seq) is not int):
            return False
        if not self.own.own_batch(message_body(message), epoch=epoch, last_seq=last_seq):
            return False
        store = self.ctx.store
        with store.lock:
            return (self.ctx.is_master and store.epoch == epoch and store.last_seq >= last_seq
                    and not store.diverged)

    def _apply_live(self, batch: ChangeBatch) -> None:
        if self.ctx.store.diverged and not self.ctx.is_master:
            self.recovery.recover(reason="diverged")
        try:
            self.apply_batch(batch, replayed=False)
        except GapError as gap:
            log.warning("%s; filling it from the change log", gap)
            self.ctx.trail.event(Event.CHANGE_GAP, expected=gap.expected, got=gap.got)
            self.recovery.fill_gap(batch.first_seq - 1)
            self.apply_batch(batch, replayed=False)

    def _decode(self, message: amqp.Message) -> ChangeBatch | EpochMark:
        body = message_body(message)
        item = decode_entry(body, max_bytes=self.settings.max_message_bytes)
        if not isinstance(item, ChangeBatch | EpochMark):
            raise MessageError(f"unexpected {type(item).__name__} message on a sync queue")
        if self.ctx.keyring is not None:
            headers = message.properties.get("application_headers") or {}
            self.ctx.keyring.verify(body, headers.get(SIGNATURE_HEADER))
        if isinstance(item, EpochMark):
            self.admit(ChangeBatch(epoch=item.epoch, origin=item.origin, changes=()), message)
        else:
            self.admit(item, message)
        return item

    def accept_mark(self, mark: EpochMark) -> bool:
        """Learn a promotion's eras; returns whether they were news to this node."""
        store = self.ctx.store
        before = store.history
        self.recovery.learn(mark.history, reason=f"disowned by epoch {mark.epoch} of "
                                                 f"{mark.origin}")
        return store.history != before

    def apply_batch(self, batch: ChangeBatch, *, replayed: bool, force: bool = False,
                    notify: bool = True) -> ApplyResult:
        """Judge ``batch`` by the eras, reject (and audit) what is stale, apply the rest by seq.

        ``notify=False`` leaves calling ``on_applied`` to the caller: a catch-up tells the node
        once at its end rather than after each of its batches.

        Raises:
            GapError: the legitimate part starts past the next expected seq.
        """
        store = self.ctx.store
        history = store.history
        verdict = history.judge(batch)
        if verdict.history.max_epoch > history.max_epoch:
            self.recovery.learn(verdict.history, reason=f"disowned by epoch {batch.epoch} of "
                                                        f"{batch.origin}")
        if verdict.stale:
            owner = verdict.history.owner(verdict.stale[0].seq)
            self.ctx.trail.event(
                Event.CHANGE_REJECTED,
                reason="stale-epoch" if batch.epoch < verdict.history.max_epoch
                else "not-the-epoch-master",
                origin=batch.origin, epoch=batch.epoch, current_epoch=store.epoch,
                owner=owner.origin if owner else None, first_seq=verdict.stale[0].seq,
                last_seq=verdict.stale[-1].seq, count=len(verdict.stale))
        if not verdict.legit:
            return ApplyResult(0, len(batch.changes), store.last_seq)
        legit = batch if not verdict.stale else ChangeBatch(
            epoch=batch.epoch, origin=batch.origin, changes=verdict.legit)
        result = store.apply(legit, force=force)
        self._log(legit, result, replayed=replayed)
        if notify and (result.applied or result.reapplied):
            self.on_applied(result)
        return result

    def _log(self, batch: ChangeBatch, result: ApplyResult, *, replayed: bool) -> None:
        how = "replayed" if replayed else "applied"
        if result.reapplied:
            log.info("re-applied %d changes the node held (seq %d..)", result.reapplied,
                     batch.first_seq)
            self.ctx.trail.event(Event.CHANGE_REAPPLIED, first_seq=batch.first_seq,
                                 count=result.reapplied, origin=batch.origin)
        if result.skipped:
            log.info("skipped %d already-applied changes (seq %d..%d)", result.skipped,
                     batch.first_seq, batch.last_seq)
            if not result.applied and batch.origin != self.ctx.node:
                self.ctx.trail.event(Event.CHANGE_SKIPPED, first_seq=batch.first_seq,
                                     last_seq=batch.last_seq, reason="already-applied")
        if not result.applied:
            return
        log.info("%s %d changes up to seq %d (epoch %d, from %s)", how, result.applied,
                 result.last_seq, batch.epoch, batch.origin)
        if log.isEnabledFor(logging.DEBUG):  # a catch-up applies 10,000 changes a call
            for change in batch.changes[-result.applied:]:
                log.debug("%s seq=%d %s %s %s", how, change.seq, change.op, change.kind,
                          change.name)
        event = Event.CHANGE_REPLAYED if replayed else Event.CHANGE_APPLIED
        if result.applied == 1:
            c = batch.changes[-1]
            self.ctx.trail.event(event, seq=c.seq, op=c.op, kind=c.kind, name=c.name,
                                 origin=c.origin)
        else:
            self.ctx.trail.event(event, first_seq=result.last_seq - result.applied + 1,
                                 last_seq=result.last_seq, count=result.applied,
                                 origin=batch.origin)
