"""Who is master: the seat, starting as master, promotion, stepping down, recovery requests.

One master per epoch rests on two things every node checks (``tasync.broker.seat``,
``tasync.broker.epochs``):

* **The seat.** A master holds the broker's master seat for as long as it acts as master, and
  publishes its changes on the seat's connection. The broker gives the seat to one connection
  at a time and takes it back when that connection ends (a crash, or a hung process whose
  heartbeats stopped), so two nodes can never both be master, and a master that lost the seat
  (it was stopped for a while, or cut off) finds out before it acts: it takes the seat back
  only when nobody else took it and the change log shows no newer era, and steps down
  otherwise.
* **The era.** A master commits only in an era it owns: the newest era it knows must be its
  own. ``--role master`` therefore means "may start as master when no era says otherwise": a
  node whose store or change log says another node owns the newest era starts as a backup and
  says why, whatever its command line.

``tasync promote N`` makes N take the seat: at once when no master holds it; otherwise N asks
the master to step down (it releases the seat) and, when the master does not answer (hung, cut
off), waits for the broker to drop the master's connection. Concurrent promotions settle on
whichever candidate the broker gives the seat; the others say so and stay backups. With the
seat, N reads the change log to its end (everything the old master reported committed is
there, because its confirms came on the seat's connection), drains it, opens a new era
``(epoch + 1, its last seq, N)`` and publishes the era's mark before it accepts a change.
Every node learns the era from its own sync queue, in order with the changes; whatever a
replaced master numbered after the era's base is rejected everywhere and, on that master, kept
in ``conflicts.json`` rather than lost (``tasync.consumers.recovery``).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Any, Protocol

from tasync.broker import topology
from tasync.broker.connection import RECOVERABLE, describe
from tasync.broker.epochs import EpochHistory, EpochMark, Era
from tasync.broker.errors import (
    BrokerUnreachable,
    ConfigError,
    NoAnswer,
    PublishError,
    RemoteError,
    SeatLost,
    TasyncError,
    TopologyMissing,
    UnfillableGap,
)
from tasync.broker.events import Event
from tasync.broker.messages import request_actor
from tasync.broker.protocol import ControlOp, Handler, Role
from tasync.broker.rpc import RpcClient
from tasync.broker.seat import MasterSeat
from tasync.broker.store import ApplyResult
from tasync.consumers.admission import Admission
from tasync.consumers.context import NodeContext
from tasync.consumers.recovery import Progress, RecoveryReport
from tasync.consumers.replay import Since, replay_into
from tasync.consumers.sync import SyncConsumer

log = logging.getLogger("tasync.roles")
#: Failures inside a request that become its error answer (``_answering``).
_FAILURES: tuple[type[BaseException], ...] = (*RECOVERABLE, sqlite3.Error)
#: The broker could not be asked: a decision about the seat waits until it can be.
_UNREACHABLE: tuple[type[BaseException], ...] = (BrokerUnreachable, TopologyMissing,
                                                  *RECOVERABLE)
#: Asking who the master is failed: nobody is known.
_UNKNOWN: tuple[type[BaseException], ...] = (TasyncError, *RECOVERABLE)
#: How long a promotion waits for the seat when a master holds it, by default. It covers the
#: broker noticing a hung master (about two seat heartbeats) with room to spare.
SEAT_WAIT_S = 30.0
#: How long the current master has to answer a promotion's request to step down. A live
#: master answers within milliseconds; a silent one is hung or cut off, and the promotion
#: then waits for the broker instead of for it.
STEP_DOWN_ASK_S = 2.0
#: How often a promotion waiting for the seat asks the broker again.
SEAT_POLL_S = 0.2


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


def _name_of_master(rpc: RpcClient) -> str | None:
    """The node that answers as master within a second, or None."""
    try:
        head = rpc.call_one(topology.MASTER, "head", timeout_s=1.0)
    except (NoAnswer, RemoteError):
        return None
    return str(head.get("node") or "") or None


class Outbox(Protocol):
    """What the roles need of the master's change relay (``tasync.producers.relay.ChangeRelay``).

    Declared here so consumers never import producers: the node hands its relay in.
    """

    def publish_outbox(self) -> int:
        """Publish every committed but unconfirmed change; returns how many."""

    def publish_mark(self, mark: EpochMark) -> None:
        """Publish a promotion's epoch mark with confirms."""

    def wake(self) -> None:
        """Have the background publisher look at the outbox now."""


class Roles:
    """The seat, promotion, step-down and the recovery requests of one node.

    Args:
        ctx: the node context.
        sync: the node's sync consumer (its lock serialises applying).
        seat: the node's hold on the master's seat.
        relay: commits and publishes when this node is the master.
        admission: this node's allow-lists: a node its own tasync.hosts denies never becomes
            master.
    """

    def __init__(self, ctx: NodeContext, sync: SyncConsumer, *, seat: MasterSeat,
                 relay: Outbox, admission: Admission | None = None) -> None:
        self.ctx = ctx
        self.admission = admission or Admission()
        self.sync = sync
        self.seat = seat
        self.relay = relay
        self.progress: Progress = ctx.progress
        self.recovery = sync.recovery
        ctx.hooks.newer_epoch.subscribe(self._on_newer_epoch)
        #: Serialises decisions about the seat (start, regain, promotion, step-down).
        self._lock = threading.RLock()

    def handlers(self) -> dict[ControlOp, Handler]:
        """The control requests served here (``head`` and ``step_down`` on the master only)."""
        handlers = {
            ControlOp.HEAD: self._head, ControlOp.SNAPSHOT: self._snapshot,
            ControlOp.RECOVER: self._recover, ControlOp.REPLAY: self._replay,
            ControlOp.PROMOTE: self._promote, ControlOp.STEP_DOWN: self._step_down,
            ControlOp.CONFLICTS: self._conflicts,
            ControlOp.CONFLICTS_RESOLVED: self._conflicts_resolved,
        }
        return {op: _answering(op, fn) for op, fn in handlers.items()}

    def status_extra(self) -> dict[str, Any]:
        """``status`` fields: open conflicts kept by this node, and whether it has the seat."""
        return {"conflicts": len(self.recovery.conflicts.open_entries()),
                "seat": self.seat.held}

    # -- starting as master -------------------------------------------------------------------

    def start(self, stop: threading.Event) -> None:
        """On a node asked to start as master: take the seat and the era, or become a backup.

        Called before the consumers start, so a node that may not be master never binds
        ``master`` nor publishes anything. While the broker is unreachable it waits (until
        ``stop``): deciding without the broker could make a second master.
        """
        while self.ctx.is_master:
            try:
                self._claim()
                return
            except _UNREACHABLE as exc:
                log.warning("cannot check the master's seat and the network's eras before "
                            "serving as master: %s; retrying", describe(exc))
                if stop.wait(2.0):
                    return

    def _claim(self) -> None:
        """Start as master if no era says otherwise (see the module docstring)."""
        node, store = self.ctx.node, self.ctx.store
        era = store.history.current
        if era is not None and era.origin != node:
            self._refuse(f"the newest era it knows is {era.origin}'s (epoch {era.epoch})",
                         owner=era.origin)
            return
        if not self.seat.take():
            holder = self._master_name()
            self._refuse("another node holds the master's seat"
                         + (f" ({holder} is the master)" if holder else ""), owner=holder)
            return
        try:
            self._keep_era(catch_up=True)
        except BaseException:
            self.seat.release()
            raise

    def _keep_era(self, *, catch_up: bool) -> bool:
        """With the seat: stay master if the change log's eras leave this node the newest one.

        Reads the log's head and eras; a newer era of another node makes this node step down
        (``_on_newer_epoch``). Else it opens the network's first era if there is none, catches
        up with what the log holds beyond its store (a master whose data directory was lost),
        and publishes its own unconfirmed changes. Returns whether it is still the master.
        """
        node, store = self.ctx.node, self.ctx.store
        view = self.recovery.log_view()
        self.recovery.learn(view.history, reason="committed by a master that had been replaced")
        era = store.history.current
        if not self.ctx.is_master:
            return False  # a newer era: stepped down while learning it
        if era is not None and era.origin != node:
            self.step_down(reason=f"the change log says {era.origin} owns epoch {era.epoch}",
                           by=era.origin)
            return False
        if catch_up and view.seq > store.last_seq:
            log.warning("the change log holds changes up to seq %d that this master's store "
                        "lacks (from %d): catching up first", view.seq, store.last_seq)
            self.recovery.catch_up(view.seq)
        if era is None:
            self._open_era(max(store.epoch, 1))
        if catch_up:  # starting: the relay's thread publishes the outbox from its mark
            self.relay.wake()
        else:  # regained: what was committed before goes out before anything new
            try:
                self.relay.publish_outbox()
            except PublishError as exc:
                log.warning("the outbox is not published yet (%s); the relay goes on trying",
                            exc)
                self.relay.wake()
        return True

    def _refuse(self, reason: str, *, owner: str | None) -> None:
        """Start as a backup although asked to start as master, and say why."""
        with self.ctx.store.lock:
            self.ctx.store.set_meta(role=Role.BACKUP)
        self.ctx.trail.event(Event.MASTER_REFUSED, reason=reason, owner=owner)
        log.warning("not starting as master: %s; running as a backup (promote it with "
                    "`tasync promote %s` if it should take over)", reason, self.ctx.node)

    def _master_name(self) -> str | None:
        """The name of the node bound as master, if one answers at once."""
        try:
            with self.recovery.rpc() as rpc:
                return _name_of_master(rpc)
        except _UNKNOWN:
            return None

    # -- keeping the seat ---------------------------------------------------------------------

    def keep_seat(self) -> bool:
        """Before acting as master: check the seat, take it back if it was lost, or step down.

        The control server calls this before it binds ``master`` and before every request
        that only the master answers, so a master that was stopped or cut off never acts on
        a request from before: it finds the seat gone and either takes it back (nobody else
        took it, and the log shows no newer era) or steps down first.

        Returns:
            Whether this node is (still) the master.

        Raises:
            BrokerUnreachable, OSError, amqp errors: the broker could not be asked; the caller
                retries once it can reach the broker again.
        """
        with self._lock:
            if not self.ctx.is_master:
                return False
            if self.seat.held:
                try:
                    self.seat.check()
                    return True
                except SeatLost:
                    pass
            reason = self.seat.lost_reason or "the seat was lost"
            if not self.seat.take():
                self.step_down(reason=f"lost the master's seat ({reason}) and another node "
                                      "holds it now", by=self._master_name())
                return False
            try:
                kept = self._keep_era(catch_up=False)
            except BaseException:
                self.seat.release()
                raise
            if kept:
                self.ctx.trail.event(Event.MASTER_SEAT_REGAINED, reason=reason,
                                     epoch=self.ctx.store.epoch)
                log.warning("took the master's seat back (%s)", reason)
            return kept

    def _on_newer_epoch(self, history: EpochHistory) -> None:
        era = history.current
        if self.ctx.is_master and era is not None and era.origin != self.ctx.node:
            self.step_down(reason=f"epoch {era.epoch} of {era.origin} is newer", by=era.origin)

    def step_down(self, *, reason: str, by: str | None = None) -> None:
        """Become a backup: refuse changes from now on and give the seat up."""
        store = self.ctx.store
        with self._lock:
            with store.lock:
                store.set_meta(role=Role.BACKUP)
            self.seat.release()
        self.ctx.trail.event(Event.MASTER_STEPPED_DOWN, reason=reason, by=by, epoch=store.epoch,
                             seq=store.last_seq, unconfirmed=store.unpublished_count or None)
        log.warning("stepped down to backup: %s", reason)
        self._changed()

    def _changed(self) -> None:
        self.sync.on_applied(ApplyResult(0, 0, self.ctx.store.last_seq))

    # -- promotion ----------------------------------------------------------------------------

    def _promote(self, args: dict[str, Any]) -> dict[str, Any]:
        """Make this node the master; who asked (``by``, when the client names them) is audited.

        ``master.promoted`` carries the name, as ``change.committed`` does for a change.
        """
        ctx, store = self.ctx, self.ctx.store
        by = request_actor(args)
        if ctx.is_master and self.keep_seat():
            return {"node": ctx.node, "epoch": store.epoch, "base_seq": store.last_seq,
                    "already": True, "previous": None, "fenced": "free", "drained": 0,
                    "waited_s": 0.0}
        self._check_may_be_master()
        if store.diverged:
            raise ConfigError(f"{ctx.node} holds changes the network never accepted; run "
                              f"tasync recover --node {ctx.node} first")
        started = time.monotonic()
        previous, fenced = self._take_seat(float(args.get("seat_wait_s") or SEAT_WAIT_S))
        try:
            with self.sync.locked():
                view = self.recovery.log_view()
                self.recovery.learn(view.history, reason="disowned by a newer epoch")
                self.progress({"stage": "draining", "done": store.last_seq, "total": view.seq})
                try:
                    drained = self.recovery.catch_up(view.seq, progress=self.progress)
                except UnfillableGap as exc:
                    raise ConfigError(f"{ctx.node} cannot drain every confirmed change "
                                      f"({exc}); run tasync recover --node {ctx.node} first"
                                      ) from None
                epoch = self._open_era(max(store.epoch, store.history.max_epoch) + 1)
        except BaseException:
            self.seat.release()
            raise
        ctx.trail.event(Event.MASTER_PROMOTED, epoch=epoch, base_seq=store.last_seq,
                        previous=previous, drained=drained, by=by)
        log.warning("promoted to master: epoch %d from seq %d", epoch, store.last_seq)
        self._changed()
        self.relay.publish_outbox()  # its own committed rows the broker never confirmed, if any
        return {"node": ctx.node, "epoch": epoch, "base_seq": store.last_seq, "already": False,
                "previous": previous, "fenced": fenced, "drained": drained,
                "waited_s": round(time.monotonic() - started, 3)}

    def _check_may_be_master(self) -> None:
        """Refuse, before touching the seat, a promotion this node's tasync.hosts forbids.

        Promoting it anyway would step the current master down and then leave the network
        with a master whose changes every node that shares the list rejects.
        """
        decision = self.admission.may_be_master(self.ctx.node)
        if decision is not None and not decision.allowed:
            self.ctx.trail.event(Event.MASTER_PROMOTION_REFUSED, reason=decision.reason)
            raise ConfigError(f"{self.ctx.node} may not act as master: {decision.reason} "
                              "(its tasync.hosts or --master); nothing was changed")

    def _take_seat(self, wait_s: float) -> tuple[str | None, str]:
        """Take the seat for a promotion.

        Returns:
            The master it replaces when that one answered, and how the seat was freed:
            ``free`` (nobody held it), ``stepped_down`` (the master gave it up when asked) or
            ``dropped`` (the master did not answer; the broker dropped its connection).

        Raises:
            ConfigError: another candidate became master meanwhile, or the seat stayed taken
                for ``wait_s`` (nothing was changed).
        """
        if self.seat.take():
            return None, "free"
        epoch_before = self.ctx.store.history.max_epoch
        started = time.monotonic()
        self.progress({"stage": "asking the master to step down", "done": 0, "total": 0})
        with self.recovery.rpc() as rpc:
            previous = self._ask_master_to_step_down(rpc)
            next_look = 0.0
            while not self.seat.take():
                waited = time.monotonic() - started
                newer = self.ctx.store.history.current
                if (newer is not None and newer.epoch > epoch_before
                        and newer.origin != self.ctx.node):
                    raise ConfigError(f"{newer.origin} became the master meanwhile (epoch "
                                      f"{newer.epoch}); {self.ctx.node} stays a backup")
                if waited >= next_look:  # who answers as master now? (a concurrent winner)
                    next_look = waited + 1.0
                    holder = _name_of_master(rpc)
                    if holder is not None and holder not in (previous, self.ctx.node):
                        raise ConfigError(f"{holder} took the master's seat first; "
                                          f"{self.ctx.node} stays a backup")
                if waited > wait_s:
                    why = ("the master did not answer (hung or cut off) and the broker still "
                           "gives it the master's seat" if previous is None else
                           f"{previous} stepped down but the seat is still held")
                    raise ConfigError(f"{why} after {wait_s:g} s; nothing was changed: promote "
                                      "again with a longer --timeout, or stop the old master")
                self.progress({"stage": "waiting for the master's seat",
                               "done": round(waited, 1), "total": wait_s})
                time.sleep(SEAT_POLL_S)
        return previous, "stepped_down" if previous else "dropped"

    def _ask_master_to_step_down(self, rpc: RpcClient) -> str | None:
        """Ask the current master to step down; its name when it did, None when silent.

        The request expires quickly: a master that was hung and resumes much later must not
        act on it (it finds its seat gone instead, ``keep_seat``).
        """
        known = self.ctx.store.history.max_epoch
        try:
            head = rpc.call_one(topology.MASTER, "step_down",
                                {"by": self.ctx.node, "epoch": known,
                                 "expires_at": time.time() + STEP_DOWN_ASK_S},
                                timeout_s=STEP_DOWN_ASK_S)
        except (NoAnswer, RemoteError) as exc:
            self.progress({"stage": "the master does not answer (hung or cut off): waiting "
                                    "for the broker to drop its connection",
                           "done": 0, "total": 0})
            log.warning("the master did not step down (%s); waiting for the broker to free "
                        "its seat", exc)
            return None
        if head.get("ignored") and int(head.get("epoch", 0)) > known:
            raise ConfigError(f"{head.get('node')} became the master meanwhile (epoch "
                              f"{head.get('epoch')}); {self.ctx.node} stays a backup")
        return str(head.get("node") or "") or None

    def _open_era(self, epoch: int) -> int:
        """Publish a new era's mark on the seat's connection, then take the master's role."""
        store = self.ctx.store
        history = store.history.learn(Era(epoch, store.last_seq, self.ctx.node))
        mark = EpochMark(epoch=epoch, base_seq=store.last_seq, origin=self.ctx.node,
                         ts=time.time(), eras=tuple(
                             (e.epoch, e.base, e.origin) for e in history.eras))
        self.relay.publish_mark(mark)
        with store.lock:
            store.set_history(history)
            store.set_meta(role=Role.MASTER)
        self.ctx.trail.event(Event.ERA_OPENED, epoch=epoch, base_seq=store.last_seq)
        return epoch

    def _step_down(self, args: dict[str, Any]) -> dict[str, Any]:
        by = str(args.get("by") or "") or None
        if int(args.get("epoch") or 0) < self.ctx.store.epoch:
            # Asked by a candidate that looked before this node's own promotion: two
            # promotions at once, and this one won. The other one stops.
            self.ctx.trail.event(Event.MASTER_STEP_DOWN_IGNORED, by=by,
                                 reason="asked about an older epoch")
            return {**self._head({}), "ignored": True}
        if time.time() > float(args.get("expires_at") or "inf"):
            # The promotion that asked gave up long ago (this node was hung): it does not
            # act on it; if it lost its seat meanwhile, keep_seat already settled that.
            self.ctx.trail.event(Event.MASTER_STEP_DOWN_IGNORED, by=by, reason="expired request")
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
        """Bring this node to the master's state; who asked (``by``) is audited, as promotion's."""
        ctx, store = self.ctx, self.ctx.store
        by = request_actor(args)
        if ctx.is_master and self.keep_seat():
            report = RecoveryReport(node=ctx.node, before_seq=store.last_seq,
                                    after_seq=store.last_seq, target_seq=store.last_seq,
                                    note=f"{ctx.node} is the master: its state is the reference")
        else:
            source = args.get("source")
            report = self.recovery.recover(source=str(source) if source else None,
                                           snapshot=bool(args.get("snapshot")),
                                           progress=self.progress, reason="request", by=by)
        return {**report.to_dict(), "role": ctx.role, "epoch": store.epoch,
                "seq": store.last_seq, "checksum": store.checksum(),
                "conflicts": self.recovery.conflicts.open_entries(),
                "conflicts_file": str(self.recovery.conflicts.path)}

    def _replay(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.ctx.is_master:
            raise ConfigError(f"{self.ctx.node} is the master: the change log is its own "
                              "output, there is nothing to replay into it")
        return replay_into(self.recovery, Since.from_args(args), progress=self.progress,
                           by=request_actor(args))

    def _conflicts(self, _args: dict[str, Any]) -> dict[str, Any]:
        return {"node": self.ctx.node, "conflicts": self.recovery.conflicts.entries(),
                "file": str(self.recovery.conflicts.path)}

    def _conflicts_resolved(self, args: dict[str, Any]) -> dict[str, Any]:
        done = args.get("done")
        if not isinstance(done, list):
            raise ConfigError("conflicts_resolved needs a list 'done'")
        return {"resolved": self.recovery.conflicts.resolve(done)}
