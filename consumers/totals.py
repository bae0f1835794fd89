"""Per-node alert totals and the duplicate window, persisted in ``<data-dir>/totals.db``.

``tasync totals`` shows how much traffic went through each server,
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
* ``duplicates`` - alerts dropped because their id was already handled within the window, by
  this node or (learned from the ``tasync.handled`` stream) by another;
* ``refused`` - alerts this node refused (bad signature, schema, sender) and moved to the
  quarantine queue, counted under the source the body names when it names a valid one, else
  under ``unknown``;
* ``dead_lettered`` - failed alerts whose copy the broker confirmed into the dead-letter queue.

The duplicate window is in the same file and written in the same transaction as the counts,
before the broker is acknowledged, so a restart neither forgets an id nor double counts one.
Ids other nodes settled are written to the same window by the handled-stream follower
(``record_handled``), with the stream offset it read up to, in one transaction.

Running sums per source (table ``sums``, and in memory) are kept beside the minute buckets, so
the metrics and an unbounded ``tasync totals`` cost the same whatever the history's length;
``--since`` still reads the buckets.

A report can also carry a *series* (``report(series=...)``, the ``series`` argument of the
``totals`` control request): every counter summed over the sources, per bucket of a chosen
width from a chosen start, for the console's traffic charts. ``tasync totals`` does not ask
for it, so its answer and output stay as they were; a node of an older release ignores the
argument and answers without ``series``.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tasync.broker.alerts import Handled
from tasync.broker.errors import ConfigError, MessageError
from tasync.broker.settings import dedup_window_from_env
from tasync.consumers.context import NodeContext

DB_NAME = "totals.db"
BUCKET_S = 60
COUNTERS = ("received", "delivered", "failed", "skipped", "taken_over", "redelivered",
            "duplicates", "refused", "dead_lettered")
_PRUNE_EVERY_S = 60.0
#: Most buckets one series holds: a day of minutes. A wider view takes wider buckets.
MAX_SERIES_BUCKETS = 1440

_COLUMNS = ", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in COUNTERS)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS totals (
    bucket INTEGER NOT NULL, source TEXT NOT NULL, {_COLUMNS},
    PRIMARY KEY (bucket, source));
CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, ts REAL NOT NULL, outcome TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS seen_ts ON seen (ts);
CREATE TABLE IF NOT EXISTS stream_offsets (
    stream TEXT PRIMARY KEY, offset INTEGER NOT NULL, at REAL NOT NULL);
"""
#: Who settled an id (NULL: this node) and when this node learned it (NULL: it settled it).
_SEEN_COLUMNS = (("node", "TEXT"), ("learned_at", "REAL"))


def window_from_env() -> float:
    """The duplicate window the settings read (``$TASYNC_DEDUP_WINDOW_S``), else one hour.

    Raises:
        ConfigError: the variable is not a non-negative number.
    """
    try:
        return dedup_window_from_env()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def open_db(data_dir: Path | str) -> sqlite3.Connection:
    """Open (and create) ``totals.db`` in WAL mode, shared by the delivery worker's parts."""
    path = Path(data_dir) / DB_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10.0)
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL is safe against a killed process in WAL mode; a power cut may lose the last
    # commits, which only widens the at-least-once window that redelivery already has.
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(_SCHEMA)
    _migrate(db)
    return db


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a file of an older release up to this schema (new columns, the sums table).

    Idempotent, and safe when several parts of a node open the file at once: a column or
    table another connection added in the meantime is taken as done.
    """
    for table, wanted in (("totals", [(c, "INTEGER NOT NULL DEFAULT 0") for c in COUNTERS]),
                          ("seen", list(_SEEN_COLUMNS))):
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for name, kind in wanted:
            if name not in have:
                with contextlib.suppress(sqlite3.OperationalError):  # added meanwhile
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
    if db.execute("SELECT 1 FROM sqlite_master WHERE name='sums'").fetchone():
        return
    columns = ", ".join(COUNTERS)
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(f"CREATE TABLE IF NOT EXISTS sums (source TEXT PRIMARY KEY, {_COLUMNS})")
        if not db.execute("SELECT 1 FROM sums LIMIT 1").fetchone():
            db.execute(f"INSERT INTO sums(source, {columns}) SELECT source, "
                       f"{', '.join(f'sum({c})' for c in COUNTERS)} FROM totals GROUP BY source")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def record_handled(db: sqlite3.Connection, records: Iterable[Handled], *, stream: str,
                   offset: int, at: float, cutoff: float) -> int:
    """Write ids other nodes settled into the duplicate window, with the stream offset read.

    One transaction for all ``records`` and the offset (of the last of them, made at ``at``),
    so after a crash the follower resumes exactly after the last record it wrote. An id this
    node already knows keeps its entry, except that an id known as failed takes a later
    success (a requeued dead letter delivered elsewhere). Records older than ``cutoff`` only
    move the offset. Returns how many ids were written.
    """
    now = time.time()
    rows = [(i, r.at, outcome, r.node, now) for r in records if r.at >= cutoff
            for i, outcome in r.items()]
    db.execute("BEGIN IMMEDIATE")
    try:
        if rows:
            db.executemany(
                "INSERT INTO seen(id, ts, outcome, node, learned_at) VALUES(?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET ts=excluded.ts, outcome=excluded.outcome, "
                "node=excluded.node, learned_at=excluded.learned_at "
                "WHERE seen.outcome='failed' AND excluded.outcome!='failed'", rows)
        db.execute("INSERT OR REPLACE INTO stream_offsets(stream, offset, at) VALUES(?, ?, ?)",
                   (stream, offset, at))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return len(rows)


def stream_offset(db: sqlite3.Connection, stream: str) -> tuple[int, float] | None:
    """``(offset, time of that record)`` the follower of ``stream`` last wrote, if any."""
    row = db.execute("SELECT offset, at FROM stream_offsets WHERE stream=?", (stream,)).fetchone()
    return (int(row[0]), float(row[1])) if row else None


class Totals:
    """Counts and the duplicate window of one node; thread-safe.

    The delivery worker calls ``count``, ``seen_outcomes`` and ``mark_seen`` as it goes and
    ``flush`` once per batch, before it acknowledges the batch; the control server calls
    ``report``, the metrics ``running_sums``.

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
        self._pending: dict[tuple[int, str], dict[str, int]] = defaultdict(_zeros)
        self._pending_seen: dict[str, tuple[float, str]] = {}
        self._last_prune = 0.0
        self._sums: dict[str, dict[str, int]] = defaultdict(_zeros)
        for row in self._db.execute(f"SELECT source, {', '.join(COUNTERS)} FROM sums"):
            self._sums[row[0]] = dict(zip(COUNTERS, (int(v) for v in row[1:]), strict=True))

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
            total = self._sums[source]
            for name, value in increments.items():
                if name not in row:
                    raise KeyError(f"unknown counter {name!r}")
                row[name] += value
                total[name] += value

    def seen_outcomes(self, ids: Iterable[str]) -> dict[str, tuple[str, str | None]]:
        """Ids among ``ids`` handled within the window: ``id -> (outcome, node)``.

        ``node`` is None for ids this node settled itself, else the node whose ``tasync.handled``
        record said so. Pending ids count; one query per 500 ids.
        """
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return {}
        cutoff = time.time() - self.dedup_window_s
        with self._lock:
            found: dict[str, tuple[str, str | None]] = {
                i: (self._pending_seen[i][1], None) for i in wanted if i in self._pending_seen}
            rest = [i for i in wanted if i not in found]
            for start in range(0, len(rest), 500):
                chunk = rest[start:start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT id, outcome, node FROM seen WHERE ts >= ? AND id IN ({marks})",
                    (cutoff, *chunk)).fetchall()
                found.update((r[0], (r[1], r[2])) for r in rows)
        return found

    def seen(self, ids: Iterable[str]) -> set[str]:
        """The ids among ``ids`` already handled within the window (pending ones included)."""
        return set(self.seen_outcomes(ids))

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
            by_source: dict[str, dict[str, int]] = defaultdict(_zeros)
            for (_bucket, source), row in self._pending.items():
                for name, value in row.items():
                    by_source[source][name] += value
            sums = [(s, *(row[c] for c in COUNTERS)) for s, row in by_source.items()]
            seen = [(i, ts, outcome) for i, (ts, outcome) in self._pending_seen.items()]
            updates = ", ".join(f"{c}={c}+excluded.{c}" for c in COUNTERS)
            values = ", ".join("?" * len(COUNTERS))
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    f"INSERT INTO totals(bucket, source, {', '.join(COUNTERS)}) "
                    f"VALUES(?, ?, {values}) "
                    f"ON CONFLICT(bucket, source) DO UPDATE SET {updates}", counts)
                self._db.executemany(
                    f"INSERT INTO sums(source, {', '.join(COUNTERS)}) VALUES(?, {values}) "
                    f"ON CONFLICT(source) DO UPDATE SET {updates}", sums)
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

    def running_sums(self) -> dict[str, dict[str, int]]:
        """Every counter per source since the file was made, from memory: what a scrape reads.

        Costs the same whatever the length of the history (no query, no flush).
        """
        with self._lock:
            return {source: dict(row) for source, row in self._sums.items()}

    def lookup(self, alert_id: str) -> dict[str, Any] | None:
        """What the window holds about one id (for ``tasync trace``), or None."""
        with self._lock:
            pending = self._pending_seen.get(alert_id)
            if pending is not None:
                return {"ts": pending[0], "outcome": pending[1], "node": self.node}
            row = self._db.execute("SELECT ts, outcome, node, learned_at FROM seen WHERE id=?",
                                   (alert_id,)).fetchone()
        if row is None:
            return None
        return {"ts": row[0], "outcome": row[1], "node": row[2] or self.node,
                "learned_at": row[3]}

    def report(self, since: float | str | None = None,
               series: dict[str, Any] | None = None) -> dict[str, Any]:
        """The node's totals as JSON-able data, optionally only from ``since`` on.

        Args:
            since: seconds since the epoch (a number or a numeric string); counts are kept per
                minute, so the report starts at the beginning of that minute. Without it the
                running sums answer, at no cost in the history's length.
            series: ``{"since": ts, "bucket_s": width}`` to add counts over time
                (``series_counts``); left out, the report is what it always was.

        Returns:
            ``{"node", "since", "sources": {source: {counter: n}}, "total": {counter: n}}``,
            and ``"series"`` when asked for.

        Raises:
            MessageError: ``since`` or ``series`` is malformed, or too long (refused).
        """
        start = _since_bucket(since)
        wanted = _series_args(series) if series is not None else None
        if since is None:
            sources = dict(sorted(self.running_sums().items()))
        else:
            with self._lock:
                self.flush()
                rows = self._db.execute(
                    f"SELECT source, {', '.join(f'sum({c})' for c in COUNTERS)} FROM totals "
                    "WHERE bucket >= ? GROUP BY source ORDER BY source", (start,)
                ).fetchall()
            sources = {r[0]: dict(zip(COUNTERS, (int(v) for v in r[1:]), strict=True))
                       for r in rows}
        total = {c: sum(s[c] for s in sources.values()) for c in COUNTERS}
        report: dict[str, Any] = {"node": self.node,
                                  "since": None if since is None else float(start),
                                  "sources": sources, "total": total}
        if wanted is not None:
            report["series"] = self.series_counts(*wanted)
        return report

    def series_counts(self, since: float, bucket_s: int, *,
                      now: float | None = None) -> dict[str, Any]:
        """Every counter, summed over the sources, per ``bucket_s`` from ``since`` to now.

        Buckets are aligned on multiples of ``bucket_s`` since the epoch, so two nodes asked
        at once answer with the same bucket times, and the last bucket is the one under way.

        Returns:
            ``{"since": first bucket's start, "bucket_s": width, "counts": {counter: [n, ...]}}``
            with one number per bucket, oldest first (zeros where nothing happened).
        """
        first = int(since // bucket_s) * bucket_s
        last = int((time.time() if now is None else now) // bucket_s) * bucket_s
        size = max(0, (last - first) // bucket_s + 1)
        if size > MAX_SERIES_BUCKETS:
            raise MessageError(f"a series has at most {MAX_SERIES_BUCKETS} buckets; take wider "
                             "buckets or a later start")
        counts = {c: [0] * size for c in COUNTERS}
        with self._lock:
            self.flush()
            rows = self._db.execute(
                f"SELECT (bucket - ?) / ?, {', '.join(f'sum({c})' for c in COUNTERS)} "
                "FROM totals WHERE bucket >= ? GROUP BY 1", (first, bucket_s, first)).fetchall()
        for row in rows:
            index = int(row[0])
            if 0 <= index < size:
                for counter, value in zip(COUNTERS, row[1:], strict=True):
                    counts[counter][index] = int(value)
        return {"since": float(first), "bucket_s": bucket_s, "counts": counts}


class Tally:
    """Counts of one batch of alerts, added to ``Totals`` with one call per source.

    ``Totals.count`` takes a lock and works out the minute for every call; the delivery
    worker counted two or three times per alert. It now adds to a tally as it goes and hands
    it over once per batch, before the batch's ``flush``. One thread only.
    """

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, int]] = {}

    def add(self, source: str, counter: str, value: int = 1) -> None:
        """Add ``value`` to ``counter`` of ``source`` (checked by ``Totals.count`` later)."""
        row = self._rows.get(source)
        if row is None:
            row = self._rows[source] = {}
        row[counter] = row.get(counter, 0) + value

    def add_to(self, totals: Totals) -> None:
        """Count everything tallied into the current minute of ``totals``, and start over."""
        rows, self._rows = self._rows, {}
        for source, counters in rows.items():
            totals.count(source, **counters)


def _zeros() -> dict[str, int]:
    return dict.fromkeys(COUNTERS, 0)


def _since_bucket(since: float | str | None) -> int:
    if since is None or since == "":
        return 0
    try:
        value = float(since)
    except (TypeError, ValueError):
        raise MessageError(f"since must be seconds since the epoch, got {since!r}") from None
    return int(value // BUCKET_S) * BUCKET_S


def _series_args(series: Any) -> tuple[float, int]:
    """``(since, bucket_s)`` of a request's ``series`` argument, checked."""
    if not isinstance(series, dict):
        raise MessageError("series must be {\"since\": seconds, \"bucket_s\": seconds}")
    try:
        since = float(series["since"])
        bucket_s = int(series.get("bucket_s", BUCKET_S))
    except (KeyError, TypeError, ValueError):
        raise MessageError("series needs since (seconds since the epoch) and bucket_s "
                         "(a multiple of 60)") from None
    if not math.isfinite(since) or since < 0:
        raise MessageError("series since must be seconds since the epoch")
    if bucket_s <= 0 or bucket_s % BUCKET_S:
        raise MessageError(f"bucket_s must be a positive multiple of {BUCKET_S}")
    return since, bucket_s
