"""The alert pages' work: a test alert sent, an alert traced, dead letters looked at and re-sent.

Each is what the command does, through the command's own functions: ``tasync send`` (an
``AlertSender`` checks names and policy and publishes with confirms), ``tasync trace`` (every
live node's trail lines about the id, merged with the broker's dead letters and quarantine by
``tasync.cli_trace.story``), ``tasync dead list|show|requeue`` (the queue browsed without
taking anything away; a re-sent alert's dead copy is acknowledged only once the broker confirmed
the new one). Where the command writes the user of the machine into the trail, the console
writes its own user: a test alert's sender and a re-send's ``by`` are ``console:NAME``, so the
delivering node's trail says who did it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tasync.alert_lists import ask_all
from tasync.broker import topology
from tasync.broker.alerts import PRIORITY_DEFAULT, Alert, new_alert_id
from tasync.broker.errors import ConfigError, InvalidObject, MessageError, TasyncError
from tasync.broker.settings import Settings
from tasync.cli_alerts import keyring_from_env
from tasync.cli_dead import describe, looking_at
from tasync.cli_trace import details_of, from_broker, story
from tasync.client import rpc_client
from tasync.producers.sender import AlertSender, SendResult, parse_hosts

#: The source of alerts sent from the console (totals count them apart).
SOURCE = "console"
#: Dead letters or quarantined messages looked at, at most, per page (as ``--limit``).
LOOK_LIMIT = 1000
#: Outcomes after which an alert's story changes no more (the trace page stops refreshing).
SETTLED = frozenset({"delivered", "dead", "refused", "skipped"})
#: The queues the console looks into, by the name in its URLs.
QUEUES = {"dead": topology.DEAD_LETTER_QUEUE, "quarantine": topology.QUARANTINE_QUEUE}
#: Where the general error of a form goes (beside no field).
GENERAL = "_form"


@dataclass(frozen=True)
class AlertForm:
    """What the send form asks for; ``target`` is ``KIND:NAME`` (``destination:ops``)."""

    target: str
    text: str
    subject: str = ""
    route: str = ""
    hosts: str = ""
    alert_id: str = ""
    priority: str = str(PRIORITY_DEFAULT)

    @classmethod
    def from_form(cls, form: Mapping[str, str]) -> AlertForm:
        """The form's fields (missing ones empty)."""
        return cls(target=form.get("target", ""), text=form.get("text", ""),
                   subject=form.get("subject", "").strip(), route=form.get("route", "").strip(),
                   hosts=form.get("hosts", "").strip(), alert_id=form.get("id", "").strip(),
                   priority=form.get("priority", str(PRIORITY_DEFAULT)).strip())


def check_form(wanted: AlertForm) -> dict[str, str]:
    """Errors by field that need no network: what to send to, and along which list."""
    errors: dict[str, str] = {}
    kind, _sep, name = wanted.target.partition(":")
    if kind not in ("destination", "group") or not name:
        errors["target"] = "choose a destination or a group"
    if bool(wanted.route) == bool(wanted.hosts):
        errors["route"] = "choose a route, or name the nodes below (not both)"
    if not wanted.priority.isdigit():
        errors["priority"] = "a number from 0 to 9"
    return errors


def send_test(settings: Settings, wanted: AlertForm, *, by: str) -> tuple[Alert, SendResult]:
    """Send one test alert as ``tasync send`` does, its sender named ``by``.

    Raises:
        InvalidObject, ConfigError, SendRefused: as ``tasync send`` reports them.
        TasyncError: the broker could not be reached, or did not confirm.
    """
    kind, _sep, name = wanted.target.partition(":")
    with AlertSender(settings, keyring=keyring_from_env(None), name=by) as sender:
        hosts = parse_hosts([wanted.hosts]) if wanted.hosts else sender.resolve_route(
            wanted.route)
        alert = Alert(id=wanted.alert_id or new_alert_id(), source=SOURCE, target_kind=kind,
                      target=name, text=wanted.text, subject=wanted.subject or None,
                      priority=int(wanted.priority), hosts=hosts)
        return alert, sender.send(alert)


def send_errors(exc: TasyncError) -> dict[str, str]:
    """A refused send's message, beside the field it is about."""
    message = str(exc)
    if isinstance(exc, InvalidObject) and exc.errors:
        fields = {"id": "id", "text": "text", "subject": "subject", "priority": "priority",
                  "hosts": "hosts", "target": "target"}
        out: dict[str, str] = {}
        for key, value in exc.errors.items():
            text = "; ".join(str(v) for v in value) if isinstance(value, list) else str(value)
            out[fields.get(key, GENERAL)] = text
        return out
    if isinstance(exc, ConfigError):
        for needle, field in (("unknown destination", "target"), ("unknown group", "target"),
                              ("route", "route"), ("node", "hosts"),
                              ("precedence list", "hosts")):
            if needle in message:
                return {field: message}
    return {GENERAL: message}


def targets(objects: Mapping[str, list[dict[str, Any]]]) -> list[tuple[str, str]]:
    """The send form's choices: (``KIND:NAME``, label) for every destination and group."""
    return [(f"{kind}:{o['name']}", f"{kind} {o['name']}")
            for kind in ("destination", "group") for o in objects.get(kind, [])]


def trace(settings: Settings, alert_id: str, *, timeout_s: float) -> dict[str, Any]:
    """The story of one alert, as ``tasync trace --json`` gives it.

    Added: ``known`` (anything at all was found), ``settled`` (the story will not change) and
    each event's ``details`` on one line.
    """
    with rpc_client(settings) as rpc:
        answers, missing = ask_all(rpc, "trace", {"id": alert_id}, timeout_s=timeout_s)
    result = story(alert_id, answers, from_broker(settings, alert_id, LOOK_LIMIT))
    result["not_answering"] = missing
    result["known"] = bool(result["events"] or result["dead"] or result["quarantined"]
                           or result["seen"])
    result["settled"] = result["outcome"] in SETTLED
    for event in result["events"]:
        event["details"] = details_of(event)
    return result


def look(settings: Settings, queue: str) -> tuple[int, list[dict[str, Any]]]:
    """How many messages ``queue`` holds, and the first ``LOOK_LIMIT`` described."""
    with looking_at(settings, queue, LOOK_LIMIT) as (browser, seen):
        return browser.total, [describe(m) for m in seen]


def requeue(settings: Settings, key: str, *, by: str,
            queue: str = topology.DEAD_LETTER_QUEUE) -> dict[str, Any] | None:
    """Send the message ``key`` of ``queue`` again, as ``tasync dead requeue`` does, asked ``by``.

    ``queue`` is the dead-letter queue, or the quarantine: a quarantined alert (refused for
    its signature or its sender, say, and since vouched for) goes out the same way, along its
    own list, and takes the normal path, so a node that still refuses it quarantines it again
    with the reason.

    Returns what was sent (``id``, ``list``, ``warnings``), or None when no message of
    ``queue`` is ``key`` (another user re-sent it meanwhile). The old copy is acknowledged
    only after the broker confirmed the new one.

    Raises:
        ConfigError: the message is not a valid alert (it stays where it is), or the send was
            refused as ``tasync send`` is refused.
    """
    with looking_at(settings, queue, LOOK_LIMIT) as (browser, seen):
        chosen = next((m for m in seen if describe(m)["key"] == key), None)
        if chosen is None:
            return None
        with AlertSender(settings, keyring=keyring_from_env(None),
                         name=f"requeue by {by}") as sender:
            try:
                result = sender.resend(chosen.body, chosen.headers, requeued_by=by)
            except MessageError as exc:
                raise ConfigError(f"{key} is not a valid alert, left where it is ({exc})"
                                  ) from None
        browser.ack(chosen)
    return {"id": key, "list": " ".join(result.hosts), "warnings": result.warnings}
