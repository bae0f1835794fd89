"""A node's local state in SQLite: configuration objects, its change history and the outbox.

One file, ``<data-dir>/node.db``. The master commits each change, its objects and its outbox row
in one transaction (``commit``), publishes, then marks the rows published; a restart publishes
whatever is still unmarked. Backups ``apply`` batches idempotently by seq, so a duplicate
delivery is a no-op and a hole is a ``GapError`` the sync worker fills from the change log.

The master runs with ``synchronous=FULL`` because its outbox is the only copy of a change until
the broker confirms it; backups use ``NORMAL`` (safe against a killed process in WAL mode): a
change lost to a power cut is a gap, refilled from the change log.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.errors import TasyncError
from broker.kinds import KINDS
from broker.messages import Change, ChangeBatch

DB_NAME = "node.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (kind, name));
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY, epoch INTEGER NOT NULL, ts REAL NOT NULL, origin TEXT NOT NULL,
    op TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, body TEXT,
    published INTEGER NOT NULL DEFAULT 1);
CREATE INDEX IF NOT EXISTS changes_unpublished ON changes (published) WHERE published = 0;
CREATE INDEX IF NOT EXISTS changes_ts ON changes (ts);
"""


class GapError(TasyncError):
    """A batch starts after the next expected seq; the missing changes must be fetched first."""

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"gap in the change stream: expected seq {expected}, got {got}")
        self.expected = expected
        self.got = got


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply`` did with a batch."""

    applied: int
    skipped: int
    last_seq: int


def canonical(body: Any) -> str:
    """The one JSON spelling of a value: sorted keys, no spaces; equal data, equal bytes."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class NodeStore:
    """Thread-safe access to one node's SQLite file; every method is one short transaction."""

    def __init__(self, data_dir: Path | str, *, durable: bool = True) -> None:
        self.path = Path(data_dir) / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        self.lock = threading.RLock()
        self._checksum: str | None = None

    def close(self) -> None:
        """Close the database file."""
        with self.lock:
            self._db.close()

    # -- meta ---------------------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        """One value of the node's bookkeeping (role, epoch, ...)."""
        with self.lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, **values: object) -> None:
        """Set several bookkeeping values in one transaction."""
        with self.lock, self._tx():
            self._set_meta_locked(values)

    def _set_meta_locked(self, values: dict[str, object]) -> None:
        self._db.executemany(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            [(k, str(v)) for k, v in values.items()],
        )

    @property
    def last_seq(self) -> int:
        """The highest seq applied (backup) or committed (master)."""
        return int(self.get_meta("last_seq", "0") or 0)

    @property
    def epoch(self) -> int:
        """The highest epoch this node has seen."""
        return int(self.get_meta("epoch", "0") or 0)

    @property
    def last_ts(self) -> float:
        """Timestamp of the last applied change, where change-log reads may start."""
        return float(self.get_meta("last_ts", "0") or 0)

    # -- changes ------------------------------------------------------------------------------

    def apply(self, batch: ChangeBatch) -> ApplyResult:
        """Apply a batch exactly once by seq; raise ``GapError`` if it starts past the next seq."""
        with self.lock, self._tx():
            last = self.last_seq
            todo = [c for c in batch.changes if c.seq > last]
            if todo and todo[0].seq != last + 1:
                raise GapError(last + 1, todo[0].seq)
            self._write_changes(todo, published=1)
            if todo:
                self._set_meta_locked({
                    "last_seq": todo[-1].seq, "last_ts": todo[-1].ts,
                    "epoch": max(self.epoch, batch.epoch),
                })
        return ApplyResult(len(todo), len(batch.changes) - len(todo), max(last, batch.last_seq))

    def commit(self, changes: list[Change]) -> None:
        """The master's transactional outbox: objects, history and unpublished rows at once."""
        with self.lock, self._tx():
            if changes and changes[0].seq != self.last_seq + 1:
                raise GapError(self.last_seq + 1, changes[0].seq)
            self._write_changes(changes, published=0)
            if changes:
                self._set_meta_locked({"last_seq": changes[-1].seq, "last_ts": changes[-1].ts})

    def _write_changes(self, changes: list[Change], *, published: int) -> None:
        if not changes:
            return
        self._checksum = None
        for c in changes:
            if c.op == "set":
                self._db.execute(
                    "INSERT INTO objects(kind, name, body, seq) VALUES(?,?,?,?) ON CONFLICT"
                    "(kind, name) DO UPDATE SET body=excluded.body, seq=excluded.seq",
                    (c.kind, c.name, canonical(c.body), c.seq),
                )
            else:
                self._db.execute("DELETE FROM objects WHERE kind=? AND name=?", (c.kind, c.name))
        self._db.executemany(
            "INSERT OR REPLACE INTO changes(seq, epoch, ts, origin, op, kind, name, body, "
            "published) VALUES(?,?,?,?,?,?,?,?,?)",
            [(c.seq, c.epoch, c.ts, c.origin, c.op, c.kind, c.name,
              None if c.body is None else canonical(c.body), published) for c in changes],
        )

    def mark_published(self, up_to_seq: int) -> None:
        """The broker confirmed every change up to ``up_to_seq``."""
        with self.lock:
            self._db.execute(
                "UPDATE changes SET published=1 WHERE published=0 AND seq<=?", (up_to_seq,)
            )

    def unpublished(self) -> list[Change]:
        """Committed changes the broker has not confirmed yet, in seq order."""
        return self._changes("WHERE published=0 ORDER BY seq", ())

    def changes_between(self, after_seq: int, up_to_seq: int | None = None) -> list[Change]:
        """Changes with ``after_seq < seq <= up_to_seq`` from the local history."""
        top = up_to_seq if up_to_seq is not None else 2**62
        return self._changes("WHERE seq>? AND seq<=? ORDER BY seq", (after_seq, top))

    def changes_since_ts(self, ts: float) -> list[Change]:
        """Changes made at or after ``ts`` (seconds since the epoch)."""
        return self._changes("WHERE ts>=? ORDER BY seq", (ts,))

    def _changes(self, where: str, params: tuple[Any, ...]) -> list[Change]:
        with self.lock:
            rows = self._db.execute(
                "SELECT seq, epoch, ts, origin, op, kind, name, body FROM changes " + where, params
            ).fetchall()
        return [
            Change(seq=r[0], epoch=r[1], ts=r[2], origin=r[3], op=r[4], kind=r[5], name=r[6],
                   body=None if r[7] is None else json.loads(r[7]))
            for r in rows
        ]

    # -- objects ------------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        """One object's body, or None."""
        with self.lock:
            row = self._db.execute(
                "SELECT body FROM objects WHERE kind=? AND name=?", (kind, name)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def objects(self, kind: str | None = None) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """``(kind, name, body)`` in canonical order, optionally of one kind."""
        query = "SELECT kind, name, body FROM objects"
        params: tuple[str, ...] = ()
        if kind is not None:
            query, params = query + " WHERE kind=?", (kind,)
        with self.lock:
            rows = self._db.execute(query + " ORDER BY kind, name", params).fetchall()
        for k, n, b in rows:
            yield k, n, json.loads(b)

    def referrers(self, kind: str, name: str) -> list[str]:
        """Stored objects that refer to ``(kind, name)``, as ``"kind name"`` strings."""
        queries = {
            "schedule": ("destination", "SELECT name FROM objects WHERE kind='destination' "
                         "AND json_extract(body, '$.schedule')=?"),
            "destination": ("group", "SELECT o.name FROM objects o, json_each(o.body, "
                            "'$.members') m WHERE o.kind='group' AND m.value=?"),
            "node": ("route", "SELECT o.name FROM objects o, json_each(o.body, '$.hosts') h "
                     "WHERE o.kind='route' AND h.value=?"),
        }
        queries["group"] = queries["destination"]
        if kind not in queries:
            return []
        ref_kind, sql = queries[kind]
        with self.lock:
            rows = self._db.execute(sql, (name,)).fetchall()
        return [f"{ref_kind} {r[0]}" for r in rows]

    def count(self) -> int:
        """Number of configuration objects held."""
        with self.lock:
            return int(self._db.execute("SELECT count(*) FROM objects").fetchone()[0])

    def export_bytes(self) -> bytes:
        """The canonical export: every kind, objects sorted by name, stable indentation."""
        state: dict[str, dict[str, Any]] = {kind: {} for kind in sorted(KINDS)}
        for kind, name, body in self.objects():
            state.setdefault(kind, {})[name] = body
        return (json.dumps(state, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()

    def checksum(self) -> str:
        """SHA-256 of the canonical export; nodes in sync have the same one."""
        with self.lock:
            if self._checksum is None:
                self._checksum = hashlib.sha256(self.export_bytes()).hexdigest()
            return self._checksum

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    def replace_all(self, objects: Iterable[tuple[str, str, dict[str, Any]]], *, seq: int,
                    epoch: int, ts: float) -> None:
        """Install a snapshot: the whole configuration as of ``seq``, replacing what was here."""
        with self.lock, self._tx():
            self._checksum = None
            self._db.execute("DELETE FROM objects")
            self._db.executemany(
                "INSERT INTO objects(kind, name, body, seq) VALUES(?,?,?,?)",
                [(k, n, canonical(b), seq) for k, n, b in objects],
            )
            self._set_meta_locked({"last_seq": seq, "epoch": max(self.epoch, epoch),
                                   "last_ts": ts})


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
