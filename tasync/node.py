"""The node runtime: one ``tasync-worker`` process and the threads it runs.

A node opens its store, decides its role, then runs one consumer per concern, each on its own
connection and thread (sync, control, delivery). The main thread only waits for a signal and
refreshes ``status.json``; SIGTERM stops the consumers, lets in-flight work finish and closes
the store, so a clean stop never leaves a half-applied batch.

A store that cannot be read (overwritten, truncated) is moved aside on a backup, kept for
inspection, and the node rebuilds its state from the network like a new node; a node asked to
start as master refuses to, because its store is the only copy of what it had not published.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

from tasync.broker.allowlist import ALERT_HOSTS_FILE
from tasync.broker.audit import Trail, setup_sync_log
from tasync.broker.connection import close_quietly, connect
from tasync.broker.errors import BrokerUnreachable, ConfigError, StoreDamaged
from tasync.broker.events import Event
from tasync.broker.protocol import Role
from tasync.broker.seat import MasterSeat
from tasync.broker.settings import Settings, failpoint_from_env
from tasync.broker.signing import KeyRing
from tasync.broker.store import DB_NAME, ApplyResult, NodeStore
from tasync.broker.topology import check_node_name
from tasync.consumers.admission import Admission
from tasync.consumers.context import NodeContext
from tasync.consumers.control import ControlServer
from tasync.consumers.delivery.worker import DeliveryConsumer
from tasync.consumers.roles import Roles
from tasync.consumers.sync import SyncConsumer
from tasync.consumers.totals import Totals
from tasync.producers.relay import ChangeRelay, RelayFaults

log = logging.getLogger("tasync.node")


@dataclass(frozen=True, kw_only=True)
class NodeOptions:
    """What ``tasync-worker`` was told on its command line."""

    node: str
    data_dir: Path
    role: str | None = None
    verbose: bool = False
    key_file: Path | None = None
    hosts_file: Path | None = None
    single_master: str | None = None
    conf_hosts_file: Path | None = None
    alert_hosts_file: Path | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"


class Component(Protocol):
    """A part of the node with a thread of its own: the sync, control and delivery consumers."""

    stop_event: threading.Event

    def start(self) -> threading.Thread:
        """Start serving in a thread of its own."""

    def stop(self, timeout_s: float = ...) -> None:
        """Stop serving and wait (up to ``timeout_s``) for the thread."""


class Node:
    """Builds the context and runs the consumers until ``stop``."""

    def __init__(self, settings: Settings, options: NodeOptions) -> None:
        check_node_name(options.node)
        self.options = options
        data_dir = options.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        setup_sync_log(data_dir, options.node, verbose=options.verbose)
        trail = Trail(data_dir, options.node)
        store = _open_store(data_dir, options, trail)
        keyring = KeyRing.load(options.key_file) if options.key_file else None
        self.ctx = NodeContext(settings=settings, node=options.node, data_dir=data_dir,
                               store=store, trail=trail, keyring=keyring)
        self._init_role(options.role)
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self.changes_applied = 0
        self.seat = MasterSeat(settings, node=options.node)
        self.relay = ChangeRelay(store, node=options.node, seat=self.seat, keyring=keyring,
                                 batch_max_changes=settings.batch_max_changes,
                                 batch_max_bytes=settings.batch_max_bytes,
                                 window_bytes=settings.publish_window_bytes,
                                 progress=self.ctx.progress,
                                 faults=RelayFaults(failpoint_from_env(), _crash))
        self.admission = self._admission(options)
        self.totals = Totals(self.ctx)
        self.delivery = DeliveryConsumer(self.ctx, totals=self.totals,
                                         senders=self.admission.senders)
        self.sync = SyncConsumer(self.ctx, on_applied=self._applied,
                                 admit=self.admission.admit_batch, own=self.relay)
        self.roles = Roles(self.ctx, self.sync, seat=self.seat, relay=self.relay,
                           admission=self.admission)
        self.control = ControlServer(
            self.ctx, committer=self.relay, keep_seat=self.roles.keep_seat,
            handlers={**self.roles.handlers(), **self.delivery.control_handlers()},
            authorize=self.admission.admit_config_request, on_committed=self._dirty.set,
            status_extra=self.roles.status_extra)
        #: Started in this order after the seat is settled; stopped together (all are told
        #: first, then each is waited for), so one slow part does not hold the others.
        self.consumers: tuple[Component, ...] = (self.sync, self.control, self.delivery)

    def _init_role(self, role: str | None) -> None:
        """Take the command line's role as a wish: ``master`` is checked at start (``Roles``)."""
        if role not in (None, *Role):
            raise ConfigError(f"unknown role {role!r}: use master or backup")
        if role is not None:
            self.ctx.store.set_meta(role=role)

    def _admission(self, options: NodeOptions) -> Admission:
        alert_hosts = options.alert_hosts_file
        if alert_hosts is None and (options.data_dir / ALERT_HOSTS_FILE).exists():
            alert_hosts = options.data_dir / ALERT_HOSTS_FILE
        store = self.ctx.store
        admission = Admission.from_options(
            hosts_file=options.hosts_file, single_master=options.single_master,
            conf_hosts_file=options.conf_hosts_file, alert_hosts_file=alert_hosts,
            is_node=lambda name: store.get("node", name) is not None,
        )
        decision = admission.may_be_master(options.node)
        if self.ctx.is_master and decision is not None and not decision.allowed:
            self.ctx.trail.event(Event.MASTER_REFUSED, reason=decision.reason)
            raise ConfigError(f"{options.node} may not act as master: {decision.reason}")
        if admission.open:
            self.ctx.trail.event(Event.NODE_SECURITY_OPEN,
                                 reason="no --hosts-file or --master: any master is accepted")
        return admission

    @property
    def lag_changes(self) -> int | None:
        """How many changes this node is behind the master (metrics); None when unknown."""
        return self.ctx.lag_changes

    def _applied(self, result: ApplyResult) -> None:
        """Count and refresh the status file; the delivery worker follows the routes itself."""
        self.changes_applied += result.applied
        self._dirty.set()

    def run(self) -> None:
        """Start every consumer and serve until SIGTERM or SIGINT."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        if self.options.metrics_port is not None:
            from tasync.metrics import start_metrics_server

            start_metrics_server(self.options.metrics_port, self, host=self.options.metrics_host)
        ctx = self.ctx
        ctx.trail.event(Event.NODE_STARTED, role=ctx.role, epoch=ctx.store.epoch,
                        seq=ctx.store.last_seq)
        log.info("starting as %s (epoch %d, seq %d)", ctx.role, ctx.store.epoch,
                 ctx.store.last_seq)
        self._report_broker()
        self.roles.start(self._stop)  # takes the seat, or starts as a backup and says why
        self.relay.start()  # publishes what the outbox still holds, in the background
        for consumer in self.consumers:
            consumer.start()
        was_ready = False
        ctx.write_status_file()
        while not self._stop.wait(0.2):
            serving = self.sync.caught_up.is_set() and self.control.connected.is_set()
            if not was_ready and serving:
                ctx.ready.set()
                was_ready = True
                ctx.trail.event(Event.NODE_READY, seq=ctx.store.last_seq)
                log.info("ready at seq %d", ctx.store.last_seq)
                self._dirty.set()
            if self._dirty.is_set():
                # The checksum and count are kept by the store, so the file is cheap to write
                # after every applied batch, whatever the configuration's size.
                self._dirty.clear()
                ctx.write_status_file()
        self.stop()

    def _report_broker(self) -> None:
        """Say at once, on stderr too, when the broker cannot be reached or refuses us.

        The consumers retry for seconds before they report, and a master first waits to learn
        the network's epoch; one attempt here tells the operator right away (an unreachable
        broker, a wrong vhost, a refused login). The consumers go on retrying either way.
        """
        try:
            conn = connect(self.ctx.settings, name=f"tasync-start-{self.ctx.node}", retry_s=0.0)
        except BrokerUnreachable as exc:
            log.warning("%s; retrying", exc, extra={"problem": str(exc)})
            return
        close_quietly(conn)

    def stop(self) -> None:
        """Stop consumers, close connections and the store."""
        log.info("stopping")
        for consumer in self.consumers:
            consumer.stop_event.set()
        for consumer in self.consumers:
            consumer.stop()
        self.relay.stop()
        self.seat.close()
        self.ctx.trail.event(Event.NODE_STOPPED, seq=self.ctx.store.last_seq)
        self.ctx.ready.clear()
        self.ctx.write_status_file()
        self.ctx.store.close()


def _open_store(data_dir: Path, options: NodeOptions, trail: Trail) -> NodeStore:
    """Open the node's store; a backup's unreadable store is moved aside and started afresh.

    A backup holds nothing the network lacks, so an empty store that catches up (from the
    change log, or a snapshot) rebuilds it exactly. A master may hold committed changes the
    broker never confirmed, so a node asked to start as master refuses instead.

    Raises:
        ConfigError: the store is unreadable and the node was asked to start as master.
    """
    try:
        return NodeStore(data_dir, durable=True, verify=True)
    except StoreDamaged as exc:
        if options.role == Role.MASTER:
            raise ConfigError(
                f"{exc}; it will not start as master on a store it cannot read. To rebuild it "
                "from the network, start it as a backup (without --role master): it moves the "
                "damaged file aside and catches up; meanwhile make another node the master "
                "with tasync promote NODE") from None
        aside = _move_aside(data_dir)
        trail.event(Event.NODE_STORE_DAMAGED, reason=exc.reason, moved_to=aside.name)
        log.error("%s; moved it aside to %s and rebuilding this node's state from the network",
                  exc, aside)
        return NodeStore(data_dir, durable=True)


def _move_aside(data_dir: Path) -> Path:
    """Rename ``node.db`` and its WAL files to ``node.db.damaged-<time>``; return the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = data_dir / f"{DB_NAME}.damaged-{stamp}"
    for suffix in ("", "-wal", "-shm"):
        source = data_dir / f"{DB_NAME}{suffix}"
        if source.exists():
            os.replace(source, data_dir / f"{target.name}{suffix}")
    return target


def _crash(reason: str) -> NoReturn:
    """End the process at once, as a SIGKILL would (the faults the tests inject)."""
    log.error("%s", reason)
    os._exit(70)
