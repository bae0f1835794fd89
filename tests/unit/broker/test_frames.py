"""The bulk ``basic.publish`` frames are py-amqp's frames, byte for byte.

``tasync.broker.frames`` exists for speed; here py-amqp's own frame writer encodes the same
messages into a list, and every generated message (any header values py-amqp can write, bodies
around the frame size, empty and missing properties) must come out identical.
"""

from __future__ import annotations

import datetime
from decimal import Decimal
from typing import Any

import amqp
import pytest
from amqp import spec
from amqp.method_framing import frame_writer
from amqp.serialization import dumps
from hypothesis import given, settings
from hypothesis import strategies as st

from tasync.broker import frames

FRAME_MAX = 4096


class _Sink:
    """What py-amqp's frame writer needs of a connection and a transport: a list of writes."""

    frame_max = FRAME_MAX
    bytes_sent = 0

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: Any) -> None:
        self.out.append(bytes(data))


def amqp_frames(*, channel: int, exchange: str, routing_key: str, mandatory: bool, body: bytes,
                props: dict[str, Any]) -> bytes:
    """What ``Channel.basic_publish`` writes for this message."""
    sink = _Sink()
    write = frame_writer(sink, sink)
    args = dumps("Bssbb", (0, exchange, routing_key, mandatory, False))
    write(1, channel, spec.Basic.Publish, args, amqp.Message(body, **props))
    return b"".join(sink.out)


def ours(*, channel: int, exchange: str, routing_key: str, mandatory: bool, body: bytes,
         props: dict[str, Any]) -> bytes:
    encoded = frames.properties(props)
    return frames.encode_publish(channel=channel, frame_max=FRAME_MAX, exchange=exchange,
                                 routing_key=routing_key, mandatory=mandatory, body=body,
                                 props=encoded)


short = st.text(max_size=40)
scalars = (st.text(max_size=60) | st.booleans() | st.none() | st.binary(max_size=20)
           | st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
           | st.floats(allow_nan=False))
header_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                             | st.dictionaries(short, inner, max_size=3), max_leaves=8)


@settings(max_examples=400, deadline=None)
@given(channel=st.integers(1, 65535), exchange=short, routing_key=short, mandatory=st.booleans(),
       body=st.binary(max_size=3 * FRAME_MAX) | st.sampled_from(
           [b"", b"x" * (FRAME_MAX - 8), b"y" * (FRAME_MAX - 9), b"z" * (FRAME_MAX * 2 - 16)]),
       content_type=st.none() | st.just("application/json") | st.just(""),
       headers=st.none() | st.dictionaries(short, header_values, max_size=6),
       delivery_mode=st.none() | st.sampled_from([1, 2]),
       message_id=st.none() | st.text(max_size=32), user_id=st.none() | short)
def test_every_message_is_framed_as_py_amqp_frames_it(
        channel: int, exchange: str, routing_key: str, mandatory: bool, body: bytes,
        content_type: str | None, headers: dict[str, Any] | None, delivery_mode: int | None,
        message_id: str | None, user_id: str | None) -> None:
    props = {k: v for k, v in {
        "content_type": content_type, "application_headers": headers,
        "delivery_mode": delivery_mode, "message_id": message_id, "user_id": user_id,
    }.items() if v is not None}
    message = {"channel": channel, "exchange": exchange, "routing_key": routing_key,
               "mandatory": mandatory, "body": body, "props": props}
    assert ours(**message) == amqp_frames(**message)


@pytest.mark.parametrize("value", [
    2147483647, -2147483647, 2147483648, -2147483648, 0, True, False, 1.5, "é", None,
    Decimal("1.25"), datetime.datetime(2026, 12, 7, 12, 0), {"a": [1, "b"]}, (1, 2),
])
def test_edge_header_values_are_spelled_the_same(value: Any) -> None:
    message = {"channel": 1, "exchange": "tasync.alerts", "routing_key": "a.b",
               "mandatory": True, "body": b"{}",
               "props": {"content_type": "application/json", "delivery_mode": 2,
                         "application_headers": {"k": value}}}
    assert ours(**message) == amqp_frames(**message)


def test_a_property_it_does_not_spell_is_refused_rather_than_dropped() -> None:
    with pytest.raises(ValueError, match="reply_to"):
        frames.properties({"content_type": "application/json", "reply_to": "q"})


def test_a_name_longer_than_a_short_string_is_refused() -> None:
    with pytest.raises(ValueError, match="255 bytes"):
        frames.encode_publish(channel=1, frame_max=FRAME_MAX, exchange="x" * 256,
                              routing_key="", mandatory=False, body=b"", props=b"\x00\x00")
