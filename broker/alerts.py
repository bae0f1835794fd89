"""The alert and host-list messages: what a source sends, and how nodes learn ad-hoc lists.

An ``Alert`` is the tuple ``(id, source, targets, text, subject, priority, created_at,
hosts)``; ``targets`` is spelled as ``target_kind`` (``destination`` or ``group``)
and ``target`` (the object's name), because one alert addresses exactly one configured object
and a group already expresses "several". ``id`` is the idempotency key: the network delivers an
id once within the duplicate window, so a script that re-sends after a timeout causes no second
page.

A ``HostList`` record is appended to the ``tasync.hostlists`` stream by whoever creates a
precedence list's queue; every node reads that stream and subscribes to the lists that name it,
so an ad-hoc ``--host a b`` list outlives every process that knew it.

A ``Handled`` record is what a node appends to the ``tasync.handled`` stream each time it
settles a batch of alerts: the ids with their outcomes. Every node follows that stream and
writes the ids into the window it judges duplicates by, so an id is delivered once by the whole
network, whichever node of the list takes each repeat.

All three register themselves with ``tasync.broker.messages`` at import time, so ``messages.decode``
and ``messages.encode`` handle them like every other wire message.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from marshmallow import Schema, fields, post_load, validate, validates
from marshmallow import ValidationError as SchemaError

from tasync.broker import messages
from tasync.broker.errors import InvalidObject
from tasync.broker.kinds import NAME_RE
from tasync.broker.topology import NODE_NAME_RE

#: Longest alert text accepted (characters). Pagers and chat tools truncate far earlier; the
#: limit exists so a runaway script cannot fill queues with megabyte "alerts".
MAX_TEXT_CHARS = 32_768
MAX_SUBJECT_CHARS = 512
MAX_HOSTS = 16
#: At most this many labels, and as many annotations, per alert (Alertmanager's alerts carry a
#: dozen or two); a key is 1 to ``MAX_FIELD_KEY_CHARS`` characters.
MAX_FIELDS = 256
MAX_FIELD_KEY_CHARS = 256
#: Characters a subject (a mail header, a chat title) and a label's name may not hold: C0 and C1
#: controls, DEL and the Unicode line and paragraph separators. A CR/LF in a mail subject would
#: start a new header; every one of them breaks a one-line title somewhere.
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: Encoded alert bodies larger than this are refused by the intake and the delivery worker.
MAX_ALERT_BYTES = 256 << 10
TARGET_KINDS = ("destination", "group")
PRIORITY_MIN, PRIORITY_MAX, PRIORITY_DEFAULT = 0, 9, 5

#: An idempotency key: printable ASCII without spaces, so it survives shells, URLs and logs.
ID_RE = re.compile(r"^[\x21-\x7e]{1,128}\Z")
#: Most ids one ``Handled`` record lists (a node settles at most a few hundred at a time).
MAX_HANDLED_IDS = 10_000
#: How an outcome is spelled in a ``Handled`` record: one letter per id.
OUTCOME_LETTERS = {"delivered": "d", "failed": "f", "skipped": "s"}
LETTER_OUTCOMES = {v: k for k, v in OUTCOME_LETTERS.items()}

#: AMQP headers an alert may carry besides the signature and the sender's host name.
#: The sending program (``AlertSender.name``: ``intake``, ``host:pid``), for the trail.
CLIENT_HEADER = "x-tasync-client"
#: What a node's ``alert_policy`` answer verifies a sender's signature of: this prefix and a
#: random challenge, so the answer can never vouch for an alert body.
POLICY_CHALLENGE_PREFIX = b"tasync alert-policy challenge:"
#: Set by ``tasync dead requeue``: who asked. The node judges a requeued id that failed
#: before as new, and writes who asked to its trail.
REQUEUED_BY_HEADER = "x-tasync-requeued-by"
SOURCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,63}\Z")


def new_alert_id() -> str:
    """A fresh, unique idempotency key for an alert whose sender gave none."""
    return uuid.uuid4().hex


@dataclass(frozen=True, kw_only=True)
class Alert:
    """One alert, immutable from the sender to the delivering node.

    Attributes:
        id: idempotency key; the network delivers an id once within its duplicate window.
        source: who sent it (``remedy``, ``nms``, a script); totals are kept per source.
        target_kind: ``destination`` or ``group``.
        target: the name of the destination or group.
        text: the message body.
        subject: a short title (mail subject, chat title); optional.
        priority: 0 (lowest) to 9 (highest); passed on to channels that know priorities.
        created_at: when the sender made it (seconds since the epoch).
        hosts: the precedence list of nodes, first one delivers.
        labels: optional name -> value pairs that identify what the alert is about (an
            Alertmanager alert's labels); channels that carry structure pass them on as fields.
        annotations: optional name -> value pairs that describe it (summary, runbook URL, ...).
    """

    id: str
    source: str
    target_kind: str
    target: str
    text: str
    subject: str | None = None
    priority: int = PRIORITY_DEFAULT
    created_at: float = field(default_factory=time.time)
    hosts: tuple[str, ...] = ()
    labels: Mapping[str, str] | None = None
    annotations: Mapping[str, str] | None = None

    def __repr__(self) -> str:
        return (f"Alert(id={self.id!r}, source={self.source!r}, {self.target_kind}="
                f"{self.target!r}, hosts={'.'.join(self.hosts)!r}, text={len(self.text)} chars)")


@dataclass(frozen=True, kw_only=True)
class HostList:
    """The durable record that a precedence list is in use and needs consumers.

    Attributes:
        hosts: the list of node names, in precedence order.
        created_at: when the record was made.
        sender: who first used the list (for the operator reading the stream).
    """

    hosts: tuple[str, ...]
    created_at: float = field(default_factory=time.time)
    sender: str = ""


@dataclass(frozen=True, kw_only=True)
class Handled:
    """Alert ids one node settled (delivered, failed or skipped), appended to ``tasync.handled``.

    Attributes:
        node: the node that settled them.
        at: when (seconds since the epoch).
        ids: the alert ids.
        outcomes: one letter per id (``OUTCOME_LETTERS``).
        marker: a node's catch-up marker (no ids): it reads the stream until it meets its own
            marker, and then knows every record published before it.
    """

    node: str
    at: float
    ids: tuple[str, ...] = ()
    outcomes: str = ""
    marker: str = ""

    def items(self) -> list[tuple[str, str]]:
        """``(id, outcome)`` pairs."""
        return [(i, LETTER_OUTCOMES[o]) for i, o in zip(self.ids, self.outcomes, strict=True)]


def _check_hosts(value: list[str]) -> None:
    if len(set(value)) != len(value):
        raise SchemaError("a node may appear only once in a precedence list")


class _Strict(Schema):
    class Meta:
        # An unknown field is an error: a typo must not become a silently ignored option.
        unknown = "raise"


def _check_subject(value: str | None) -> None:
    if value is not None and CONTROL_RE.search(value):
        raise SchemaError("a subject is one line: no line breaks, tabs or other control "
                          "characters")


def _check_fields(value: dict[str, str] | None) -> None:
    if value is None:
        return
    if len(value) > MAX_FIELDS:
        raise SchemaError(f"at most {MAX_FIELDS} entries")
    for key in value:
        if not 1 <= len(key) <= MAX_FIELD_KEY_CHARS or CONTROL_RE.search(key):
            raise SchemaError(f"a name is 1-{MAX_FIELD_KEY_CHARS} characters without control "
                              "characters")


def _fields() -> fields.Dict:
    return fields.Dict(keys=fields.String(), values=fields.String(), load_default=None,
                       allow_none=True, validate=_check_fields)


class AlertSchema(_Strict):
    """An alert on the wire; the limits here are the ones users see in error messages."""

    v = fields.Integer(required=True)
    type = fields.String(required=True)
    id = fields.String(required=True, validate=validate.Regexp(
        ID_RE, error="an alert id is 1-128 printable characters without spaces"))
    source = fields.String(required=True, validate=validate.Regexp(
        SOURCE_RE, error="a source is 1-64 letters, digits or _ . : @ + -"))
    target_kind = fields.String(required=True, validate=validate.OneOf(TARGET_KINDS))
    target = fields.String(required=True, validate=validate.Regexp(
        NAME_RE, error="not a valid destination or group name"))
    text = fields.String(required=True)
    subject = fields.String(load_default=None, allow_none=True,
                            validate=[validate.Length(max=MAX_SUBJECT_CHARS), _check_subject])
    priority = fields.Integer(load_default=PRIORITY_DEFAULT, strict=True,
                              validate=validate.Range(min=PRIORITY_MIN, max=PRIORITY_MAX))
    created_at = fields.Float(required=True, validate=validate.Range(min=0))
    hosts = fields.List(
        fields.String(validate=validate.Regexp(NODE_NAME_RE, error="not a node name")),
        required=True, validate=validate.Length(min=1, max=MAX_HOSTS))
    labels = _fields()
    annotations = _fields()

    @validates("hosts")
    def _unique(self, value: list[str], **_: Any) -> None:
        _check_hosts(value)

    @validates("text")
    def _text(self, value: str, **_: Any) -> None:
        if not value.strip():
            raise SchemaError("the message is empty")
        if len(value) > MAX_TEXT_CHARS:
            raise SchemaError(f"the message is {len(value)} characters; the limit is "
                              f"{MAX_TEXT_CHARS}")

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> Alert:
        data.pop("v")
        data.pop("type")
        data["hosts"] = tuple(data["hosts"])
        return Alert(**data)


class HostListSchema(_Strict):
    """A host-list record on the ``tasync.hostlists`` stream."""

    v = fields.Integer(required=True)
    type = fields.String(required=True)
    hosts = fields.List(
        fields.String(validate=validate.Regexp(NODE_NAME_RE, error="not a node name")),
        required=True, validate=validate.Length(min=1, max=MAX_HOSTS))
    created_at = fields.Float(required=True)
    sender = fields.String(load_default="", validate=validate.Length(max=128))

    @validates("hosts")
    def _unique(self, value: list[str], **_: Any) -> None:
        _check_hosts(value)

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> HostList:
        return HostList(hosts=tuple(data["hosts"]), created_at=data["created_at"],
                        sender=data["sender"])


class HandledSchema(_Strict):
    """A ``Handled`` record on the ``tasync.handled`` stream."""

    v = fields.Integer(required=True)
    type = fields.String(required=True)
    node = fields.String(required=True, validate=validate.Regexp(
        NODE_NAME_RE, error="not a node name"))
    at = fields.Float(required=True, validate=validate.Range(min=0))
    ids = fields.List(fields.String(validate=validate.Regexp(ID_RE, error="not an alert id")),
                      load_default=list, validate=validate.Length(max=MAX_HANDLED_IDS))
    outcomes = fields.String(load_default="", validate=validate.Regexp(
        r"^[dfs]*\Z", error="outcomes are letters d, f, s"))
    marker = fields.String(load_default="", validate=validate.Length(max=64))

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> Handled:
        if len(data["ids"]) != len(data["outcomes"]):
            raise SchemaError("one outcome per id")
        return Handled(node=data["node"], at=data["at"], ids=tuple(data["ids"]),
                       outcomes=data["outcomes"], marker=data["marker"])




def alert_to_dict(alert: Alert) -> dict[str, Any]:
    """The wire form of an alert, built directly.

    ``dataclasses.asdict`` deep-copies every field; for bulk sends that copy cost more than
    the publish itself.
    ``labels`` and ``annotations`` appear only when the alert has them, so an alert without
    them is encoded exactly as before they existed and nodes of that time accept it.
    """
    data = {"v": messages.SCHEMA_VERSION, "type": "alert", "id": alert.id,
            "source": alert.source, "target_kind": alert.target_kind, "target": alert.target,
            "text": alert.text, "subject": alert.subject, "priority": alert.priority,
            "created_at": alert.created_at, "hosts": list(alert.hosts)}
    if alert.labels is not None:
        data["labels"] = dict(alert.labels)
    if alert.annotations is not None:
        data["annotations"] = dict(alert.annotations)
    return data


_ALERT_SCHEMA = AlertSchema()
messages.register("alert", Alert, _ALERT_SCHEMA, to_dict=alert_to_dict)
messages.register("hostlist", HostList, HostListSchema())
messages.register("handled", Handled, HandledSchema())


def encode_alert(alert: Alert) -> bytes:
    """Compact JSON bytes of an alert, byte-identical to ``messages.encode(alert)``."""
    return json.dumps(alert_to_dict(alert), separators=(",", ":"), ensure_ascii=False).encode()


def validated(alert: Alert) -> Alert:
    """Check ``alert`` against the wire schema before it leaves the process.

    Senders call this so that a bad alert is a clear usage error at the edge rather than a
    message the delivery worker has to refuse later.

    Raises:
        tasync.broker.errors.InvalidObject: naming each bad field, e.g. ``text: the message is
            empty``.
    """
    data = alert_to_dict(alert)
    try:
        loaded: Alert = fast_load(data) or _ALERT_SCHEMA.load(data)
    except SchemaError as exc:
        errors = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        raise InvalidObject(
            "invalid alert: " + _one_line(errors), errors=dict(errors)
        ) from None
    size = len(encode_alert(loaded))
    if size > MAX_ALERT_BYTES:
        raise InvalidObject(
            f"invalid alert: {size} bytes encoded, the limit is {MAX_ALERT_BYTES}")
    return loaded


def _one_line(errors: Any) -> str:
    if isinstance(errors, dict):
        parts = []
        for key, value in errors.items():
            inner = _one_line(value)
            parts.append(inner if key == "_schema" else f"{key}: {inner}")
        return "; ".join(parts)
    if isinstance(errors, list):
        return "; ".join(_one_line(e) for e in errors)
    return str(errors)


# -- the fast path ------------------------------------------------------------------------------

_ALERT_KEYS = frozenset({"v", "type", "id", "source", "target_kind", "target", "text", "subject",
                         "priority", "created_at", "hosts", "labels", "annotations"})
_OPTIONAL_KEYS = frozenset({"subject", "priority", "labels", "annotations"})
_REQUIRED_KEYS = _ALERT_KEYS - _OPTIONAL_KEYS
_new = object.__new__


def fast_load(data: Any) -> Alert | None:
    """The ``Alert`` that ``AlertSchema`` would load from ``data``, when it certainly would.

    marshmallow costs about 80 µs per alert, more than publishing or delivering it; senders
    and every delivering node check each alert, so bulk sends spent most of their time there.
    This applies the schema's rules by hand to the common, well-formed case (the same regular
    expressions, limits and types, only stricter: no numeric strings, no bools as numbers) and
    returns None for anything else, which the caller hands to marshmallow for its verdict and
    its error messages. It never accepts what the schema refuses;
    ``tests/unit/broker/test_fastalerts.py`` checks that.
    """
    if type(data) is not dict or not _REQUIRED_KEYS <= data.keys() <= _ALERT_KEYS:
        return None
    version, alert_id, source, kind = data["v"], data["id"], data["source"], data["target_kind"]
    target, text, created, hosts = data["target"], data["text"], data["created_at"], data["hosts"]
    subject, priority = data.get("subject"), data.get("priority", PRIORITY_DEFAULT)
    labels, annotations = data.get("labels"), data.get("annotations")
    if type(version) is not int or version != messages.SCHEMA_VERSION or data["type"] != "alert":
        return None
    if not (type(alert_id) is str and type(source) is str and type(target) is str
            and type(text) is str and type(kind) is str and kind in TARGET_KINDS
            and ID_RE.match(alert_id) and SOURCE_RE.match(source) and NAME_RE.match(target)
            and len(text) <= MAX_TEXT_CHARS and text.strip()):
        return None
    if subject is not None and (type(subject) is not str or len(subject) > MAX_SUBJECT_CHARS
                                or CONTROL_RE.search(subject)):
        return None
    if type(priority) is not int or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        return None
    if not (_time_ok(created) and _hosts_ok(hosts) and _fields_ok(labels)
            and _fields_ok(annotations)):
        return None
    alert: Alert = _new(Alert)  # every field checked: fill the frozen dataclass directly
    alert.__dict__.update(id=alert_id, source=source, target_kind=kind, target=target,
                          text=text, subject=subject, priority=priority,
                          created_at=float(created), hosts=tuple(hosts), labels=labels,
                          annotations=annotations)
    return alert


def _time_ok(value: Any) -> bool:
    """A finite, non-negative number that is not a bool (``fields.Float``, ``Range(min=0)``)."""
    if type(value) is float:
        return 0.0 <= value < math.inf  # also False for NaN
    return type(value) is int and 0 <= value < 2**53


def _fields_ok(value: Any) -> bool:
    """None, or a dict of string to string within the limits ``_check_fields`` applies."""
    if value is None:
        return True
    return (type(value) is dict and len(value) <= MAX_FIELDS
            and all(type(k) is str and type(v) is str and 1 <= len(k) <= MAX_FIELD_KEY_CHARS
                    and not CONTROL_RE.search(k) for k, v in value.items()))


def _hosts_ok(hosts: Any) -> bool:
    """1 to ``MAX_HOSTS`` distinct node names."""
    return (type(hosts) is list and 1 <= len(hosts) <= MAX_HOSTS
            and all(type(h) is str and NODE_NAME_RE.match(h) for h in hosts)
            and len(set(hosts)) == len(hosts))


def decode_alert(body: bytes, *, max_bytes: int = MAX_ALERT_BYTES) -> Alert:
    """``messages.decode(body, expect="alert")``, fast for well-formed alerts.

    Raises:
        MessageError: the body is not a valid alert, with marshmallow's reason.
    """
    if len(body) <= max_bytes:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            data = None
        alert = fast_load(data)
        if alert is not None:
            return alert
    decoded: Alert = messages.decode(body, max_bytes=max_bytes, expect="alert")
    return decoded


# -- handled records ----------------------------------------------------------------------------


def encode_handled(record: Handled) -> bytes:
    """The compact JSON of a ``Handled`` record, as ``HandledSchema`` reads it back."""
    return json.dumps({"v": messages.SCHEMA_VERSION, "type": "handled", "node": record.node,
                       "at": record.at, "ids": list(record.ids), "outcomes": record.outcomes,
                       "marker": record.marker}, separators=(",", ":")).encode()


class _WireHandled(msgspec.Struct, forbid_unknown_fields=True):
    """``HandledSchema`` for msgspec: every node reads every record, marshmallow per id is slow."""

    v: int
    type: str
    node: Annotated[str, msgspec.Meta(pattern=NODE_NAME_RE.pattern)]
    at: Annotated[float, msgspec.Meta(ge=0)]
    ids: Annotated[list[Annotated[str, msgspec.Meta(pattern=ID_RE.pattern)]],
                   msgspec.Meta(max_length=MAX_HANDLED_IDS)] = []
    outcomes: Annotated[str, msgspec.Meta(pattern=r"^[dfs]*$")] = ""
    marker: Annotated[str, msgspec.Meta(max_length=64)] = ""


_read_handled = msgspec.json.Decoder(_WireHandled).decode


def decode_handled(body: bytes, *, max_bytes: int) -> Handled:
    """A ``Handled`` record from the stream, fast when it is well-formed.

    msgspec checks what ``HandledSchema`` checks; anything it does not accept goes to
    ``messages.decode``, which gives marshmallow's verdict and reason.

    Raises:
        MessageError: not a valid record.
    """
    if len(body) <= max_bytes:
        try:
            wire = _read_handled(body)
        except msgspec.DecodeError:
            wire = None
        if (wire is not None and wire.v == messages.SCHEMA_VERSION and wire.type == "handled"
                and len(wire.ids) == len(wire.outcomes) and math.isfinite(wire.at)):
            return Handled(node=wire.node, at=wire.at, ids=tuple(wire.ids),
                           outcomes=wire.outcomes, marker=wire.marker)
    record: Handled = messages.decode(body, max_bytes=max_bytes, expect="handled")
    return record
