"""The configuration pages' work: reading objects from the master, and changing them.

Changes take the path of ``tasync config set`` and ``tasync config delete``: the body is
checked here first with the same schema (``tasync.broker.kinds.load_body``), then committed on the
master by ``tasync.cli_config``'s commit, which the master checks again (references included)
and replicates. A refusal comes back as field -> messages and is shown beside the field; a
reference the master refuses (``references``) is put beside the field that names it, found
through ``tasync.broker.kinds.REFERENCES``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tasync.broker import kinds, topology
from tasync.broker.errors import InvalidObject, RemoteError
from tasync.broker.settings import Settings
from tasync.cli_config import commit_once
from tasync.client import rpc_client

#: Objects listed on one page at most; a filter narrows the rest.
PAGE_OBJECTS = 500
#: The error not tied to one field is shown at the top of the form under this key.
GENERAL = "_form"


@dataclass(frozen=True)
class Field:
    """One input of a kind's form.

    Attributes:
        name: the body's field.
        label: what the form calls it.
        form: ``text``, ``lines`` (one list item per line), ``json`` or ``choice``.
        help: a line under the input.
        choices: the values of a ``choice``.
    """

    name: str
    label: str
    form: str = "text"
    help: str = ""
    choices: tuple[str, ...] = ()


FIELDS: dict[str, tuple[Field, ...]] = {
    "destination": (
        Field("url", "Delivery URL", help="file:///path, https://..., mailto:ops@example.com, "
                                          "or an Apprise URL"),
        Field("schedule", "Schedule", help="Name of a schedule that gates it (optional)."),
        Field("subject", "Subject", help="Subject template (optional)."),
    ),
    "group": (
        Field("members", "Members", "lines", "Destinations or groups, one per line."),
        Field("mode", "Mode", "choice", "all: each member; sequence: until one works.",
              ("all", "sequence")),
    ),
    "route": (Field("hosts", "Hosts", "lines", "Nodes in precedence order, one per line."),),
    "schedule": (
        Field("timezone", "Time zone", help="IANA name, e.g. Europe/Berlin."),
        Field("windows", "Windows", "json", 'JSON list, e.g. [{"days": ["mon"], '
                                            '"start": "08:00", "end": "18:00"}]'),
    ),
    "node": (Field("description", "Description", help="Free text."),),
}


def list_objects(settings: Settings, kind: str, *, timeout_s: float) -> list[dict[str, Any]]:
    """Every object of ``kind`` the master holds (as ``tasync config show KIND``)."""
    with rpc_client(settings) as rpc:
        data = rpc.call_one(topology.MASTER, "show", {"kind": kind, "name": None},
                            timeout_s=timeout_s)
    return list(data["objects"])


def get_object(settings: Settings, kind: str, name: str, *,
               timeout_s: float) -> dict[str, Any] | None:
    """The body of one object on the master, or None."""
    with rpc_client(settings) as rpc:
        data = rpc.call_one(topology.MASTER, "show", {"kind": kind, "name": name},
                            timeout_s=timeout_s)
    found = [o for o in data["objects"] if o["name"] == name]
    return dict(found[0]["body"]) if found else None


def matches(obj: Mapping[str, Any], query: str) -> bool:
    """Whether an object's name or any of its values contains ``query`` (any case)."""
    needle = query.strip().lower()
    return not needle or needle in obj["name"].lower() or needle in json.dumps(
        obj["body"], ensure_ascii=False).lower()


def form_values(kind: str, body: Mapping[str, Any]) -> dict[str, str]:
    """What a form's inputs hold for an object's body."""
    values = {}
    for f in FIELDS[kind]:
        value = body.get(f.name)
        if value is None:
            values[f.name] = ""
        elif f.form == "lines":
            values[f.name] = "\n".join(str(v) for v in value)
        elif f.form == "json":
            values[f.name] = json.dumps(value, indent=2, ensure_ascii=False)
        else:
            values[f.name] = str(value)
    return values


def body_from_form(kind: str, form: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The body a form describes, and the errors of the fields that could not be read."""
    body: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for f in FIELDS[kind]:
        raw = form.get(f.name, "")
        if f.form == "lines":
            items = [line.strip() for line in raw.splitlines() if line.strip()]
            if items:
                body[f.name] = items
        elif f.form == "json":
            if raw.strip():
                try:
                    body[f.name] = json.loads(raw)
                except (json.JSONDecodeError, RecursionError, ValueError) as exc:
                    errors[f.name] = f"not valid JSON: {str(exc)[:120]}"
        elif raw.strip():
            body[f.name] = raw.strip()
    return body, errors


def check(kind: str, name: str, form: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The checked body of a form (``config set``'s check), or the errors by field."""
    errors: dict[str, str] = {}
    try:
        kinds.check_name(kind, name)
    except InvalidObject as exc:
        errors["name"] = str(exc)
    body, unread = body_from_form(kind, form)
    errors.update(unread)
    for key, value in body.items():
        try:
            kinds.check_plain(key, value)
        except InvalidObject as exc:
            errors[key] = str(exc)
    if errors:
        return body, errors
    try:
        return kinds.load_body(kind, name, body), {}
    except InvalidObject as exc:
        return body, field_errors(kind, body, str(exc), exc.errors)


def field_errors(kind: str, body: Mapping[str, Any], message: str,
                 errors: Mapping[str, Any]) -> dict[str, str]:
    """Messages by form field from a refusal's field -> messages (the master's or the schema's).

    ``references`` (the master's check of names) goes beside the field that names the missing
    object; what belongs to no field goes to ``GENERAL``.
    """
    known = {f.name for f in FIELDS[kind]}
    out: dict[str, str] = {}
    for key, value in errors.items():
        if key == "references":
            for problem in value if isinstance(value, list) else [value]:
                out.setdefault(_referring_field(kind, body, str(problem)), str(problem))
        elif key in known:
            out[key] = "; ".join(flatten(value))
        else:
            out[GENERAL] = "; ".join(flatten({key: value}))
    if not out:
        out[GENERAL] = message
    return out


def _referring_field(kind: str, body: Mapping[str, Any], problem: str) -> str:
    for ref in kinds.REFERENCES:
        if ref.kind == kind and any(ref.dangling.format(name=n) in problem
                                    for n in ref.names(body)):
            return ref.field
    return GENERAL


def flatten(value: Any, prefix: str = "") -> list[str]:
    """Nested field -> messages as lines, each prefixed with its path (``body: url: ...``)."""
    if isinstance(value, Mapping):
        return [m for k, v in value.items() for m in flatten(v, f"{prefix}{k}: ")]
    if isinstance(value, list):
        return [m for v in value for m in flatten(v, prefix)]
    return [f"{prefix}{value}"]


def commit(settings: Settings, op: dict[str, Any], *, by: str,
           timeout_s: float) -> dict[str, Any]:
    """Commit one change on the master as ``tasync config`` does; returns its seq and epoch.

    The request is ``tasync config``'s (``commit_once``) with ``by`` added: the master writes
    ``change.committed by=...`` to its trail, so the change is audited with the console user.
    """
    return commit_once(settings, [op], timeout_s=timeout_s, by=by)


def refusal(kind: str, body: Mapping[str, Any], exc: RemoteError) -> dict[str, str]:
    """The errors by field of a change the master refused."""
    data = exc.data.get("errors")
    return field_errors(kind, body, str(exc), data if isinstance(data, Mapping) else {})
