"""A node's SQLite store: idempotent apply, the outbox, the canonical export (broker/store.py)."""

import gc
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasync.broker.collector import BULK_OPS
from tasync.broker.epochs import EpochHistory, Era
from tasync.broker.errors import GapError
from tasync.broker.kinds import KINDS
from tasync.broker.messages import Change, ChangeBatch
from tasync.broker.store import DB_NAME, ROWS_PER_INSERT, NodeStore, canonical


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NodeStore]:
    s = NodeStore(tmp_path / "a", durable=False)
    yield s
    s.close()


@pytest.fixture
def other(tmp_path: Path) -> Iterator[NodeStore]:
    s = NodeStore(tmp_path / "b", durable=False)
    yield s
    s.close()


def setc(seq: int, kind: str, name: str, body: dict[str, Any], *, epoch: int = 1,
         ts: float | None = None) -> Change:
    return Change(epoch=epoch, seq=seq, ts=1_000.0 + seq if ts is None else ts, origin="m",
                  op="set", kind=kind, name=name, body=body)


def delc(seq: int, kind: str, name: str, *, epoch: int = 1) -> Change:
    return Change(epoch=epoch, seq=seq, ts=1_000.0 + seq, origin="m", op="delete", kind=kind,
                  name=name)


def batch(*changes: Change) -> ChangeBatch:
    return ChangeBatch(epoch=changes[0].epoch, origin="m", changes=changes)


def history() -> list[Change]:
    """A short history touching several kinds, with an update and a delete."""
    return [
        setc(1, "node", "a", {"description": ""}),
        setc(2, "destination", "d1", {"url": "file:///one", "schedule": None, "subject": None}),
        setc(3, "destination", "d2", {"url": "file:///two", "schedule": None, "subject": None}),
        setc(4, "group", "g", {"members": ["d2", "d1"], "mode": "all"}),
        setc(5, "destination", "d1", {"url": "file:///uno", "schedule": None, "subject": "x"}),
        setc(6, "route", "r", {"hosts": ["a"]}),
        setc(7, "destination", "tmp", {"url": "file:///tmp", "schedule": None, "subject": None}),
        delc(8, "destination", "tmp"),
    ]


# -- apply ------------------------------------------------------------------------------------


def test_fresh_store_is_empty(store: NodeStore) -> None:
    assert (store.last_seq, store.epoch, store.last_ts, store.count()) == (0, 0, 0.0, 0)
    assert (store.path.name, store.path.exists()) == (DB_NAME, True)


def test_apply_writes_objects_and_meta(store: NodeStore) -> None:
    result = store.apply(batch(*history()[:4]))
    assert (result.applied, result.skipped, result.last_seq) == (4, 0, 4)
    assert (store.last_seq, store.epoch, store.last_ts) == (4, 1, 1004.0)
    assert store.get("group", "g") == {"members": ["d2", "d1"], "mode": "all"}
    assert store.get("group", "nope") is None
    assert store.count() == 4


def test_same_batch_twice_is_skipped(store: NodeStore) -> None:
    b = batch(*history()[:3])
    store.apply(b)
    before = store.export_bytes()
    result = store.apply(b)
    assert (result.applied, result.skipped, result.last_seq) == (0, 3, 3)
    assert store.export_bytes() == before
    assert store.last_seq == 3


def test_overlapping_batch_applies_only_the_new_tail(store: NodeStore) -> None:
    h = history()
    store.apply(batch(*h[:3]))
    result = store.apply(batch(*h[1:5]))
    assert (result.applied, result.skipped, result.last_seq) == (2, 2, 5)
    assert store.get("destination", "d1") == h[4].body


def test_gap_raises_with_expected_and_got_and_changes_nothing(store: NodeStore) -> None:
    h = history()
    store.apply(batch(*h[:2]))
    before = store.export_bytes()
    with pytest.raises(GapError, match="expected seq 3, got 5") as info:
        store.apply(batch(*h[4:6]))
    assert (info.value.expected, info.value.got) == (3, 5)
    assert store.last_seq == 2
    assert store.export_bytes() == before
    assert [c.seq for c in store.changes_between(0)] == [1, 2]


def test_gap_on_an_empty_store(store: NodeStore) -> None:
    with pytest.raises(GapError) as info:
        store.apply(batch(setc(2, "node", "a", {})))
    assert (info.value.expected, info.value.got) == (1, 2)


def test_apply_keeps_the_highest_epoch(store: NodeStore) -> None:
    store.apply(batch(setc(1, "node", "a", {}, epoch=3)))
    store.apply(batch(setc(2, "node", "b", {}, epoch=2)))
    assert store.epoch == 3
    store.apply(batch(setc(3, "node", "c", {}, epoch=4)))
    assert store.epoch == 4


def test_delete_removes_the_object(store: NodeStore) -> None:
    store.apply(batch(*history()))
    assert store.get("destination", "tmp") is None
    assert ("destination", "tmp") not in {(k, n) for k, n, _ in store.objects()}
    deletion = store.changes_between(7, 8)[0]
    assert (deletion.op, deletion.body) == ("delete", None)


# -- the outbox -------------------------------------------------------------------------------


def test_sets_and_deletes_of_one_object_in_one_batch_end_in_the_last(store: NodeStore) -> None:
    """The objects are derived from the history rows run by run: the order must hold."""
    store.apply(batch(
        setc(1, "destination", "x", {"url": "file:///1"}), delc(2, "destination", "x"),
        setc(3, "destination", "x", {"url": "file:///3"}), setc(4, "destination", "y", {}),
        setc(5, "destination", "y", {"url": "file:///5"}), delc(6, "destination", "y"),
        delc(7, "destination", "never-set"), setc(8, "node", "n", {"description": "n"}),
    ))
    assert store.get("destination", "x") == {"url": "file:///3"}
    assert store.get("destination", "y") is None
    assert [(k, n) for k, n, _ in store.objects()] == [("destination", "x"), ("node", "n")]


def test_forced_replay_rewrites_held_rows_and_restores_objects(store: NodeStore) -> None:
    store.apply(batch(*history()))
    with store._tx():  # an object changed behind the history's back
        store._db.execute("UPDATE objects SET body='{}' WHERE name='d1'")
    result = store.apply(batch(*history()[4:6]), force=True)
    assert (result.applied, result.reapplied, store.last_seq) == (0, 2, 8)
    assert store.get("destination", "d1") == history()[4].body
    assert store.changes_between(0) == history()


def test_many_rows_are_written_whole_across_statement_boundaries(store: NodeStore,
                                                                 other: NodeStore) -> None:
    """Rows go ``ROWS_PER_INSERT`` to a statement; counts around it, and a replay that
    collides in its first statement, write every row exactly as one row at a time does."""
    n = 3 * ROWS_PER_INSERT + 7
    changes = [setc(s, "destination", f"d{s % 250}", {"url": f"file:///{s}", "schedule": None,
                                                     "subject": None}) for s in range(1, n + 1)]
    done = 0
    for size in (1, ROWS_PER_INSERT - 1, ROWS_PER_INSERT, ROWS_PER_INSERT + 1, n):
        part = changes[done:done + size]
        if part:
            store.apply(batch(*part))
            done += len(part)
    for change in changes:  # the same history, a row per statement
        other.apply(batch(change))
    assert store.changes_between(0) == other.changes_between(0) == changes
    assert store.export_bytes() == other.export_bytes()
    assert store.checksum() == other.checksum() == store.checksum(fresh=True)
    # A forced replay from inside the held rows: its first statement collides, all are rewritten.
    tail = changes[ROWS_PER_INSERT // 2:]
    result = store.apply(batch(*tail), force=True)
    assert (result.applied, result.reapplied) == (0, len(tail))
    assert store.changes_between(0) == changes
    assert store.checksum() == other.checksum()


def test_a_bulk_write_runs_without_the_cycle_collector(store: NodeStore) -> None:
    """A batch of ``BULK_OPS`` changes is written with the collector paused; a small one is not.

    SQLite's trace hook sees every statement as it runs: each write of change rows and objects
    notes whether the collector could run then.
    """
    enabled: dict[str, list[bool]] = {"changes": [], "objects": []}

    def traced(sql: str) -> None:
        for table, states in enabled.items():
            if sql.startswith(f"INSERT INTO {table}"):
                states.append(gc.isenabled())

    bulk = [setc(s, "destination", f"d{s}", {"url": f"file:///{s}"})
            for s in range(1, BULK_OPS + 1)]
    small = [setc(BULK_OPS + s, "destination", f"e{s}", {"url": f"file:///{s}"})
             for s in range(1, 3)]
    store._db.set_trace_callback(traced)
    try:
        store.apply(batch(*bulk))
        during_bulk = {table: set(states) for table, states in enabled.items()}
        for states in enabled.values():
            states.clear()
        store.commit(small)
    finally:
        store._db.set_trace_callback(None)
    assert during_bulk == {"changes": {False}, "objects": {False}}
    assert {table: set(states) for table, states in enabled.items()} == {
        "changes": {True}, "objects": {True}}
    assert gc.isenabled() and store.last_seq == BULK_OPS + 2


def test_writing_changes_with_a_hole_is_refused(store: NodeStore) -> None:
    with pytest.raises(ValueError, match="consecutive"):
        store.commit([setc(1, "node", "a", {}), setc(3, "node", "b", {})])
    assert (store.last_seq, store.count()) == (0, 0)


def test_commit_unpublished_mark_published_cycle(store: NodeStore) -> None:
    h = history()
    store.commit(h[:3])
    assert store.last_seq == 3
    assert store.get("destination", "d2") == h[2].body
    assert [c.seq for c in store.unpublished()] == [1, 2, 3]
    assert store.unpublished() == h[:3]
    store.commit(h[3:5])
    store.mark_published(2)
    assert [c.seq for c in store.unpublished()] == [3, 4, 5]
    store.mark_published(5)
    assert store.unpublished() == []
    assert [c.seq for c in store.changes_between(0)] == [1, 2, 3, 4, 5]


def test_commit_refuses_a_gap_and_writes_nothing(store: NodeStore) -> None:
    store.commit(history()[:1])
    with pytest.raises(GapError) as info:
        store.commit(history()[2:3])
    assert (info.value.expected, info.value.got) == (2, 3)
    assert store.last_seq == 1
    assert store.get("destination", "d2") is None


def test_commit_of_nothing_is_a_no_op(store: NodeStore) -> None:
    store.commit([])
    assert (store.last_seq, store.count(), store.unpublished()) == (0, 0, [])


def test_applied_changes_are_not_in_the_outbox(store: NodeStore) -> None:
    store.apply(batch(*history()[:2]))
    assert store.unpublished() == []


def test_unpublished_survives_reopen(tmp_path: Path) -> None:
    s = NodeStore(tmp_path, durable=True)
    s.commit(history()[:4])
    s.mark_published(1)
    s.close()
    again = NodeStore(tmp_path, durable=True)
    try:
        assert [c.seq for c in again.unpublished()] == [2, 3, 4]
        assert again.last_seq == 4
    finally:
        again.close()


# -- canonical export -------------------------------------------------------------------------


def test_export_is_canonical_across_batchings(store: NodeStore, other: NodeStore) -> None:
    h = history()
    store.apply(batch(*h))
    for c in h[:3]:
        other.apply(batch(c))
    other.apply(batch(*h[3:6]))
    other.apply(batch(*h[5:]))  # overlapping redelivery
    assert store.export_bytes() == other.export_bytes()
    assert store.checksum() == other.checksum()


def test_export_ignores_body_key_order_and_history(store: NodeStore, other: NodeStore) -> None:
    store.apply(batch(setc(1, "destination", "d", {"url": "file:///x", "subject": "s"})))
    other.apply(batch(
        setc(1, "destination", "zz", {"url": "file:///z"}),
        setc(2, "destination", "d", {"subject": "s", "url": "file:///x"}),
        delc(3, "destination", "zz"),
    ))
    assert store.export_bytes() == other.export_bytes()
    assert store.checksum() == other.checksum()


def test_export_differs_when_content_differs(store: NodeStore, other: NodeStore) -> None:
    store.apply(batch(setc(1, "node", "a", {"description": "x"})))
    other.apply(batch(setc(1, "node", "a", {"description": "y"})))
    assert store.export_bytes() != other.export_bytes()
    assert store.checksum() != other.checksum()


def test_export_shape_and_checksum(store: NodeStore) -> None:
    store.apply(batch(*history()))
    exported = store.export_bytes()
    assert exported.endswith(b"\n")
    data = json.loads(exported)
    assert list(data) == sorted(KINDS)
    assert list(data["destination"]) == ["d1", "d2"]
    assert data["group"]["g"] == {"members": ["d2", "d1"], "mode": "all"}
    assert store.checksum() == full_checksum(data)


def test_empty_export_lists_every_kind(store: NodeStore) -> None:
    assert json.loads(store.export_bytes()) == {kind: {} for kind in KINDS}


def test_checksum_follows_changes(store: NodeStore) -> None:
    store.apply(batch(*history()[:2]))
    first = store.checksum()
    store.apply(batch(history()[2]))
    assert store.checksum() != first
    assert store.checksum() == full_checksum(json.loads(store.export_bytes()))


def full_checksum(state: dict[str, dict[str, Any]]) -> str:
    """The checksum computed from an export, independently of the store's kept value."""
    xor = 0
    for kind, objects in state.items():
        for name, body in objects.items():
            text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            digest = hashlib.blake2b(f"{kind}\0{name}\0{text}".encode(), digest_size=16)
            xor ^= int.from_bytes(digest.digest(), "big")
    count = sum(len(objects) for objects in state.values())
    return hashlib.sha256(f"tasync-objects-v1:{count}:{xor:032x}".encode()).hexdigest()


def test_canonical_is_sorted_and_compact() -> None:
    text = canonical({"b": 1, "a": [1, {"d": None, "c": "é"}]})
    assert text == '{"a":[1,{"c":"é","d":null}],"b":1}'


#: Every value a body can hold: no floats (no kind's schema admits one). Text of every plane,
#: control characters and quotes included; integers beyond 64 bits.
BODY_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30)


@given(st.dictionaries(st.text(), BODY_VALUES, max_size=8))
@settings(max_examples=500, deadline=None)
def test_canonical_is_the_json_spelling_stores_already_hold(body: dict[str, Any]) -> None:
    """Stores written before msgspec spelled bodies hold ``json.dumps``'s bytes: the kept
    checksum and every node's export depend on the two being equal."""
    legacy = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert canonical(body) == legacy


def test_canonical_spells_what_msgspec_cannot_as_json_does() -> None:
    lone = {"a": "\ud800"}  # only a JSON escape can make one; msgspec refuses to write it
    assert canonical(lone) == json.dumps(lone, sort_keys=True, separators=(",", ":"),
                                         ensure_ascii=False)


# -- snapshot ---------------------------------------------------------------------------------


def test_replace_all_installs_a_snapshot(store: NodeStore, other: NodeStore) -> None:
    store.apply(batch(*history()))
    other.apply(batch(setc(1, "node", "stale", {"description": "old"})))
    other.replace_all(list(store.objects()), seq=store.last_seq, epoch=2, ts=2000.0)
    assert other.export_bytes() == store.export_bytes()
    assert other.checksum() == store.checksum()
    assert other.get("node", "stale") is None
    assert (other.last_seq, other.epoch, other.last_ts) == (8, 2, 2000.0)
    # The next change after the snapshot applies; an older one is skipped.
    result = other.apply(batch(setc(9, "node", "n9", {})))
    assert (result.applied, other.last_seq) == (1, 9)
    assert other.apply(batch(history()[7])).skipped == 1


def test_replace_all_keeps_a_higher_epoch(store: NodeStore) -> None:
    store.apply(batch(setc(1, "node", "a", {}, epoch=5)))
    store.replace_all([], seq=1, epoch=3, ts=0.0)
    assert (store.epoch, store.count()) == (5, 0)


# -- queries ----------------------------------------------------------------------------------


def test_objects_are_ordered_and_filterable(store: NodeStore) -> None:
    store.apply(batch(*history()))
    listed = [(k, n) for k, n, _ in store.objects()]
    assert listed == sorted(listed)
    assert [n for _, n, _ in store.objects("destination")] == ["d1", "d2"]
    assert list(store.objects("schedule")) == []


def test_referrers_via_sql(store: NodeStore) -> None:
    store.apply(batch(
        setc(1, "schedule", "office", {"timezone": "UTC", "windows": []}),
        setc(2, "destination", "d1", {"url": "file:///1", "schedule": "office"}),
        setc(3, "destination", "d2", {"url": "file:///2", "schedule": None}),
        setc(4, "group", "g1", {"members": ["d1", "d2"]}),
        setc(5, "group", "g2", {"members": ["g1"]}),
        setc(6, "group", "g3", {"members": ["d1"]}),
        setc(7, "node", "a", {}),
        setc(8, "route", "r", {"hosts": ["b", "a"]}),
    ))
    assert store.referrers("schedule", "office") == ["destination d1"]
    assert store.referrers("schedule", "other") == []
    assert sorted(store.referrers("destination", "d1")) == ["group g1", "group g3"]
    assert store.referrers("destination", "d2") == ["group g1"]
    assert store.referrers("group", "g1") == ["group g2"]
    assert store.referrers("group", "g2") == []
    assert store.referrers("node", "a") == ["route r"]
    assert store.referrers("route", "r") == []


def test_changes_between(store: NodeStore) -> None:
    store.apply(batch(*history()))
    assert [c.seq for c in store.changes_between(3)] == [4, 5, 6, 7, 8]
    assert [c.seq for c in store.changes_between(3, 5)] == [4, 5]
    assert store.changes_between(8) == []
    assert store.changes_between(0) == history()


def test_everything_persists_across_reopen(tmp_path: Path) -> None:
    s = NodeStore(tmp_path)
    s.apply(batch(*history()[:4]))
    s.apply(batch(setc(5, "node", "b", {})))
    s.set_meta(role="master", note="hello world")
    exported, checksum = s.export_bytes(), s.checksum()
    s.close()
    again = NodeStore(tmp_path)
    try:
        assert (again.last_seq, again.epoch, again.last_ts) == (5, 1, 1005.0)
        assert again.export_bytes() == exported
        assert again.checksum() == checksum
        assert (again.get_meta("role"), again.get_meta("note")) == ("master", "hello world")
        assert again.get_meta("missing", "dflt") == "dflt"
        assert [c.seq for c in again.changes_between(0)] == [1, 2, 3, 4, 5]
        assert again.apply(batch(*history()[:4])).skipped == 4
    finally:
        again.close()


# -- request ids and staged imports --------------------------------------------------------------


def test_a_committed_request_is_remembered_with_its_seqs(store: NodeStore) -> None:
    store.commit([setc(1, "node", "a", {}), setc(2, "node", "b", {})], request_id="r1")
    done = store.request("r1")
    assert done is not None and (done.first_seq, done.last_seq, done.count) == (1, 2, 2)
    assert store.request("r2") is None
    assert [r.request_id for r in store.requests_ending_in(2, 2)] == ["r1"]
    assert store.requests_ending_in(1, 1) == []


def test_a_backup_learns_request_ids_from_the_batch_that_ends_them(store: NodeStore) -> None:
    changes = (setc(1, "node", "a", {}), setc(2, "node", "b", {}))
    store.apply(ChangeBatch(epoch=1, origin="m", changes=changes, requests=(("r9", 1),)))
    done = store.request("r9")
    assert done is not None and (done.first_seq, done.last_seq) == (1, 2)
    store.apply(ChangeBatch(epoch=1, origin="m", changes=changes, requests=(("r10", 1),)))
    assert store.request("r10") is None  # a repeat applies nothing, so it records nothing


def test_staged_parts_survive_a_reopen_and_go_with_the_commit(tmp_path: Path) -> None:
    first = NodeStore(tmp_path, durable=False)
    assert first.stage("imp", 1, 3, "[]") == [1]
    assert first.stage("imp", 0, 3, '[["set","node","n",{}]]') == [0, 1]
    assert first.stage("imp", 0, 3, '[["set","node","n",{}]]') == [0, 1]  # a resend replaces
    first.close()
    again = NodeStore(tmp_path, durable=False)
    assert again.staged_parts("imp") == [0, 1]
    assert list(again.staged_ops("imp")) == ['[["set","node","n",{}]]', "[]"]
    assert again.stage("imp", 0, 4, "[]") == [0]  # another total: the old attempt is dropped
    again.commit([setc(1, "node", "n", {})], request_id="imp", staged="imp")
    assert again.staged_parts("imp") == []
    again.close()


def test_stale_staged_imports_are_dropped(store: NodeStore) -> None:
    store.stage("old", 0, 2, "[]")
    store.drop_staged(older_than_s=3600)
    assert store.staged_parts("old") == [0]
    store.drop_staged(older_than_s=-1)
    assert store.staged_parts("old") == []


# -- a damaged file ------------------------------------------------------------------------------


def test_a_damaged_file_is_reported_not_a_traceback(tmp_path: Path) -> None:
    from tasync.broker.store import StoreDamaged

    s = NodeStore(tmp_path, durable=False)
    s.commit([setc(1, "node", "a", {})])
    s.close()
    with open(tmp_path / DB_NAME, "r+b") as db:
        db.write(b"\xff" * 4096)
    with pytest.raises(StoreDamaged) as caught:
        NodeStore(tmp_path, durable=False, verify=True)
    assert "is unreadable" in str(caught.value) and "\n" not in str(caught.value)


# -- what changed, per kind, and the eras as parsed -----------------------------------------------


def test_kind_version_moves_only_for_the_kinds_written(store: NodeStore) -> None:
    route, destination = store.kind_version("route"), store.kind_version("destination")
    store.apply(batch(setc(1, "destination", "d1", {"url": "file:///one"})))
    assert store.kind_version("route") == route
    assert store.kind_version("destination") > destination
    store.commit([setc(2, "route", "r", {"hosts": ["a"]})])  # a master's own commit counts too
    assert store.kind_version("route") > route
    route = store.kind_version("route")
    store.apply(batch(setc(2, "route", "r", {"hosts": ["a"]})))  # held already: nothing written
    assert store.kind_version("route") == route
    store.replace_all([], seq=9, epoch=1, ts=1.0)  # a snapshot may change every kind
    assert store.kind_version("route") > route and store.kind_version("node") > 0


def test_history_is_parsed_again_only_when_its_stored_text_changes(store: NodeStore) -> None:
    first = EpochHistory().learn(Era(1, 0, "a"))
    store.set_history(first)
    assert store.history is store.history == first
    store.set_history(first.learn(Era(2, 5, "b")))
    assert store.history.max_epoch == 2 and store.history.current == Era(2, 5, "b")
