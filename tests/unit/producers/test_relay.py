"""Batching and signing of the master's changes (producers/relay.py: chunk, batch_messages)."""

import itertools
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasync.broker import topology
from tasync.broker.errors import MessageError, PublishError
from tasync.broker.messages import Change, ChangeBatch, decode, encode
from tasync.broker.signing import SIGNATURE_HEADER, KeyRing
from tasync.broker.store import NodeStore
from tasync.producers.relay import (
    ChangeRelay,
    batch_messages,
    chunk,
    encoded_chunks,
    outbox_batches,
)

RING = KeyRing.parse("k1:" + "ab" * 32)


def changes(n: int, *, first: int = 1, body_size: int = 20, name_len: int = 6,
            origin: str = "master") -> list[Change]:
    return [
        Change(epoch=3, seq=seq, ts=1_700_000_000.125 + seq, origin=origin, op="set",
               kind="destination", name=f"d{seq:0{name_len - 1}d}",
               body={"url": "file:///" + "x" * body_size, "schedule": None, "subject": None})
        for seq in range(first, first + n)
    ]


def flatten(batches: list[ChangeBatch]) -> list[Change]:
    return [c for b in batches for c in b.changes]


def test_single_batch_when_under_both_limits() -> None:
    cs = changes(10)
    batches = chunk(cs, max_changes=100, max_bytes=1 << 20)
    assert len(batches) == 1
    assert batches[0].changes == tuple(cs)
    assert (batches[0].epoch, batches[0].origin) == (3, "master")


def test_empty_input_gives_no_batches() -> None:
    assert chunk([], max_changes=10, max_bytes=1000) == []


@pytest.mark.parametrize(("n", "max_changes", "sizes"), [
    (10, 3, [3, 3, 3, 1]), (9, 3, [3, 3, 3]), (5, 1, [1] * 5), (4, 10, [4]),
])
def test_max_changes_is_respected(n: int, max_changes: int, sizes: list[int]) -> None:
    batches = chunk(changes(n), max_changes=max_changes, max_bytes=1 << 30)
    assert [len(b.changes) for b in batches] == sizes


def test_max_bytes_is_respected_and_order_and_seqs_are_kept() -> None:
    cs = changes(200, first=41, body_size=300)
    batches = chunk(cs, max_changes=10_000, max_bytes=8_000)
    assert len(batches) > 5
    for b in batches:
        assert len(encode(b)) <= 8_000
        assert [c.seq for c in b.changes] == list(range(b.first_seq, b.last_seq + 1))
    assert flatten(batches) == cs
    for prev, nxt in itertools.pairwise(batches):
        assert nxt.first_seq == prev.last_seq + 1


def test_a_change_larger_than_max_bytes_travels_alone() -> None:
    cs = changes(3, body_size=50)
    big = msgspec.structs.replace(cs[1], body={"url": "file:///" + "y" * 5_000})
    batches = chunk([cs[0], big, cs[2]], max_changes=100, max_bytes=1_000)
    assert [[c.seq for c in b.changes] for b in batches] == [[1], [2], [3]]


def test_max_bytes_holds_for_long_names_and_origins() -> None:
    cs = [Change(epoch=1, seq=s, ts=1_700_000_000.123456, origin="o" * 64, op="delete",
                 kind="destination", name=f"{s:0128d}") for s in range(1, 101)]
    for b in chunk(cs, max_changes=1000, max_bytes=10_000):
        assert len(encode(b)) <= 10_000


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 400), min_size=1, max_size=60), st.integers(1, 20),
       st.integers(600, 5_000))
def test_chunk_property(body_sizes: list[int], max_changes: int, max_bytes: int) -> None:
    cs = [Change(epoch=1, seq=i, ts=1.0, origin="m", op="set", kind="node", name=f"n{i}",
                 body={"description": "z" * size}) for i, size in enumerate(body_sizes, 1)]
    batches = chunk(cs, max_changes=max_changes, max_bytes=max_bytes)
    assert flatten(batches) == cs
    for b in batches:
        assert 1 <= len(b.changes) <= max_changes
        assert len(b.changes) == 1 or len(encode(b)) <= max_bytes
        # Every batch is acceptable to a receiver (consecutive seqs, one epoch).
        assert decode(encode(b), max_bytes=1 << 20, expect="changes") == b


# -- batch_messages ---------------------------------------------------------------------------


def batches() -> list[ChangeBatch]:
    return chunk(changes(7, first=10), max_changes=3, max_bytes=1 << 20)


def test_batch_messages_without_a_key_ring_are_unsigned() -> None:
    out = batch_messages(batches(), None)
    assert len(out) == 3
    for msg, b in zip(out, batches(), strict=True):
        assert (msg.exchange, msg.routing_key) == (topology.CONFIG_EXCHANGE, "")
        assert msg.persistent
        assert SIGNATURE_HEADER not in msg.headers
        assert msg.headers == {"tasync-type": "changes", "first-seq": b.first_seq,
                               "last-seq": b.last_seq, "epoch": b.epoch, "origin": b.origin}
        assert decode(msg.body, max_bytes=1 << 20, expect="changes") == b


def test_batch_messages_are_signed_and_verify_against_the_body() -> None:
    out = batch_messages(batches(), RING)
    assert [m.headers["first-seq"] for m in out] == [10, 13, 16]
    for msg in out:
        signature: Any = msg.headers[SIGNATURE_HEADER]
        assert signature.startswith("k1:")
        RING.verify(msg.body, signature)
    assert len({m.message_id for m in out}) == 3


def test_signature_does_not_verify_another_body_or_key() -> None:
    first, second = batch_messages(batches()[:2], RING)
    with pytest.raises(MessageError, match="bad signature"):
        RING.verify(second.body, first.headers[SIGNATURE_HEADER])
    with pytest.raises(MessageError, match="bad signature"):
        KeyRing.parse("k1:" + "cd" * 32).verify(first.body, first.headers[SIGNATURE_HEADER])


# -- encoded_chunks -----------------------------------------------------------------------------


def test_encoded_chunks_are_byte_identical_to_encoding_each_batch() -> None:
    cs = changes(25, body_size=40)
    cs[3] = msgspec.structs.replace(cs[3], op="delete", body=None)
    cs[7] = msgspec.structs.replace(cs[7], body={"url": "file:///é/✓", "subject": "ünï \"q\"\n"})
    pairs = encoded_chunks(cs, max_changes=10, max_bytes=2_000)
    assert [b for b, _ in pairs] == chunk(cs, max_changes=10, max_bytes=2_000)
    for batch, body in pairs:
        assert body == encode(batch)
        assert len(body) <= 2_000


def test_request_ids_ride_on_the_last_batch_byte_for_byte(tmp_path: Path) -> None:
    from tasync.broker import messages

    changes = [Change(epoch=1, seq=s, ts=1.0, origin="m", op="set", kind="node", name=f"n{s}",
                      body={}) for s in range(1, 2501)]
    store = NodeStore(tmp_path, durable=False)
    store.commit(changes, request_id="req")
    batches = list(outbox_batches(store.outbox_rows(0, 5000), {2500: [("req", 1)]},
                                  max_changes=1000, max_bytes=1 << 20))
    decoded = [messages.decode(b.body, max_bytes=1 << 22) for b in batches]
    assert [d.requests for d in decoded] == [(), (), (("req", 1),)]
    for batch, body in zip(decoded, batches, strict=True):
        assert body.body == messages.encode(batch)
    assert [c for d in decoded for c in d.changes] == changes


# -- the outbox: published from the mark, in passes, resumed where the confirms stopped ------------


class FlakySeat:
    """A seat whose broker confirms only the first ``confirm`` messages of the next call."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []
        self.confirm: int | None = None
        self.held = True

    def publish(self, out: Any, *, window_bytes: int | None = None,
                on_confirmed: Any = None) -> int:
        out = list(out)
        limit, self.confirm = self.confirm, None
        for i, message in enumerate(out):
            if limit is not None and i == limit:
                on_confirmed(limit)
                raise PublishError("no confirm in time")
            self.sent.append((message.headers["first-seq"], message.headers["last-seq"]))
            decoded = decode(message.body, max_bytes=1 << 30, expect="changes")
            first, last = self.sent[-1]
            assert [c.seq for c in decoded.changes] == list(range(first, last + 1))
        return len(out)


def test_outbox_resumes_at_the_mark_after_a_timeout(tmp_path: Path) -> None:
    store = NodeStore(tmp_path, durable=False)
    store.commit(changes(5000))
    seat = FlakySeat()
    relay = ChangeRelay(store, node="master", seat=seat,  # type: ignore[arg-type]
                        batch_max_changes=100)
    seat.confirm = 7  # seven batches confirmed, then the broker goes quiet
    with pytest.raises(PublishError):
        relay.publish_outbox()
    assert store.published_seq == 700 and store.unpublished_count == 4300
    relay.publish_outbox()
    assert store.published_seq == 5000
    seqs = [s for first, last in seat.sent for s in range(first, last + 1)]
    assert seqs == list(range(1, 5001))  # every seq once: the retry began at the mark


def test_publish_through_retries_while_the_mark_moves(tmp_path: Path) -> None:
    store = NodeStore(tmp_path, durable=False)
    store.commit(changes(300))
    seat = FlakySeat()
    relay = ChangeRelay(store, node="master", seat=seat,  # type: ignore[arg-type]
                        batch_max_changes=100)
    seat.confirm = 1
    relay.publish_through(300)  # one batch confirmed, then a timeout: it goes on by itself
    assert store.published_seq == 300
    assert [first for first, _ in seat.sent] == [1, 101, 201]
    store.commit(changes(10, first=301))
    seat.confirm = 0  # nothing confirmed: the mark did not move, the caller hears of it
    with pytest.raises(PublishError):
        relay.publish_through(310)
    assert store.published_seq == 300


def test_outbox_batches_splice_stored_bodies_and_request_ids(tmp_path: Path) -> None:
    store = NodeStore(tmp_path, durable=False)
    cs = changes(250)
    store.commit(cs, request_id="req-1")
    rows = store.outbox_rows(0, 1000)
    batches = list(outbox_batches(rows, {250: [("req-1", 1)]}, max_changes=100,
                                  max_bytes=1 << 20))
    assert [(b.first_seq, b.last_seq) for b in batches] == [(1, 100), (101, 200), (201, 250)]
    decoded = [decode(b.body, max_bytes=1 << 30, expect="changes") for b in batches]
    assert [c for d in decoded for c in d.changes] == cs
    assert [d.requests for d in decoded] == [(), (), (("req-1", 1),)]


# -- own batches: what the master's sync consumer may skip without decoding ------------------------


class RecordingSeat:
    """A seat whose broker confirms everything; keeps what was published."""

    held = True

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def publish(self, out: Any, *, window_bytes: int | None = None,
                on_confirmed: Any = None) -> int:
        self.sent += list(out)
        return len(self.sent)


def test_own_batch_recognises_each_published_body_once(tmp_path: Path) -> None:
    store = NodeStore(tmp_path, durable=False)
    store.commit(changes(5))
    seat = RecordingSeat()
    relay = ChangeRelay(store, node="master", seat=seat,  # type: ignore[arg-type]
                        batch_max_changes=3)
    relay.publish_outbox()
    first, second = seat.sent
    assert (first.headers["origin"], first.headers["epoch"], first.headers["last-seq"]) == (
        "master", 3, 3)
    assert relay.own_batch(bytes(first.body), epoch=3, last_seq=3)
    assert not relay.own_batch(first.body, epoch=3, last_seq=3)  # a repeat takes the full path
    assert not relay.own_batch(second.body + b" ", epoch=3, last_seq=5)  # another body
    assert not relay.own_batch(second.body, epoch=2, last_seq=5)  # another epoch
    assert not relay.own_batch(second.body, epoch=3, last_seq=5)  # a mismatch forgot it
    store.close()


def test_batches_of_another_origin_are_never_remembered_as_own(tmp_path: Path) -> None:
    store = NodeStore(tmp_path, durable=False)
    store.commit(changes(2, origin="elsewhere"))
    seat = RecordingSeat()
    relay = ChangeRelay(store, node="master", seat=seat)  # type: ignore[arg-type]
    relay.publish_outbox()
    (message,) = seat.sent
    assert message.headers["origin"] == "elsewhere"
    assert not relay.own_batch(message.body, epoch=3, last_seq=2)
    store.close()


# -- a pass publishes as it reads, without the store's lock ---------------------------------------


class LazySeat:
    """A seat that takes each message as it is produced, noting how far the outbox was read.

    ``during`` runs once before the first message is taken (with the seat's lock held, in the
    real seat), e.g. to have another thread take the store's lock meanwhile.
    """

    def __init__(self, store: NodeStore, during: Any = None) -> None:
        self.store = store
        self.during = during
        self.reads_seen: list[int] = []
        self.published = threading.Event()
        self.held = True
        self.reads = 0
        original = store.outbox_rows

        def counting(after_seq: int, limit: int) -> list[tuple[Any, ...]]:
            self.reads += 1
            return original(after_seq, limit)

        store.outbox_rows = counting  # type: ignore[method-assign]

    def publish(self, out: Any, *, window_bytes: int | None = None,
                on_confirmed: Any = None) -> int:
        if self.during is not None:
            self.during()
        count = 0
        for _message in out:
            self.reads_seen.append(self.reads)
            count += 1
        self.published.set()
        return count


def test_a_pass_publishes_its_first_message_before_reading_the_rest(tmp_path: Path) -> None:
    store = NodeStore(tmp_path, durable=False)
    store.commit(changes(12_000))
    seat = LazySeat(store)
    relay = ChangeRelay(store, node="master", seat=seat,  # type: ignore[arg-type]
                        batch_max_changes=1000)
    relay.publish_outbox()
    assert store.published_seq == 12_000
    # Three pages of the outbox (5,000 rows each); each message went out once its page was
    # read, so the backups start applying while the master is still reading.
    assert seat.reads_seen == [1] * 5 + [2] * 5 + [3] * 2
    store.close()


def test_a_pass_reads_the_outbox_while_a_commit_holds_the_store(tmp_path: Path) -> None:
    """A committing thread holds the store's lock while it waits for the seat's lock, which a
    publishing pass holds: the pass must read the outbox without the store's lock, or the two
    wait for each other forever."""
    store = NodeStore(tmp_path, durable=False)
    store.commit(changes(3000))
    holding, release = threading.Event(), threading.Event()

    def committer() -> None:
        with store.lock:  # as ``submit`` does around its seat check
            holding.set()
            release.wait(30)

    def start_committer() -> None:
        threading.Thread(target=committer, daemon=True).start()
        assert holding.wait(10)

    seat = LazySeat(store, during=start_committer)
    relay = ChangeRelay(store, node="master", seat=seat,  # type: ignore[arg-type]
                        batch_max_changes=1000)
    publisher = threading.Thread(target=relay._publish_pass, args=(0, 3000), daemon=True)
    publisher.start()
    # The publishing (the seat's part) ends while the store is held; moving the mark waits
    # for the store, as it must, until the committer lets go.
    published = seat.published.wait(10)
    release.set()
    publisher.join(10)
    assert published, "the pass waited for the store's lock while publishing"
    assert seat.reads_seen == [1, 1, 1]
    assert store.published_seq == 3000
    store.close()
