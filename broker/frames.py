"""``basic.publish`` frames encoded in bulk: the bytes py-amqp writes, a fraction of its cost.

py-amqp spends about 50 µs of Python per published message on this class of machine: it
serialises the method arguments and the properties through a generic format interpreter,
takes a lock, sets the socket's timeout twice and makes one ``sendall`` per message. A sender
publishing thousands of alerts a second spends most of its time there (docs/benchmarks.md,
"Alerts against the raw path at its fastest"). ``encode_publish`` writes the same three
frames (method, content header, body) with a handful of ``struct`` calls, for the properties
tasync sets, and ``ConfirmedPublisher`` joins a window's frames into one write.

The encoding is py-amqp's, byte for byte (``tests/unit/broker/test_frames.py`` compares them
over generated messages), so the broker, the consumers and the confirms see nothing new; a
header value of a type this module does not spell (a nested table, a list, a date) is encoded
by py-amqp's own table writer.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

from amqp.serialization import dumps

#: ``basic.publish``: class 60, method 40; then the reserved short (ticket) of its arguments.
_PUBLISH_METHOD = struct.pack(">HHH", 60, 40, 0)
_FRAME_END = b"\xce"
_METHOD, _HEADER, _BODY = 1, 2, 3
#: Property flags (AMQP 0-9-1 ``basic`` class), in the order their values are written.
_CONTENT_TYPE, _HEADERS, _DELIVERY_MODE = 1 << 15, 1 << 13, 1 << 12
_MESSAGE_ID, _USER_ID = 1 << 7, 1 << 4
#: The largest int py-amqp writes as a 32-bit ``I`` (above, a 64-bit ``L``).
_INT32_MAX = 2147483647


def _shortstr(value: str) -> bytes:
    data = value.encode("utf-8", "surrogatepass")
    if len(data) > 255:
        raise ValueError(f"a short string holds at most 255 bytes, not {len(data)}")
    return bytes((len(data),)) + data


def _octet(value: int) -> bytes:
    return bytes((value,))


def _item(value: Any) -> bytes | None:
    """One table value as py-amqp writes it, or None for a type left to py-amqp."""
    if isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        return b"S" + struct.pack(">I", len(data)) + data
    if isinstance(value, bool):
        return b"t\x01" if value else b"t\x00"
    if isinstance(value, float):
        return b"d" + struct.pack(">d", value)
    if isinstance(value, int):
        if -_INT32_MAX <= value <= _INT32_MAX:
            return b"I" + struct.pack(">i", value)
        return b"L" + struct.pack(">q", value)
    if value is None:
        return b"V"
    return None


def table(headers: Mapping[str, Any]) -> bytes:
    """A field table, its length first, as py-amqp's ``dumps("F", ...)`` writes it."""
    parts: list[bytes] = []
    for key, value in headers.items():
        item = _item(value)
        if item is None:
            spelled: bytes = dumps("F", [headers])
            return spelled
        parts.append(_shortstr(key))
        parts.append(item)
    data = b"".join(parts)
    return struct.pack(">I", len(data)) + data


#: The properties tasync sets, by py-amqp's names, with their flags and spellings, in the
#: order AMQP lists them (flags and values are written in that order).
_PROPERTIES: tuple[tuple[str, int, Callable[[Any], bytes]], ...] = (
    ("content_type", _CONTENT_TYPE, _shortstr), ("application_headers", _HEADERS, table),
    ("delivery_mode", _DELIVERY_MODE, _octet), ("message_id", _MESSAGE_ID, _shortstr),
    ("user_id", _USER_ID, _shortstr))
_KNOWN = frozenset(name for name, _, _ in _PROPERTIES)


def properties(props: Mapping[str, Any]) -> bytes:
    """The property flags and list of a content header, from the properties ``amqp.Message`` takes.

    Only the properties tasync sets are spelled here (``ValueError`` for another). A property
    that is missing or None is left out, flag and value; an empty string or table is sent
    empty, as py-amqp sends it.
    """
    unknown = props.keys() - _KNOWN
    if unknown:
        raise ValueError(f"no bulk spelling for the properties {sorted(unknown)}")
    flags = 0
    values: list[bytes] = []
    for name, flag, spell in _PROPERTIES:
        value = props.get(name)
        if value is not None:
            flags |= flag
            values.append(spell(value))
    return struct.pack(">H", flags) + b"".join(values)


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + _FRAME_END


def encode_publish(*, channel: int, frame_max: int, exchange: str, routing_key: str,
                   mandatory: bool, body: bytes, props: bytes) -> bytes:
    """The frames of one ``basic.publish``: method, content header, body in ``frame_max`` pieces.

    Args:
        channel: the channel's number.
        frame_max: the connection's negotiated frame size; a body frame's payload is at most
            ``frame_max - 8`` bytes.
        exchange: the exchange's name (at most 255 bytes, as every short string).
        routing_key: the routing key (likewise).
        mandatory: have the broker return the message when no queue takes it.
        body: the message's bytes, split into as many body frames as it needs.
        props: ``properties(...)`` of the message.
    """
    method = (_PUBLISH_METHOD + _shortstr(exchange) + _shortstr(routing_key)
              + (b"\x01" if mandatory else b"\x00"))
    out = [_frame(_METHOD, channel, method),
           _frame(_HEADER, channel, struct.pack(">HHQ", 60, 0, len(body)) + props)]
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        out.append(_frame(_BODY, channel, body[start:start + chunk]))
    return b"".join(out)
