"""Every event the audit trail records: one home, one convention, each name searchable.

A trail line reads ``TIMESTAMP NODE EVENT key=value ...``; ``EVENT`` is ``area.what``, where
the area is what the event is about (``node``, ``master``, ``era``, ``change``, ``recovery``,
``alert``, ``alertmanager``). Code writes ``Event.MASTER_PROMOTED``, never a string, so
``grep -rn MASTER_PROMOTED`` finds every place that records a promotion and a typo cannot
create a new event; an operator greps the value (``grep ' master.promoted '``).
docs/operations.md lists them all, and a test keeps that list and this one equal.
"""

from __future__ import annotations

import enum


class Event(enum.StrEnum):
    """A trail event; its value is what the line says."""

    # a node's life
    NODE_STARTED = "node.started"
    NODE_READY = "node.ready"
    NODE_STOPPED = "node.stopped"
    NODE_REGISTERED = "node.registered"
    NODE_SECURITY_OPEN = "node.security_open"
    NODE_STORE_DAMAGED = "node.store_damaged"

    # the master's role and seat
    MASTER_PROMOTED = "master.promoted"
    MASTER_STEPPED_DOWN = "master.stepped_down"
    MASTER_STEP_DOWN_IGNORED = "master.step_down_ignored"
    MASTER_REFUSED = "master.refused"
    MASTER_PROMOTION_REFUSED = "master.promotion_refused"
    MASTER_SEAT_REGAINED = "master.seat_regained"

    # eras (epochs) of the network
    ERA_OPENED = "era.opened"
    ERA_LEARNED = "era.learned"

    # configuration changes on this node
    CHANGE_COMMITTED = "change.committed"
    CHANGE_APPLIED = "change.applied"
    CHANGE_REPLAYED = "change.replayed"
    CHANGE_REAPPLIED = "change.reapplied"
    CHANGE_SKIPPED = "change.skipped"
    CHANGE_REJECTED = "change.rejected"
    CHANGE_QUARANTINED = "change.quarantined"
    CHANGE_GAP = "change.gap"

    # catching up and repairing
    RECOVERY_CAUGHT_UP = "recovery.caught_up"
    RECOVERY_FAILED = "recovery.failed"
    RECOVERY_DONE = "recovery.done"
    RECOVERY_SNAPSHOT_INSTALLED = "recovery.snapshot_installed"
    RECOVERY_REPLAYED = "recovery.replayed"
    RECOVERY_CONFLICT_KEPT = "recovery.conflict_kept"
    RECOVERY_CONFLICT_RESUBMITTED = "recovery.conflict_resubmitted"

    # alerts
    ALERT_DELIVERED = "alert.delivered"
    ALERT_FAILED = "alert.failed"
    ALERT_SKIPPED = "alert.skipped"
    ALERT_TAKEN_OVER = "alert.taken_over"
    ALERT_DEAD_LETTERED = "alert.dead_lettered"
    ALERT_REFUSED = "alert.refused"
    ALERT_DUPLICATE = "alert.duplicate"
    ALERT_REQUEUED = "alert.requeued"
    ALERT_LIST_ERROR = "alert.list_error"
    ALERT_LIST_STRANDED = "alert.list_stranded"
    ALERT_LIST_RECOVERED = "alert.list_recovered"
    ALERT_DEDUP_BEHIND = "alert.dedup_behind"
    ALERTMANAGER_TRUNCATED = "alertmanager.truncated"
