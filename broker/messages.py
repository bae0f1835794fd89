"""Wire messages: frozen records inside, versioned JSON validated by marshmallow at the edge.

Every body is a JSON object with ``v`` (schema version) and ``type``. ``decode`` is the only way
a consumer turns bytes into a message: it checks size, JSON, version, type and schema, and raises
``MessageError`` with a reason the consumer writes to the quarantine and the trail.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import msgspec
from marshmallow import Schema, ValidationError, fields, post_load, validate

from tasync.broker.errors import MessageError

SCHEMA_VERSION = 1
OPS = ("set", "delete")


class Change(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
             gc=False):
    """One validated configuration mutation; ``seq`` is cluster-wide and gap-free.

    The one message record that is a msgspec ``Struct`` rather than a frozen dataclass: a
    catch-up decodes 100,000 of them, and msgspec builds and checks them in C, at a sixth of
    what making the dataclasses cost (``tasync.broker.fastdecode``). It behaves like one: keyword
    construction that checks nothing, immutable, equal by value. The limits annotated here are
    ``ChangeSchema``'s; only msgspec's decoding enforces them.

    ``gc=False``: Python's cycle collector does not track changes. A change holds numbers,
    strings and a JSON body, so it can never be part of a reference cycle, and the collector
    walked every one of a catch-up's pending changes again and again: untracked, a worker
    catching up 100,000 changes spent 14 % less time (``docs/benchmarks.md``).
    """

    epoch: Annotated[int, msgspec.Meta(ge=1)]
    seq: Annotated[int, msgspec.Meta(ge=1)]
    ts: float
    origin: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    op: str
    kind: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    body: dict[str, Any] | None = None


#: Most request ids one batch may name, and the longest id (``ChangeBatch.requests``).
MAX_BATCH_REQUESTS = 1000
MAX_REQUEST_ID_CHARS = 128
#: Longest name of the person a request acts for (``request_actor``).
MAX_ACTOR_CHARS = 128


def request_actor(args: dict[str, Any]) -> str | None:
    """Who a control request acts for (its ``by`` argument), or None when it names nobody.

    A client that acts on a person's behalf (the web console, for its logged-in user) names
    them, and the node writes the name to its trail beside what was done. It must be short
    and printable: a trail line is one line.

    Raises:
        MessageError: ``by`` is not 1-``MAX_ACTOR_CHARS`` printable characters.
    """
    value = args.get("by")
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ACTOR_CHARS \
            or not value.isprintable():
        raise MessageError(f"by must be 1-{MAX_ACTOR_CHARS} printable characters")
    return value


@dataclass(frozen=True, kw_only=True)
class ChangeBatch:
    """Consecutive changes that travel in one message; each keeps its own seq.

    ``requests`` names the client requests whose last change is this batch's last change, each
    with the seq of its first change, so every node learns which requests were committed (a
    client asking again after a lost answer is answered from that record rather than
    committing twice).
    """

    epoch: int
    origin: str
    changes: tuple[Change, ...]
    requests: tuple[tuple[str, int], ...] = ()

    @property
    def first_seq(self) -> int:
        """Seq of the first change; a gap exists when it is past the receiver's next seq."""
        return self.changes[0].seq

    @property
    def last_seq(self) -> int:
        """Seq of the last change."""
        return self.changes[-1].seq


@dataclass(frozen=True, kw_only=True)
class Request:
    """A control request to one node, every node or the master; answered by a ``Reply``."""

    op: str
    sender: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Reply:
    """The answer to a ``Request``: data, or an error with the exit-code class name."""

    ok: bool
    node: str
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None


class _Strict(Schema):
    class Meta:
        unknown = "raise"


class ChangeSchema(_Strict):
    """A change on the wire; bodies are checked per kind by ``tasync.broker.kinds`` when applied."""

    epoch = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))
    seq = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))
    ts = fields.Float(required=True)
    origin = fields.String(required=True, validate=validate.Length(min=1, max=64))
    op = fields.String(required=True, validate=validate.OneOf(OPS))
    kind = fields.String(required=True, validate=validate.Length(min=1, max=32))
    name = fields.String(required=True, validate=validate.Length(min=1, max=128))
    body = fields.Dict(keys=fields.String(), load_default=None, allow_none=True)

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> Change:
        return Change(**data)


class ChangeBatchSchema(_Strict):
    """Changes in seq order without holes, all of one epoch."""

    v = fields.Integer(required=True)
    type = fields.String(required=True)
    epoch = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))
    origin = fields.String(required=True, validate=validate.Length(min=1, max=64))
    changes = fields.List(fields.Nested(ChangeSchema), required=True,
                          validate=validate.Length(min=1, max=100_000))
    requests = fields.List(
        fields.Tuple((fields.String(validate=validate.Length(min=1, max=MAX_REQUEST_ID_CHARS)),
                      fields.Integer(strict=True, validate=validate.Range(min=1)))),
        load_default=list, validate=validate.Length(max=MAX_BATCH_REQUESTS))

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> ChangeBatch:
        changes = tuple(data["changes"])
        for prev, nxt in itertools.pairwise(changes):
            if nxt.seq != prev.seq + 1:
                raise ValidationError(f"seq {nxt.seq} does not follow {prev.seq}", "changes")
        if any(c.epoch != data["epoch"] for c in changes):
            raise ValidationError("a change's epoch differs from its batch's", "changes")
        return ChangeBatch(epoch=data["epoch"], origin=data["origin"], changes=changes,
                           requests=tuple((str(r), int(f)) for r, f in data["requests"]))


class RequestSchema(_Strict):
    """A control request."""

    v = fields.Integer(required=True)
    type = fields.String(required=True)
    op = fields.String(required=True, validate=validate.Length(min=1, max=32))
    sender = fields.String(required=True, validate=validate.Length(min=1, max=128))
    args = fields.Dict(keys=fields.String(), load_default=dict)

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> Request:
        return Request(op=data["op"], sender=data["sender"], args=data["args"])


class ReplySchema(_Strict):
    """A control reply."""

    v = fields.Integer(required=True)
    type = fields.String(required=True)
    ok = fields.Boolean(required=True)
    node = fields.String(required=True)
    data = fields.Dict(keys=fields.String(), load_default=dict)
    error = fields.String(load_default=None, allow_none=True)
    error_type = fields.String(load_default=None, allow_none=True)

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> Reply:
        data.pop("v")
        data.pop("type")
        return Reply(**data)


SCHEMAS: dict[str, Schema] = {
    "changes": ChangeBatchSchema(),
    "request": RequestSchema(),
    "reply": ReplySchema(),
}
TYPES: dict[type, str] = {ChangeBatch: "changes", Request: "request", Reply: "reply"}
#: Types whose wire form is not simply every field (optional fields left out when unset).
_TO_DICT: dict[type, Callable[[Any], dict[str, Any]]] = {}


def register(type_name: str, cls: type, schema: Schema, *,
             to_dict: Callable[[Any], dict[str, Any]] | None = None) -> None:
    """Add a message type (the alert layer registers its own) to ``encode``/``decode``.

    ``to_dict`` builds the wire form when it is not every field of the dataclass.
    """
    SCHEMAS[type_name] = schema
    TYPES[cls] = type_name
    if to_dict is not None:
        _TO_DICT[cls] = to_dict


def change_to_dict(change: Change) -> dict[str, Any]:
    """The wire form of one change, as ``ChangeSchema`` reads it back.

    Bodies are not copied (``dataclasses.asdict`` would deep-copy them, which for the master's
    100,000-object import, encoded twice to size its batches, cost seconds): they are encoded
    at once and never changed.
    """
    return {"epoch": change.epoch, "seq": change.seq, "ts": change.ts, "origin": change.origin,
            "op": change.op, "kind": change.kind, "name": change.name, "body": change.body}


def to_dict(message: Any) -> dict[str, Any]:
    """The JSON-ready dict of a message dataclass, with ``v`` and ``type`` first."""
    type_name = TYPES[type(message)]
    # The bulk paths build the same dict without asdict's deep copies: a change batch holds
    # 1,000 bodies, an import request 1,000 objects, a snapshot reply the whole configuration.
    if type(message) is ChangeBatch:
        batch = {"v": SCHEMA_VERSION, "type": type_name, "epoch": message.epoch,
                 "origin": message.origin,
                 "changes": [change_to_dict(c) for c in message.changes]}
        if message.requests:
            batch["requests"] = [list(r) for r in message.requests]
        return batch
    if type(message) is Request:
        return {"v": SCHEMA_VERSION, "type": type_name, "op": message.op,
                "sender": message.sender, "args": message.args}
    if type(message) is Reply:
        return {"v": SCHEMA_VERSION, "type": type_name, "ok": message.ok, "node": message.node,
                "data": message.data, "error": message.error, "error_type": message.error_type}
    custom = _TO_DICT.get(type(message))
    if custom is not None:
        return custom(message)
    data = asdict(message)
    return {"v": SCHEMA_VERSION, "type": type_name, **data}


def encode(message: Any) -> bytes:
    """Serialise a message dataclass to compact JSON bytes.

    A change batch goes through ``encode_value`` (msgspec), as the relay's batches do, so the
    two spell it the same, and so does a request: an import sends 100 requests of 1,000
    objects, which ``json.dumps`` encoded in a fifth of a second of the client's time, on the
    path every backup waits for (their bodies were checked by ``kinds.load_body``, so they hold
    no float a reader could take differently). Everything else goes through ``json.dumps``,
    which the alert layer's own encoder matches byte for byte
    (``tasync.broker.alerts.encode_alert``).
    """
    if type(message) is ChangeBatch or type(message) is Request:
        return encode_value(to_dict(message))
    return json.dumps(to_dict(message), separators=(",", ":"), ensure_ascii=False).encode()


_read_json = msgspec.json.Decoder().decode


def parse_json(body: bytes) -> Any:
    """``json.loads(body)``: the same value, or the same error, in half the time.

    msgspec reads what it can (a bulk import's parts are 100-200 kB each: 0.43 ms each with
    the standard library's parser, 0.22 ms with msgspec's). What msgspec refuses and
    ``json.loads`` accepts (``NaN``, ``1e400``, a lone surrogate, a byte-order mark) or refuses
    in its own words is handed to ``json.loads``, so what is accepted, and every error's
    message, stay as they were; ``tests/unit/broker/test_messages.py`` compares the two.
    """
    try:
        return _read_json(body)
    except (msgspec.DecodeError, RecursionError):
        return json.loads(body)


def decode(body: bytes, *, max_bytes: int, expect: str | None = None) -> Any:
    """Validate ``body`` and return its message dataclass, or raise ``MessageError`` with a reason.

    Args:
        body: the raw message body.
        max_bytes: anything larger is refused before it is parsed.
        expect: the only type acceptable here, e.g. ``"changes"`` on a sync queue.
    """
    if len(body) > max_bytes:
        raise MessageError(f"oversized message: {len(body)} bytes > {max_bytes}")
    try:
        raw = parse_json(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge ints, nesting
        raise MessageError(f"malformed JSON: {str(exc)[:200]}") from None
    if not isinstance(raw, dict):
        raise MessageError("malformed message: not a JSON object")
    version, type_name = raw.get("v"), raw.get("type")
    if version != SCHEMA_VERSION:
        raise MessageError(f"unsupported schema version {version!r} (expected {SCHEMA_VERSION})")
    if not isinstance(type_name, str) or type_name not in SCHEMAS or (
            expect is not None and type_name != expect):
        raise MessageError(f"unexpected message type {type_name!r}")
    try:
        return SCHEMAS[type_name].load(raw)
    except ValidationError as exc:
        raise MessageError(f"invalid {type_name} message: {exc.normalized_messages()}") from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise MessageError(f"invalid {type_name} message: {str(exc)[:200]}") from None


_ENCODER = msgspec.json.Encoder()


def encode_value(value: Any) -> bytes:
    """Compact JSON of any JSON-ready value (the relay encodes every change's head with it).

    msgspec, a tenth of ``json.dumps``'s cost for the small dicts of a batch: the same bytes
    (compact, UTF-8 unescaped, the same string escapes), except that a float in exponent form
    is spelled ``1e16`` rather than ``1e+16``, which every JSON reader reads as the same number.
    Change timestamps never take that form, and validated bodies hold no floats. The
    configuration's checksum is computed from ``tasync.broker.store.canonical``, never from these
    bytes.
    """
    return _ENCODER.encode(value)
