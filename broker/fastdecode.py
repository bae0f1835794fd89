"""A fast path for decoding change batches, with marshmallow as the judge of everything else.

Catching up means decoding the change log: 100,000 changes are 100 messages, and marshmallow
spends about 40 µs on each change (nested schema, a dozen fields), which alone would be most of
a catch-up's time. Here msgspec reads a ``changes`` message straight into ``Change`` records,
checking in C the types and limits ``tasync.broker.messages.ChangeSchema`` checks (strict integers,
string lengths, no unknown key), and a short loop checks what a schema per change cannot: one
epoch, consecutive seqs, a known op. Anything it does not accept with certainty (another
message type, a bool where an int belongs, a number written as a string, ``NaN``) goes to
``tasync.broker.messages.decode``, which accepts it or refuses it with its usual reason. So the fast
path changes speed, never what is accepted; ``tests/unit/broker/test_fastdecode.py`` checks this
against marshmallow.

msgspec rather than orjson: it checks types while it parses, and it reads integers beyond 64
bits exactly (orjson turns them into floats, silently changing a body).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from tasync.broker import messages
from tasync.broker.errors import MessageError
from tasync.broker.messages import (
    MAX_BATCH_REQUESTS,
    MAX_REQUEST_ID_CHARS,
    OPS,
    SCHEMA_VERSION,
    Change,
    ChangeBatch,
)

MAX_CHANGES = 100_000
_OPS = frozenset(OPS)


_RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_REQUEST_ID_CHARS)]


class _WireBatch(msgspec.Struct, forbid_unknown_fields=True):
    """A ``changes`` message as ``ChangeBatchSchema`` describes it, read in one pass."""

    v: int
    type: str
    epoch: Annotated[int, msgspec.Meta(ge=1)]
    origin: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    changes: Annotated[list[Change], msgspec.Meta(min_length=1, max_length=MAX_CHANGES)]
    requests: Annotated[list[tuple[_RequestId, Annotated[int, msgspec.Meta(ge=1)]]],
                        msgspec.Meta(max_length=MAX_BATCH_REQUESTS)] = []


_read_batch = msgspec.json.Decoder(_WireBatch).decode


def _batch(body: bytes) -> ChangeBatch | None:
    """The batch ``body`` holds if it is certainly valid, else None (marshmallow decides)."""
    try:
        wire = _read_batch(body)
    except msgspec.DecodeError:  # also its ValidationError: a type or a limit
        return None
    if wire.v != SCHEMA_VERSION or wire.type != "changes":
        return None
    epoch, changes = wire.epoch, wire.changes
    # Consecutive seqs of the batch's epoch, as ChangeBatchSchema demands.
    for seq, change in enumerate(changes, changes[0].seq):
        if change.seq != seq or change.epoch != epoch or change.op not in _OPS:
            return None
    return ChangeBatch(epoch=epoch, origin=wire.origin, changes=tuple(changes),
                       requests=tuple((r, f) for r, f in wire.requests))


def decode_entry(body: bytes, *, max_bytes: int) -> Any:
    """Like ``tasync.broker.messages.decode`` (no ``expect``), fast for valid change batches."""
    if len(body) > max_bytes:
        raise MessageError(f"oversized message: {len(body)} bytes > {max_bytes}")
    return _batch(body) or messages.decode(body, max_bytes=max_bytes)
