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
import math
from typing import Any

from broker import messages
from broker.errors import MessageError
from broker.messages import OPS, SCHEMA_VERSION, Change, ChangeBatch

_BATCH_KEYS = frozenset({"v", "type", "epoch", "origin", "changes"})
_CHANGE_KEYS = frozenset({"epoch", "seq", "ts", "origin", "op", "kind", "name", "body"})
_REQUIRED = _CHANGE_KEYS - {"body"}
MAX_CHANGES = 100_000
_new = object.__new__


def _text(value: Any, low: int, high: int) -> bool:
    return type(value) is str and low <= len(value) <= high


def _change(raw: Any, epoch: int) -> Change | None:
    """The change ``raw`` describes when it is certainly valid and of ``epoch``, else None."""
    if type(raw) is not dict or not _REQUIRED <= raw.keys() <= _CHANGE_KEYS:
        return None
    seq, ts, body, op = raw["seq"], raw["ts"], raw.get("body"), raw["op"]
    if type(raw["epoch"]) is not int or raw["epoch"] != epoch or type(seq) is not int or seq < 1:
        return None
    if not ((type(ts) is float and math.isfinite(ts)) or (type(ts) is int and abs(ts) < 2**53)):
        return None  # marshmallow refuses NaN and infinities; huge ints are its call too
    origin, kind, name = raw["origin"], raw["kind"], raw["name"]
    if not (type(origin) is str and type(kind) is str and type(name) is str
            and 0 < len(origin) <= 64 and 0 < len(kind) <= 32 and 0 < len(name) <= 128
            and type(op) is str and op in OPS):
        return None
    if body is not None and (type(body) is not dict or any(type(k) is not str for k in body)):
        return None
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
    if not 1 <= len(items) <= MAX_CHANGES:
        return None
    changes: list[Change] = []
    for item in items:
        change = _change(item, epoch)
        if change is None or (changes and change.seq != changes[-1].seq + 1):
            return None
        changes.append(change)
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
