"""The master's change relay: commit to the outbox, publish with confirms, then report.

``submit`` is the only way configuration changes enter the network. It validates the
operations (``tasync.producers.changes``), gives each its ``(epoch, seq)``, commits changes and
objects in one SQLite transaction, publishes them to ``tasync.config`` (reaching every sync
queue and the change-log stream at once) and returns only after the broker confirmed.

The outbox is every committed change above the store's published-up-to mark. Publishing reads
it from the mark on, in passes of bounded size, with a bounded number of bytes unconfirmed at
a time, and moves the mark forward over each run of messages the broker confirmed in order: a
publish that times out half-way, or a master killed half-way, resumes where the confirms
stopped, never at the first change of a large import. Backups skip by seq whatever they got
twice. ``submit`` publishes its own changes and retries while confirms keep coming; a
background thread (``start``) publishes whatever is left after a timeout or a restart until
the outbox is empty, while the node is master with the seat.

A relay commits only while its node is the master of the newest era it knows and holds the
master's seat on the broker (``tasync.broker.seat``): the store's role, the era and a round trip to
the broker are checked inside the same lock that guards the commit, so no change is numbered in an
epoch the node does not own, and none is reported committed unless the broker confirmed it on
the seat's connection. A promotion's epoch mark goes out through the same confirmed, signed
path as the changes (``publish_mark``).

Every request may carry an id. The master keeps the ids it committed, with the seqs they
became, and the batches carry them to every backup: a client that lost its answer asks again
with the same id and gets the first result instead of a second commit, whichever node is the
master by then.

Every batch message names its seqs, epoch and origin in headers. The master's own sync queue
receives its batches too; they are already in its store, so its sync consumer skips them
without decoding them. Headers are not signed, so they only select the candidates: the relay
remembers a digest of every batch body it encoded from its own committed rows (``own_batch``),
and only a body byte for byte equal to one of those is skipped (``tasync.consumers.sync``).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import msgspec

from tasync.broker import messages, topology
from tasync.broker.collector import BULK_OPS, collector_paused
from tasync.broker.commits import Committed, Op
from tasync.broker.connection import RECOVERABLE, describe
from tasync.broker.epochs import EpochMark
from tasync.broker.errors import FencedError, PublishError, SeatLost
from tasync.broker.messages import Change, ChangeBatch
from tasync.broker.protocol import Role
from tasync.broker.publisher import Outgoing
from tasync.broker.seat import MasterSeat
from tasync.broker.signing import SIGNATURE_HEADER, KeyRing
from tasync.broker.store import NodeStore
from tasync.producers.changes import check_references

log = logging.getLogger("tasync.relay")
#: Bytes of a batch message beyond its changes: version, type, epoch, origin, brackets.
BATCH_ENVELOPE_BYTES = 256
#: What stops a background pass; it is tried again (``_run``).
_FAILURES: tuple[type[BaseException], ...] = (PublishError, SeatLost, *RECOVERABLE,
                                              sqlite3.Error)
#: Outbox rows read from the store at a time.
OUTBOX_PAGE = 5000
#: A publishing pass holds this many body bytes, read and encoded at once; the mark moves
#: after each (over what was confirmed in order, also when the pass failed), and the control
#: thread's seat checks wait for at most a pass.
PASS_BYTES = 16 << 20
#: How long the background publisher waits after a failed pass before it tries again.
RETRY_AFTER_S = 1.0
#: Digests of own batch bodies kept for the master's sync consumer (``own_batch``): four
#: imports of 1,000,000 changes, 32 bytes each; the oldest are forgotten (and a forgotten body
#: takes the full path, which skips it by seq).
OWN_BODIES_KEPT = 4096


def _never(reason: str) -> NoReturn:
    raise AssertionError(f"a fault was asked for without a way to crash: {reason}")


@dataclass(frozen=True)
class RelayFaults:
    """Faults the recovery and outbox tests inject into a master's relay; none by default.

    The node builds this from the settings (``$TASYNC_FAILPOINT``); the relay never reads the
    environment and never ends the process itself.

    Attributes:
        name: ``before-publish``: crash right after committing a change and before publishing
            it (the change stays unconfirmed in the outbox). ``publish-timeout`` (once per
            process) or ``exit-mid-publish``: the first publishing pass of more than one
            message publishes only its first half, is marked, and then fails as a confirm
            timeout would, or crashes as if killed.
        crash: ends the process at once, as a SIGKILL would (given by the node).
    """

    name: str = ""
    crash: Callable[[str], NoReturn] = _never


def batch_messages(batches: Iterable[ChangeBatch], keyring: KeyRing | None) -> list[Outgoing]:
    """One persistent message per batch to the config fanout, signed when a key ring is set."""
    return [_message(batch, messages.encode(batch), keyring) for batch in batches]


def _message(batch: ChangeBatch, body: bytes, keyring: KeyRing | None) -> Outgoing:
    return _signed(body, batch_headers(batch.first_seq, batch.last_seq, batch.epoch,
                                       batch.origin), keyring)


def batch_headers(first_seq: int, last_seq: int, epoch: int, origin: str) -> dict[str, object]:
    """What a batch message says of itself outside its body (unsigned: a hint, never trusted).

    A node reads ``origin``, ``epoch`` and ``last-seq`` to tell its own batches from others'
    without decoding them; an operator sees them in the management UI.
    """
    return {"tasync-type": "changes", "first-seq": first_seq, "last-seq": last_seq,
            "epoch": epoch, "origin": origin}


def body_digest(body: bytes) -> bytes:
    """A collision-resistant digest of a message body (what ``own_batch`` compares).

    SHA-256: the fastest of ``hashlib``'s on processors with SHA extensions (about 1 GB/s
    here, against 0.6 GB/s for BLAKE2b), a few times cheaper than decoding the batch.
    """
    return hashlib.sha256(body).digest()


def _signed(body: bytes, headers: dict[str, object], keyring: KeyRing | None) -> Outgoing:
    """A persistent message to the config fanout, with its signature when a key ring is set."""
    if keyring is not None:
        headers[SIGNATURE_HEADER] = keyring.sign(body)
    return Outgoing(exchange=topology.CONFIG_EXCHANGE, routing_key="", body=body,
                    headers=headers)


def encoded_chunks(changes: list[Change], *, max_changes: int,
                   max_bytes: int) -> list[tuple[ChangeBatch, bytes]]:
    """``chunk`` and ``messages.encode`` at once, encoding every change only once.

    The batching is ``outbox_batches``'s, fed the changes as rows whose bodies are encoded
    the way ``messages.encode`` encodes them, so a batch's body is byte for byte what
    ``messages.encode(batch)`` gives (``tests/unit/producers/test_relay.py``).
    """
    rows = [(c.seq, c.epoch, c.ts, c.origin, c.op, c.kind, c.name,
             None if c.body is None else messages.encode_value(c.body).decode())
            for c in changes]
    out: list[tuple[ChangeBatch, bytes]] = []
    start = 0
    for batch in outbox_batches(rows, {}, max_changes=max_changes, max_bytes=max_bytes):
        end = start + batch.last_seq - batch.first_seq + 1
        out.append((_batch(changes[start:end]), batch.body))
        start = end
    return out


def chunk(changes: list[Change], *, max_changes: int, max_bytes: int) -> list[ChangeBatch]:
    """Split consecutive changes into batches under both limits; each keeps its own seq."""
    return [batch for batch, _ in encoded_chunks(changes, max_changes=max_changes,
                                                 max_bytes=max_bytes)]


def _batch(changes: list[Change]) -> ChangeBatch:
    return ChangeBatch(epoch=changes[0].epoch, origin=changes[0].origin, changes=tuple(changes))


@dataclass(frozen=True)
class _Outgoing:
    """One batch read from the outbox, encoded: its seqs, epoch, origin and message body."""

    first_seq: int
    last_seq: int
    body: bytes
    epoch: int
    origin: str


class _Spliced(msgspec.Struct, gc=False):
    """One change's wire form (``messages.change_to_dict``, keys in that order), body spelled.

    msgspec writes a ``Raw`` as it is, so a stored canonical body goes out unchanged. Building
    the head as a dict, encoding it and splicing the body in took twice as long, and a
    100,000-object import encodes 100,000 of them on the master.
    """

    epoch: int
    seq: int
    ts: float
    origin: str
    op: str
    kind: str
    name: str
    body: msgspec.Raw


_encode_spliced = msgspec.json.Encoder().encode
_NULL = msgspec.Raw(b"null")


def outbox_batches(rows: Iterable[tuple[Any, ...]], requests: dict[int, list[tuple[str, int]]],
                   *, max_changes: int, max_bytes: int) -> Iterator[_Outgoing]:
    """Encode stored change rows (``NodeStore.outbox_rows``) into batch bodies.

    A row's body is already canonical JSON, so it is spliced in as it is, not decoded and
    encoded again. Batches hold one epoch and origin each, at most ``max_changes`` changes and
    about ``max_bytes``; the batch holding a request's last change names the request
    (``requests``: by last seq, ``(request id, first seq)``), so a backup records them too
    and a later master can answer a client that asks again (``NodeStore.request``).
    """
    budget = max_bytes - BATCH_ENVELOPE_BYTES
    parts: list[bytes] = []
    ids: list[tuple[str, int]] = []
    size, first, last, key = 0, 0, 0, (0, "")

    def flush() -> _Outgoing:
        head = messages.encode_value({"v": messages.SCHEMA_VERSION, "type": "changes",
                                      "epoch": key[0], "origin": key[1]})
        body = head[:-1] + b',"changes":[' + b",".join(parts) + b"]"
        if ids:
            body += b',"requests":' + messages.encode_value([list(r) for r in ids])
        return _Outgoing(first, last, body + b"}", key[0], key[1])

    for seq, epoch, ts, origin, op, kind, name, text in rows:
        part = _encode_spliced(_Spliced(epoch, seq, ts, origin, op, kind, name,
                                        _NULL if text is None else msgspec.Raw(text.encode())))
        if parts and (len(parts) >= max_changes or size + len(part) + 1 > budget
                      or (epoch, origin) != key):
            yield flush()
            parts, ids, size = [], [], 0
        if not parts:
            first, key = seq, (epoch, origin)
        parts.append(part)
        size += len(part) + 1
        last = seq
        ids += requests.get(seq, ())
    if parts:
        yield flush()


class ChangeRelay:
    """Commits and publishes the master's changes.

    ``submit`` runs on the control server's thread; ``start`` runs the background publisher.
    Both publish through ``publish_outbox``, one at a time, always from the mark on.

    Args:
        store: the master's store, opened with ``durable=True``.
        node: the master's node name, the ``origin`` of every change.
        seat: the master's seat; changes are published on its connection.
        keyring: signs every batch when set.
        batch_max_changes: changes per replication message.
        batch_max_bytes: upper bound of one replication message's body.
        window_bytes: most body bytes published and not yet confirmed.
        progress: told how far a long publish got (it also keeps an asker's connection alive).
    """

    def __init__(self, store: NodeStore, *, node: str, seat: MasterSeat,
                 keyring: KeyRing | None = None, batch_max_changes: int = 1000,
                 batch_max_bytes: int = 1 << 20, window_bytes: int = 16 << 20,
                 progress: Callable[[dict[str, Any]], None] | None = None,
                 faults: RelayFaults | None = None) -> None:
        self.store = store
        self.faults = faults or RelayFaults()
        self.node = node
        self.seat = seat
        self.keyring = keyring
        self.batch_max_changes = batch_max_changes
        self.batch_max_bytes = batch_max_bytes
        self.window_bytes = window_bytes
        self.progress = progress or (lambda _data: None)
        #: One publisher at a time: a pass reads from the mark and moves it.
        self._publishing = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False  # the fault fired (``RelayFaults``)
        #: Digest of every own batch body encoded here -> (epoch, last seq), oldest first.
        self._own: OrderedDict[bytes, tuple[int, int]] = OrderedDict()
        self._own_lock = threading.Lock()

    def publish_mark(self, mark: EpochMark) -> None:
        """Publish a promotion's epoch mark with confirms, signed like the changes."""
        self.seat.publish([_signed(messages.encode(mark),
                                   {"tasync-type": "epoch", "epoch": mark.epoch}, self.keyring)])

    def own_batch(self, body: bytes, *, epoch: int, last_seq: int) -> bool:
        """Whether ``body`` is a batch this relay encoded from its own rows of ``epoch``.

        True only for a body byte for byte equal to one encoded by ``_publish_pass`` from
        changes this node committed in ``epoch``, up to ``last_seq``: decoding it would give
        changes the store already holds. Each body is recognised once (a redelivery takes the
        full path).
        """
        with self._own_lock:
            known = self._own.pop(body_digest(body), None)
        return known == (epoch, last_seq)

    def _remember(self, batch: _Outgoing) -> None:
        """Remember an own batch before it is published (its sync queue may hold it at once)."""
        if batch.origin != self.node:
            return
        with self._own_lock:
            self._own[body_digest(batch.body)] = (batch.epoch, batch.last_seq)
            while len(self._own) > OWN_BODIES_KEPT:
                self._own.popitem(last=False)

    # -- the outbox -----------------------------------------------------------------------------

    def publish_outbox(self) -> int:
        """Publish every committed but unconfirmed change, in seq order; returns how many.

        Starts at the store's mark and moves it as confirms arrive; the request ids those
        changes complete go with them, so a backup knows them too.

        Raises:
            PublishError: a confirm did not come in time or a batch was refused; the mark
                stays after the last change confirmed in order.
            SeatLost: the seat's connection broke.
        """
        with self._publishing:
            store, done = self.store, 0
            first = store.published_seq + 1
            if store.last_seq >= first:
                log.info("publishing %d unconfirmed changes from the outbox (seq %d..%d)",
                         store.last_seq - first + 1, first, store.last_seq)
            while store.published_seq < store.last_seq:
                after = store.published_seq
                done += self._publish_pass(after, store.last_seq)
                if store.published_seq == after:  # no row above the mark: nothing to send
                    raise PublishError(f"the outbox holds no change after seq {after} "
                                       f"although seq {store.last_seq} was committed")
            return done

    def _publish_pass(self, after: int, top: int) -> int:
        """Publish up to ``PASS_BYTES`` of the outbox after seq ``after``; returns the count.

        Messages are read and encoded as they are published (``_encoded``), so the first goes
        out as soon as it is encoded, not after the whole pass: the backups start applying
        while the rest is read. The mark moves after the pass, over what the broker confirmed
        in order. The seat's lock is held while publishing, and a thread holding the store's
        lock may wait for the seat's (``submit`` checks the seat inside it), so reading the
        outbox does not take the store's lock (``NodeStore.outbox_rows``), and the mark is
        moved after the seat's lock is released.
        """
        ends: list[int] = []  # last seq of every message encoded, in order
        out: Iterable[Outgoing] = self._encoded(after, top, ends)
        bulk = top - after >= BULK_OPS
        failpoint = self.faults.name
        cut = failpoint in ("publish-timeout", "exit-mid-publish") and not self._failed
        if cut:  # the fault needs the pass's length: read it whole first
            with collector_paused(bulk):
                listed = list(out)
            cut = len(listed) > 1
            if cut:
                self._failed = True
                listed = listed[:len(listed) // 2]
                del ends[len(listed):]
            out = listed
        confirmed = [0]  # messages confirmed in order; set with the seat's lock held
        try:
            with collector_paused(bulk):
                self.seat.publish(out, window_bytes=self.window_bytes,
                                  on_confirmed=lambda n: confirmed.__setitem__(0, n))
            confirmed[0] = len(ends)
        finally:
            if confirmed[0]:
                self.store.mark_published(ends[confirmed[0] - 1])
        if cut and failpoint == "exit-mid-publish":
            self.faults.crash(f"failpoint exit-mid-publish: exiting at seq "
                              f"{ends[confirmed[0] - 1]}")
        if cut:
            raise PublishError(f"failpoint publish-timeout after seq {ends[confirmed[0] - 1]}")
        if ends and threading.current_thread() is not self._thread:  # an asker's thread
            self.progress({"stage": "publishing", "done": ends[-1], "total": top})
        return ends[confirmed[0] - 1] - after if confirmed[0] else 0

    def _encoded(self, after: int, top: int, ends: list[int]) -> Iterator[Outgoing]:
        """Read and encode up to ``PASS_BYTES`` of the outbox after ``after``, lazily.

        Appends each message's last seq to ``ends`` as it yields the message.
        """
        size, cursor = 0, after
        while cursor < top and size < PASS_BYTES:
            rows = self.store.outbox_rows(cursor, min(OUTBOX_PAGE, top - cursor))
            if not rows:
                return
            reqs: dict[int, list[tuple[str, int]]] = {}
            for r in self.store.requests_ending_in(rows[0][0], rows[-1][0]):
                reqs.setdefault(r.last_seq, []).append((r.request_id, r.first_seq))
            for batch in outbox_batches(rows, reqs, max_changes=self.batch_max_changes,
                                        max_bytes=self.batch_max_bytes):
                ends.append(batch.last_seq)
                size += len(batch.body)
                self._remember(batch)
                yield _signed(batch.body, batch_headers(
                    batch.first_seq, batch.last_seq, batch.epoch, batch.origin), self.keyring)
            cursor = rows[-1][0]

    def publish_through(self, seq: int) -> None:
        """Publish the outbox until ``seq`` is confirmed; retry while confirms keep coming.

        Raises:
            PublishError: a pass failed without moving the mark; the background publisher
                goes on trying.
            SeatLost: the seat's connection broke.
        """
        while self.store.published_seq < seq:
            before = self.store.published_seq
            try:
                self.publish_outbox()
            except PublishError as exc:
                if self.store.published_seq == before:
                    self._wake.set()
                    raise
                log.warning("%s; publishing again from seq %d", exc,
                            self.store.published_seq + 1)

    # -- the background publisher ---------------------------------------------------------------

    def start(self) -> None:
        """Publish the outbox from a thread whenever it holds changes and this node may."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"tasync-relay-{self.node}",
                                            daemon=True)
            self._thread.start()
        self._wake.set()

    def wake(self) -> None:
        """Have the background publisher look at the outbox now."""
        self._wake.set()

    def stop(self) -> None:
        """Stop the background publisher (before the store closes)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10.0)

    def _may_publish(self) -> bool:
        store = self.store
        if store.published_seq >= store.last_seq or not self.seat.held:
            return False
        era = store.history.current
        return (store.get_meta("role") == Role.MASTER and era is not None
                and era.origin == self.node)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(RETRY_AFTER_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self._may_publish():
                    count = self.publish_outbox()
                    if count:
                        log.info("published the outbox up to seq %d", self.store.published_seq)
            except _FAILURES as exc:
                log.warning("publishing the outbox stopped at seq %d: %s; trying again",
                            self.store.published_seq, describe(exc))
                self._stop.wait(RETRY_AFTER_S)
                self._wake.set()

    def check_may_commit(self) -> None:
        """Refuse unless this node is the master of the newest era it knows, with the seat.

        Raises:
            FencedError: the store says backup, or the newest era is another node's.
            SeatLost: the broker no longer holds the seat for this node.
        """
        store = self.store
        if store.get_meta("role") != Role.MASTER:
            raise FencedError(f"{self.node} is no longer the master (epoch {store.epoch}); "
                              "send changes to the current master")
        era = store.history.current
        if era is None or era.origin != self.node or era.epoch != store.epoch:
            owner = f"{era.origin}'s epoch {era.epoch}" if era else "no era"
            raise FencedError(f"{self.node} does not own the newest era ({owner}); it refuses "
                              "to commit")
        self.seat.check()

    def submit(self, parsed: list[Op], *, request_id: str | None = None,
               staged: str | None = None) -> Committed:
        """Check references, commit and publish operations; returns once the broker confirmed.

        ``parsed`` comes from ``tasync.broker.commits.parse_ops``, which checked each body's schema.
        A ``request_id`` committed before returns that first result and commits nothing.
        ``staged`` names an import whose staged parts the commit drops in its transaction.

        Raises:
            ValidationError: nothing was committed.
            FencedError, SeatLost: this node may not commit; nothing was committed.
            SeatLost: committed locally, then the seat was lost before the broker confirmed:
                the change is not reported; it reaches the network only if this node keeps
                (or regains) the seat, else it becomes a conflict of this node.
            PublishError: committed locally but not confirmed; the rows stay in the outbox.
        """
        with self.store.lock:
            done = self.store.request(request_id) if request_id else None
            if done is None:
                self.check_may_commit()  # a round trip to the broker: not in the pause below
                with collector_paused(len(parsed) >= BULK_OPS):
                    ops = check_references(self.store, parsed)
                    epoch, seq, now = self.store.epoch, self.store.last_seq, time.time()
                    changes = [
                        Change(epoch=epoch, seq=seq + i + 1, ts=now, origin=self.node,
                               op=o.op, kind=o.kind, name=o.name, body=o.body)
                        for i, o in enumerate(ops)
                    ]
                    self.store.commit(changes, request_id=request_id, staged=staged)
        if done is not None:  # publishing happens outside the store's lock (``_publish_pass``)
            if done.last_seq > self.store.published_seq:
                self.check_may_commit()
                self.publish_through(done.last_seq)
            return Committed.from_request(done)
        if not changes:
            return Committed(seq, seq, 0, epoch)
        if self.faults.name == "before-publish":
            self.faults.crash(f"failpoint before-publish: exiting after commit of seq {seq + 1}")
        self.publish_through(changes[-1].seq)  # older unconfirmed rows go first, in order
        log.info("committed seq %d..%d (%d changes)", changes[0].seq, changes[-1].seq,
                 len(changes))
        return Committed(changes[0].seq, changes[-1].seq, len(changes), epoch)
