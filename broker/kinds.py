"""The configuration kinds: their schemas and the references between them.

Every object is ``(kind, name, body)``; ``body`` is the dict that the kind's marshmallow schema
loads, without the name. The master validates both the schema and the references (a group's
members exist, a route names known nodes) before it commits a change. Backups do not check
bodies again: they check each batch's envelope, signature and era, and apply what the master
validated, in seq order, where a bulk import may pass through states the master validated as
a whole. ``REFERENCES`` is the one description of the references between kinds.
"""

from __future__ import annotations

import logging
import re
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates, validates_schema

from tasync.broker.errors import InvalidObject
from tasync.broker.topology import NODE_NAME_RE

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}\Z")
#: C0 and C1 control characters and DEL: never part of a URL, a subject or a name, and a NUL or
#: a line break in one would reach every node and fail at every delivery.
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Nesting deeper than any kind's schema (a schedule's windows are three levels down) is
#: refused before a schema sees it, so hostile input cannot exhaust the recursion limit.
MAX_BODY_DEPTH = 8
#: How much of a refused value an error message quotes.
QUOTE_CHARS = 40
URL_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
HHMM_RE = re.compile(r"^(?:[01][0-9]|2[0-3]):[0-5][0-9]\Z|^24:00\Z")
#: Delivery URL schemes tasync handles itself; every other scheme is Apprise's
#: (``mailto://user:pw@gmail.com`` too: Apprise's form, where tasync's is ``mailto:ops@x``).
NATIVE_SCHEMES = frozenset({"file", "http", "https", "smtp", "smtps", "mailto"})


def is_native_url(url: str) -> bool:
    """Whether tasync delivers to ``url`` itself rather than through Apprise."""
    scheme = url.split(":", 1)[0].lower()
    return scheme in NATIVE_SCHEMES and not (scheme == "mailto" and url.startswith("mailto://"))


def apprise_refuses(url: str) -> str | None:
    """Why Apprise could not deliver to ``url``, or None when it understands it.

    Checked when a destination is set, so that a typo in a scheme is refused by ``config set``
    rather than found at the first alert. Apprise is imported only here and only for URLs
    tasync does not handle itself: it loads a hundred plugins. Its own complaint (which holds
    the URL, and so maybe a secret) is kept off the terminal.
    """
    import apprise

    logger = logging.getLogger("apprise")
    previous, logger.disabled = logger.disabled, True
    try:
        understood = apprise.Apprise.instantiate(url) is not None
    finally:
        logger.disabled = previous
    if understood:
        return None
    scheme = url.split(":", 1)[0].lower()
    if scheme in _apprise_schemes(apprise):
        return (f"Apprise cannot read this {scheme!r} URL: a part is missing or malformed (see "
                "https://github.com/caronc/apprise/wiki for its form)")
    return f"no delivery channel knows the {scheme!r} scheme (a typo?)"


def _apprise_schemes(apprise: Any) -> frozenset[str]:
    """The URL schemes the installed Apprise has plugins for (empty when it cannot say)."""
    try:
        from apprise.manager_plugins import NotificationManager

        return frozenset(NotificationManager().schemas())  # type: ignore[no-untyped-call]
    except (ImportError, AttributeError):  # Apprise before 1.6 keeps them elsewhere
        return frozenset(getattr(apprise, "SCHEMA_MAP", {}))


class _Body(Schema):
    class Meta:
        # Unknown fields are an error: a typo must not become silently stored configuration.
        unknown = "raise"


class DestinationSchema(_Body):
    """Where alerts go: a delivery URL, an optional schedule and subject template."""

    url = fields.String(required=True, validate=validate.Length(min=3, max=2048))
    schedule = fields.String(load_default=None, allow_none=True)
    subject = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=512))

    @validates("url")
    def _has_scheme(self, value: str, **_: Any) -> None:
        if not URL_SCHEME_RE.match(value):
            raise ValidationError("a delivery URL needs a scheme, e.g. file:///path or https://")
        if not is_native_url(value):
            reason = apprise_refuses(value)
            if reason:
                raise ValidationError(reason)


class GroupSchema(_Body):
    """Several destinations or groups: ``all`` delivers to each, ``sequence`` until one works."""

    members = fields.List(
        fields.String(validate=validate.Length(min=1, max=128)),
        required=True, validate=validate.Length(min=1, max=1000),
    )
    mode = fields.String(load_default="all", validate=validate.OneOf(["all", "sequence"]))


class RouteSchema(_Body):
    """A named precedence list of nodes: the first live one delivers."""

    hosts = fields.List(
        fields.String(validate=validate.Regexp(NODE_NAME_RE, error="not a node name")),
        required=True, validate=validate.Length(min=1, max=16),
    )

    @validates("hosts")
    def _unique(self, value: list[str], **_: Any) -> None:
        if len(set(value)) != len(value):
            raise ValidationError("a node may appear only once in a precedence list")


class WindowSchema(_Body):
    """One weekly window: days of the week and a start/end time of day (end may be 24:00)."""

    days = fields.List(fields.String(validate=validate.OneOf(DAYS)), required=True,
                       validate=validate.Length(min=1, max=7))
    start = fields.String(required=True, validate=validate.Regexp(HHMM_RE, error="use HH:MM"))
    end = fields.String(required=True, validate=validate.Regexp(HHMM_RE, error="use HH:MM"))

    @validates_schema
    def _ordered(self, data: dict[str, Any], **_: Any) -> None:
        if data["start"] >= data["end"]:
            raise ValidationError("start must be before end", "end")


class ScheduleSchema(_Body):
    """Weekly windows in a time zone; a destination outside its window is skipped."""

    timezone = fields.String(load_default="UTC")
    windows = fields.List(fields.Nested(WindowSchema), required=True,
                          validate=validate.Length(min=1, max=100))

    @validates("timezone")
    def _known_zone(self, value: str, **_: Any) -> None:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
            raise ValidationError(f"unknown time zone {value!r}") from exc


class NodeSchema(_Body):
    """A messaging server known to the network; routes and host lists may only name these."""

    description = fields.String(load_default="", validate=validate.Length(max=512))


SCHEMAS: dict[str, Schema] = {
    "destination": DestinationSchema(),
    "group": GroupSchema(),
    "route": RouteSchema(),
    "schedule": ScheduleSchema(),
    "node": NodeSchema(),
}
KINDS = tuple(SCHEMAS)
#: Order in which a bulk import applies kinds, so every intermediate state has its references.
DEPENDENCY_ORDER = {"node": 0, "schedule": 1, "destination": 2, "group": 3, "route": 4}


def quote(value: object) -> str:
    """``repr`` of a value for an error message, cut to ``QUOTE_CHARS`` characters.

    Refused input can be huge or hostile: a message quotes a short prefix and says how long
    the value was, so the error stays one readable line.
    """
    text = repr(value)
    if len(text) <= QUOTE_CHARS:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
    return f"{text[:QUOTE_CHARS]}... ({size})"


def check_kind(kind: str) -> str:
    """Return ``kind`` if tasync knows it, else raise a validation error listing the kinds."""
    if kind not in SCHEMAS:
        raise InvalidObject(f"unknown kind {quote(kind)}; kinds are: {', '.join(KINDS)}")
    return kind


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it may name an object of ``kind``."""
    pattern = NODE_NAME_RE if kind == "node" else NAME_RE
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise InvalidObject(f"invalid {kind} name {quote(name)}")
    return name


def check_plain(where: str, value: Any) -> None:
    """Refuse control characters in every string of ``value`` and nesting past the limit.

    Iterative, so a value nested thousands deep is refused, not a ``RecursionError``.

    Raises:
        InvalidObject: naming the field path and the character.
    """
    if _flat_and_plain(value):
        return
    stack: list[tuple[str, Any, int]] = [("", value, 0)]
    while stack:
        path, item, depth = stack.pop()
        if depth > MAX_BODY_DEPTH:
            raise InvalidObject(f"{where}: nested more than {MAX_BODY_DEPTH} levels deep")
        if isinstance(item, str):
            bad = CONTROL_RE.search(item)
            if bad is not None:
                field = f" {path.lstrip('.')}" if path else ""
                raise InvalidObject(
                    f"{where}:{field} contains a control character (U+{ord(bad.group()):04X}) "
                    f"at position {bad.start()}")
        elif isinstance(item, Mapping):
            for key, sub in item.items():
                stack.append((f"{path}.{quote(key)} (a key)", key, depth + 1))
                stack.append((f"{path}.{key}", sub, depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((f"{path}[{i}]", sub, depth + 1) for i, sub in enumerate(item))


def _flat_and_plain(value: Any) -> bool:
    """Whether ``value`` is a dict of plain strings, numbers and None under plain string keys.

    Most bodies are (a destination's), and for them ``check_plain``'s walk, which builds a field
    path for every key and value in case it must name one, cost more than the rest of the
    body's checks: a bulk import checks every body on the CLI and again on the master. False
    sends the value to the walk, which decides and names the field.
    """
    if type(value) is not dict:
        return False
    search = CONTROL_RE.search
    for key, item in value.items():
        if type(key) is not str or search(key) is not None:
            return False
        kind = type(item)
        if kind is str:
            if search(item) is not None:
                return False
        elif item is not None and kind is not int and kind is not float and kind is not bool:
            return False
    return True


def load_body(kind: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one object's body against its kind's schema; returns the normalised body."""
    if kind == "destination" and type(body) is dict and type(name) is str \
            and NAME_RE.fullmatch(name):  # a bulk import's usual object, in fewer steps
        fast = _fast_destination(body)
        if fast is not None and _flat_and_plain(body):
            return fast
    check_kind(kind)
    check_name(kind, name)
    if not isinstance(body, Mapping):
        raise InvalidObject(f"{kind} {name}: the body must be a JSON object")
    check_plain(f"{kind} {name}", body)
    fast = _fast_destination(body) if kind == "destination" else None
    if fast is not None:
        return fast
    try:
        loaded: dict[str, Any] = SCHEMAS[kind].load(dict(body))
    except ValidationError as exc:
        errors = exc.normalized_messages()
        raise InvalidObject(
            f"{kind} {name}: {_one_line(errors)}", errors=dict(errors)
        ) from exc
    return loaded


_DESTINATION_KEYS = frozenset({"url", "schedule", "subject"})


def _fast_destination(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """What ``DestinationSchema`` loads from ``body``, when it certainly accepts it; else None.

    A bulk import checks every body twice (the CLI before sending, the master on arrival) and
    marshmallow spends about 17 µs on each: 100,000 destinations cost seconds on both sides.
    Destinations are what imports are made of, and their rules are few: this applies them by
    hand (only plain strings and None; anything else goes to marshmallow, which decides and
    explains). ``tests/unit/broker/test_kinds_fast.py`` holds it to the schema.
    """
    if type(body) is not dict or not body.keys() <= _DESTINATION_KEYS:
        return None
    url, schedule, subject = body.get("url"), body.get("schedule"), body.get("subject")
    if (type(url) is not str or not 3 <= len(url) <= 2048 or not URL_SCHEME_RE.match(url)
            or not is_native_url(url)):
        return None
    if schedule is not None and type(schedule) is not str:
        return None
    if subject is not None and (type(subject) is not str or len(subject) > 512):
        return None
    return {"url": url, "schedule": schedule, "subject": subject}


def _one_line(errors: Mapping[str, Any] | list[Any] | str, prefix: str = "") -> str:
    """Flatten marshmallow's nested messages into ``field: message; ...`` for a one-line error."""
    if isinstance(errors, str):
        return f"{prefix}{errors}" if not prefix else f"{prefix.rstrip('.')}: {errors}"
    if isinstance(errors, list):
        return "; ".join(_one_line(e, prefix) for e in errors)
    return "; ".join(_one_line(v, f"{prefix}{k}.") for k, v in errors.items())


State = Mapping[str, Mapping[str, Mapping[str, Any]]]
#: Whether an object ``(kind, name)`` exists, wherever the caller keeps its configuration.
Exists = Callable[[str, str], bool]
#: An object's body, or None, wherever the caller keeps its configuration.
Get = Callable[[str, str], Mapping[str, Any] | None]


@dataclass(frozen=True)
class Reference:
    """One kind of reference between objects: ``kind.field`` names objects of ``targets``.

    The only description of the reference graph: the master's checks of a change
    (``tasync.producers.changes``), the store's query for referrers, the checks of a whole
    configuration (import files, the documentation's examples) and delivery all read it.
    """

    kind: str
    field: str
    many: bool  # a list of names, or one name
    targets: tuple[str, ...]
    dangling: str  # the message when a named object does not exist; {name!r} is filled in

    def names(self, body: Mapping[str, Any]) -> list[str]:
        """The names ``body`` (an object of ``kind``) refers to through this reference."""
        value = body.get(self.field)
        if not value:
            return []
        return [str(v) for v in value] if self.many else [str(value)]


REFERENCES: tuple[Reference, ...] = (
    Reference("destination", "schedule", False, ("schedule",),
              "schedule {name!r} does not exist"),
    Reference("group", "members", True, ("destination", "group"),
              "member {name!r} is neither a destination nor a group"),
    Reference("route", "hosts", True, ("node",), "host {name!r} is not a known node"),
)


def refers(ref_kind: str, body: Mapping[str, Any], kind: str, name: str) -> bool:
    """Whether an object of ``ref_kind`` with ``body`` refers to ``(kind, name)``."""
    return any(ref.kind == ref_kind and kind in ref.targets and name in ref.names(body)
               for ref in REFERENCES)


def outgoing_errors(kind: str, name: str, body: Mapping[str, Any], exists: Exists) -> list[str]:
    """What ``(kind, name)`` with ``body`` refers to that does not exist."""
    return [f"{kind} {name}: " + ref.dangling.format(name=target)
            for ref in REFERENCES if ref.kind == kind
            for target in ref.names(body)
            if not any(exists(t, target) for t in ref.targets)]


def group_cycle(group: str, get: Get) -> str | None:
    """The error when ``group`` contains itself through its members, which would deliver forever."""
    stack, seen = list((get("group", group) or {}).get("members", [])), set()
    while stack:
        member = stack.pop()
        if member == group:
            return f"group {group}: contains itself through its members"
        if member not in seen and get("group", member) is not None:
            seen.add(member)
            stack.extend((get("group", member) or {}).get("members", []))
    return None


def reference_errors(state: State) -> list[str]:
    """Every dangling or cyclic reference in a whole configuration ``{kind: {name: body}}``."""
    def get(kind: str, name: str) -> Mapping[str, Any] | None:
        return state.get(kind, {}).get(name)

    def exists(kind: str, name: str) -> bool:
        return get(kind, name) is not None

    errors = [error for ref_kind in dict.fromkeys(ref.kind for ref in REFERENCES)
              for name, body in state.get(ref_kind, {}).items()
              for error in outgoing_errors(ref_kind, name, body, exists)]
    errors += [cycle for group in sorted(state.get("group", {}))
               if (cycle := group_cycle(group, get)) is not None]
    return errors


def referrers(state: State, kind: str, name: str) -> list[str]:
    """Objects that refer to ``(kind, name)``; a delete is refused while any exist."""
    return [f"{ref.kind} {other}" for ref in REFERENCES if kind in ref.targets
            for other, body in state.get(ref.kind, {}).items() if name in ref.names(body)]
