"""Bringing a node to the network's state: replay from the change log, else a snapshot.

One procedure serves every case of ``tasync recover`` (docs/operations.md) and of a worker's
start: a backup that was down, a brand-new node, a node whose queue was lost, a returning old
master. It asks the master (else the change log's tail) where the network stands and which eras
it knows; it keeps any local change the eras disown in ``conflicts.json`` (``consumers.
conflicts``) and marks the node diverged; then it replays the missing changes from the change
log when the log still reaches back, and otherwise (or when diverged, or when asked) installs a
snapshot from the master or the most advanced peer and replays the log's tail after it.

Everything runs under the sync consumer's lock, so queue deliveries wait rather than interleave
with a snapshot, and a seq is never applied twice.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import amqp.exceptions

from tasync.broker import topology
from tasync.broker.connection import close_quietly, connect
from tasync.broker.epochs import EpochHistory, EpochMark
from tasync.broker.errors import ConfigError, GapError, NoAnswer, RemoteError, UnfillableGap
from tasync.broker.events import Event
from tasync.broker.messages import ChangeBatch
from tasync.broker.rpc import RpcClient
from tasync.broker.store import ApplyResult
from tasync.broker.stream import log_head, read_changelog
from tasync.consumers.conflicts import ConflictFile
from tasync.consumers.context import NodeContext
from tasync.consumers.snapshots import fetch_snapshot

log = logging.getLogger("tasync.sync")
#: How far before the last applied change a change-log read starts (clock skew between hosts).
REWIND_S = 300.0
#: Most changes a catch-up applies in one transaction (consecutive change-log batches merged).
MERGE_CHANGES = 10_000
#: Progress callbacks are called at most this often.
PROGRESS_EVERY_S = 0.25
Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class NetworkView:
    """Where the network stands: the newest confirmed seq and the eras, and who said so."""

    seq: int
    history: EpochHistory
    master: str | None
    checksum: str | None = None


@dataclass
class RecoveryReport:
    """What one recovery did, as ``tasync recover`` prints it."""

    node: str
    method: str = "none"
    before_seq: int = 0
    after_seq: int = 0
    target_seq: int = 0
    applied: int = 0
    snapshot: dict[str, Any] | None = None
    new_conflicts: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


class Ticker:
    """Calls a progress callback with ``done``/``total`` at most every ``PROGRESS_EVERY_S``."""

    def __init__(self, progress: Progress | None, total: int, stage: str) -> None:
        self.progress, self.total, self.stage = progress, total, stage
        self.done = 0
        self._last = 0.0

    def add(self, count: int) -> None:
        """Count ``count`` more done; report when the last report is old enough."""
        self.done += count
        now = time.monotonic()
        if self.progress is not None and now - self._last >= PROGRESS_EVERY_S:
            self._last = now
            self.progress({"stage": self.stage, "done": self.done, "total": self.total})


class Applier(Protocol):
    """What recovery needs of the node's sync consumer (``tasync.consumers.sync.SyncConsumer``).

    Declared here so the sync consumer can own a ``Recovery`` without the two modules needing
    each other.
    """

    on_applied: Callable[[ApplyResult], None]

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the apply lock."""

    def apply_batch(self, batch: ChangeBatch, *, replayed: bool, force: bool = False,
                    notify: bool = True) -> ApplyResult:
        """Judge and apply one batch."""

    def accept_mark(self, mark: EpochMark) -> bool:
        """Learn a promotion's eras; returns whether they were news."""


class Recovery:
    """The recovery procedure of one node; its sync consumer applies what it finds.

    When it learns an epoch newer than the node's own it calls ``ctx.hooks.newer_epoch``
    before keeping conflicts (the node's roles step a master down there).

    Attributes:
        conflicts: the node's ``conflicts.json``.
    """

    def __init__(self, ctx: NodeContext, sync: Applier) -> None:
        self.ctx = ctx
        self.sync = sync
        self.settings = ctx.settings
        self.conflicts = ConflictFile(ctx.data_dir, ctx.trail)

    # -- where the network stands -------------------------------------------------------------

    @contextlib.contextmanager
    def rpc(self) -> Iterator[RpcClient]:
        """A request client on a connection of its own, closed afterwards."""
        conn = connect(self.settings, name=f"tasync-recovery-{self.ctx.node}", retry_s=5.0)
        try:
            yield RpcClient(conn, sender=self.ctx.node)
        finally:
            close_quietly(conn)

    def network_view(self) -> NetworkView:
        """The master's head when a master of at least this node's epoch answers, else the log's.

        A master of an older epoch is stale: its word is ignored.
        """
        store = self.ctx.store
        with self.rpc() as rpc:
            try:
                # The master's checksum is only compared at an equal seq (``_drifted``).
                head = rpc.call_one(topology.MASTER, "head", {"checksum_at": store.last_seq},
                                    timeout_s=2.0)
            except (NoAnswer, RemoteError, amqp.exceptions.NotFound):
                head = None  # NotFound: no control exchange yet, a network's very first start
        if head is not None and head.get("node") != self.ctx.node \
                and int(head["epoch"]) >= store.epoch:
            history = EpochHistory.from_list(head.get("eras", []))
            return NetworkView(int(head["seq"]), history, str(head.get("node")),
                               head.get("checksum"))
        return self.log_view()

    def log_view(self) -> NetworkView:
        """The change log's newest legitimate seq and the eras its marks announce."""
        seq, history = log_head(self.settings, self.ctx.store.history)
        return NetworkView(seq, history, None)

    # -- eras and conflicts -------------------------------------------------------------------

    def learn(self, history: EpochHistory, *, reason: str) -> list[dict[str, Any]]:
        """Adopt the network's eras; keep every local change they disown as a conflict.

        Returns the conflicts newly kept. The network's word on an epoch wins over this node's.
        """
        store = self.ctx.store
        with store.lock:
            old, old_epoch = store.history, store.epoch
            new = history.merge(old)
            if new == old:
                return []  # rows are only ever added in their own era: nothing new to judge
            store.set_history(new)
        for era in new.eras:
            if era not in old.eras:
                self.ctx.trail.event(Event.ERA_LEARNED, epoch=era.epoch, base_seq=era.base,
                                     origin=era.origin)
        if new.max_epoch > old_epoch:
            self.ctx.hooks.newer_epoch(new)
        later = [e.base for e in new.eras[1:]]
        if not later:
            return []
        disowned = [c for c in store.changes_between(min(later))
                    if not new.is_legit(c.epoch, c.seq, c.origin)]
        if not disowned:
            return []
        kept = self.conflicts.keep(disowned, reason=reason)
        store.set_aside(disowned)
        log.warning("kept %d changes the network never accepted in conflicts.json (%s)",
                    len(disowned), reason)
        return kept

    # -- replay from the change log -----------------------------------------------------------

    def catch_up(self, target: int | None = None, *, progress: Progress | None = None) -> int:
        """Apply every change up to ``target`` (default: the network's head) from the change log.

        Returns:
            The number of changes applied.

        Raises:
            UnfillableGap: the log no longer holds the first missing change, or the node turned
                out to hold conflicting changes (it needs a snapshot either way).
        """
        store = self.ctx.store
        target = self.network_view().seq if target is None else target
        if store.last_seq >= target:
            return 0
        log.info("catching up from seq %d to %d through the change log", store.last_seq, target)
        ticker = Ticker(progress, target - store.last_seq, "replay")
        offset = self._start_offset()
        try:
            applied = self._read_from(offset, target, ticker)
            if store.last_seq < target and offset != "first" and not store.diverged:
                applied += self._read_from("first", target, ticker)
        finally:
            if ticker.done:
                self.sync.on_applied(ApplyResult(ticker.done, 0, store.last_seq))
        if store.diverged:
            raise UnfillableGap("this node holds changes the network never accepted")
        if store.last_seq < target:
            raise UnfillableGap(
                f"the change log does not reach back to seq {store.last_seq + 1}; "
                f"holding {store.last_seq}, need {target}: recover from a snapshot"
            )
        self.ctx.trail.event(Event.RECOVERY_CAUGHT_UP, seq=store.last_seq, applied=applied)
        return applied

    def _start_offset(self) -> Any:
        store = self.ctx.store
        if store.last_seq == 0 or store.last_ts <= 0:
            return "first"
        return dt.datetime.fromtimestamp(max(0.0, store.last_ts - REWIND_S), dt.UTC)

    def _read_from(self, offset: Any, target: int, ticker: Ticker) -> int:
        """Apply the log from ``offset`` until ``target``, consecutive batches merged.

        The master sends up to 1,000 changes a message; a catch-up applies up to
        ``MERGE_CHANGES`` consecutive ones (same epoch and origin, seqs without a hole) in one
        transaction, which saves a commit and its fsync, and the judging and logging, per
        message. Anything else (a mark, a repeat, another era) first applies what is pending,
        so the order of the log is kept exactly.
        """
        store = self.ctx.store
        applied = 0
        pending: list[ChangeBatch] = []

        def flush() -> bool:
            """Apply what is pending as one batch; returns whether to keep reading."""
            nonlocal applied
            if pending:
                merged = pending[0] if len(pending) == 1 else ChangeBatch(
                    epoch=pending[0].epoch, origin=pending[0].origin,
                    changes=tuple(c for b in pending for c in b.changes))
                pending.clear()
                try:
                    result = self.sync.apply_batch(merged, replayed=True, notify=False)
                except GapError:
                    return False  # started too late in the log, or it no longer reaches back
                applied += result.applied
                ticker.add(result.applied)
            return store.last_seq < target and not store.diverged

        def on_batch(batch: ChangeBatch) -> bool:
            if not pending and batch.last_seq <= store.last_seq:
                return True
            if pending and not _follows(pending[-1], batch) and not flush():
                return False
            pending.append(batch)
            if sum(len(b.changes) for b in pending) >= MERGE_CHANGES or batch.last_seq >= target:
                return flush()
            return True

        def on_mark(mark: EpochMark) -> bool:
            if pending and not flush():
                return False  # what was pending reached the target, or hit a gap
            self.sync.accept_mark(mark)
            return not store.diverged

        try:
            read_changelog(self.settings, offset=offset, on_batch=on_batch, on_mark=on_mark,
                           idle_s=2.0)
        finally:
            flush()  # the log went quiet (or broke) with changes still pending
        return applied

    # -- the one recovery procedure -----------------------------------------------------------

    def recover(self, *, source: str | None = None, snapshot: bool = False,
                progress: Progress | None = None, reason: str = "request",
                by: str | None = None) -> RecoveryReport:
        """Bring this node to the network's head; see the module docstring for the choices.

        Args:
            source: the node to take a snapshot from when one is needed (default: the master,
                else the most advanced peer).
            snapshot: install a snapshot even when the log could fill the gap (repairs a node
                whose objects drifted from its seq).
            progress: called with ``{"stage", "done", "total"}`` while replaying.
            reason: why, for the trail.
            by: who asked, when the client names them (the console's user); the trail line
                then names them, and is written even when nothing needed doing, so an auditor
                sees every recovery a person asked for.
        """
        store = self.ctx.store
        with self.sync.locked():
            report = RecoveryReport(node=self.ctx.node, before_seq=store.last_seq)
            view = self.network_view()
            report.target_seq = view.seq
            report.new_conflicts = self.learn(view.history, reason="disowned by a newer epoch")
            if not (snapshot or store.diverged) and store.last_seq < view.seq:
                try:
                    report.applied = self.catch_up(view.seq, progress=progress)
                    report.method = "log"
                except UnfillableGap as exc:
                    report.note = str(exc)
            if self._drifted(view):
                report.note = f"its objects differed from the master's at seq {view.seq}"
                snapshot = True
            if snapshot or store.diverged or store.last_seq < view.seq:
                report.method = "snapshot"
                report.snapshot, tail, kept = self.install_snapshot(source, view,
                                                                    progress=progress)
                report.new_conflicts += kept
                report.applied += tail
            report.after_seq = store.last_seq
            if report.method != "none" or report.new_conflicts or by is not None:
                self.ctx.trail.event(Event.RECOVERY_DONE, method=report.method, reason=reason,
                                     by=by,
                                     from_seq=report.before_seq, to_seq=report.after_seq,
                                     applied=report.applied,
                                     conflicts=len(report.new_conflicts) or None)
            return report

    def _drifted(self, view: NetworkView) -> bool:
        """Same seq as the master but other objects: the store was changed behind its back."""
        store = self.ctx.store
        return (view.checksum is not None and not store.diverged
                and store.last_seq == view.seq and store.checksum(fresh=True) != view.checksum)

    def fill_gap(self, target: int) -> None:
        """A live batch revealed a gap: replay up to ``target``, or recover when that fails."""
        try:
            self.catch_up(target)
        except UnfillableGap as exc:
            log.warning("%s; recovering", exc)
            self.recover(reason="gap")

    # -- snapshots ----------------------------------------------------------------------------

    def install_snapshot(self, source: str | None, view: NetworkView, *,
                         progress: Progress | None = None
                         ) -> tuple[dict[str, Any], int, list[dict[str, Any]]]:
        """Replace this node's state with a peer's, then replay the log's tail after it.

        Returns:
            What was installed (source, seq, objects), how many tail changes were applied, and
            the conflicts newly kept because the source's eras disown local changes.
        """
        store = self.ctx.store
        if source == self.ctx.node:
            raise ConfigError("a node cannot recover from its own snapshot; name another node")
        with self.rpc() as rpc:
            data = fetch_snapshot(rpc, node=self.ctx.node, epoch=store.epoch, source=source)
        history = EpochHistory.from_list(data["eras"])
        kept = self.learn(history, reason="disowned by the snapshot source's eras")
        objects = [(str(k), str(n), b) for k, n, b in data["objects"]]
        store.replace_all(objects, seq=int(data["seq"]), epoch=int(data["epoch"]),
                          ts=float(data["ts"]), history=history)
        if data.get("checksum") and store.checksum() != data["checksum"]:
            raise ConfigError(f"the snapshot from {data['node']} did not install identically")
        self.ctx.trail.event(Event.RECOVERY_SNAPSHOT_INSTALLED, source=data["node"],
                             seq=data["seq"], objects=len(objects), checksum=store.checksum()[:16])
        self.sync.on_applied(ApplyResult(0, 0, store.last_seq))  # state changed, no seq
        tail = 0
        if store.last_seq < view.seq:
            tail = self.catch_up(view.seq, progress=progress)
        info = {"source": data["node"], "seq": int(data["seq"]), "objects": len(objects)}
        return info, tail, kept


def _follows(prev: ChangeBatch, batch: ChangeBatch) -> bool:
    """Whether ``batch`` continues ``prev`` exactly: same era, the next seq on."""
    return (batch.epoch == prev.epoch and batch.origin == prev.origin
            and batch.first_seq == prev.last_seq + 1)
