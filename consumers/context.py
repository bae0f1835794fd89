"""What every consumer of a node shares: who the node is, its store, its logs, its readiness.

The node runtime builds one ``NodeContext`` and hands it to each consumer, so consumers never
reach for globals and tests can build a context around a temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasync.broker.audit import Trail
from tasync.broker.protocol import Role
from tasync.broker.settings import Settings
from tasync.broker.signing import KeyRing
from tasync.broker.store import NodeStore
from tasync.consumers.hooks import NodeHooks
from tasync.consumers.peers import Peers

STATUS_FILE = "status.json"


class RequestProgress:
    """Interim answers to the control request being handled, for handlers that run long.

    The control server attaches the request's reply channel while a handler runs; a long
    handler (a recovery, a promotion waiting for the seat) calls this object with
    ``{"stage", "done", "total"}``, which both informs the asker and keeps the server's
    connection alive. Outside a request, or when the asker wanted no progress, it does nothing.
    """

    def __init__(self) -> None:
        self._sink: Callable[[dict[str, Any]], None] | None = None

    def __call__(self, data: dict[str, Any]) -> None:
        """Send ``data`` to the attached request, if any."""
        sink = self._sink
        if sink is not None:
            sink(data)

    @contextlib.contextmanager
    def attached(self, sink: Callable[[dict[str, Any]], None]) -> Iterator[None]:
        """Send progress to ``sink`` until the block ends."""
        self._sink = sink
        try:
            yield
        finally:
            self._sink = None


@dataclass(kw_only=True)
class NodeContext:
    """The shared, long-lived parts of one running node.

    Attributes:
        settings: broker settings.
        node: this node's name.
        data_dir: where the store, logs and status file live.
        store: the node's SQLite state.
        trail: the audit trail.
        keyring: the cluster key ring, or None when messages are not signed.
        ready: set once the node has caught up (it holds every change committed before it
            started).
        started_at: when the process started (seconds since the epoch).
        progress: interim answers to the control request being handled.
        peers: the latest beacon of every node, this one included.
        hooks: where the node's parts tell each other what happened (``tasync.consumers.hooks``).
    """

    settings: Settings
    node: str
    data_dir: Path
    store: NodeStore
    trail: Trail
    keyring: KeyRing | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    started_at: float = field(default_factory=time.time)
    progress: RequestProgress = field(default_factory=RequestProgress)
    hooks: NodeHooks = field(default_factory=NodeHooks)
    peers: Peers = field(init=False)

    def __post_init__(self) -> None:
        self.peers = Peers(self.node)

    @property
    def lag_changes(self) -> int | None:
        """Changes the master's last beacon is ahead of this node; None when no master speaks."""
        head = self.peers.master_seq()
        return None if head is None else max(0, head - self.store.last_seq)

    @property
    def role(self) -> Role:
        """``master`` or ``backup``, as persisted in the store."""
        return Role(self.store.get_meta("role", Role.BACKUP) or Role.BACKUP)

    @property
    def is_master(self) -> bool:
        """Whether this node currently accepts configuration changes."""
        return self.role is Role.MASTER

    def status(self) -> dict[str, Any]:
        """This node's view of itself, as ``tasync status`` shows it.

        The checksum and object count are kept by the store with every change, so this is a
        few reads whatever the configuration's size.
        """
        era = self.store.history.current
        return {
            "node": self.node,
            "role": self.role,
            "epoch": self.store.epoch,
            "era_owner": era.origin if era else None,
            "applied_seq": self.store.last_seq,
            "ready": self.ready.is_set(),
            "checksum": self.store.checksum(),
            "objects": self.store.count(),
            "pid": os.getpid(),
            "started_at": self.started_at,
        }

    def write_status_file(self) -> None:
        """Write ``status.json`` atomically so local tools can read state without the broker."""
        path = self.data_dir / STATUS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status(), sort_keys=True))
        os.replace(tmp, path)
