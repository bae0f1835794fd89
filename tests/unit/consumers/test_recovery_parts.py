"""The pieces recovery builds on: store snapshots, forced replay, conflicts file, --since."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasync.broker.audit import Trail, read_trail
from tasync.broker.epochs import EpochHistory, Era
from tasync.broker.errors import ConfigError, GapError
from tasync.broker.messages import Change, ChangeBatch
from tasync.broker.store import NodeStore
from tasync.consumers.conflicts import ConflictFile, as_op
from tasync.consumers.replay import Since, stream_offset


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NodeStore]:
    s = NodeStore(tmp_path / "n", durable=False)
    yield s
    s.close()


def setc(seq: int, name: str, url: str, *, epoch: int = 1, origin: str = "a") -> Change:
    return Change(epoch=epoch, seq=seq, ts=1000.0 + seq, origin=origin, op="set",
                  kind="destination", name=name, body={"url": url})


def batch(*changes: Change) -> ChangeBatch:
    return ChangeBatch(epoch=changes[0].epoch, origin=changes[0].origin, changes=changes)


def test_forced_replay_rewrites_what_the_node_holds(store: NodeStore) -> None:
    store.apply(batch(setc(1, "d1", "file:///1"), setc(2, "d2", "file:///2"),
                      setc(3, "d1", "file:///one")))
    reference = store.export_bytes()
    store.replace_all([("destination", "d1", {"url": "drifted"})], seq=3, epoch=1, ts=1003.0)
    store.apply(batch(setc(2, "d2", "file:///2"), setc(3, "d1", "file:///one")))
    assert store.get("destination", "d1") == {"url": "drifted"}  # a plain apply skips by seq
    result = store.apply(batch(setc(2, "d2", "file:///2"), setc(3, "d1", "file:///one"),
                               setc(4, "d3", "file:///3")), force=True)
    assert (result.reapplied, result.applied, result.skipped, store.last_seq) == (2, 1, 0, 4)
    assert store.get("destination", "d1") == {"url": "file:///one"}
    assert store.export_bytes() != reference and store.get("destination", "d3")
    with pytest.raises(GapError):
        store.apply(batch(setc(6, "d6", "file:///6")), force=True)


def test_snapshot_installs_identically_and_carries_the_eras(store: NodeStore,
                                                            tmp_path: Path) -> None:
    history = EpochHistory((Era(1, 0, "a"), Era(2, 2, "b")))
    store.apply(batch(setc(1, "d1", "file:///1"), setc(2, "d2", "file:///2")), history=history)
    snap = store.snapshot()
    assert (snap.seq, snap.epoch, snap.eras) == (2, 2, history.to_list())
    other = NodeStore(tmp_path / "o", durable=False)
    try:
        other.apply(batch(setc(1, "x", "file:///x")))
        other.replace_all(snap.objects, seq=snap.seq, epoch=snap.epoch, ts=snap.ts,
                          history=EpochHistory.from_list(snap.eras))
        assert other.checksum() == store.checksum()
        assert other.history == history and other.changes_between(0) == []
        assert not other.diverged
    finally:
        other.close()


def test_set_aside_marks_diverged_and_published_seq_stops_at_the_outbox(
        store: NodeStore) -> None:
    store.commit([setc(1, "d1", "file:///1"), setc(2, "d2", "file:///2")])
    store.mark_published(1)
    assert (store.published_seq, store.last_seq) == (1, 2)
    store.set_aside(store.unpublished())
    assert store.diverged and store.unpublished() == [] and store.published_seq == 2
    assert store.get("destination", "d2") is not None  # effects stay until a snapshot


def test_checksum_fresh_notices_changes_behind_the_stores_back(store: NodeStore) -> None:
    import sqlite3

    store.apply(batch(setc(1, "d1", "file:///1")))
    cached = store.checksum()
    with sqlite3.connect(store.path) as db:
        db.execute("DELETE FROM objects")
    assert store.checksum() == cached
    assert store.checksum(fresh=True) != cached


def test_conflicts_are_kept_once_listed_and_resolved(tmp_path: Path) -> None:
    trail = Trail(tmp_path, "a")
    conflicts = ConflictFile(tmp_path, trail)
    late = setc(5, "late", "file:///l")
    assert len(conflicts.keep([late], reason="replaced")) == 1
    assert conflicts.keep([late], reason="again") == []
    entry = conflicts.open_entries()[0]
    assert as_op(entry) == {"op": "set", "kind": "destination", "name": "late",
                            "body": {"url": "file:///l"}}
    assert conflicts.resolve([{"epoch": 1, "seq": 5, "origin": "a", "new_seq": 9}]) == 1
    saved = json.loads((tmp_path / "conflicts.json").read_text())["conflicts"]
    assert [(c["status"], c["resubmitted_as"]) for c in saved] == [("resubmitted", 9)]
    assert conflicts.open_entries() == []
    events = [e["event"] for e in read_trail(tmp_path)]
    assert events == ["recovery.conflict_kept", "recovery.conflict_resubmitted"]
    (tmp_path / "conflicts.json").write_text("{broken")
    with pytest.raises(ConfigError, match="unreadable"):
        conflicts.entries()


def test_since_selects_changes_and_where_the_stream_read_starts() -> None:
    assert Since(seq=4).wants(setc(5, "d", "u")) and not Since(seq=5).wants(setc(5, "d", "u"))
    assert Since(ts=1005.0).wants(setc(5, "d", "u")) and not Since(ts=1005.5).wants(
        setc(5, "d", "u"))
    assert stream_offset(Since(seq=1)) == "first"
    assert stream_offset(Since(ts=1000.0)) == dt.datetime.fromtimestamp(700.0, dt.UTC)
