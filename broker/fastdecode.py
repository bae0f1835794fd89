"""A fast path for decoding change batches, with marshmallow as the judge of everything else.

Catching up means decoding the change log: 100,000 changes are 100 messages, and marshmallow
spends about 40 µs on each change (nested schema, a dozen fields), which alone is most of a
catch-up's time. ``decode_entry`` checks a well-formed ``changes`` message by hand, under rules
at least as strict as ``broker.messages.ChangeBatchSchema``, and builds the same dataclasses.
Anything it does not accept with certainty (another message type, an unexpected key, a bool
where an int belongs, a string that might be a number) goes to ``broker.messages.decode``,
which accepts it or refuses it with its usual reason. So the fast path changes speed, never
what is accepted; ``tests/unit/test_fastdecode.py`` checks this against marshmallow.
"""

from __future__ import annotations

import json
from typing import Any

from broker import messages
from broker.errors import MessageError
from broker.messages import OPS, SCHEMA_VERSION, Change, ChangeBatch

_BATCH_KEYS = frozenset({"v", "type", "epoch", "origin", "changes"})
_OPS = frozenset(OPS)
MAX_CHANGES = 100_000
_new = object.__new__


def _text(value: Any, low: int, high: int) -> bool:
    return type(value) is str and low <= len(value) <= high


def _change(raw: Any, epoch: int, seq: int) -> Change | None:
    """The change ``raw`` describes if it is certainly valid, of ``epoch`` and ``seq``; else None.

    Written for speed, because a catch-up runs it 100,000 times: plain comparisons, each field
    read once, and no check the JSON parser already guarantees (object keys are strings).
    """
    if type(raw) is not dict:
        return None
    size = len(raw)
    if size != 7 and not (size == 8 and "body" in raw):
        return None  # an unknown key (marshmallow refuses it) or a missing one
    try:
        c_epoch, c_seq, ts = raw["epoch"], raw["seq"], raw["ts"]
        origin, op, kind, name = raw["origin"], raw["op"], raw["kind"], raw["name"]
    except KeyError:
        return None
    if type(c_epoch) is not int or c_epoch != epoch or type(c_seq) is not int or c_seq != seq:
        return None
    if type(ts) is float:
        if ts - ts != 0.0:
            return None  # NaN or an infinity: marshmallow refuses them
    elif type(ts) is not int or not -(2**53) < ts < 2**53:
        return None  # huge ints (and bools, strings) are marshmallow's call
    if not (type(origin) is str and type(kind) is str and type(name) is str
            and 0 < len(origin) <= 64 and 0 < len(kind) <= 32 and 0 < len(name) <= 128
            and type(op) is str and op in _OPS):
        return None
    body = raw.get("body")
    if body is not None and type(body) is not dict:
        return None  # a dict from json.loads has string keys, as fields.Dict(String) wants
    # Every field is checked: fill the frozen dataclass directly, which costs a third of its
    # __init__ (one object.__setattr__ per field); the result compares equal to Change(...).
    change: Change = _new(Change)
    fields = change.__dict__
    fields.update(raw)
    fields["ts"] = float(ts)
    fields["body"] = body
    return change


def _batch(raw: dict[str, Any]) -> ChangeBatch | None:
    epoch, items = raw.get("epoch"), raw.get("changes")
    if raw.keys() != _BATCH_KEYS or type(epoch) is not int or epoch < 1:
        return None
    if not _text(raw["origin"], 1, 64) or type(items) is not list:
        return None
    if not 1 <= len(items) <= MAX_CHANGES or type(items[0]) is not dict:
        return None
    first = items[0].get("seq")
    if type(first) is not int or first < 1:
        return None
    changes: list[Change] = []
    append = changes.append
    for seq, item in enumerate(items, first):  # consecutive seqs, as ChangeBatchSchema demands
        change = _change(item, epoch, seq)
        if change is None:
            return None
        append(change)
    return ChangeBatch(epoch=epoch, origin=raw["origin"], changes=tuple(changes))


def decode_entry(body: bytes, *, max_bytes: int) -> Any:
    """Like ``broker.messages.decode`` (no ``expect``), fast for valid change batches."""
    if len(body) > max_bytes:
        raise MessageError(f"oversized message: {len(body)} bytes > {max_bytes}")
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raw = None
    if (type(raw) is dict and raw.get("type") == "changes" and type(raw.get("v")) is int
            and raw["v"] == SCHEMA_VERSION):
        batch = _batch(raw)
        if batch is not None:
            return batch
    return messages.decode(body, max_bytes=max_bytes)
