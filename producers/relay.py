"""The master's change relay: commit to the outbox, publish with confirms, then report.

``submit`` is the only way configuration changes enter the network. It validates the
operations (``producers.changes.plan``), gives each its ``(epoch, seq)``, commits changes and
outbox rows in one SQLite transaction, publishes them to ``tasync.config`` (reaching every sync
queue and the change-log stream at once) and returns only after the broker confirmed. A crash
between commit and confirm leaves the rows unpublished; ``publish_outbox`` at start sends them
again, and backups skip what they already have by seq.

A relay commits only while its node is the master: after a step-down (``consumers.roles``) a
late request is refused inside the same lock that guards the commit, so no change can be
numbered in an epoch the node no longer owns. A promotion's epoch mark goes out through the
same confirmed, signed path as the changes (``publish_mark``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

from kombu import Connection

from broker import messages, topology
from broker.connection import close_quietly, ensure
from broker.epochs import EpochMark
from broker.errors import FencedError
from broker.messages import Change, ChangeBatch
from broker.publisher import ConfirmedPublisher, Outgoing
from broker.settings import Settings
from broker.signing import SIGNATURE_HEADER, KeyRing
from broker.store import NodeStore
from producers.changes import Op, check_references

log = logging.getLogger("tasync.relay")
#: Bytes of a batch message beyond its changes: version, type, epoch, origin, brackets.
BATCH_ENVELOPE_BYTES = 256
#: Fault injection for the recovery tests: with ``TASYNC_FAILPOINT=before-publish`` the master
#: process exits right after committing a change and before publishing it, exactly like a
#: crash in that window (the change stays unconfirmed in the outbox).
FAILPOINT_ENV = "TASYNC_FAILPOINT"


@dataclass(frozen=True)
class Committed:
    """What a ``submit`` committed and the broker confirmed."""

    first_seq: int
    last_seq: int
    count: int
    epoch: int


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
    byte for byte what ``messages.encode(batch)`` gives (``tests/unit/test_relay.py``).
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


def chunk(changes: list[Change], *, max_changes: int, max_bytes: int) -> list[ChangeBatch]:
    """Split consecutive changes into batches under both limits; each keeps its own seq."""
    return [batch for batch, _ in encoded_chunks(changes, max_changes=max_changes,
                                                 max_bytes=max_bytes)]


def _batch(changes: list[Change]) -> ChangeBatch:
    return ChangeBatch(epoch=changes[0].epoch, origin=changes[0].origin, changes=tuple(changes))


class ChangeRelay:
    """Owns the master's publisher connection; used from one thread (the control server's).

    Args:
        settings: broker settings (batch limits, confirm timeout).
        store: the master's store, opened with ``durable=True``.
        node: the master's node name, the ``origin`` of every change.
        keyring: signs every batch when set.
    """

    def __init__(self, settings: Settings, store: NodeStore, *, node: str,
                 keyring: KeyRing | None = None) -> None:
        self.settings = settings
        self.store = store
        self.node = node
        self.keyring = keyring
        self._conn: Connection | None = None
        self._publisher: ConfirmedPublisher | None = None

    def close(self) -> None:
        """Close the publisher connection."""
        close_quietly(self._conn)
        self._conn = self._publisher = None

    def heartbeat(self) -> None:
        """Keep the idle publisher connection alive between changes."""
        if self._conn is not None:
            try:
                self._conn.heartbeat_check()
            except Exception:
                self.close()

    def _publish(self, encoded: list[tuple[ChangeBatch, bytes]]) -> None:
        self._send([_message(batch, body, self.keyring) for batch, body in encoded])
        self.store.mark_published(encoded[-1][0].last_seq)

    def publish_mark(self, mark: EpochMark) -> None:
        """Publish a promotion's epoch mark with confirms, signed like the changes."""
        self._send([_signed(messages.encode(mark), {"tasync-type": "epoch", "epoch": mark.epoch},
                            self.keyring)])

    def _send(self, outgoing: list[Outgoing]) -> None:
        def send(conn: Connection) -> int:
            if self._publisher is None or self._publisher.conn is not conn:
                self._publisher = ConfirmedPublisher(
                    conn, timeout_s=self.settings.confirm_timeout_s)
            return self._publisher.publish_many(outgoing)

        try:
            _, self._conn = ensure(self.settings, send, name=f"tasync-relay-{self.node}",
                                   conn=self._conn)
        except BaseException:
            self.close()
            raise

    def publish_outbox(self) -> int:
        """Publish every committed but unconfirmed change, in seq order; returns how many."""
        pending = self.store.unpublished()
        if pending:
            log.info("publishing %d unconfirmed changes from the outbox (seq %d..%d)",
                     len(pending), pending[0].seq, pending[-1].seq)
            by_epoch: dict[int, list[Change]] = {}
            for change in pending:
                by_epoch.setdefault(change.epoch, []).append(change)
            for group in by_epoch.values():
                self._publish(self._chunk(group))
        return len(pending)

    def _chunk(self, changes: list[Change]) -> list[tuple[ChangeBatch, bytes]]:
        return encoded_chunks(changes, max_changes=self.settings.batch_max_changes,
                              max_bytes=self.settings.batch_max_bytes)

    def submit(self, parsed: list[Op]) -> Committed:
        """Check references, commit and publish operations; returns once the broker confirmed.

        ``parsed`` comes from ``producers.changes.parse_ops``, which checked each body's schema.

        Raises:
            ValidationError: nothing was committed.
            BrokerUnreachable, PublishError: committed locally but not confirmed; the rows stay
                in the outbox and are published when the broker is back.
        """
        with self.store.lock:
            if self.store.get_meta("role") != "master":
                raise FencedError(f"{self.node} is no longer the master (epoch "
                                  f"{self.store.epoch}); send changes to the current master")
            ops = check_references(self.store, parsed)
            epoch, seq, now = self.store.epoch, self.store.last_seq, time.time()
            changes = [
                Change(epoch=epoch, seq=seq + i + 1, ts=now, origin=self.node, op=o.op,
                       kind=o.kind, name=o.name, body=o.body)
                for i, o in enumerate(ops)
            ]
            self.store.commit(changes)
        if not changes:
            return Committed(seq, seq, 0, epoch)
        if os.environ.get(FAILPOINT_ENV) == "before-publish":
            log.error("failpoint before-publish: exiting after commit of seq %d", seq + 1)
            os._exit(70)
        if self.store.published_seq == changes[0].seq - 1:
            # The outbox holds exactly these changes: publish them from memory rather than
            # reading 100,000 rows back and decoding their bodies again.
            self._publish(self._chunk(changes))
        else:
            self.publish_outbox()  # older rows are still unconfirmed: they go first, in order
        log.info("committed seq %d..%d (%d changes)", changes[0].seq, changes[-1].seq,
                 len(changes))
        return Committed(changes[0].seq, changes[-1].seq, len(changes), epoch)
