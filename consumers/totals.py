"""Per-node alert totals and the duplicate window, persisted in ``<data-dir>/totals.db``.

``tasync totals`` (the seed's "totals" command) shows how much traffic went through each server,
by source. Counts live in one-minute buckets so ``--since`` can cut anywhere with minute
precision while the table stays small; they survive restarts because operators read them over
weeks, not over one process's life.

The counters, per source:

* ``received`` - alerts this node took from its queues (duplicates excluded);
* ``delivered`` - alerts whose delivery succeeded;
* ``failed`` - alerts that exhausted their retries and went to the dead-letter queue;
* ``skipped`` - alerts whose every destination was outside its schedule;
* ``taken_over`` - delivered alerts for which this node was not first in the precedence list:
  the nodes ahead of it were dead, hung or full (overflow is how load sharing works, so it is
  the same event seen from the list's point of view);
* ``redelivered`` - of those received, alerts that the broker had handed out before (a peer or an
  earlier connection of this node died holding them unacknowledged);
* ``duplicates`` - alerts dropped because their id was already handled within the window.

The duplicate window is in the same file and written in the same transaction as the counts,
before the broker is acknowledged, so a restart neither forgets an id nor double counts one.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from broker.errors import ConfigError
from consumers.context import NodeContext

DB_NAME = "totals.db"
BUCKET_S = 60
COUNTERS = ("received", "delivered", "failed", "skipped", "taken_over", "redelivered",
            "duplicates")
DEFAULT_DEDUP_WINDOW_S = 3600.0
ENV_DEDUP_WINDOW = "TASYNC_DEDUP_WINDOW_S"
_PRUNE_EVERY_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS totals (
    bucket INTEGER NOT NULL, source TEXT NOT NULL,
    received INTEGER NOT NULL DEFAULT 0, delivered INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0, skipped INTEGER NOT NULL DEFAULT 0,
    taken_over INTEGER NOT NULL DEFAULT 0, redelivered INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket, source));
CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, ts REAL NOT NULL, outcome TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS seen_ts ON seen (ts);
"""


def window_from_env() -> float:
    """The duplicate window from ``$TASYNC_DEDUP_WINDOW_S`` (seconds), else one hour.

    Raises:
        ConfigError: the variable is not a non-negative number.
    """
    raw = os.environ.get(ENV_DEDUP_WINDOW, "").strip()
    if not raw:
        return DEFAULT_DEDUP_WINDOW_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ConfigError(f"{ENV_DEDUP_WINDOW} must be a number of seconds, got {raw!r}")
    return value


def open_db(data_dir: Path | str) -> sqlite3.Connection:
    """Open (and create) ``totals.db`` in WAL mode, shared by the delivery worker's parts."""
    path = Path(data_dir) / DB_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10.0)
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL is safe against a killed process in WAL mode; a power cut may lose the last
    # commits, which only widens the at-least-once window the design already allows.
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(_SCHEMA)
    return db


class Totals:
    """Counts and the duplicate window of one node; thread-safe.

    The delivery worker calls ``count``, ``is_seen`` and ``mark_seen`` as it goes and ``flush``
    once per batch, before it acknowledges the batch; the control server calls ``report``.

    Args:
        ctx: the node context (its ``data_dir`` holds the file, its ``node`` names the report).
        dedup_window_s: how long an alert id is remembered; by default
            ``$TASYNC_DEDUP_WINDOW_S``, else one hour.
    """

    def __init__(self, ctx: NodeContext, *, dedup_window_s: float | None = None) -> None:
        self.node = ctx.node
        self.dedup_window_s = window_from_env() if dedup_window_s is None else dedup_window_s
        self._db = open_db(ctx.data_dir)
        self._lock = threading.RLock()
        self._pending: dict[tuple[int, str], dict[str, int]] = defaultdict(
            lambda: dict.fromkeys(COUNTERS, 0))
        self._pending_seen: dict[str, tuple[float, str]] = {}
        self._last_prune = 0.0

    def close(self) -> None:
        """Write what is pending and close the file."""
        with self._lock:
            self.flush()
            self._db.close()

    # -- recording ----------------------------------------------------------------------------

    def count(self, source: str, *, now: float | None = None, **increments: int) -> None:
        """Add to counters of ``source`` in the current minute, e.g. ``count("nms", received=1)``.

        Raises:
            KeyError: for a counter name that does not exist (a programming error).
        """
        bucket = int((time.time() if now is None else now) // BUCKET_S) * BUCKET_S
        with self._lock:
            row = self._pending[(bucket, source)]
            for name, value in increments.items():
                if name not in row:
                    raise KeyError(f"unknown counter {name!r}")
                row[name] += value

    def seen(self, ids: Iterable[str]) -> set[str]:
        """The ids among ``ids`` already handled within the window (pending ones included)."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return set()
        cutoff = time.time() - self.dedup_window_s
        with self._lock:
            found = {i for i in wanted if i in self._pending_seen}
            rest = [i for i in wanted if i not in found]
            for start in range(0, len(rest), 500):
                chunk = rest[start:start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT id FROM seen WHERE ts >= ? AND id IN ({marks})", (cutoff, *chunk)
                ).fetchall()
                found.update(r[0] for r in rows)
        return found

    def is_seen(self, alert_id: str) -> bool:
        """Whether one id was handled within the window."""
        return bool(self.seen([alert_id]))

    def mark_seen(self, alert_id: str, outcome: str, *, now: float | None = None) -> None:
        """Remember that ``alert_id`` was handled (``delivered``, ``failed``, ``skipped``)."""
        with self._lock:
            self._pending_seen[alert_id] = (time.time() if now is None else now, outcome)

    def flush(self) -> None:
        """Write pending counts and ids in one transaction; call before acknowledging them."""
        with self._lock:
            if not self._pending and not self._pending_seen:
                self._maybe_prune()
                return
            counts = [(b, s, *(row[c] for c in COUNTERS))
                      for (b, s), row in self._pending.items()]
            seen = [(i, ts, outcome) for i, (ts, outcome) in self._pending_seen.items()]
            updates = ", ".join(f"{c}={c}+excluded.{c}" for c in COUNTERS)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    f"INSERT INTO totals(bucket, source, {', '.join(COUNTERS)}) "
                    f"VALUES(?, ?, {', '.join('?' * len(COUNTERS))}) "
                    f"ON CONFLICT(bucket, source) DO UPDATE SET {updates}", counts)
                self._db.executemany(
                    "INSERT OR REPLACE INTO seen(id, ts, outcome) VALUES(?, ?, ?)", seen)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._pending.clear()
            self._pending_seen.clear()
            self._maybe_prune()

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < _PRUNE_EVERY_S:
            return
        self._last_prune = now
        self._db.execute("DELETE FROM seen WHERE ts < ?", (time.time() - self.dedup_window_s,))

    # -- reading ------------------------------------------------------------------------------

    def report(self, since: float | str | None = None) -> dict[str, Any]:
        """The node's totals as JSON-able data, optionally only from ``since`` on.

        Args:
            since: seconds since the epoch (a number or a numeric string); counts are kept per
                minute, so the report starts at the beginning of that minute.

        Returns:
            ``{"node", "since", "sources": {source: {counter: n}}, "total": {counter: n}}``.
        """
        start = _since_bucket(since)
        with self._lock:
            self.flush()
            rows = self._db.execute(
                f"SELECT source, {', '.join(f'sum({c})' for c in COUNTERS)} FROM totals "
                "WHERE bucket >= ? GROUP BY source ORDER BY source", (start,)
            ).fetchall()
        sources = {r[0]: dict(zip(COUNTERS, (int(v) for v in r[1:]), strict=True))
                   for r in rows}
        total = {c: sum(s[c] for s in sources.values()) for c in COUNTERS}
        return {"node": self.node, "since": None if since is None else float(start),
                "sources": sources, "total": total}


def _since_bucket(since: float | str | None) -> int:
    if since is None or since == "":
        return 0
    try:
        value = float(since)
    except (TypeError, ValueError):
        raise ValueError(f"since must be seconds since the epoch, got {since!r}") from None
    return int(value // BUCKET_S) * BUCKET_S
