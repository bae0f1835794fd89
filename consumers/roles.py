"""Who is master: promotion with fencing, stepping down, and the requests recovery answers.

``tasync promote N`` asks N to take over. N first fences the current master, if one answers:
that node steps down at once (it refuses changes from then on and unbinds ``master``) and says
how far its confirmed changes go. N then drains every confirmed change from the change log,
opens a new era ``(epoch + 1, its last seq, N)`` and publishes its epoch mark before it accepts
a change. Every node learns the era from its own sync queue, in order with the changes; a
master that missed the fence steps down when the mark reaches it; and whatever a replaced
master numbered after the era's base is rejected everywhere (``broker.epochs``) and, on that
master, kept in ``conflicts.json`` rather than lost (``consumers.recovery``).

A node started with ``--role master`` looks before it publishes its outbox: when the network
already runs a newer epoch, it steps down instead and keeps its unconfirmed changes as
conflicts; they are never published.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from broker import topology
from broker.connection import RECOVERABLE, describe
from broker.epochs import EpochHistory, EpochMark, Era
from broker.errors import BrokerUnreachable, ConfigError, NoAnswer, RemoteError, TasyncError
from broker.store import ApplyResult
from broker.stream import UnfillableGap
from consumers.admission import Admission
from consumers.context import NodeContext
from consumers.recovery import RecoveryReport
from consumers.replay import Since, replay_into
from consumers.sync import SyncConsumer
from producers.relay import ChangeRelay

log = logging.getLogger("tasync.roles")
Handler = Callable[[dict[str, Any]], dict[str, Any]]
#: Failures inside a request that become its error answer (``_answering``).
_FAILURES: tuple[type[BaseException], ...] = (*RECOVERABLE, sqlite3.Error)
#: How long a promotion waits for the current master to step down.
FENCE_TIMEOUT_S = 30.0


def _answering(op: str, handler: Handler) -> Handler:
    """Report a broker or database failure inside a long request as that request's error.

    The control server answers ``TasyncError`` only; anything else would end its connection
    and leave the caller waiting. The request is not repeated: these requests are not
    idempotent the way a delivery is.
    """
    def wrapped(args: dict[str, Any]) -> dict[str, Any]:
        try:
            return handler(args)
        except TasyncError:
            raise
        except _FAILURES as exc:
            log.exception("%s failed", op)
            raise RemoteError(f"{op} failed: {describe(exc)}") from None
    return wrapped


class ControlSeat(Protocol):
    """What roles need from the control server (``tasync.control.ControlServer``)."""

    relay: ChangeRelay | None

    def role_changed(self) -> None:
        """Rebind ``master`` by the stored role; drop the relay of a former master."""

    def progress(self, data: dict[str, Any]) -> None:
        """Send an interim answer to the request being handled."""


class Roles:
    """Promotion, step-down and the recovery requests of one node."""

    def __init__(self, ctx: NodeContext, sync: SyncConsumer, seat: ControlSeat, *,
                 admission: Admission | None = None) -> None:
        self.ctx = ctx
        #: This node's allow-lists: a node its own tasync.hosts denies is never promoted.
        self.admission = admission or Admission()
        self.sync = sync
        self.seat = seat
        self.recovery = sync.recovery
        self.recovery.on_newer_epoch = self._on_newer_epoch

    def handlers(self) -> dict[str, Handler]:
        """The control requests served here (``head`` and ``step_down`` on the master only)."""
        handlers = {
            "head": self._head, "snapshot": self._snapshot, "recover": self._recover,
            "replay": self._replay, "promote": self._promote, "step_down": self._step_down,
            "conflicts": self._conflicts, "conflicts_resolved": self._conflicts_resolved,
        }
        return {op: _answering(op, fn) for op, fn in handlers.items()}

    def status_extra(self) -> dict[str, Any]:
        """``status`` fields: open conflicts kept by this node."""
        return {"conflicts": len(self.recovery.conflicts.open_entries())}

    # -- the master's start -------------------------------------------------------------------

    def start(self, stop: threading.Event) -> None:
        """On a node started as master: step down when a newer epoch runs, else publish the outbox.

        Called before the consumers start, so a replaced master never binds ``master`` nor
        publishes a change the network has moved past; while the broker is unreachable it
        waits (until ``stop``), because publishing unchecked could spread stale changes.
        """
        store = self.ctx.store
        if not self.ctx.is_master:
            return
        while True:
            try:
                self.check_epoch()
                break
            except BrokerUnreachable as exc:
                log.warning("cannot check the network's epoch before serving as master: %s",
                            exc)
                if stop.wait(2.0):
                    return
        if not self.ctx.is_master:
            return
        if store.history.era(store.epoch) is None:
            base = 0 if store.epoch <= 1 else store.last_seq
            store.set_history(store.history.learn(Era(store.epoch, base, self.ctx.node)))
        if self.seat.relay is not None:
            self.seat.relay.publish_outbox()

    def check_epoch(self) -> None:
        """Learn the network's eras; a master that finds a newer epoch steps down here."""
        view = self.recovery.network_view()
        self.recovery.learn(view.history, reason="committed by a master that had been replaced")

    def _on_newer_epoch(self, history: EpochHistory) -> None:
        era = history.current
        if self.ctx.is_master and era is not None and era.origin != self.ctx.node:
            self.step_down(reason=f"epoch {era.epoch} of {era.origin} is newer", by=era.origin)

    def step_down(self, *, reason: str, by: str | None = None) -> None:
        """Become a backup: refuse changes from now on, unbind ``master``, drop the relay."""
        store = self.ctx.store
        with store.lock:
            store.set_meta(role="backup")
        self.ctx.trail.event("stepped_down", reason=reason, by=by, epoch=store.epoch,
                             seq=store.last_seq, unconfirmed=len(store.unpublished()) or None)
        log.warning("stepped down to backup: %s", reason)
        self._changed()
        self.seat.role_changed()

    def _changed(self) -> None:
        self.sync.on_applied(ApplyResult(0, 0, self.ctx.store.last_seq))

    # -- promotion ----------------------------------------------------------------------------

    def _promote(self, args: dict[str, Any]) -> dict[str, Any]:
        ctx, store = self.ctx, self.ctx.store
        if ctx.is_master:
            return {"node": ctx.node, "epoch": store.epoch, "base_seq": store.last_seq,
                    "already": True, "previous": None, "drained": 0}
        self._check_may_be_master()
        with self.sync.locked():
            if store.diverged:
                raise ConfigError(f"{ctx.node} holds changes the network never accepted; run "
                                  f"tasync recover --node {ctx.node} first")
            old = self._fence(float(args.get("fence_timeout_s") or FENCE_TIMEOUT_S))
            view = self.recovery.network_view()
            history = view.history
            if old is not None:
                history = history.merge(EpochHistory.from_list(old.get("eras", [])))
            self.recovery.learn(history, reason="disowned by a newer epoch")
            target = max(view.seq, int(old["seq"]) if old else 0)
            try:
                drained = self.recovery.catch_up(target, progress=self.seat.progress)
            except UnfillableGap as exc:
                raise ConfigError(f"{ctx.node} cannot drain every confirmed change ({exc}); "
                                  f"run tasync recover --node {ctx.node} first") from None
            epoch = max(store.epoch, store.history.max_epoch,
                        int(old["epoch"]) if old else 0) + 1
            history = store.history.learn(Era(epoch, store.last_seq, ctx.node))
            self._open_era(epoch, history)
        self.ctx.trail.event("promoted", epoch=epoch, base_seq=store.last_seq,
                             previous=old["node"] if old else None, drained=drained)
        log.warning("promoted to master: epoch %d from seq %d", epoch, store.last_seq)
        self._changed()
        return {"node": ctx.node, "epoch": epoch, "base_seq": store.last_seq, "already": False,
                "previous": old["node"] if old else None, "drained": drained}

    def _check_may_be_master(self) -> None:
        """Refuse, before fencing anyone, a promotion this node's tasync.hosts forbids.

        Promoting it anyway would step the current master down and then leave the network
        with a master whose changes every node that shares the list rejects.
        """
        decision = self.admission.may_be_master(self.ctx.node)
        if decision is not None and not decision.allowed:
            self.ctx.trail.event("promotion_refused", reason=decision.reason)
            raise ConfigError(f"{self.ctx.node} may not act as master: {decision.reason} "
                              "(its tasync.hosts or --master); nothing was changed")

    def _fence(self, timeout_s: float) -> dict[str, Any] | None:
        """Ask the current master to step down; returns its head, or None when none runs.

        A master that is bound but silent (hung, or cut off while the broker still holds its
        connection) stops the promotion: going ahead would make two masters. The broker drops
        such a connection after two missed heartbeats, and a retry then finds no master.
        """
        started = time.monotonic()
        try:
            with self.recovery.rpc() as rpc:
                head = rpc.call_one(topology.MASTER, "step_down",
                                    {"by": self.ctx.node, "expires_at": time.time() + timeout_s},
                                    timeout_s=timeout_s)
            if head.get("ignored"):  # its clock is ahead of ours: it is still the master
                raise ConfigError(f"the master {head.get('node')} refused to step down (its "
                                  "clock says the request expired); check the clocks and retry")
            return head
        except NoAnswer:
            if time.monotonic() - started < timeout_s:
                return None  # returned at once: no node holds the master's binding
            raise ConfigError(f"the current master did not answer within {timeout_s:g} s; "
                              "it may be hung or cut off: stop it, or retry once the broker "
                              "has dropped its connection") from None
        except RemoteError as exc:
            raise ConfigError(f"the current master did not step down: {exc}") from None

    def _open_era(self, epoch: int, history: EpochHistory) -> None:
        """Publish the epoch mark, then take the master's seat (nothing changes if it fails)."""
        store = self.ctx.store
        relay = ChangeRelay(self.ctx.settings, store, node=self.ctx.node, keyring=self.ctx.keyring)
        mark = EpochMark(epoch=epoch, base_seq=store.last_seq, origin=self.ctx.node,
                         ts=time.time(), eras=tuple(
                             (e.epoch, e.base, e.origin) for e in history.eras))
        try:
            relay.publish_mark(mark)
        except BaseException:
            relay.close()
            raise
        with store.lock:
            store.set_history(history)
            store.set_meta(role="master")
        if self.seat.relay is not None:
            self.seat.relay.close()
        self.seat.relay = relay
        self.seat.role_changed()
        relay.publish_outbox()  # its own committed rows the broker never confirmed, if any

    def _step_down(self, args: dict[str, Any]) -> dict[str, Any]:
        by = str(args.get("by") or "") or None
        if time.time() > float(args.get("expires_at") or "inf"):
            # The promotion that asked gave up long ago (this node was hung): stay master.
            self.ctx.trail.event("step_down_ignored", by=by, reason="expired request")
            return {**self._head({}), "ignored": True}
        self.step_down(reason=f"{by} is being promoted" if by else "asked to", by=by)
        return self._head({})

    # -- requests -----------------------------------------------------------------------------

    def _head(self, args: dict[str, Any]) -> dict[str, Any]:
        """Where this node stands; the checksum only when the asker can use it.

        A checksum hashes the whole configuration (most of a second at 100,000 objects), and
        an asker compares it only when it holds the same seq (recovery's drift check): with
        ``checksum_at`` set, it is computed only when that seq is this node's.
        """
        store = self.ctx.store
        seq = store.published_seq
        wanted = args.get("checksum_at")
        useful = seq == store.last_seq and (wanted is None or wanted == seq)
        return {"node": self.ctx.node, "seq": seq, "committed": store.last_seq,
                "epoch": store.epoch, "eras": store.history.to_list(),
                "checksum": store.checksum() if useful else None}

    def _snapshot(self, _args: dict[str, Any]) -> dict[str, Any]:
        store = self.ctx.store
        if store.diverged:
            raise ConfigError(f"{self.ctx.node} holds changes the network never accepted; "
                              "it cannot serve a snapshot")
        if store.published_seq < store.last_seq:
            raise ConfigError(f"{self.ctx.node} has unconfirmed changes; try again when the "
                              "broker confirmed them")
        snap = store.snapshot()
        return {"node": self.ctx.node, "seq": snap.seq, "epoch": snap.epoch, "ts": snap.ts,
                "eras": snap.eras, "objects": snap.objects, "checksum": store.checksum()}

    def _recover(self, args: dict[str, Any]) -> dict[str, Any]:
        ctx, store = self.ctx, self.ctx.store
        if ctx.is_master:
            report = RecoveryReport(node=ctx.node, before_seq=store.last_seq,
                                    after_seq=store.last_seq, target_seq=store.last_seq,
                                    note=f"{ctx.node} is the master: its state is the reference")
        else:
            source = args.get("source")
            report = self.recovery.recover(source=str(source) if source else None,
                                           snapshot=bool(args.get("snapshot")),
                                           progress=self.seat.progress, reason="request")
        return {**report.to_dict(), "role": ctx.role, "epoch": store.epoch,
                "seq": store.last_seq, "checksum": store.checksum(),
                "conflicts": self.recovery.conflicts.open_entries(),
                "conflicts_file": str(self.recovery.conflicts.path)}

    def _replay(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.ctx.is_master:
            raise ConfigError(f"{self.ctx.node} is the master: the change log is its own "
                              "output, there is nothing to replay into it")
        return replay_into(self.recovery, Since.from_args(args), progress=self.seat.progress)

    def _conflicts(self, _args: dict[str, Any]) -> dict[str, Any]:
        return {"node": self.ctx.node, "conflicts": self.recovery.conflicts.entries(),
                "file": str(self.recovery.conflicts.path)}

    def _conflicts_resolved(self, args: dict[str, Any]) -> dict[str, Any]:
        done = args.get("done")
        if not isinstance(done, list):
            raise ConfigError("conflicts_resolved needs a list 'done'")
        return {"resolved": self.recovery.conflicts.resolve(done)}
