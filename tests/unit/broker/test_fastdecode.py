"""The fast change-batch decoder accepts exactly what marshmallow accepts, and builds the same."""

from __future__ import annotations

import gc
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasync.broker import messages
from tasync.broker.commits import decode_staged, encode_staged, parse_ops
from tasync.broker.errors import MessageError
from tasync.broker.fastdecode import decode_entry
from tasync.broker.messages import Change, ChangeBatch, encode
from tests.unit.fastpaths import MAX, json_values, outcome


def good(n: int = 3) -> dict[str, Any]:
    batch = ChangeBatch(epoch=2, origin="a", changes=tuple(
        Change(epoch=2, seq=s, ts=1.5 + s, origin="a", op="set", kind="destination",
               name=f"d{s}", body={"url": "file:///x", "schedule": None})
        for s in range(5, 5 + n)))
    data: dict[str, Any] = json.loads(encode(batch))
    return data



def same(data: Any) -> None:
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    assert outcome(body, decode_entry) == outcome(body, messages.decode)


def test_a_valid_batch_decodes_to_the_same_dataclass() -> None:
    body = json.dumps(good()).encode()
    assert decode_entry(body, max_bytes=MAX) == messages.decode(body, max_bytes=MAX)
    assert isinstance(decode_entry(body, max_bytes=MAX), ChangeBatch)


MUTATIONS: list[tuple[str, Any]] = [
    ("v", 1.0), ("v", "1"), ("v", True), ("epoch", True), ("epoch", 0), ("epoch", "2"),
    ("origin", ""), ("origin", "o" * 65), ("origin", 5), ("changes", []), ("extra", 1),
]
CHANGE_MUTATIONS: list[tuple[str, Any]] = [
    ("seq", 0), ("seq", 6.0), ("seq", True), ("epoch", 3), ("epoch", True), ("ts", "1.5"),
    ("ts", float("nan")), ("ts", float("inf")), ("ts", 10**400), ("ts", 7), ("ts", True),
    ("op", "put"), ("op", ["set"]), ("kind", ""), ("kind", "k" * 33), ("name", "n" * 129),
    ("body", []), ("body", {"1": 2}), ("body", None), ("extra", 1), ("origin", None),
    ("body", {"n": 10**30}), ("body", {"f": float("nan")}), ("body", {"x": [1, {"y": -0.0}]}),
    ("name", "é" * 128), ("name", "é" * 129), ("ts", 2**60), ("seq", 10**30),
]


@pytest.mark.parametrize(("key", "value"), MUTATIONS)
def test_batch_level_mutations_agree(key: str, value: Any) -> None:
    data = good()
    data[key] = value
    same(data)


@pytest.mark.parametrize(("key", "value"), CHANGE_MUTATIONS)
def test_change_level_mutations_agree(key: str, value: Any) -> None:
    data = good()
    data["changes"][1][key] = value
    same(data)


def test_missing_keys_holes_and_other_types_agree() -> None:
    for key in ("v", "type", "epoch", "origin", "changes"):
        data = good()
        del data[key]
        same(data)
    for key in ("epoch", "seq", "ts", "origin", "op", "kind", "name", "body"):
        data = good()
        del data["changes"][0][key]
        same(data)
    data = good()
    data["changes"][2]["seq"] = 9
    same(data)
    same(b"{not json")
    same(b"[1, 2]")
    same({"v": 1, "type": "request", "op": "status", "sender": "x"})
    with pytest.raises(MessageError, match="oversized"):
        decode_entry(b"x" * 20, max_bytes=10)




@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["epoch", "seq", "ts", "origin", "op", "kind", "name", "body", "new"]),
       json_values)
def test_random_values_in_a_change_agree(key: str, value: Any) -> None:
    data = good(2)
    data["changes"][0][key] = value
    same(data)


def test_request_ids_decode_the_same_on_both_paths() -> None:
    data = good()
    data["requests"] = [["req-1", 5], ["req-2", 7]]
    same(data)
    decoded = decode_entry(json.dumps(data).encode(), max_bytes=MAX)
    assert decoded.requests == (("req-1", 5), ("req-2", 7))
    for bad in ([["", 5]], [["r", 0]], [["r"]], [["r", "5"]], [["r" * 129, 5]], "r"):
        data["requests"] = bad
        same(data)


def test_decoded_changes_and_staged_ops_are_left_to_reference_counting() -> None:
    """A catch-up holds thousands of changes; the cycle collector must not walk each again."""
    batch = decode_entry(json.dumps(good()).encode(), max_bytes=MAX)
    assert batch.changes and not any(gc.is_tracked(c) for c in batch.changes)
    ops = decode_staged(encode_staged(parse_ops([{"kind": "destination", "name": "d1",
                                                  "body": {"url": "file:///x"}}])))
    assert ops and not any(gc.is_tracked(o) for o in ops)
