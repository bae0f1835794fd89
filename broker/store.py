"""A node's local state in SQLite: configuration objects, its change history and the outbox.

One file, ``<data-dir>/node.db``. The master commits each change and its objects in one
transaction (``commit``); its outbox is every change above the published-up-to mark
(``published_seq``, one value), which the relay moves forward as the broker confirms chunks, so
a restart or a retry publishes from the mark on, never from the first change of a large import.
Backups ``apply`` batches idempotently by seq, so a duplicate delivery is a no-op and a hole is a
``GapError`` the sync worker fills from the change log.

The configuration's checksum and object count are kept in the store and updated in the same
transaction as every change, replay and snapshot install (``checksum``), so asking for them
costs a read, whatever the configuration's size.

A node runs with ``synchronous=FULL``: a master because its outbox is the only copy of a change
until the broker confirms it, and a backup because it may be promoted, when its store becomes
the outbox. ``NORMAL`` on backups (safe against a killed process in WAL mode; a change lost to a
power cut would be a gap refilled from the change log) was measured and not taken: with three
backups it moved commit -> applied from 4.27 to 3.4 ms at the median and from 6.72 to 6.59 ms
at the 99th percentile, and a 100,000-object import by less than the runs' spread. Commands
that only read a node's store (``--data-dir``) open it with ``NORMAL``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import operator
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from tasync.broker.collector import BULK_OPS, collector_paused
from tasync.broker.epochs import EpochHistory
from tasync.broker.errors import GapError, StoreDamaged
from tasync.broker.kinds import KINDS, REFERENCES
from tasync.broker.messages import Change, ChangeBatch

DB_NAME = "node.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (kind, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY, epoch INTEGER NOT NULL, ts REAL NOT NULL, origin TEXT NOT NULL,
    op TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, body TEXT,
    published INTEGER NOT NULL DEFAULT 1);
DROP INDEX IF EXISTS changes_ts;
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL, ts REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS staged (
    import_id TEXT NOT NULL, part INTEGER NOT NULL, parts INTEGER NOT NULL, ops TEXT NOT NULL,
    ts REAL NOT NULL, PRIMARY KEY (import_id, part)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS staged_parts ON staged(import_id, parts, ts);
"""
#: ``staged_parts`` covers every question about staged parts but their operations (which parts
#: an import holds, under which total, how old): a part's row holds its operations, about
#: 100 kB for 1,000 objects, and without the index each question read every staged part's
#: pages, so staging an import of many parts was quadratic in its size.
#: Meta keys of the outbox mark and of the kept checksum (``objects_xor``: hex) and count.
_PUBLISHED, _XOR, _COUNT = "published_seq", "objects_xor", "objects_count"
#: Committed request ids are kept this long: a client asks again within seconds or minutes.
REQUESTS_KEEP_S = 7 * 86400.0


@dataclass(frozen=True)
class CommittedRequest:
    """A client request the network committed: its id and the seqs it became."""

    request_id: str
    first_seq: int
    last_seq: int
    epoch: int

    @property
    def count(self) -> int:
        """How many changes the request committed."""
        return self.last_seq - self.first_seq + 1


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply`` did with a batch; ``reapplied`` counts changes a forced replay rewrote."""

    applied: int
    skipped: int
    last_seq: int
    reapplied: int = 0


@dataclass(frozen=True)
class Snapshot:
    """The whole configuration as of ``seq``, with the eras its holder knew (for recovery)."""

    seq: int
    epoch: int
    ts: float
    eras: list[list[Any]]
    objects: list[tuple[str, str, dict[str, Any]]]


#: The canonical spelling's encoder (``canonical``): msgspec, sorted keys, compact, UTF-8.
_CANONICAL = msgspec.json.Encoder(order="sorted")
#: Everything msgspec cannot spell (a string holding a lone surrogate) is spelled as before.
_LEGACY = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
#: A change row. A fresh seq cannot be taken (rows only exist up to ``last_seq``), so the
#: plain insert is tried first: ``OR REPLACE`` costs a fifth more per row, and is only needed
#: when a replay rewrites rows the node holds.
_INSERT_CHANGE = "INSERT INTO changes(seq, epoch, ts, origin, op, kind, name, body) VALUES"
_REPLACE_CHANGE = _INSERT_CHANGE.replace("INSERT", "INSERT OR REPLACE", 1)
#: Change rows bound per statement: one statement per row spent a fifth of its time on the
#: statement itself (a step, a reset, the lock let go and taken again), and a catch-up or an
#: import writes a hundred thousand rows; a hundred rows are 800 of SQLite's 32,766 variables.
ROWS_PER_INSERT = 100
_ROW = "(?,?,?,?,?,?,?,?)"
_ROWS = ",".join([_ROW] * ROWS_PER_INSERT)
#: A change row's object name (``_write_changes``'s rows: seq, epoch, ts, origin, op, kind,
#: name, body).
_NAME = operator.itemgetter(6)
#: The objects follow from the change rows just written, in one statement per run of sets or
#: deletes (``?1``..``?2``, consecutive seqs): SQLite does the per-row work without a trip
#: through Python per row. In seq order, so a later set of the same object wins.
_SETS_FROM_CHANGES = (
    "INSERT INTO objects(kind, name, body, seq) SELECT kind, name, coalesce(body, 'null'), seq "
    "FROM changes WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq "
    "ON CONFLICT(kind, name) DO UPDATE SET body=excluded.body, seq=excluded.seq")
#: The objects a range of changes touches, as they are before the changes (each once).
_TOUCHED_OBJECTS = ("SELECT kind, name, body FROM objects WHERE (kind, name) IN "
                    "(SELECT kind, name FROM changes WHERE seq BETWEEN ?1 AND ?2)")
#: The same when the range names each object once: a join probes ``objects`` straight from each
#: change row, where ``IN`` first builds a temporary index of the names (three times the cost).
_TOUCHED_DISTINCT = ("SELECT o.kind, o.name, o.body FROM changes AS c JOIN objects AS o "
                     "ON o.kind = c.kind AND o.name = c.name WHERE c.seq BETWEEN ?1 AND ?2")
_DELETES_FROM_CHANGES = ("DELETE FROM objects WHERE (kind, name) IN "
                         "(SELECT kind, name FROM changes WHERE seq BETWEEN ?1 AND ?2)")


def canonical(body: Any) -> str:
    """The one JSON spelling of a value: sorted keys, no spaces; equal data, equal bytes.

    The stored bodies, their hashes and so the checksum are made of this spelling. It is
    ``json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` byte for byte
    for every value a body can hold (strings, integers, booleans, null, lists and objects of
    them; ``tests/unit/broker/test_store.py`` holds it to that with generated values), written
    by msgspec at a quarter of the cost: every node spells every body it applies, and at 100,000
    objects that was a fifth of a backup's CPU. Floats are the one difference (``1e16`` for
    ``1e+16``, ``0.00001`` for ``1e-05``, ``null`` for ``NaN``); no kind's schema admits one, so
    no body the master committed holds one.
    """
    try:
        return _CANONICAL.encode(body).decode()
    except (TypeError, UnicodeEncodeError):
        return _LEGACY.encode(body)


def object_hash(kind: str, name: str, body_text: str) -> int:
    """A stored object's 128-bit hash: its kind, name and canonical body (``canonical``)."""
    data = f"{kind}\0{name}\0{body_text}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=16).digest(), "big")


#: ``object_hash``'s hash with nothing hashed yet; ``objects_xor`` starts each from a copy.
_BLANK_HASH = hashlib.blake2b(digest_size=16)
#: Objects hashed per step of ``objects_xor``: its memory stays flat whatever their number.
HASH_CHUNK = 65_536


def objects_xor(objects: Iterable[tuple[str, str, str]]) -> tuple[int, int]:
    """``(count, XOR of object_hash)`` of ``(kind, name, canonical body)`` triples.

    The same value as XOR-ing ``object_hash`` of each, for a quarter less (52 -> 39 ms per
    100,000 objects): an import or a catch-up hashes every object it writes. Each hash starts
    from a copy of a blank one (a new one reads its ``digest_size`` argument every time), and
    the digests of a chunk are joined into one integer and folded onto themselves (``_fold``)
    rather than each converted to an integer and XOR-ed in Python.
    """
    count, xor = 0, 0
    rest = iter(objects)
    while True:
        digests = []
        for kind, name, body in itertools.islice(rest, HASH_CHUNK):
            digest = _BLANK_HASH.copy()  # a third cheaper than a new one: no arguments to read
            digest.update(f"{kind}\0{name}\0{body}".encode())
            digests.append(digest.digest())
        if not digests:
            return count, xor
        count += len(digests)
        xor ^= _fold(int.from_bytes(b"".join(digests), "big"), len(digests))


def _fold(packed: int, n: int) -> int:
    """The XOR of the ``n`` 128-bit numbers ``packed`` holds side by side.

    Each step XORs the upper half onto the lower (an odd one out stays at the bottom), so
    ``n`` numbers take ``log2(n)`` whole-integer XORs, in C.
    """
    while n > 1:
        shift = (n - n // 2) * 128
        packed = (packed >> shift) ^ (packed & ((1 << shift) - 1))
        n -= n // 2
    return packed


def format_checksum(count: int, xor: int) -> str:
    """The checksum shown and compared: SHA-256 of the object count and the objects' XOR.

    The XOR of every object's hash (``object_hash``) does not depend on the order objects
    arrived in, so it is updated per change instead of recomputed; nodes holding the same
    objects have the same value.
    """
    return hashlib.sha256(f"tasync-objects-v1:{count}:{xor:032x}".encode()).hexdigest()


class NodeStore:
    """Thread-safe access to one node's SQLite file; every method is one short transaction."""

    def __init__(self, data_dir: Path | str, *, durable: bool = True,
                 verify: bool = False) -> None:
        """Open (or create) the store.

        Args:
            data_dir: the node's data directory.
            durable: ``synchronous=FULL`` (the master's outbox) rather than ``NORMAL``.
            verify: also read every page once (``PRAGMA quick_check``): a worker does this at
                start, so damage is found before the node acts on its state, not mid-apply.

        Raises:
            StoreDamaged: the file is not a readable SQLite database.
        """
        self.path = Path(data_dir) / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
            if verify:
                verdict = self._db.execute("PRAGMA quick_check(1)").fetchone()[0]
                if verdict != "ok":
                    raise sqlite3.DatabaseError(str(verdict))
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreDamaged(self.path, str(exc).splitlines()[0][:200]) from None
        self.lock = threading.RLock()
        #: The outbox's own connection (``outbox_rows``), opened when first needed.
        self._outbox_db: sqlite3.Connection | None = None
        self._outbox_lock = threading.Lock()
        #: The eras as last parsed, with the stored text they came from (``history``).
        self._history: tuple[str | None, EpochHistory] = (None, EpochHistory())
        #: Per kind, how often this object wrote objects of it; ``""``: every kind (a snapshot).
        self._versions: dict[str, int] = {}
        with self.lock, self._tx():
            self._migrate_locked()

    def _migrate_locked(self) -> None:
        """Bring a store written by an earlier version up to the kept mark and checksum.

        Earlier versions flagged every outbox row (``published=0``) and hashed the whole
        configuration on demand; the flags become the mark once, and the checksum is computed
        once from the stored objects.
        """
        meta = dict(self._db.execute("SELECT key, value FROM meta WHERE key IN (?,?,?)",
                                     (_PUBLISHED, _XOR, _COUNT)).fetchall())
        if _PUBLISHED not in meta:
            row = self._db.execute("SELECT min(seq) FROM changes WHERE published=0").fetchone()
            mark = self.last_seq if row[0] is None else int(row[0]) - 1
            self._db.execute("UPDATE changes SET published=1 WHERE published=0")
            self._set_meta_locked({_PUBLISHED: mark})
        self._db.execute("DROP INDEX IF EXISTS changes_unpublished")
        if _XOR not in meta or _COUNT not in meta:
            self._recount_locked()

    def _recount_locked(self) -> tuple[int, int]:
        """Hash every stored object again and keep the result; returns ``(count, xor)``."""
        count, xor = objects_xor(self._db.execute("SELECT kind, name, body FROM objects"))
        self._set_meta_locked({_COUNT: count, _XOR: f"{xor:x}"})
        return count, xor

    def close(self) -> None:
        """Close the database file."""
        with self.lock, self._outbox_lock:
            self._db.close()
            if self._outbox_db is not None:
                self._outbox_db.close()

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

    @property
    def history(self) -> EpochHistory:
        """The eras this node knows (``tasync.broker.epochs``).

        Read on every commit and every applied batch, and changed only by a promotion, so the
        parsed value is kept and parsed again only when the stored text differs (a rolled-back
        transaction leaves the text, and so the value, as it was).
        """
        text = self.get_meta("epochs")
        parsed_from, history = self._history
        if text != parsed_from:
            history = EpochHistory.from_json(text)
            self._history = (text, history)
        return history

    def set_history(self, history: EpochHistory) -> None:
        """Persist the eras; the node's epoch follows the newest one."""
        with self.lock, self._tx():
            self._set_history_locked(history)

    def _set_history_locked(self, history: EpochHistory) -> None:
        self._set_meta_locked({"epochs": history.to_json(),
                               "epoch": max(self.epoch, history.max_epoch)})

    def kind_version(self, kind: str) -> int:
        """A number that grows whenever objects of ``kind`` may have changed through this store.

        Held in memory and cheap to read, for a part that keeps something derived from one kind
        (the delivery worker's subscriptions follow the routes) and must not redo it after every
        change of other kinds. A snapshot install counts for every kind; a transaction that
        rolls back may count too (a harmless extra refresh).
        """
        return self._versions.get(kind, 0) + self._versions.get("", 0)

    def _bump_locked(self, kinds: Iterable[str]) -> None:
        for kind in kinds:
            self._versions[kind] = self._versions.get(kind, 0) + 1

    @property
    def diverged(self) -> bool:
        """Whether this node holds effects of changes the network does not have (see recovery)."""
        return self.get_meta("diverged", "0") == "1"

    @property
    def published_seq(self) -> int:
        """The highest seq the broker confirmed (the mark); the outbox is every seq above it."""
        return int(self.get_meta(_PUBLISHED, "0") or 0)

    @property
    def unpublished_count(self) -> int:
        """How many committed changes the broker has not confirmed yet."""
        with self.lock:
            return max(0, self.last_seq - self.published_seq)

    def apply(self, batch: ChangeBatch, *, force: bool = False,
              history: EpochHistory | None = None) -> ApplyResult:
        """Apply a batch exactly once by seq; raise ``GapError`` if it starts past the next seq.

        Args:
            batch: consecutive changes.
            force: also rewrite changes this node already holds (``tasync replay``): replaying
                a suffix of the history in order restores every object it touches. The
                checksum is then computed again from every object, since a replay repairs
                objects that may have changed without the store (a damaged copy).
            history: eras to persist in the same transaction (learned from this batch).
        """
        # A bulk batch's rows and tuples live until ``_write_changes`` returns: the collector
        # would find nothing in them. It resumes only after they are freed; resuming inside
        # ``_write_changes`` made its first pass walk all 10,000 rows of a catch-up's
        # transaction (catch-ups 7-10 % slower, alternated runs).
        with self.lock, self._tx(), collector_paused(len(batch.changes) >= BULK_OPS):
            last = self.last_seq
            if force or batch.first_seq > last:  # the usual case: every change is new
                todo = list(batch.changes)
            else:
                todo = [c for c in batch.changes if c.seq > last]
            if todo and todo[0].seq > last + 1:
                raise GapError(last + 1, todo[0].seq)
            self._write_changes(todo)
            fresh = todo if not force or batch.first_seq > last else [
                c for c in todo if c.seq > last]
            if fresh:
                values: dict[str, object] = {
                    "last_seq": fresh[-1].seq, "last_ts": fresh[-1].ts,
                    "epoch": max(self.epoch, batch.epoch)}
                if self.published_seq >= last:  # no outbox here: what arrives is published
                    values[_PUBLISHED] = fresh[-1].seq
                self._set_meta_locked(values)
            if history is not None:
                self._set_history_locked(history)
            if batch.requests and fresh:
                self._record_requests([(r, first, batch.last_seq, batch.epoch)
                                       for r, first in batch.requests])
            if force:  # a repair: objects may have drifted behind the kept checksum's back
                self._recount_locked()
        return ApplyResult(len(fresh), len(batch.changes) - len(todo),
                           max(last, batch.last_seq), reapplied=len(todo) - len(fresh))

    def commit(self, changes: list[Change], *, request_id: str | None = None,
               staged: str | None = None) -> None:
        """The master's transactional outbox: objects, history and unpublished rows at once.

        Args:
            changes: consecutive changes from the next seq on.
            request_id: the client's request id, remembered with the seqs it became.
            staged: an import whose staged parts these changes are: dropped in the same
                transaction, so an import is either staged or committed, never both.
        """
        with self.lock, self._tx():
            if changes and changes[0].seq != self.last_seq + 1:
                raise GapError(self.last_seq + 1, changes[0].seq)
            self._write_changes(changes)
            if changes:
                self._set_meta_locked({"last_seq": changes[-1].seq, "last_ts": changes[-1].ts})
                if request_id is not None:
                    self._record_requests([(request_id, changes[0].seq, changes[-1].seq,
                                            changes[0].epoch)])
            if staged is not None:
                self._db.execute("DELETE FROM staged WHERE import_id=?", (staged,))

    def _record_requests(self, rows: list[tuple[str, int, int, int]]) -> None:
        now = time.time()
        self._db.executemany("INSERT OR IGNORE INTO requests(id, first_seq, last_seq, epoch, ts) "
                             "VALUES(?,?,?,?,?)", [(*row, now) for row in rows])
        self._db.execute("DELETE FROM requests WHERE ts < ?", (now - REQUESTS_KEEP_S,))

    def request(self, request_id: str) -> CommittedRequest | None:
        """What a request id was committed as, if this node knows it committed."""
        with self.lock:
            row = self._db.execute("SELECT id, first_seq, last_seq, epoch FROM requests "
                                   "WHERE id=?", (request_id,)).fetchone()
        return None if row is None else CommittedRequest(*row)

    def requests_ending_in(self, first_seq: int, last_seq: int) -> list[CommittedRequest]:
        """Requests whose last change lies in ``first_seq..last_seq`` (an outbox being sent).

        Read like ``outbox_rows``, without the store's lock.
        """
        with self._outbox_reader() as db:
            rows = db.execute("SELECT id, first_seq, last_seq, epoch FROM requests "
                              "WHERE last_seq BETWEEN ? AND ?", (first_seq, last_seq)).fetchall()
        return [CommittedRequest(*row) for row in rows]

    # -- staged imports -----------------------------------------------------------------------

    def stage(self, import_id: str, part: int, parts: int, ops_json: str) -> list[int]:
        """Keep one part of an import durably; returns the parts staged so far, in order.

        A part sent again replaces itself; parts staged under another total are dropped,
        because they belong to an attempt the client has given up.
        """
        now = time.time()
        with self.lock, self._tx():
            self._db.execute("DELETE FROM staged WHERE import_id=? AND parts<>?",
                             (import_id, parts))
            self._db.execute("INSERT OR REPLACE INTO staged(import_id, part, parts, ops, ts) "
                             "VALUES(?,?,?,?,?)", (import_id, part, parts, ops_json, now))
            return self._staged_parts(import_id)

    def staged_parts(self, import_id: str) -> list[int]:
        """The parts of an import staged so far, in order."""
        with self.lock:
            return self._staged_parts(import_id)

    def _staged_parts(self, import_id: str) -> list[int]:
        rows = self._db.execute("SELECT part FROM staged INDEXED BY staged_parts "
                                "WHERE import_id=? ORDER BY part", (import_id,)).fetchall()
        return [int(r[0]) for r in rows]

    def staged_ops(self, import_id: str) -> Iterator[str]:
        """The staged parts' operations (JSON text), in part order."""
        with self.lock:
            rows = self._db.execute("SELECT ops FROM staged WHERE import_id=? ORDER BY part",
                                    (import_id,)).fetchall()
        for (ops,) in rows:
            yield ops

    def drop_staged(self, *, import_id: str | None = None, older_than_s: float | None = None
                    ) -> None:
        """Forget one import's parts, or every import untouched for ``older_than_s``."""
        with self.lock:
            if import_id is not None:
                self._db.execute("DELETE FROM staged WHERE import_id=?", (import_id,))
            if older_than_s is not None:
                self._db.execute("DELETE FROM staged WHERE import_id IN (SELECT import_id FROM "
                                 "staged GROUP BY import_id HAVING max(ts) < ?)",
                                 (time.time() - older_than_s,))

    def _write_changes(self, changes: list[Change]) -> None:
        """Write history rows, then bring the objects they touch, count and checksum up to date.

        ``changes`` hold consecutive seqs (a batch, a commit). A bulk catch-up or import spends
        its time here, so Python only binds the history rows; the objects are derived from
        those rows by SQL, one statement per run of sets or deletes, in order. The kept
        checksum drops the hashes of the objects the changes touch as they were before, and
        adds those of their final state (``format_checksum``).
        """
        if not changes:
            return
        if changes[-1].seq - changes[0].seq != len(changes) - 1:
            raise ValueError("changes must hold consecutive seqs")  # the SQL below reads ranges
        self._bump_locked({c.kind for c in changes})
        rows = [(c.seq, c.epoch, c.ts, c.origin, c.op, c.kind, c.name,
                 None if c.body is None else canonical(c.body)) for c in changes]
        try:
            self._insert_rows(_INSERT_CHANGE, rows)
        except sqlite3.IntegrityError:  # a replay of seqs this node holds: rewrite them
            self._insert_rows(_REPLACE_CHANGE, rows)
        # An import or a catch-up names each object once (its names alone are distinct: a set of
        # strings whose hashes are cached costs a fifth of a dict keyed by new tuples). Then
        # each change is its object's final state, and the touched objects are found by a join.
        distinct = len(set(map(_NAME, rows))) == len(rows)
        count, xor = self._kept_locked()
        gone, gone_xor = objects_xor(self._db.execute(
            _TOUCHED_DISTINCT if distinct else _TOUCHED_OBJECTS,
            (changes[0].seq, changes[-1].seq)))
        # The last change of each object decides its final state.
        final = rows if distinct else [*{(row[5], row[6]): row for row in rows}.values()]
        added, added_xor = objects_xor((kind, name, body or "null") for
                                       _, _, _, _, op, kind, name, body in final
                                       if op == "set")
        self._set_meta_locked({_COUNT: count - gone + added,
                               _XOR: f"{xor ^ gone_xor ^ added_xor:x}"})
        for op, run in itertools.groupby(rows, key=operator.itemgetter(4)):
            seqs = [row[0] for row in run]  # an import or a catch-up is a single run
            self._db.execute(_SETS_FROM_CHANGES if op == "set" else _DELETES_FROM_CHANGES,
                             (seqs[0], seqs[-1]))

    def _insert_rows(self, insert: str, rows: list[tuple[Any, ...]]) -> None:
        """Bind change rows ``ROWS_PER_INSERT`` to a statement (``insert`` + its values)."""
        whole = len(rows) - len(rows) % ROWS_PER_INSERT
        if whole:
            width = len(rows[0]) * ROWS_PER_INSERT
            flat = list(itertools.chain.from_iterable(rows[:whole]))
            self._db.executemany(insert + _ROWS,
                                 (flat[i:i + width] for i in range(0, len(flat), width)))
        if whole < len(rows):
            self._db.executemany(insert + _ROW, rows[whole:])

    def _kept_locked(self) -> tuple[int, int]:
        """The kept ``(count, xor)`` (``format_checksum``)."""
        rows = dict(self._db.execute("SELECT key, value FROM meta WHERE key IN (?,?)",
                                     (_COUNT, _XOR)).fetchall())
        return int(rows.get(_COUNT, 0)), int(rows.get(_XOR, "0"), 16)

    def mark_published(self, up_to_seq: int) -> None:
        """The broker confirmed every change up to ``up_to_seq``: move the mark (one value)."""
        with self.lock, self._tx():
            mark = min(max(self.published_seq, up_to_seq), self.last_seq)
            self._set_meta_locked({_PUBLISHED: mark})

    def unpublished(self) -> list[Change]:
        """Committed changes the broker has not confirmed yet, in seq order."""
        return self.changes_between(self.published_seq)

    def outbox_rows(self, after_seq: int, limit: int) -> list[tuple[Any, ...]]:
        """Up to ``limit`` stored change rows after ``after_seq``, bodies as canonical text.

        ``(seq, epoch, ts, origin, op, kind, name, body)``: what the relay publishes, without
        decoding and encoding every body again.

        Read on a connection of the outbox's own, without the store's lock: the relay reads
        the outbox while it publishes, holding the master's seat, and a thread committing
        holds the store's lock while it checks the seat. Each read sees the committed state
        as of its start (WAL), and committed rows are not rewritten while they wait.
        """
        with self._outbox_reader() as db:
            return db.execute("SELECT seq, epoch, ts, origin, op, kind, name, body FROM changes "
                              "WHERE seq>? ORDER BY seq LIMIT ?", (after_seq, limit)).fetchall()

    @contextlib.contextmanager
    def _outbox_reader(self) -> Iterator[sqlite3.Connection]:
        """The outbox's connection (``outbox_rows``), for one read at a time."""
        with self._outbox_lock:
            if self._outbox_db is None:
                self._outbox_db = sqlite3.connect(self.path, check_same_thread=False,
                                                  isolation_level=None)
            yield self._outbox_db

    def changes_between(self, after_seq: int, up_to_seq: int | None = None) -> list[Change]:
        """Changes with ``after_seq < seq <= up_to_seq`` from the local history."""
        top = up_to_seq if up_to_seq is not None else 2**62
        return self._changes("WHERE seq>? AND seq<=? ORDER BY seq", (after_seq, top))

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
        """Stored objects that refer to ``(kind, name)``, as ``"kind name"`` strings.

        The references are ``tasync.broker.kinds.REFERENCES``; SQLite's JSON functions find them
        without reading every body into Python.
        """
        found: list[str] = []
        for ref in REFERENCES:
            if kind not in ref.targets:
                continue
            sql = (f"SELECT o.name FROM objects o, json_each(o.body, '$.{ref.field}') m "
                   "WHERE o.kind=? AND m.value=?" if ref.many else
                   f"SELECT name FROM objects WHERE kind=? AND json_extract(body, "
                   f"'$.{ref.field}')=?")
            with self.lock:
                rows = self._db.execute(sql, (ref.kind, name)).fetchall()
            found += [f"{ref.kind} {row[0]}" for row in rows]
        return found

    def count(self) -> int:
        """Number of configuration objects held (kept with every write, not counted)."""
        with self.lock:
            return self._kept_locked()[0]

    def export_chunks(self) -> Iterator[bytes]:
        """The canonical export in pieces, with flat memory, outside the store's lock.

        Every kind, objects sorted by name, stable indentation: joined, the pieces are the
        bytes of ``json.dumps(state, sort_keys=True, indent=2, ensure_ascii=False) + "\\n"``.
        The objects are read through a second, read-only connection in one read transaction:
        a consistent state, while this node goes on applying and committing.
        """
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        try:
            db.execute("BEGIN")
            rows = db.execute("SELECT kind, name, body FROM objects ORDER BY kind, name")
            yield from _export_pieces(rows)
        finally:
            db.close()

    def export_bytes(self) -> bytes:
        """The whole canonical export at once (``export_chunks``)."""
        return b"".join(self.export_chunks())

    def checksum(self, *, fresh: bool = False) -> str:
        """The configuration's checksum (``format_checksum``); nodes in sync have the same one.

        It is kept up to date by every write, so reading it costs a read; ``fresh`` hashes
        every stored object again (and keeps the result), which also notices a file changed
        behind the store's back (recovery's drift check).
        """
        with self.lock:
            if fresh:
                with self._tx():
                    count, xor = self._recount_locked()
            else:
                count, xor = self._kept_locked()
        return format_checksum(count, xor)

    @property
    def cached_checksum(self) -> str:
        """The checksum, always valid: it is kept with every write (same as ``checksum()``)."""
        return self.checksum()

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    def snapshot(self) -> Snapshot:
        """The whole configuration and its seq, read at once (what ``replace_all`` installs)."""
        with self.lock:
            rows = self._db.execute(
                "SELECT kind, name, body FROM objects ORDER BY kind, name").fetchall()
            return Snapshot(seq=self.last_seq, epoch=self.epoch, ts=self.last_ts,
                            eras=self.history.to_list(),
                            objects=[(k, n, json.loads(b)) for k, n, b in rows])

    def replace_all(self, objects: Iterable[tuple[str, str, dict[str, Any]]], *, seq: int,
                    epoch: int, ts: float, history: EpochHistory | None = None) -> None:
        """Install a snapshot: the whole configuration as of ``seq``, replacing what was here.

        The local history goes too: it described the state being replaced, and a diverged
        node's history holds changes the network never had (they were kept as conflicts).
        """
        with self.lock, self._tx():
            self._db.execute("DELETE FROM objects")
            self._db.execute("DELETE FROM changes")
            self._db.executemany(
                "INSERT INTO objects(kind, name, body, seq) VALUES(?,?,?,?)",
                [(k, n, canonical(b), seq) for k, n, b in objects],
            )
            self._recount_locked()
            self._bump_locked([""])
            self._set_meta_locked({"last_seq": seq, "epoch": max(self.epoch, epoch),
                                   "last_ts": ts, "diverged": 0, "snapshot_seq": seq,
                                   _PUBLISHED: seq})
            if history is not None:
                self._set_history_locked(history.merge(self.history))

    def set_aside(self, changes: list[Change]) -> None:
        """Drop ``changes`` from the history and mark the node diverged (they became conflicts).

        Their effects stay in the objects until a snapshot replaces them, so the node must not
        serve snapshots or apply further changes before it recovered.
        """
        with self.lock, self._tx():
            self._db.executemany("DELETE FROM changes WHERE seq=? AND epoch=?",
                                 [(c.seq, c.epoch) for c in changes])
            self._set_meta_locked({"diverged": 1, _PUBLISHED: self.last_seq})


def _export_pieces(rows: Iterable[tuple[str, str, str]]) -> Iterator[bytes]:
    """``export_chunks`` from ``(kind, name, body text)`` rows sorted by kind and name."""
    empty_kinds = sorted(KINDS)
    yield b"{"
    lead, current = "\n", None
    for kind, name, body in rows:
        if kind != current:
            if current is not None:
                yield b"\n  }"
            while empty_kinds and empty_kinds[0] < kind:  # kinds with no objects, in order
                yield f"{lead}  {json.dumps(empty_kinds.pop(0))}: {{}}".encode()
                lead = ",\n"
            if empty_kinds and empty_kinds[0] == kind:
                empty_kinds.pop(0)
            yield f"{lead}  {json.dumps(kind, ensure_ascii=False)}: {{\n".encode()
            current, lead = kind, ",\n"
            first = True
        text = json.dumps(json.loads(body), sort_keys=True, indent=2,
                          ensure_ascii=False).replace("\n", "\n    ")
        yield (("" if first else ",\n") + f"    {json.dumps(name, ensure_ascii=False)}: "
               f"{text}").encode()
        first = False
    if current is not None:
        yield b"\n  }"
    for kind in empty_kinds:
        yield f"{lead}  {json.dumps(kind)}: {{}}".encode()
        lead = ",\n"
    yield b"\n}\n" if lead != "\n" else b"}\n"


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
