"""The commit's contract (broker/commits.py): operations checked by schema, and results."""

import json
from typing import Any

import pytest

from tasync.broker.commits import (
    Committed,
    Op,
    decode_staged,
    encode_staged,
    parse_ops,
)
from tasync.broker.errors import InvalidObject
from tasync.broker.store import CommittedRequest


def op_del(kind: str, name: str) -> dict[str, Any]:
    return {"op": "delete", "kind": kind, "name": name}


def dest(name: str) -> dict[str, Any]:
    return {"op": "set", "kind": "destination", "name": name, "body": {"url": f"file:///tmp/{name}"}}


def test_parse_ops_normalises_bodies_and_defaults_op_to_set() -> None:
    ops = parse_ops([{"kind": "group", "name": "g", "body": {"members": ["d"]}},
                     op_del("destination", "d")])
    assert ops == [Op(op="set", kind="group", name="g", body={"members": ["d"], "mode": "all"}),
                   Op(op="delete", kind="destination", name="d", body=None)]


@pytest.mark.parametrize(("raw", "match"), [
    ("not an object", "operation 1: not an object"),
    ({"op": "upsert", "kind": "node", "name": "a"}, "operation 1: op must be"),
    ({"kind": "printer", "name": "p"}, "unknown kind 'printer'"),
    ({"kind": "destination", "name": "bad name", "body": {"url": "file:///x"}},
     "invalid destination name"),
    ({"kind": "destination", "name": "d", "body": {"url": "file:///x", "typo": 1}},
     "destination d: typo: Unknown field"),
    ({"kind": "destination", "name": "d"}, "destination d: url: Missing data"),
])
def test_parse_ops_rejects_bad_operations(raw: Any, match: str) -> None:
    with pytest.raises(InvalidObject, match=match):
        parse_ops([raw])


def test_parse_ops_counts_operations_from_one() -> None:
    with pytest.raises(InvalidObject, match="operation 2: not an object"):
        parse_ops([dest("d"), 7])  # type: ignore[list-item]


def test_a_repeated_request_is_answered_with_its_first_seqs() -> None:
    done = CommittedRequest("r1", first_seq=5, last_seq=7, epoch=2)
    assert Committed.from_request(done) == Committed(5, 7, 3, 2, repeated=True)


def test_staged_parts_round_trip_and_parts_staged_by_json_dumps_still_read() -> None:
    ops = parse_ops([{"kind": "group", "name": "g", "body": {"members": ["d", "é"]}},
                     op_del("destination", "d"), dest("x")])
    text = encode_staged(ops)
    assert decode_staged(text) == ops
    assert json.loads(text) == [[o.op, o.kind, o.name, o.body] for o in ops]
    earlier = json.dumps([[o.op, o.kind, o.name, o.body] for o in ops])  # an earlier version's
    assert decode_staged(earlier) == ops
