"""What integrations post to the HTTP intake, turned into alert requests.

Two payloads are understood:

* **generic JSON** (``POST /alerts``): one object or a list of objects::

      {"source": "remedy", "destination": "ops-mail", "message": "INC0042 P1 opened",
       "subject": "P1", "id": "INC0042-open", "priority": 8, "route": "remedy"}

  ``group`` may replace ``destination``; ``text`` may replace ``message``; ``hosts`` (a list)
  may replace ``route``; without either, the intake maps the source to its route.

* **Prometheus Alertmanager** webhook (``POST /alertmanager?destination=ops&source=prom``): each
  entry of ``alerts`` becomes one alert. Its id is built from the fingerprint, status and start
  time, so Alertmanager's own retries of one notification are delivered once, while a
  "resolved" for the same alert is a new alert.

Every problem is a ``BadRequest`` whose message tells the integrator which field to fix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.alerts import PRIORITY_DEFAULT

SEVERITY_PRIORITY = {"critical": 9, "page": 9, "error": 7, "high": 7, "warning": 6,
                     "warn": 6, "info": 3, "low": 2, "none": 1}
MAX_ALERTS_PER_REQUEST = 1000


class BadRequest(ValueError):
    """The request cannot become alerts; the message is the reason shown to the caller."""


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


def _target(obj: Mapping[str, Any], query: Mapping[str, str]) -> tuple[str, str]:
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


def parse_generic(data: Any, *, query: Mapping[str, str]) -> list[AlertRequest]:
    """Alert requests from the generic JSON payload (one object or a list of them)."""
    items = data if isinstance(data, list) else [data]
    if not items:
        raise BadRequest("no alert in the request")
    if len(items) > MAX_ALERTS_PER_REQUEST:
        raise BadRequest(f"at most {MAX_ALERTS_PER_REQUEST} alerts per request")
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
             "route", "hosts"}
    unknown = sorted(set(item) - known)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r} (fields: {', '.join(sorted(known))})")
    text = _str(item, "message") if "message" in item else _str(item, "text")
    if not text or not text.strip():
        raise BadRequest("the message is empty (field 'message')")
    kind, target = _target(item, query)
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
        hosts=tuple(hosts) if hosts else None)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def parse_alertmanager(data: Any, *, query: Mapping[str, str]) -> list[AlertRequest]:
    """Alert requests from an Alertmanager webhook notification (payload version 4)."""
    if not isinstance(data, dict) or not isinstance(data.get("alerts"), list):
        raise BadRequest("not an Alertmanager payload: no 'alerts' list")
    if not data["alerts"]:
        raise BadRequest("the Alertmanager payload has no alerts")
    kind, target = _target({}, query)
    source = query.get("source") or "alertmanager"
    common = _dict(data.get("commonLabels"))
    requests = []
    for index, entry in enumerate(data["alerts"][:MAX_ALERTS_PER_REQUEST]):
        if not isinstance(entry, dict):
            raise BadRequest(f"alerts[{index}] is not an object")
        labels = _dict(entry.get("labels"))
        notes = _dict(entry.get("annotations"))
        status = str(entry.get("status") or data.get("status") or "firing")
        name = str(labels.get("alertname") or common.get("alertname") or "alert")
        summary = str(notes.get("summary") or notes.get("description") or name)
        detail = " ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "alertname")
        text = f"{summary}\n{detail}".strip() if detail else summary
        if notes.get("description") and notes.get("summary"):
            text += f"\n{notes['description']}"
        fingerprint = str(entry.get("fingerprint") or hashlib.sha256(
            json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16])
        starts = str(entry.get("startsAt") or "")
        severity = str(labels.get("severity") or common.get("severity") or "").lower()
        requests.append(AlertRequest(
            id=f"am-{fingerprint}-{status}-{starts}".replace(" ", "")[:128],
            source=source, target_kind=kind, target=target, text=text,
            subject=f"[{status.upper()}] {name}"[:512],
            priority=SEVERITY_PRIORITY.get(severity, PRIORITY_DEFAULT),
            route=query.get("route")))
    return requests
