"""The sync worker: applies configuration changes in seq order, exactly once, and catches up.

Changes arrive on the node's own quorum queue ``tasync.sync.<node>``. Each batch is decoded,
authenticated, fenced by epoch and applied idempotently by seq (``NodeStore.apply``). A batch
that starts past the next expected seq reveals a gap (the queue was lost, or the node is new):
the missing changes are read from the change-log stream first. Before subscribing, the worker
finds the newest seq (from the master, or the stream's tail) and catches up from the stream, so
it reports ready only once it holds everything committed before it started (guarantee 4).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from typing import Any

import amqp

from broker import messages, topology
from broker.connection import close_quietly, connect
from broker.consumer import ConsumerLoop
from broker.errors import MessageError, NoAnswer, TasyncError
from broker.messages import ChangeBatch
from broker.rpc import RpcClient
from broker.store import ApplyResult, GapError
from broker.stream import read_changelog
from consumers.context import NodeContext
from consumers.quarantine import quarantine

log = logging.getLogger("tasync.sync")
SIGNATURE_HEADER = "tasync-sig"
#: How far before the last applied change a change-log read starts (clock skew between hosts).
REWIND_S = 300.0


class UnfillableGap(TasyncError):
    """The change log no longer reaches back to the missing changes: a snapshot is needed."""


class SyncConsumer(ConsumerLoop):
    """Consumes ``tasync.sync.<node>``; ``on_applied`` is called after every applied batch."""

    name = "tasync-sync"

    def __init__(self, ctx: NodeContext, *,
                 on_applied: Callable[[ApplyResult], None] | None = None,
                 on_gap: Callable[[int, int], None] | None = None,
                 admit: Callable[[ChangeBatch, amqp.Message], None] | None = None) -> None:
        super().__init__(ctx.settings)
        self.ctx = ctx
        self.name = f"tasync-sync-{ctx.node}"
        self.on_applied = on_applied or (lambda _r: None)
        self.on_gap = on_gap
        #: Set once the start-up catch-up is done; the node is ready when its control server
        #: also listens (``tasync.node``).
        self.caught_up = threading.Event()
        #: Security check of a decoded batch (origin allowed, user id); raises MessageError.
        self.admit = admit or (lambda _b, _m: None)

    # -- catch-up -----------------------------------------------------------------------------

    def head_seq(self) -> int:
        """The newest committed seq: the master's word, else the change log's tail."""
        conn = connect(self.settings, name=f"{self.name}-head", retry_s=5.0)
        try:
            rpc = RpcClient(conn, sender=self.ctx.node)
            data = rpc.call_one(topology.MASTER, "head", timeout_s=2.0)
            return int(data["seq"])
        except NoAnswer:
            from broker.stream import stream_head

            return stream_head(self.settings).last_seq
        finally:
            close_quietly(conn)

    def catch_up(self, target: int | None = None) -> int:
        """Apply every change up to ``target`` (default: the head) from the change log.

        Returns:
            The number of changes applied.

        Raises:
            UnfillableGap: the log no longer holds the first missing change.
        """
        store = self.ctx.store
        target = self.head_seq() if target is None else target
        if store.last_seq >= target:
            return 0
        log.info("catching up from seq %d to %d through the change log", store.last_seq, target)
        offset = self._start_offset()
        applied = self._read_from(offset, target)
        if store.last_seq < target and offset != "first":
            applied += self._read_from("first", target)
        if store.last_seq < target:
            raise UnfillableGap(
                f"the change log does not reach back to seq {store.last_seq + 1}; "
                f"holding {store.last_seq}, need {target}: recover from a snapshot"
            )
        self.ctx.trail.event("caught_up", seq=store.last_seq, applied=applied)
        return applied

    def _start_offset(self) -> Any:
        store = self.ctx.store
        if store.last_seq == 0 or store.last_ts <= 0:
            return "first"
        return dt.datetime.fromtimestamp(max(0.0, store.last_ts - REWIND_S), dt.UTC)

    def _read_from(self, offset: Any, target: int) -> int:
        applied = 0

        def on_batch(batch: ChangeBatch) -> bool:
            nonlocal applied
            if batch.last_seq <= self.ctx.store.last_seq:
                return True
            try:
                result = self._apply(batch, replayed=True)
            except GapError:
                return False  # started too late in the log, or the log no longer reaches back
            applied += result.applied
            return True

        read_changelog(self.settings, offset=offset, on_batch=on_batch, until_seq=target,
                       idle_s=2.0)
        return applied

    # -- consuming ----------------------------------------------------------------------------

    def setup(self, channel: Any) -> None:
        """Declare the topology and the node's queue, catch up, then subscribe."""
        topology.declare_all(channel, self.settings)
        topology.declare_sync_queue(channel, self.ctx.node)
        if not self.ctx.is_master:
            self.catch_up()
        self.caught_up.set()
        channel.basic_consume(topology.sync_queue(self.ctx.node), callback=self._on_message,
                              on_cancel=self.cancelled)

    def _on_message(self, message: amqp.Message) -> None:
        try:
            batch = self._decode(message)
        except MessageError as exc:
            quarantine(self.channel, message, reason=str(exc), node=self.ctx.node,
                       source=topology.sync_queue(self.ctx.node))
            self.ctx.trail.event("quarantined", queue=topology.sync_queue(self.ctx.node),
                                 reason=str(exc))
            self.channel.basic_ack(message.delivery_tag)
            return
        try:
            self._apply(batch, replayed=False)
        except GapError as gap:
            log.warning("%s; filling it from the change log", gap)
            self.ctx.trail.event("gap_detected", expected=gap.expected, got=gap.got)
            self.catch_up(target=batch.first_seq - 1)
            self._apply(batch, replayed=False)
        self.channel.basic_ack(message.delivery_tag)

    def _decode(self, message: amqp.Message) -> ChangeBatch:
        batch: ChangeBatch = messages.decode(
            message.body, max_bytes=self.settings.max_message_bytes, expect="changes")
        if self.ctx.keyring is not None:
            headers = message.properties.get("application_headers") or {}
            self.ctx.keyring.verify(bytes(message.body), headers.get(SIGNATURE_HEADER))
        self.admit(batch, message)
        return batch

    def _apply(self, batch: ChangeBatch, *, replayed: bool) -> ApplyResult:
        store = self.ctx.store
        if batch.epoch < store.epoch:
            self.ctx.trail.event("change_rejected", reason="stale-epoch", origin=batch.origin,
                                 epoch=batch.epoch, current_epoch=store.epoch,
                                 first_seq=batch.first_seq, last_seq=batch.last_seq)
            return ApplyResult(0, len(batch.changes), store.last_seq)
        result = store.apply(batch)
        self._log(batch, result, replayed=replayed)
        if result.applied:
            self.on_applied(result)
        return result

    def _log(self, batch: ChangeBatch, result: ApplyResult, *, replayed: bool) -> None:
        how = "replayed" if replayed else "applied"
        if result.skipped:
            log.info("skipped %d already-applied changes (seq %d..%d)", result.skipped,
                     batch.first_seq, batch.last_seq)
            if not result.applied and batch.origin != self.ctx.node:
                self.ctx.trail.event("change_skipped", first_seq=batch.first_seq,
                                     last_seq=batch.last_seq, reason="already-applied")
        if not result.applied:
            return
        log.info("%s %d changes up to seq %d (epoch %d, from %s)", how, result.applied,
                 result.last_seq, batch.epoch, batch.origin)
        for change in batch.changes[-result.applied:]:
            log.debug("%s seq=%d %s %s %s", how, change.seq, change.op, change.kind, change.name)
        if result.applied == 1:
            c = batch.changes[-1]
            self.ctx.trail.event(f"change_{how}", seq=c.seq, op=c.op, kind=c.kind, name=c.name,
                                 origin=c.origin)
        else:
            self.ctx.trail.event(f"changes_{how}", first_seq=result.last_seq - result.applied + 1,
                                 last_seq=result.last_seq, count=result.applied,
                                 origin=batch.origin)
