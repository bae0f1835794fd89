"""Alertmanager's webhook notifications (payload version 4), turned into alert requests.

Each entry of a notification's ``alerts`` becomes one tasync alert:

* **subject**: ``[FIRING] DiskFull instance=db1 mountpoint=/var``: the status, the alert's
  name and the labels that tell this alert from the others (the group's labels and the labels
  not common to the whole notification), so the alerts of one group do not all look alike;
* **text**: the ``summary`` annotation (else ``description``, else the name), the
  ``description`` below it when both exist, and a line when Alertmanager left alerts out
  (``truncatedAlerts``, the receiver's ``max_alerts``);
* **labels** and **annotations** as fields of the alert (with ``generatorURL`` among the
  annotations), so a webhook or file destination receives ``runbook_url`` as a field;
* **priority** from the ``severity`` label (``SEVERITY_PRIORITY``); a resolved alert has
  ``RESOLVED_PRIORITY``, whatever its severity was.

Ids. Alertmanager sends the very same notification again for two reasons: it retries one
that failed (a timeout, a 5xx), and it repeats one still firing after ``repeat_interval`` as a
reminder. The payload is the same both times (firing alerts carry no end time), so only time
tells them apart: retries follow each other within about a minute, a reminder comes
``repeat_interval`` (hours, by default) after the last successful attempt. The intake keeps,
per notification content, when it was first and last seen (``NotificationMemory``): seen again
within ``retry_window_s`` of its last attempt it is a retry and gets the same ids; later, it is
a reminder and gets new ones. An alert's id is ``am-<fingerprint>-<status>-<tag>``, the tag a
hash of the notification's content and the time it was first seen, so the ids of a retry match
and every reminder is delivered once more. The memory lives in the intake process: a retry
that reaches another intake, or an intake restarted between two attempts, gets new ids.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tasync.broker.alerts import (
    CONTROL_RE,
    MAX_FIELD_KEY_CHARS,
    MAX_FIELDS,
    MAX_SUBJECT_CHARS,
    MAX_TEXT_CHARS,
    PRIORITY_DEFAULT,
)
from tasync.broker.errors import BadRequest
from tasync.producers.intake_formats import AlertRequest, target_of

SEVERITY_PRIORITY = {"critical": 9, "page": 9, "error": 7, "high": 7, "warning": 6,
                     "warn": 6, "info": 3, "low": 2, "none": 1}
#: A resolved notice is an all-clear: low, and shown as "success" where channels have colours.
RESOLVED_PRIORITY = 1
#: Longest annotation value carried as a field; longer ones are cut (the text keeps the rest
#: of what matters) so that one runaway annotation cannot make Alertmanager's whole
#: notification too large to accept.
MAX_FIELD_VALUE_CHARS = 8192
MAX_MEMORY_ENTRIES = 100_000
_FINGERPRINT_RE = re.compile(r"[^0-9A-Za-z]")


@dataclass(frozen=True)
class Notification:
    """One webhook notification, read.

    Attributes:
        requests: one alert request per alert of the notification.
        truncated: how many alerts Alertmanager left out (``max_alerts``).
        group_key: Alertmanager's key of the group.
        receiver: the receiver's name.
        retry: whether the same notification was seen within the retry window (same ids).
    """

    requests: list[AlertRequest]
    truncated: int
    group_key: str
    receiver: str
    retry: bool


class NotificationMemory:
    """When each notification content was first and last seen; thread-safe, bounded.

    Args:
        window_s: a content seen again within this time of its last sighting is a retry.
        clock: wall time (seconds); tests give their own.
    """

    def __init__(self, window_s: float, *, clock: Callable[[], float] = time.time,
                 max_entries: int = MAX_MEMORY_ENTRIES) -> None:
        self.window_s = window_s
        self.clock = clock
        self.max_entries = max_entries
        self._seen: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def sighting(self, key: str) -> tuple[float, bool]:
        """``(first seen, retry)`` for a notification content seen now."""
        now = self.clock()
        with self._lock:
            entry = self._seen.pop(key, None)
            retry = entry is not None and now - entry[1] < self.window_s
            first = entry[0] if entry is not None and retry else now
            self._seen[key] = (first, now)
            while self._seen:
                oldest_key, (_, last) = next(iter(self._seen.items()))
                if len(self._seen) <= self.max_entries and now - last < self.window_s:
                    break
                del self._seen[oldest_key]
        return first, retry


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _fields(value: Any, *, limit: int) -> dict[str, str]:
    """Labels or annotations as strings, within the alert's limits for such fields."""
    out: dict[str, str] = {}
    for key, item in sorted(_dict(value).items()):
        name = str(key)
        if len(out) >= MAX_FIELDS or not 1 <= len(name) <= MAX_FIELD_KEY_CHARS \
                or CONTROL_RE.search(name):
            continue
        text = item if isinstance(item, str) else json.dumps(item)
        out[name] = text if len(text) <= limit else text[:limit - 1] + "…"
    return out


def _one_line(text: str) -> str:
    return CONTROL_RE.sub(" ", text)


def _subject(status: str, labels: Mapping[str, str], group: Mapping[str, Any],
             common: Mapping[str, Any]) -> str:
    name = labels.get("alertname") or str(common.get("alertname") or "alert")
    keys = [k for k in group if k != "alertname" and k in labels]
    keys += sorted(k for k in labels if k not in common and k != "alertname" and k not in keys)
    words = [f"[{status.upper()}]", name, *(f"{k}={labels[k]}" for k in keys)]
    subject = _one_line(" ".join(words))
    return subject if len(subject) <= MAX_SUBJECT_CHARS else subject[:MAX_SUBJECT_CHARS - 1] + "…"


def _text(name: str, notes: Mapping[str, str], truncated: int) -> str:
    summary = notes.get("summary") or notes.get("description") or name
    lines = [summary]
    if notes.get("summary") and notes.get("description"):
        lines.append(notes["description"])
    if truncated:
        lines.append(f"Alertmanager left out {truncated} more alert(s) of this group "
                     "(the receiver's max_alerts).")
    text = "\n".join(lines)
    if not text.strip():
        text = name
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS - 1] + "…"


def _content_key(data: Mapping[str, Any], entries: list[dict[str, Any]], truncated: int) -> str:
    """A hash of what makes two notifications the same one (not their arrival time)."""
    alerts = sorted([str(e.get("fingerprint") or ""), str(e.get("status") or ""),
                     str(e.get("startsAt") or ""), str(e.get("endsAt") or ""),
                     json.dumps(_dict(e.get("labels")), sort_keys=True)] for e in entries)
    content = [str(data.get("receiver") or ""), str(data.get("groupKey") or ""),
               str(data.get("status") or ""), truncated, alerts]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def _fingerprint(entry: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    given = _FINGERPRINT_RE.sub("", str(entry.get("fingerprint") or ""))[:32]
    return given or hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]


def _entries(data: Any) -> list[dict[str, Any]]:
    if not isinstance(data, dict) or not isinstance(data.get("alerts"), list):
        raise BadRequest("not an Alertmanager payload: no 'alerts' list")
    entries: list[dict[str, Any]] = data["alerts"]
    if not entries:
        raise BadRequest("the Alertmanager payload has no alerts")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise BadRequest(f"alerts[{index}] is not an object")
    return entries


def _truncated(data: Mapping[str, Any]) -> int:
    value = data.get("truncatedAlerts") or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest("'truncatedAlerts' must be a whole number >= 0")
    return value


def parse_alertmanager(data: Any, *, query: Mapping[str, str],
                       memory: NotificationMemory) -> Notification:
    """One alert request per alert of a notification; see the module's docstring.

    Raises:
        BadRequest: not an Alertmanager notification, or no target in the query.
    """
    entries = _entries(data)
    truncated = _truncated(data)
    kind, target = target_of({}, query)
    source = query.get("source") or "alertmanager"
    common, group = _dict(data.get("commonLabels")), _dict(data.get("groupLabels"))
    key = _content_key(data, entries, truncated)
    first_seen, retry = memory.sighting(key)
    tag = hashlib.sha256(f"{key}:{first_seen:.6f}".encode()).hexdigest()[:16]
    requests = []
    for entry in entries:
        labels = _fields(entry.get("labels"), limit=MAX_FIELD_VALUE_CHARS)
        notes = _fields(entry.get("annotations"), limit=MAX_FIELD_VALUE_CHARS)
        if entry.get("generatorURL") and "generatorURL" not in notes:
            notes["generatorURL"] = str(entry["generatorURL"])[:MAX_FIELD_VALUE_CHARS]
        status = "resolved" if str(entry.get("status") or data.get("status")) == "resolved" \
            else "firing"
        name = labels.get("alertname") or str(common.get("alertname") or "alert")
        severity = str(labels.get("severity") or common.get("severity") or "").lower()
        priority = RESOLVED_PRIORITY if status == "resolved" \
            else SEVERITY_PRIORITY.get(severity, PRIORITY_DEFAULT)
        requests.append(AlertRequest(
            id=f"am-{_fingerprint(entry, labels)}-{status}-{tag}", source=source,
            target_kind=kind, target=target, text=_text(name, notes, truncated),
            subject=_subject(status, labels, group, common), priority=priority,
            route=query.get("route"), labels=labels, annotations=notes))
    return Notification(requests=requests, truncated=truncated,
                        group_key=str(data.get("groupKey") or ""),
                        receiver=str(data.get("receiver") or ""), retry=retry)
