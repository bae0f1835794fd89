"""What integrations post to the HTTP intake (generic JSON), turned into alert requests.

``POST /alerts`` takes one object or a list of objects::

    {"source": "remedy", "destination": "ops-mail", "message": "INC0042 P1 opened",
     "subject": "P1", "id": "INC0042-open", "priority": 8, "route": "remedy"}

``group`` may replace ``destination``; ``text`` may replace ``message``; ``hosts`` (a list)
may replace ``route``; without either, the intake maps the source to its route. ``labels`` and
``annotations`` (objects of strings) travel with the alert as fields. Alertmanager's webhook
is read by ``tasync.producers.alertmanager``.

Every problem is a ``BadRequest`` whose message tells the integrator which field to fix; a
request with more alerts than the intake takes at once is ``TooLarge`` (413: split it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tasync.broker.alerts import PRIORITY_DEFAULT
from tasync.broker.errors import BadRequest, TooLarge


@dataclass(frozen=True, kw_only=True)
class AlertRequest:
    """One alert as asked for, before its precedence list is settled.

    Attributes:
        id: idempotency key, or None to have one generated.
        source: who sent it.
        target_kind: ``destination`` or ``group``.
        target: its name.
        text: the message.
        subject: optional title.
        priority: 0-9.
        route: a named route asked for, if any.
        hosts: an explicit precedence list, if any.
        labels: name -> value pairs identifying what the alert is about, if any.
        annotations: name -> value pairs describing it, if any.
    """

    id: str | None
    source: str
    target_kind: str
    target: str
    text: str
    subject: str | None = None
    priority: int = PRIORITY_DEFAULT
    route: str | None = None
    hosts: tuple[str, ...] | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


def load_json(body: bytes) -> Any:
    """Parse a request body, with the position of a syntax error in the message."""
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
                         ) from None
    except RecursionError:
        raise BadRequest("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise BadRequest(f"invalid JSON: {str(exc)[:120]}") from None


def _str(obj: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise BadRequest(f"missing field {key!r}")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"field {key!r} must be a string")
    return value


def _strings(obj: Mapping[str, Any], key: str) -> dict[str, str] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise BadRequest(f"field {key!r} must be an object of strings")
    return value


def target_of(obj: Mapping[str, Any], query: Mapping[str, str]) -> tuple[str, str]:
    """``(target_kind, target)`` from the object's or the query's ``destination``/``group``."""
    destination = _str(obj, "destination") or query.get("destination")
    group = _str(obj, "group") or query.get("group")
    if bool(destination) == bool(group):
        raise BadRequest("give exactly one of 'destination' or 'group'")
    return ("destination", destination) if destination else ("group", str(group))


def _priority(value: Any) -> int:
    if value is None:
        return PRIORITY_DEFAULT
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest("field 'priority' must be an integer from 0 to 9")
    return value


def parse_generic(data: Any, *, query: Mapping[str, str], max_alerts: int
                  ) -> list[AlertRequest]:
    """Alert requests from the generic JSON payload (one object or a list of them).

    Raises:
        BadRequest: a field is wrong, named in the message.
        TooLarge: more than ``max_alerts`` alerts.
    """
    items = data if isinstance(data, list) else [data]
    if not items:
        raise BadRequest("no alert in the request")
    if len(items) > max_alerts:
        raise TooLarge(f"{len(items)} alerts in one request; the limit is {max_alerts}: "
                       "split the request")
    requests: list[AlertRequest] = []
    for index, item in enumerate(items):
        where = f"alert {index}: " if len(items) > 1 else ""
        if not isinstance(item, dict):
            raise BadRequest(f"{where}each alert must be a JSON object")
        try:
            requests.append(_generic_one(item, query))
        except BadRequest as exc:
            raise BadRequest(f"{where}{exc}") from None
    return requests


def _generic_one(item: dict[str, Any], query: Mapping[str, str]) -> AlertRequest:
    known = {"id", "source", "destination", "group", "message", "text", "subject", "priority",
             "route", "hosts", "labels", "annotations"}
    unknown = sorted(set(item) - known)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r} (fields: {', '.join(sorted(known))})")
    text = _str(item, "message") if "message" in item else _str(item, "text")
    if not text or not text.strip():
        raise BadRequest("the message is empty (field 'message')")
    kind, target = target_of(item, query)
    hosts = item.get("hosts")
    if hosts is not None and (not isinstance(hosts, list)
                              or not all(isinstance(h, str) for h in hosts)):
        raise BadRequest("field 'hosts' must be a list of node names")
    source = _str(item, "source") or query.get("source")
    if not source:
        raise BadRequest("missing field 'source' (or ?source= in the URL)")
    return AlertRequest(
        id=_str(item, "id"), source=source, target_kind=kind, target=target, text=text,
        subject=_str(item, "subject"), priority=_priority(item.get("priority")),
        route=_str(item, "route") or query.get("route"),
        hosts=tuple(hosts) if hosts else None, labels=_strings(item, "labels"),
        annotations=_strings(item, "annotations"))
