"""The fast alert check accepts only what marshmallow's ``AlertSchema`` accepts, built the same.

``tasync.broker.alerts.fast_load`` and ``decode_alert`` exist for speed; these tests hold them to
the schema: every mutation of a valid alert gets the same verdict from both paths.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasync.broker import messages
from tasync.broker.alerts import Alert, alert_to_dict, decode_alert, fast_load, validated
from tasync.broker.errors import InvalidObject, MessageError
from tests.unit.fastpaths import MAX, agree, json_values


def good() -> dict[str, Any]:
    alert = Alert(id="a-1", source="nms", target_kind="destination", target="ops",
                  text="disk full", subject="disk", priority=7, created_at=1.7e9,
                  hosts=("a", "b"))
    return alert_to_dict(alert)



def same(data: Any) -> None:
    agree(data, decode_alert, "alert")


def test_a_valid_alert_takes_the_fast_path_and_equals_marshmallows() -> None:
    data = good()
    fast = fast_load(data)
    assert fast is not None
    assert fast == messages.decode(json.dumps(data).encode(), max_bytes=MAX, expect="alert")
    assert decode_alert(json.dumps(data).encode()) == fast
    assert validated(fast) == fast


MUTATIONS: list[tuple[str, Any]] = [
    ("v", 2), ("v", 1.0), ("v", True), ("v", "1"), ("type", "alerts"), ("id", ""),
    ("id", "has space"), ("id", "x" * 129), ("id", 5), ("source", "-bad"), ("source", "s" * 65),
    ("target_kind", "route"), ("target_kind", None), ("target", ""), ("target", "ok name"),
    ("target", "-x"), ("text", ""), ("text", "   "), ("text", "x" * 32_769), ("text", 3),
    ("subject", None), ("subject", "s" * 513), ("subject", 1), ("priority", 10),
    ("priority", -1), ("priority", True), ("priority", 5.0), ("priority", "5"),
    ("created_at", -1), ("created_at", "1.5"), ("created_at", True), ("created_at", 7),
    ("created_at", float("inf")), ("created_at", float("nan")), ("created_at", 10**400),
    ("hosts", []), ("hosts", ["a", "a"]), ("hosts", ["a"] * 17), ("hosts", "a"),
    ("hosts", ["bad name"]), ("hosts", [1]), ("hosts", ["n" * 64]), ("extra", 1),
    ("subject", "P1\r\nBcc: x"), ("subject", "tab\t"), ("subject", "c1\x85"),
    ("subject", "ls\u2028"), ("subject", "Störung ✓"), ("labels", {"alertname": "Disk"}),
    ("labels", None), ("labels", {}), ("labels", {"a": 1}), ("labels", {"": "x"}),
    ("labels", {"a\n": "x"}), ("labels", {"k" * 257: "x"}), ("labels", "alertname=x"),
    ("labels", {f"k{i}": "v" for i in range(257)}), ("annotations", {"summary": "a\nb"}),
    ("annotations", []), ("annotations", {"runbook_url": None}),
]


@pytest.mark.parametrize(("key", "value"), MUTATIONS)
def test_mutations_get_the_same_verdict(key: str, value: Any) -> None:
    data = good()
    data[key] = value
    same(data)


def test_missing_keys_and_other_messages_agree() -> None:
    for key in good():
        data = good()
        del data[key]
        same(data)
    same(b"{not json")
    same(b"[1]")
    same({"v": 1, "type": "request", "op": "status", "sender": "x"})
    with pytest.raises(MessageError, match="oversized"):
        decode_alert(b"x" * 20, max_bytes=10)


def test_validated_still_names_the_bad_field() -> None:
    bad = Alert(id="a", source="nms", target_kind="destination", target="ops", text=" ",
                hosts=("a",))
    with pytest.raises(InvalidObject, match="text: the message is empty"):
        validated(bad)




@settings(max_examples=400, deadline=None)
@given(st.sampled_from([*sorted(good()), "labels", "annotations", "new"]), json_values)
def test_random_values_agree(key: str, value: Any) -> None:
    data = good()
    data[key] = value
    same(data)
