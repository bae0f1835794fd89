"""Validating requested operations before the master commits them (producers/changes.py)."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasync.broker.commits import Op, parse_ops
from tasync.broker.errors import InvalidObject
from tasync.broker.messages import Change
from tasync.broker.store import NodeStore
from tasync.producers.changes import check_references, dependency_sorted

WINDOWS = [{"days": ["mon"], "start": "09:00", "end": "17:00"}]


def plan(store: NodeStore, raw: list[dict[str, Any]]) -> list[Op]:
    """What the master does with a request's operations: schema, then references."""
    return check_references(store, parse_ops(raw))


def op_set(kind: str, name: str, **body: Any) -> dict[str, Any]:
    return {"op": "set", "kind": kind, "name": name, "body": body}


def op_del(kind: str, name: str) -> dict[str, Any]:
    return {"op": "delete", "kind": kind, "name": name}


def dest(name: str, **extra: Any) -> dict[str, Any]:
    return op_set("destination", name, url=f"file:///tmp/{name}", **extra)


def group(name: str, *members: str) -> dict[str, Any]:
    return op_set("group", name, members=list(members))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NodeStore]:
    s = NodeStore(tmp_path, durable=False)
    yield s
    s.close()


def commit(store: NodeStore, ops: list[Op]) -> None:
    """Commit planned operations the way the relay does, in the order ``plan`` returned them."""
    seq = store.last_seq
    store.commit([Change(epoch=1, seq=seq + i, ts=1.0, origin="m", op=o.op, kind=o.kind,
                         name=o.name, body=o.body) for i, o in enumerate(ops, 1)])


def seed(store: NodeStore, raw: list[dict[str, Any]]) -> None:
    commit(store, plan(store, raw))


def fails(store: NodeStore, raw: list[dict[str, Any]], *expected: str) -> InvalidObject:
    before = (store.export_bytes(), store.last_seq, store.unpublished())
    with pytest.raises(InvalidObject) as info:
        plan(store, raw)
    problems = info.value.errors["references"]
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
    assert "\n" not in str(info.value)
    # All or nothing: a refused request leaves the store exactly as it was.
    assert (store.export_bytes(), store.last_seq, store.unpublished()) == before
    return info.value


def test_dependency_sorted_orders_sets_forward_and_deletes_backward() -> None:
    ops = parse_ops([op_set("route", "r", hosts=["a"]), group("g", "d"), dest("d"),
                     op_del("node", "n"), op_del("group", "old"), op_set("node", "a"),
                     op_set("schedule", "s", windows=WINDOWS), op_del("destination", "x")])
    assert [(o.op, o.kind) for o in dependency_sorted(ops)] == [
        ("set", "node"), ("set", "schedule"), ("set", "destination"), ("set", "group"),
        ("set", "route"), ("delete", "group"), ("delete", "destination"), ("delete", "node"),
    ]


def test_dependency_sorted_is_stable_within_a_kind() -> None:
    ops = parse_ops([dest("z"), dest("a"), dest("m")])
    assert [o.name for o in dependency_sorted(ops)] == ["z", "a", "m"]


# -- plan: references -------------------------------------------------------------------------


def test_group_before_its_destination_in_the_input_passes(store: NodeStore) -> None:
    ops = plan(store, [group("g", "d1", "d2"), dest("d1"), dest("d2")])
    assert [(o.kind, o.name) for o in ops] == [("destination", "d1"), ("destination", "d2"),
                                              ("group", "g")]


def test_whole_configuration_in_reverse_order_passes(store: NodeStore) -> None:
    ops = plan(store, [
        op_set("route", "r", hosts=["b", "a"]), group("outer", "inner"), group("inner", "d"),
        dest("d", schedule="office"), op_set("schedule", "office", windows=WINDOWS),
        op_set("node", "a"), op_set("node", "b"),
    ])
    commit(store, ops)
    assert store.count() == 7
    assert store.get("group", "outer") == {"members": ["inner"], "mode": "all"}


def test_references_to_stored_objects_pass(store: NodeStore) -> None:
    seed(store, [dest("d"), op_set("node", "a")])
    assert len(plan(store, [group("g", "d"), op_set("route", "r", hosts=["a"])])) == 2


def test_dangling_member_is_refused(store: NodeStore) -> None:
    seed(store, [dest("d")])
    fails(store, [group("g", "d", "ghost")],
          "group g: member 'ghost' is neither a destination nor a group")


def test_dangling_schedule_is_refused(store: NodeStore) -> None:
    fails(store, [dest("d", schedule="office")], "destination d: schedule 'office' does not exist")


def test_dangling_route_host_is_refused(store: NodeStore) -> None:
    seed(store, [op_set("node", "a")])
    fails(store, [op_set("route", "r", hosts=["a", "b"])], "route r: host 'b' is not a known node")


def test_a_destination_is_not_a_node(store: NodeStore) -> None:
    seed(store, [dest("a")])
    fails(store, [op_set("route", "r", hosts=["a"])], "host 'a' is not a known node")


def test_every_problem_is_listed_and_the_message_is_capped(store: NodeStore) -> None:
    error = fails(store, [group("g", "m1", "m2", "m3", "m4", "m5")], "'m1'", "'m5'")
    assert len(error.errors["references"]) == 5
    assert str(error).endswith("(and 2 more)")


# -- plan: deletes ----------------------------------------------------------------------------


def test_delete_of_a_referenced_object_is_refused(store: NodeStore) -> None:
    seed(store, [op_set("node", "a"), op_set("route", "r", hosts=["a"]),
                 op_set("schedule", "s", windows=WINDOWS), dest("d", schedule="s"),
                 group("g", "d"), group("top", "g")])
    fails(store, [op_del("node", "a")], "node a: still used by route r")
    fails(store, [op_del("schedule", "s")], "schedule s: still used by destination d")
    fails(store, [op_del("destination", "d")], "destination d: still used by group g")
    fails(store, [op_del("group", "g")], "group g: still used by group top")


def test_delete_with_its_referrers_in_one_request_passes(store: NodeStore) -> None:
    seed(store, [dest("d"), group("g", "d"), group("top", "g")])
    ops = plan(store, [op_del("destination", "d"), op_del("group", "g"), op_del("group", "top")])
    assert [o.name for o in ops[-1:]] == ["d"]  # the destination goes after the groups
    commit(store, ops)
    assert store.count() == 0


def test_delete_allowed_when_the_referrer_is_changed_in_the_same_request(
    store: NodeStore,
) -> None:
    seed(store, [op_set("node", "a"), op_set("node", "b"), op_set("route", "r", hosts=["a", "b"])])
    ops = plan(store, [op_del("node", "a"), op_set("route", "r", hosts=["b"])])
    commit(store, ops)
    assert store.get("node", "a") is None
    assert store.get("route", "r") == {"hosts": ["b"]}


def test_delete_refused_when_a_new_object_in_the_request_refers(store: NodeStore) -> None:
    seed(store, [dest("d")])
    fails(store, [op_del("destination", "d"), group("g", "d")],
          "destination d: still used by group g")


def test_delete_of_a_missing_object_is_refused(store: NodeStore) -> None:
    seed(store, [dest("d")])
    fails(store, [op_del("destination", "nope")], "destination nope: does not exist")
    # Names are per kind: a destination "d" is not a group "d".
    fails(store, [op_del("group", "d")], "group d: does not exist")


def test_set_then_delete_in_one_request_ends_deleted(store: NodeStore) -> None:
    ops = plan(store, [dest("d"), op_del("destination", "d")])
    commit(store, ops)
    assert store.get("destination", "d") is None


def test_delete_then_set_in_one_request_ends_with_the_new_object(store: NodeStore) -> None:
    seed(store, [dest("d", subject="old")])
    ops = plan(store, [op_del("destination", "d"), dest("d", subject="new")])
    commit(store, ops)
    assert store.get("destination", "d") == {"url": "file:///tmp/d", "schedule": None,
                                             "subject": "new"}


def test_delete_then_set_of_a_referenced_object_passes(store: NodeStore) -> None:
    seed(store, [dest("d"), group("g", "d")])
    ops = plan(store, [op_del("destination", "d"), dest("d", subject="new")])
    commit(store, ops)
    assert store.get("destination", "d") is not None


# -- plan: cycles -----------------------------------------------------------------------------


def test_cycle_within_one_request_is_refused(store: NodeStore) -> None:
    seed(store, [dest("d")])
    fails(store, [group("a", "b"), group("b", "c", "d"), group("c", "a")],
          "group a: contains itself", "group b: contains itself", "group c: contains itself")


def test_cycle_through_stored_groups_is_refused(store: NodeStore) -> None:
    seed(store, [dest("d"), group("a", "d"), group("b", "a"), group("c", "b")])
    fails(store, [group("a", "d", "c")], "group a: contains itself through its members")


def test_self_membership_is_refused(store: NodeStore) -> None:
    fails(store, [group("g", "g")], "group g: contains itself")


def test_diamond_is_not_a_cycle(store: NodeStore) -> None:
    seed(store, [dest("d")])
    assert len(plan(store, [group("l", "d"), group("r", "d"), group("top", "l", "r")])) == 3


# -- plan writes nothing ----------------------------------------------------------------------


def test_plan_writes_nothing_even_when_it_succeeds(store: NodeStore) -> None:
    seed(store, [dest("d")])
    before = (store.export_bytes(), store.last_seq, store.changes_between(0))
    ops = plan(store, [group("g", "d", "e"), dest("e"), op_set("node", "n")])
    assert len(ops) == 3
    assert (store.export_bytes(), store.last_seq, store.changes_between(0)) == before


def test_one_bad_operation_refuses_the_whole_request(store: NodeStore) -> None:
    seed(store, [dest("d")])
    fails(store, [dest("e"), group("g", "d"), group("h", "ghost"), op_set("node", "n")],
          "member 'ghost'")
    assert store.get("destination", "e") is None


def test_schema_error_refuses_the_whole_request(store: NodeStore) -> None:
    before = store.export_bytes()
    with pytest.raises(InvalidObject, match="url"):
        plan(store, [dest("ok"), op_set("destination", "bad")])
    assert store.export_bytes() == before
