"""``tasync trace ID``: the story of one alert from every live node's trail and the broker.

Every live node answers a ``trace`` request with its trail lines about the id (current and
rotated files) and what its duplicate window holds; the broker's dead-letter and quarantine
queues are looked at without taking anything away. The lines are merged by time into one story:
when and by whom the alert was made and along which list, which node took it (over from which
one, after a redelivery), each attempt and its outcome, dead-lettered, requeued, refused, and
the repeats judged duplicates. Exit 1 when nothing is known of the id.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import amqp.exceptions
import click

from tasync.alert_lists import ask_all
from tasync.broker import topology
from tasync.broker.browse import browse
from tasync.broker.connection import close_quietly, connect
from tasync.broker.errors import ConfigError
from tasync.cli_dead import DEFAULT_LIMIT, describe
from tasync.client import print_table, rpc_client
from tasync.options import (
    json_option,
    make_settings,
    print_json,
    timeout_option,
)

#: Fields every trail line has; the rest are the event's own.
_BASE = ("ts", "node", "event", "id")
#: Which event settles the outcome, strongest last (a later delivery beats an earlier failure).
_OUTCOMES = {"alert.refused": "refused", "alert.skipped": "skipped", "alert.failed": "failed",
             "alert.dead_lettered": "dead", "alert.delivered": "delivered"}


def from_broker(settings: Any, alert_id: str, limit: int) -> dict[str, list[dict[str, Any]]]:
    """The dead letters and quarantined messages of ``alert_id`` (nothing taken away)."""
    found: dict[str, list[dict[str, Any]]] = {"dead": [], "quarantined": []}
    conn = connect(settings, name="tasync-cli", retry_s=min(settings.connect_retry_s, 5.0))
    try:
        for name, queue in (("dead", topology.DEAD_LETTER_QUEUE),
                            ("quarantined", topology.QUARANTINE_QUEUE)):
            with browse(conn, queue, limit=limit) as browser:
                try:
                    seen = browser.read()
                except amqp.exceptions.NotFound:
                    continue
                found[name] = [row for row in map(describe, seen) if row["key"] == alert_id]
    finally:
        close_quietly(conn)
    return found


def story(alert_id: str, answers: list[dict[str, Any]],
          broker: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The merged story of one alert from the nodes' answers and the broker's queues."""
    events = sorted((line for answer in answers for line in answer.get("lines", [])),
                    key=lambda line: (line.get("ts", ""), line.get("node", "")))
    outcome = "unknown"
    for line in events:
        outcome = _OUTCOMES.get(line["event"], outcome)
        if line["event"] == "alert.requeued":
            outcome = "requeued"
    if broker["dead"]:
        outcome = "dead"
    elif broker["quarantined"] and outcome == "unknown":
        outcome = "refused"
    seen = {a["node"]: a["seen"] for a in answers if a.get("seen")}
    if outcome == "unknown" and seen:
        outcome = next(iter(seen.values()))["outcome"]
    made = next((line for line in events if line.get("created_at")), None)
    accepted = None if made is None else {
        "created_at": float(made["created_at"]), "sender": made.get("sender"),
        "list": made.get("list"), "source": made.get("source")}
    return {"id": alert_id, "outcome": outcome, "accepted": accepted, "events": events,
            "dead": broker["dead"], "quarantined": broker["quarantined"], "seen": seen,
            "nodes": sorted(a["node"] for a in answers)}


def details_of(line: dict[str, str]) -> str:
    """A trail line's own fields as ``key=value`` words (those every line has left out)."""
    return " ".join(f"{k}={v}" for k, v in line.items() if k not in _BASE)


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@click.command("trace")
@click.argument("alert_id", metavar="ID")
@click.option("--limit", type=click.IntRange(min=1), default=DEFAULT_LIMIT, show_default=True,
              help="Look at most at this many dead letters and quarantined messages.")
@timeout_option(2.0)
@json_option
def trace(*, alert_id: str, limit: int, timeout_s: float, as_json: bool) -> None:
    """The story of one alert across every live node and the broker; exit 1 if unknown.

    Accepted (when, by which sender, along which list), taken by which node, each
    attempt and its outcome, delivered / failed / dead / refused, requeued, and the
    repeats judged duplicates. Nodes that are down cannot tell their part.

    \b
    Examples:
      tasync trace INC42
      tasync trace INC42 --json
    """
    settings = make_settings()
    with rpc_client(settings) as rpc:
        answers, missing = ask_all(rpc, "trace", {"id": alert_id}, timeout_s=timeout_s)
    result = story(alert_id, answers, from_broker(settings, alert_id, limit))
    result["not_answering"] = missing
    known = result["events"] or result["dead"] or result["quarantined"] or result["seen"]
    if as_json:
        print_json(result)
    else:
        _print(result)
    if missing:
        click.echo(f"not answering: {' '.join(missing)}", err=True)
    if not known:
        raise ConfigError(f"nothing is known of alert {alert_id!r} "
                       f"(asked {', '.join(result['nodes']) or 'no node'} and the broker)")


def _print(result: dict[str, Any]) -> None:
    accepted = result["accepted"]
    click.echo(f"alert {result['id']}: {result['outcome']}")
    if accepted is not None:
        click.echo(f"  made {_when(accepted['created_at'])} by {accepted['sender'] or '?'}, "
                   f"source {accepted['source']}, list {accepted['list']}")
    if result["events"]:
        print_table(["time", "node", "event", "details"],
                    [[e["ts"], e["node"], e["event"].removeprefix("alert."), details_of(e)]
                     for e in result["events"]])
    for row in result["dead"]:
        click.echo(f"  dead letter: failed on {row['node']} at {row['at']}: {row['reason']}")
    for row in result["quarantined"]:
        click.echo(f"  quarantined by {row['node']} at {row['at']}: {row['reason']}")
