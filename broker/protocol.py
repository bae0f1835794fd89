"""The words nodes and clients exchange, as enums: a node's role and the control requests.

On the wire and in files they stay plain strings (``StrEnum`` values compare and hash equal to
their strings, so a request decoded from JSON finds its handler); inside, code names them by
member, which a type checker and a search can follow. Adding a control request means adding it
here, where every request a node answers is listed with who answers it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any


class Role(enum.StrEnum):
    """What a node does in the network; a node's store keeps it (``meta.role``)."""

    MASTER = "master"
    BACKUP = "backup"


class ControlOp(enum.StrEnum):
    """A control request (``Request.op``) and which part of a node answers it."""

    # the control server itself
    STATUS = "status"
    EXPORT = "export"
    SHOW = "show"
    COMMIT = "commit"
    IMPORT = "import"
    IMPORT_COMMIT = "import_commit"
    REQUEST = "request"
    HELLO = "hello"
    BEACON = "beacon"
    # the roles (seat, promotion, recovery)
    HEAD = "head"
    SNAPSHOT = "snapshot"
    RECOVER = "recover"
    REPLAY = "replay"
    PROMOTE = "promote"
    STEP_DOWN = "step_down"
    CONFLICTS = "conflicts"
    CONFLICTS_RESOLVED = "conflicts_resolved"
    # the delivery worker
    TOTALS = "totals"
    DELIVERY = "delivery"
    LISTS = "lists"
    ALERT_POLICY = "alert_policy"
    TRACE = "trace"


#: Requests only the master answers (a backup refuses them).
MASTER_OPS = frozenset({ControlOp.COMMIT, ControlOp.IMPORT, ControlOp.IMPORT_COMMIT,
                        ControlOp.REQUEST, ControlOp.HEAD, ControlOp.HELLO,
                        ControlOp.STEP_DOWN})
#: Requests that change configuration, checked against telaconf.hosts.
CONFIG_OPS = frozenset({ControlOp.COMMIT, ControlOp.IMPORT, ControlOp.IMPORT_COMMIT})
#: Requests that want no answer.
NO_ANSWER_OPS = frozenset({ControlOp.BEACON})


#: What answers one control request: its arguments in, its answer's data out (the control
#: server dispatches to these by ``ControlOp``; roles and delivery provide some).
Handler = Callable[[dict[str, Any]], dict[str, Any]]
