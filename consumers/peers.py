"""What a node knows of its peers from their beacons: who was seen when, the master's head.

Every node's control server sends a small beacon to every node about once a second (a request
to ``all`` that wants no answer) with its name, role, epoch and seq. Each node keeps the latest
beacon of every peer here, which gives three things nothing else can:

* when a node that no longer answers was last seen (``tasync status`` shows it for dead nodes);
* a hung or dead node, visible from the others' metrics (the age of its last beacon grows);
* this node's lag: how many changes the master's last beacon is ahead of what it applied.

Beacons live in memory only: a node that just started knows its peers within a second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

#: How often a node sends its beacon.
BEACON_EVERY_S = 1.0
#: A master's beacon older than this no longer tells this node its lag.
HEAD_FRESH_S = 10.0


@dataclass(frozen=True)
class Beacon:
    """One peer's latest word about itself, and when it arrived (Unix time)."""

    node: str
    role: str
    epoch: int
    seq: int
    ready: bool
    seen_at: float


class Peers:
    """The latest beacon of every peer; thread-safe.

    Args:
        node: this node's name (its own beacons are kept too: one view of the network).
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self._lock = threading.Lock()
        self._beacons: dict[str, Beacon] = {}

    def saw(self, args: dict[str, Any], *, now: float | None = None) -> None:
        """Record a beacon's arguments; malformed ones are ignored (a beacon is a hint)."""
        try:
            beacon = Beacon(node=str(args["node"]), role=str(args["role"]),
                            epoch=int(args["epoch"]), seq=int(args["seq"]),
                            ready=bool(args["ready"]),
                            seen_at=time.time() if now is None else now)
        except (KeyError, TypeError, ValueError):
            return
        with self._lock:
            self._beacons[beacon.node] = beacon

    def view(self) -> dict[str, dict[str, Any]]:
        """Every peer's latest beacon as JSON-ready data, by name."""
        with self._lock:
            return {name: asdict(b) for name, b in self._beacons.items()}

    def ages(self, *, known: Iterable[str] = (), listening_since: float | None = None,
             now: float | None = None) -> dict[str, float]:
        """Seconds since each peer's last beacon.

        ``known`` nodes never heard from are included with the time since this node began
        listening (``listening_since``), so a node that died before its first beacon reached
        this one is not simply missing from the view.
        """
        current = time.time() if now is None else now
        with self._lock:
            ages = {name: max(0.0, current - b.seen_at) for name, b in self._beacons.items()}
        if listening_since is not None:
            for name in known:
                ages.setdefault(name, max(0.0, current - listening_since))
        return ages

    def master_seq(self, *, now: float | None = None) -> int | None:
        """The seq in the newest master's recent beacon, if one came within ``HEAD_FRESH_S``."""
        current = time.time() if now is None else now
        with self._lock:
            masters = [b for b in self._beacons.values()
                       if b.role == "master" and current - b.seen_at <= HEAD_FRESH_S]
        if not masters:
            return None
        return max(masters, key=lambda b: (b.epoch, b.seen_at)).seq
