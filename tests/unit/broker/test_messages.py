"""Wire messages: encode/decode and every way ``decode`` refuses a body (broker/messages.py)."""

import contextlib
import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tasync.broker import messages
from tasync.broker.errors import MessageError
from tasync.broker.messages import Change, ChangeBatch, Reply, Request, decode, encode

BIG = 1 << 20


def change(seq: int, *, epoch: int = 2, **kw: Any) -> Change:
    fields: dict[str, Any] = dict(epoch=epoch, seq=seq, ts=1_700_000_000.25 + seq, origin="m1",
                                  op="set", kind="destination", name=f"d{seq}",
                                  body={"url": f"file:///tmp/{seq}", "schedule": None})
    fields.update(kw)
    return Change(**fields)


def raw_change(seq: int, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = dict(epoch=1, seq=seq, ts=1.5, origin="m", op="set", kind="destination",
                             name="d", body={"url": "file:///x"})
    d.update(kw)
    return d


def raw_batch(changes: list[dict[str, Any]], **kw: Any) -> bytes:
    d: dict[str, Any] = {"v": 1, "type": "changes", "epoch": 1, "origin": "m", "changes": changes}
    d.update(kw)
    return json.dumps(d).encode()


def refused(body: bytes, match: str, **kw: Any) -> MessageError:
    with pytest.raises(MessageError, match=match) as info:
        decode(body, max_bytes=kw.pop("max_bytes", BIG), **kw)
    return info.value


# -- round trips ------------------------------------------------------------------------------


def test_change_batch_round_trip() -> None:
    batch = ChangeBatch(epoch=2, origin="m1", changes=(
        change(7), change(8, op="delete", body=None), change(9, name="é-unicode")))
    decoded = decode(encode(batch), max_bytes=BIG, expect="changes")
    assert decoded == batch
    assert isinstance(decoded.changes, tuple)
    assert (decoded.first_seq, decoded.last_seq) == (7, 9)


def test_request_round_trip() -> None:
    request = Request(op="status", sender="cli-1", args={"since": "seq:4", "nodes": ["a", "b"]})
    assert decode(encode(request), max_bytes=BIG) == request


def test_request_args_default_to_empty() -> None:
    body = json.dumps({"v": 1, "type": "request", "op": "status", "sender": "x"}).encode()
    assert decode(body, max_bytes=BIG) == Request(op="status", sender="x")


@pytest.mark.parametrize("reply", [
    Reply(ok=True, node="n1", data={"seq": 4, "ready": True}),
    Reply(ok=False, node="n2", error="no master", error_type="NoAnswer"),
])
def test_reply_round_trip(reply: Reply) -> None:
    assert decode(encode(reply), max_bytes=BIG, expect="reply") == reply


def test_encoding_is_compact_json_with_version_and_type_first() -> None:
    body = encode(Request(op="ping", sender="s"))
    assert b" " not in body
    assert list(json.loads(body))[:2] == ["v", "type"]
    assert json.loads(body)["v"] == messages.SCHEMA_VERSION


# -- refusals ---------------------------------------------------------------------------------


def test_oversized_is_refused_before_parsing() -> None:
    body = encode(Request(op="ping", sender="s"))
    refused(body, r"^oversized message: \d+ bytes > 10$", max_bytes=10)
    assert decode(body, max_bytes=len(body)) == Request(op="ping", sender="s")


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b'{"v": 1,}', b"\xff\xfe\xfa"])
def test_malformed_json_is_refused(body: bytes) -> None:
    refused(body, "^malformed JSON")


@pytest.mark.parametrize("body", [b"[]", b"1", b'"text"', b"null", b"true"])
def test_non_object_is_refused(body: bytes) -> None:
    refused(body, "not a JSON object")


@pytest.mark.parametrize("version", [None, 0, 2, "1"])
def test_wrong_version_is_refused(version: Any) -> None:
    d = json.loads(encode(Request(op="ping", sender="s")))
    if version is None:
        del d["v"]
    else:
        d["v"] = version
    refused(json.dumps(d).encode(), "unsupported schema version")


@pytest.mark.parametrize("type_name", ["alert-x", "", None, 5])
def test_unknown_type_is_refused(type_name: Any) -> None:
    body = json.dumps({"v": 1, "type": type_name, "op": "x", "sender": "y"}).encode()
    refused(body, "unexpected message type")


def test_type_other_than_expected_is_refused() -> None:
    body = encode(Request(op="ping", sender="s"))
    refused(body, "unexpected message type 'request'", expect="changes")


@pytest.mark.parametrize("type_name", [["changes"], {"a": 1}])
def test_unhashable_type_is_refused(type_name: Any) -> None:
    refused(json.dumps({"v": 1, "type": type_name}).encode(), "unexpected message type")


def test_deeply_nested_json_is_refused() -> None:
    refused(b"[" * 100_000, "malformed")


def test_huge_integer_is_refused() -> None:
    refused(b'{"v": 1, "type": "request", "n": ' + b"9" * 5000 + b"}", "malformed")


@pytest.mark.parametrize("missing", ["epoch", "origin", "changes"])
def test_batch_missing_field_is_refused(missing: str) -> None:
    d = json.loads(raw_batch([raw_change(1)]))
    del d[missing]
    error = refused(json.dumps(d).encode(), "invalid changes message")
    assert missing in str(error)


@pytest.mark.parametrize("missing", ["epoch", "seq", "ts", "origin", "op", "kind", "name"])
def test_change_missing_field_is_refused(missing: str) -> None:
    c = raw_change(1)
    del c[missing]
    error = refused(raw_batch([c]), "invalid changes message")
    assert missing in str(error)


def test_missing_change_body_defaults_to_none() -> None:
    c = raw_change(1, op="delete")
    del c["body"]
    assert decode(raw_batch([c]), max_bytes=BIG).changes[0].body is None


def test_unexpected_field_is_refused() -> None:
    refused(raw_batch([raw_change(1)], extra=1), "Unknown field")
    refused(raw_batch([raw_change(1, extra=1)]), "Unknown field")


def test_empty_batch_is_refused() -> None:
    refused(raw_batch([]), "invalid changes message")


@pytest.mark.parametrize("seqs", [[1, 3], [2, 1], [1, 1], [5, 6, 8]])
def test_non_consecutive_seqs_are_refused(seqs: list[int]) -> None:
    refused(raw_batch([raw_change(s) for s in seqs]), "does not follow")


def test_consecutive_seqs_are_accepted() -> None:
    batch = decode(raw_batch([raw_change(s) for s in (4, 5, 6)]), max_bytes=BIG)
    assert [c.seq for c in batch.changes] == [4, 5, 6]


def test_mixed_epochs_are_refused() -> None:
    refused(raw_batch([raw_change(1), raw_change(2, epoch=2)]), "epoch differs")
    refused(raw_batch([raw_change(1, epoch=2)], epoch=1), "epoch differs")


@pytest.mark.parametrize(("field", "value"), [
    ("seq", "2"), ("seq", 2.0), ("seq", True), ("epoch", "1"), ("epoch", False),
    ("seq", 0), ("epoch", 0), ("seq", -1),
])
def test_change_ints_are_strict_and_positive(field: str, value: Any) -> None:
    c = raw_change(1)
    c[field] = value
    error = refused(raw_batch([c]), "invalid changes message")
    assert field in str(error)


def test_batch_epoch_is_strict() -> None:
    refused(raw_batch([raw_change(1)], epoch="1"), "epoch")


def test_unknown_op_is_refused() -> None:
    refused(raw_batch([raw_change(1, op="upsert")]), "Must be one of")


def test_request_and_reply_missing_fields_are_refused() -> None:
    refused(json.dumps({"v": 1, "type": "request", "op": "x"}).encode(), "sender")
    refused(json.dumps({"v": 1, "type": "reply", "node": "n"}).encode(), "ok")


def test_register_adds_a_type(monkeypatch: pytest.MonkeyPatch) -> None:
    class Ping(messages._Strict):
        v = messages.fields.Integer(required=True)
        type = messages.fields.String(required=True)
        n = messages.fields.Integer(required=True, strict=True)

    monkeypatch.setattr(messages, "SCHEMAS", dict(messages.SCHEMAS))
    monkeypatch.setattr(messages, "TYPES", dict(messages.TYPES))
    refused(b'{"v": 1, "type": "ping", "n": 1}', "unexpected message type")
    messages.register("ping", dict, Ping())
    assert decode(b'{"v": 1, "type": "ping", "n": 1}', max_bytes=BIG) == {
        "v": 1, "type": "ping", "n": 1}


# -- decode never raises anything but MessageError --------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8) \
    | st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=8,
)
field_names = st.sampled_from(["epoch", "seq", "ts", "origin", "op", "kind", "name", "body",
                               "changes", "sender", "args", "ok", "node", "data", "error",
                               "error_type", "extra"])


def decodes_or_refuses(body: bytes, expect: str | None = None) -> None:
    with contextlib.suppress(MessageError):
        decode(body, max_bytes=BIG, expect=expect)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_decode_random_bytes_only_raises_message_error(body: bytes) -> None:
    decodes_or_refuses(body)


@settings(max_examples=150)
@given(
    st.sampled_from(["changes", "request", "reply"]),
    st.dictionaries(field_names, json_values, max_size=5),
    st.lists(st.dictionaries(field_names, st.integers(1, 5) | json_values, max_size=8),
             max_size=3),
    st.sampled_from([None, "changes", "request", "reply"]),
)
def test_decode_random_envelopes_only_raise_message_error(
    type_name: str, fields: dict[str, Any], changes: list[Any], expect: str | None
) -> None:
    body = {"v": 1, "type": type_name, **fields}
    if type_name == "changes" and "changes" not in fields:
        body["changes"] = changes
    decodes_or_refuses(json.dumps(body).encode(), expect)


@settings(max_examples=300)
@given(json_values | st.dictionaries(st.sampled_from(["v", "type"]), json_values)
       .map(lambda d: {"v": 1, **d}))
@example({"v": 1, "type": ["changes"]})
def test_decode_random_json_values_only_raise_message_error(value: Any) -> None:
    decodes_or_refuses(json.dumps(value).encode())


def parsed(parse: Any, body: bytes) -> tuple[Any, ...]:
    """What ``parse`` made of ``body``: the value's repr (``NaN`` is not equal to itself), or
    the error's type and words."""
    try:
        return ("value", repr(parse(body)))
    except (ValueError, RecursionError) as exc:
        return ("error", type(exc), str(exc))


#: Every JSON value, with what only the standard library reads (NaN, infinities, integers of
#: any size, lone surrogates) and strings of any code point.
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(10**400), 10**400)
    | st.floats() | st.text(st.characters(codec=None, exclude_categories=())),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(st.characters(codec=None, exclude_categories=()), max_size=4), inner,
        max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(value=ANY_JSON, ascii_only=st.booleans())
@example(value=float("nan"), ascii_only=True)
@example(value="\ud800", ascii_only=False)
def test_parse_json_reads_what_json_loads_reads(value: Any, ascii_only: bool) -> None:
    """The fast parser gives ``json.loads``'s value, or its error, for every text."""
    body = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    assert parsed(messages.parse_json, body) == parsed(json.loads, body)


@pytest.mark.parametrize("body", [
    b"", b"{", b"\xff\xfe\xfa", b"\xef\xbb\xbf{}", b"[" * 100_000, b"1e400", b"-1e400",
    b"9" * 5000, b'{"a": 1, "a": 2}', b" [1, 2.5e-400] ", b'"\\ud800"', b"NaN", b"[Infinity]",
])
def test_parse_json_matches_json_loads_at_the_edges(body: bytes) -> None:
    assert parsed(messages.parse_json, body) == parsed(json.loads, body)
