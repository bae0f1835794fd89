"""The master's change relay: commit to the outbox, publish with confirms, then report.

``submit`` is the only way configuration changes enter the network. It validates the
operations (``producers.changes``), gives each its ``(epoch, seq)``, commits changes and outbox
rows in one SQLite transaction, publishes them to ``tasync.config`` (reaching every sync
queue and the change-log stream at once) and returns only after the broker confirmed. A crash
between commit and confirm leaves the rows unpublished; ``publish_outbox`` at start sends them
again, and backups skip what they already have by seq.

A relay commits only while its node is the master of the newest era it knows and holds the
master's seat on the broker (``broker.seat``): the store's role, the era and a round trip to the
broker are checked inside the same lock that guards the commit, so no change is numbered in an
epoch the node does not own, and none is reported committed unless the broker confirmed it on
the seat's connection. A promotion's epoch mark goes out through the same confirmed, signed
path as the changes (``publish_mark``).

Every request may carry an id. The master keeps the ids it committed, with the seqs they
became, and the batches carry them to every backup: a client that lost its answer asks again
with the same id and gets the first result instead of a second commit, whichever node is the
master by then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from broker import messages, topology
from broker.epochs import EpochMark
from broker.errors import FencedError
from broker.messages import Change, ChangeBatch
from broker.protocol import Role
from broker.publisher import Outgoing
from broker.seat import MasterSeat
from broker.signing import SIGNATURE_HEADER, KeyRing
from broker.store import CommittedRequest, NodeStore
from producers.changes import Op, check_references

log = logging.getLogger("tasync.relay")
#: Bytes of a batch message beyond its changes: version, type, epoch, origin, brackets.
BATCH_ENVELOPE_BYTES = 256


@dataclass(frozen=True)
class Committed:
    """What a ``submit`` committed and the broker confirmed.

    ``repeated`` is set when the request id had been committed before: nothing new was.
    """

    first_seq: int
    last_seq: int
    count: int
    epoch: int
    repeated: bool = False

    @classmethod
    def from_request(cls, done: CommittedRequest) -> Committed:
        """The answer a request id got the first time it was committed."""
        return cls(done.first_seq, done.last_seq, done.count, done.epoch, repeated=True)


def batch_messages(batches: Iterable[ChangeBatch], keyring: KeyRing | None) -> list[Outgoing]:
    """One persistent message per batch to the config fanout, signed when a key ring is set."""
    return [_message(batch, messages.encode(batch), keyring) for batch in batches]


def _message(batch: ChangeBatch, body: bytes, keyring: KeyRing | None) -> Outgoing:
    return _signed(body, {"tasync-type": "changes", "first-seq": batch.first_seq,
                          "last-seq": batch.last_seq}, keyring)


def _signed(body: bytes, headers: dict[str, object], keyring: KeyRing | None) -> Outgoing:
    """A persistent message to the config fanout, with its signature when a key ring is set."""
    if keyring is not None:
        headers[SIGNATURE_HEADER] = keyring.sign(body)
    return Outgoing(exchange=topology.CONFIG_EXCHANGE, routing_key="", body=body,
                    headers=headers)


def encoded_chunks(changes: list[Change], *, max_changes: int,
                   max_bytes: int) -> list[tuple[ChangeBatch, bytes]]:
    """``chunk`` and ``messages.encode`` at once, encoding every change only once.

    Sizing a batch needs each change's encoded length, and encoding the batch afterwards did
    the same work again; here a batch's body is its changes' JSON joined inside the envelope,
    byte for byte what ``messages.encode(batch)`` gives (``tests/unit/producers/test_relay.py``).
    """
    budget = max_bytes - BATCH_ENVELOPE_BYTES
    out: list[tuple[ChangeBatch, bytes]] = []
    current: list[Change] = []
    parts: list[bytes] = []
    size = 0
    for change in changes:
        part = messages.encode_value(messages.change_to_dict(change))
        if current and (len(current) >= max_changes or size + len(part) + 1 > budget):
            out.append(_encoded(current, parts))
            current, parts, size = [], [], 0
        current.append(change)
        parts.append(part)
        size += len(part) + 1
    if current:
        out.append(_encoded(current, parts))
    return out


def _encoded(changes: list[Change], parts: list[bytes]) -> tuple[ChangeBatch, bytes]:
    batch = _batch(changes)
    head = messages.encode_value({"v": messages.SCHEMA_VERSION, "type": "changes",
                                  "epoch": batch.epoch, "origin": batch.origin})
    return batch, head[:-1] + b',"changes":[' + b",".join(parts) + b"]}"


def with_requests(encoded: list[tuple[ChangeBatch, bytes]],
                  requests: tuple[tuple[str, int], ...]) -> list[tuple[ChangeBatch, bytes]]:
    """The same batches, the last one also naming the request ids its last change completes.

    Backups record them, so a later master can answer a client that asks again after a
    promotion (``NodeStore.request``).
    """
    if not requests or not encoded:
        return encoded
    batch, body = encoded[-1]
    last = ChangeBatch(epoch=batch.epoch, origin=batch.origin, changes=batch.changes,
                       requests=requests)
    tail = messages.encode_value([list(r) for r in requests])
    return [*encoded[:-1], (last, body[:-1] + b',"requests":' + tail + b"}")]


def chunk(changes: list[Change], *, max_changes: int, max_bytes: int) -> list[ChangeBatch]:
    """Split consecutive changes into batches under both limits; each keeps its own seq."""
    return [batch for batch, _ in encoded_chunks(changes, max_changes=max_changes,
                                                 max_bytes=max_bytes)]


def _batch(changes: list[Change]) -> ChangeBatch:
    return ChangeBatch(epoch=changes[0].epoch, origin=changes[0].origin, changes=tuple(changes))


class ChangeRelay:
    """Commits and publishes the master's changes; used from one thread (the control server's).

    Args:
        store: the master's store, opened with ``durable=True``.
        node: the master's node name, the ``origin`` of every change.
        seat: the master's seat; changes are published on its connection.
        keyring: signs every batch when set.
        batch_max_changes: changes per replication message.
        batch_max_bytes: upper bound of one replication message's body.
    """

    def __init__(self, store: NodeStore, *, node: str, seat: MasterSeat,
                 keyring: KeyRing | None = None, batch_max_changes: int = 1000,
                 batch_max_bytes: int = 1 << 20,
                 before_publish: Callable[[int], None] | None = None) -> None:
        self.store = store
        #: Called with the first committed seq, after the commit and before the publish: the
        #: window a crash leaves a change committed but unconfirmed. The recovery tests
        #: inject a crash here (``tasync.node``); nothing else uses it.
        self.before_publish = before_publish or (lambda _seq: None)
        self.node = node
        self.seat = seat
        self.keyring = keyring
        self.batch_max_changes = batch_max_changes
        self.batch_max_bytes = batch_max_bytes

    def _publish(self, encoded: list[tuple[ChangeBatch, bytes]]) -> None:
        self.seat.publish([_message(batch, body, self.keyring) for batch, body in encoded])
        self.store.mark_published(encoded[-1][0].last_seq)

    def publish_mark(self, mark: EpochMark) -> None:
        """Publish a promotion's epoch mark with confirms, signed like the changes."""
        self.seat.publish([_signed(messages.encode(mark),
                                   {"tasync-type": "epoch", "epoch": mark.epoch}, self.keyring)])

    def publish_outbox(self) -> int:
        """Publish every committed but unconfirmed change, in seq order; returns how many.

        The request ids those changes complete go with them, so a backup knows them too.
        """
        pending = self.store.unpublished()
        if pending:
            log.info("publishing %d unconfirmed changes from the outbox (seq %d..%d)",
                     len(pending), pending[0].seq, pending[-1].seq)
            requests = self.store.requests_ending_in(pending[0].seq, pending[-1].seq)
            by_epoch: dict[int, list[Change]] = {}
            for change in pending:
                by_epoch.setdefault(change.epoch, []).append(change)
            for group in by_epoch.values():
                self._publish_group(group, [r for r in requests
                                            if group[0].seq <= r.last_seq <= group[-1].seq])
        return len(pending)

    def _publish_group(self, changes: list[Change], requests: list[CommittedRequest]) -> None:
        """Publish consecutive changes, each request id on the batch holding its last change."""
        tagged: list[tuple[ChangeBatch, bytes]] = []
        for batch, body in self._chunk(changes):
            ids = tuple((r.request_id, r.first_seq) for r in requests
                        if batch.first_seq <= r.last_seq <= batch.last_seq)
            tagged += with_requests([(batch, body)], ids)
        self._publish(tagged)

    def _chunk(self, changes: list[Change]) -> list[tuple[ChangeBatch, bytes]]:
        return encoded_chunks(changes, max_changes=self.batch_max_changes,
                              max_bytes=self.batch_max_bytes)

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

        ``parsed`` comes from ``producers.changes.parse_ops``, which checked each body's schema.
        A ``request_id`` committed before returns that first result and commits nothing.
        ``staged`` names an import whose staged parts the commit drops in its transaction.

        Raises:
            InvalidObject: nothing was committed.
            FencedError, SeatLost: this node may not commit; nothing was committed.
            SeatLost: committed locally, then the seat was lost before the broker confirmed:
                the change is not reported; it reaches the network only if this node keeps
                (or regains) the seat, else it becomes a conflict of this node.
            PublishError: committed locally but not confirmed; the rows stay in the outbox.
        """
        with self.store.lock:
            done = self.store.request(request_id) if request_id else None
            if done is not None:
                if done.last_seq > self.store.published_seq:
                    self.check_may_commit()
                    self.publish_outbox()
                return Committed.from_request(done)
            self.check_may_commit()
            ops = check_references(self.store, parsed)
            epoch, seq, now = self.store.epoch, self.store.last_seq, time.time()
            changes = [
                Change(epoch=epoch, seq=seq + i + 1, ts=now, origin=self.node, op=o.op,
                       kind=o.kind, name=o.name, body=o.body)
                for i, o in enumerate(ops)
            ]
            self.store.commit(changes, request_id=request_id, staged=staged)
        if not changes:
            return Committed(seq, seq, 0, epoch)
        self.before_publish(seq + 1)
        if self.store.published_seq == changes[0].seq - 1:
            # The outbox holds exactly these changes: publish them from memory rather than
            # reading 100,000 rows back and decoding their bodies again.
            this = [] if request_id is None else [CommittedRequest(
                request_id, changes[0].seq, changes[-1].seq, epoch)]
            self._publish_group(changes, this)
        else:
            self.publish_outbox()  # older rows are still unconfirmed: they go first, in order
        log.info("committed seq %d..%d (%d changes)", changes[0].seq, changes[-1].seq,
                 len(changes))
        return Committed(changes[0].seq, changes[-1].seq, len(changes), epoch)
