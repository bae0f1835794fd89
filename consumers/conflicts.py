"""``<data-dir>/conflicts.json``: changes a node made that the network never accepted.

A master that dies between its commit and the broker's confirm, or that keeps committing after
another node was promoted, holds changes no other node has. They are neither applied silently
(the network moved on; their seqs now mean other changes) nor dropped: recovery moves them
here, writes one trail line for each, shows them in ``tasync recover`` and lets the operator
send them again through the current master with ``--resubmit``.

The file is JSON so an operator can read it and tools can parse it; it is replaced atomically,
so a crash never leaves half of it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from tasync.broker.audit import Trail, utc_now
from tasync.broker.errors import ConfigError
from tasync.broker.events import Event
from tasync.broker.messages import Change, change_to_dict

CONFLICTS_FILE = "conflicts.json"
OPEN = "open"
RESUBMITTED = "resubmitted"


def conflict_key(entry: dict[str, Any]) -> tuple[int, int, str]:
    """What identifies a kept change: its epoch, seq and origin."""
    return int(entry["epoch"]), int(entry["seq"]), str(entry["origin"])


def as_op(entry: dict[str, Any]) -> dict[str, Any]:
    """The operation a kept change asks for, as ``tasync config`` requests carry it."""
    op = {"op": entry["op"], "kind": entry["kind"], "name": entry["name"]}
    if entry["op"] == "set":
        op["body"] = entry.get("body") or {}
    return op


class ConflictFile:
    """Reads and appends to one node's conflicts file; thread-safe within the process."""

    def __init__(self, data_dir: Path, trail: Trail) -> None:
        self.path = Path(data_dir) / CONFLICTS_FILE
        self.trail = trail
        self._lock = threading.Lock()

    def entries(self) -> list[dict[str, Any]]:
        """Every kept change, open or resubmitted, in the order they were kept."""
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{self.path} is unreadable ({exc}); fix or move it aside") from None
        conflicts: list[dict[str, Any]] = data.get("conflicts", [])
        return conflicts

    def open_entries(self) -> list[dict[str, Any]]:
        """The kept changes not yet resubmitted."""
        return [e for e in self.entries() if e.get("status") == OPEN]

    def keep(self, changes: list[Change], *, reason: str) -> list[dict[str, Any]]:
        """Add ``changes`` (once each) with ``reason``; returns the entries that are new."""
        with self._lock:
            entries = self.entries()
            known = {conflict_key(e) for e in entries}
            added = []
            for change in changes:
                entry = {**change_to_dict(change), "reason": reason, "kept_at": utc_now(),
                         "status": OPEN, "resubmitted_as": None}
                if conflict_key(entry) in known:
                    continue
                known.add(conflict_key(entry))
                added.append(entry)
            if added:
                self._write(entries + added)
        for entry in added:
            self.trail.event(Event.RECOVERY_CONFLICT_KEPT, seq=entry["seq"], epoch=entry["epoch"],
                             origin=entry["origin"], op=entry["op"], kind=entry["kind"],
                             name=entry["name"], reason=reason, file=self.path.name)
        return added

    def resolve(self, done: list[dict[str, Any]]) -> int:
        """Mark entries resubmitted: ``done`` holds ``epoch``, ``seq``, ``origin``, ``new_seq``."""
        new_seq = {conflict_key(d): d.get("new_seq") for d in done}
        with self._lock:
            entries = self.entries()
            changed = [e for e in entries if e.get("status") == OPEN and conflict_key(e) in new_seq]
            for entry in changed:
                entry["status"] = RESUBMITTED
                entry["resubmitted_as"] = new_seq[conflict_key(entry)]
            if changed:
                self._write(entries)
        for entry in changed:
            self.trail.event(Event.RECOVERY_CONFLICT_RESUBMITTED, seq=entry["seq"],
                             epoch=entry["epoch"], kind=entry["kind"], name=entry["name"],
                             new_seq=entry["resubmitted_as"])
        return len(changed)

    def _write(self, entries: list[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump({"version": 1, "conflicts": entries}, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
