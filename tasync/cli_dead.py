"""``tasync dead list|show|requeue`` and ``tasync quarantine list|show``.

Dead letters are alerts whose delivery failed after every retry; the node that gave up put a
copy in ``tasync.dead-letter`` with the reason, itself and the attempts in its headers. The
quarantine holds what a node refused (bad signature, schema, sender), with the reason.

Both are read without taking anything away (``tasync.broker.browse``: each look raises the messages'
``x-delivery-count`` by one, which is harmless because these queues have no delivery limit),
at most ``--limit`` messages per look. ``dead requeue`` sends an alert again through the normal
path (``AlertSender.resend``: policy and names checked, confirmed publish to its list) and takes
the dead copy away only after the broker confirmed the new one; the node that takes it writes
``alert.requeued`` with who asked to its trail, and delivers it even though its id failed
before (a repeat of an id that was delivered stays a duplicate).
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import amqp.exceptions
import click

from tasync.broker import topology
from tasync.broker.alerts import ID_RE
from tasync.broker.browse import Browsed, QueueBrowser, browse
from tasync.broker.connection import close_quietly, connect
from tasync.broker.errors import ConfigError, MessageError, TopologyMissing
from tasync.broker.settings import Settings, key_file_from_env
from tasync.broker.signing import KeyRing
from tasync.client import print_table
from tasync.consumers.quarantine import (
    ATTEMPTS_HEADER,
    DEAD_AT_HEADER,
    NODE_HEADER,
    QUARANTINED_AT_HEADER,
    REASON_HEADER,
    SOURCE_QUEUE_HEADER,
)
from tasync.options import json_option, make_settings, print_json
from tasync.producers.sender import AlertSender

DEFAULT_LIMIT = 1000
_LIST_WIDTH = 60


def describe(message: Browsed) -> dict[str, Any]:
    """What an operator wants to know of one dead or quarantined message.

    ``key`` names it on the command line: the alert id when there is one, else ``q-`` and a
    hash of its bytes (a refused message may have no readable id at all).
    """
    try:
        data = json.loads(message.body)
    except ValueError:
        data = None
    body = data if isinstance(data, dict) else {}
    alert_id = next((c for c in (message.message_id, body.get("id"))
                     if isinstance(c, str) and ID_RE.match(c)), None)
    headers = message.headers
    hosts = body.get("hosts")
    created = body.get("created_at")
    return {
        "key": alert_id or "q-" + hashlib.sha256(message.body).hexdigest()[:12],
        "id": alert_id,
        "source": _text(body.get("source")),
        "target": f"{body.get('target_kind')} {body.get('target')}" if body.get("target")
        else None,
        "list": ".".join(str(h) for h in hosts) if isinstance(hosts, list) else None,
        "text": _text(body.get("text")),
        "created_at": created if isinstance(created, int | float) else None,
        # A dead letter of an older release was rejected into the dead-letter exchange: the
        # broker's x-first-death headers say where from, the node's trail says why.
        "reason": _text(headers.get(REASON_HEADER)) or _text(
            headers.get("x-first-death-reason")),
        "node": _text(headers.get(NODE_HEADER)),
        "queue": _text(headers.get(SOURCE_QUEUE_HEADER)) or _text(
            headers.get("x-first-death-queue")),
        "at": _text(headers.get(DEAD_AT_HEADER) or headers.get(QUARANTINED_AT_HEADER)),
        "attempts": headers.get(ATTEMPTS_HEADER) if isinstance(
            headers.get(ATTEMPTS_HEADER), int) else None,
        "looked_at": message.delivery_count,
        "bytes": len(message.body),
    }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@contextmanager
def looking_at(settings: Settings, queue: str, limit: int) -> Iterator[tuple[QueueBrowser,
                                                                          list[Browsed]]]:
    """Browse up to ``limit`` messages of ``queue`` without taking them; closed on exit."""
    conn = connect(settings, name="tasync-cli", retry_s=min(settings.connect_retry_s, 5.0))
    try:
        with browse(conn, queue, limit=limit) as browser:
            try:
                seen = browser.read()
            except amqp.exceptions.NotFound:
                raise TopologyMissing(topology.setup_advice(settings.vhost,
                                                            f"queue {queue}")) from None
            yield browser, seen
    finally:
        close_quietly(conn)


def _list(queue: str, title: str, *, limit: int, as_json: bool) -> None:
    with looking_at(make_settings(), queue, limit) as (browser, seen):
        rows = [describe(m) for m in seen]
        total = browser.total
    if as_json:
        print_json({"queue": queue, "total": total, "shown": len(rows), "messages": rows})
        return
    print_table(["id", "source", "list", "node", "at", "reason"],
                [[r["key"], r["source"], r["list"], r["node"], r["at"],
                  _short(r["reason"])] for r in rows],
                title=f"{title}: {total}" + (f" (first {len(rows)})" if total > len(rows) else ""))


def _short(text: str | None) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= _LIST_WIDTH else text[:_LIST_WIDTH - 1] + "…"


def _show(queue: str, key: str, *, limit: int, as_json: bool) -> None:
    with looking_at(make_settings(), queue, limit) as (_browser, seen):
        rows = [describe(m) for m in seen if describe(m)["key"] == key]
    if not rows:
        raise ConfigError(f"nothing in {queue} is {key!r} (looked at the first {limit}; "
                          "see --limit)")
    if as_json:
        print_json(rows)
        return
    for row in rows:
        for name in ("key", "source", "target", "list", "node", "queue", "at", "attempts",
                     "looked_at", "reason"):
            if row[name] is not None:
                click.echo(f"{name + ':':11}{row[name]}")
        if row["created_at"] is not None:
            when = dt.datetime.fromtimestamp(row["created_at"], dt.UTC)
            click.echo(f"{'created:':11}{when:%Y-%m-%d %H:%M:%S} UTC")
        click.echo(f"{'text:':11}{row['text'] or ''}")


def _limit_option(fn: Any) -> Any:
    return click.option("--limit", type=click.IntRange(min=1), default=DEFAULT_LIMIT,
                        show_default=True, help="Look at most at this many messages.")(fn)


def _looking_commands(group: click.Group, queue: str, title: str, *, list_help: str,
                      show_help: str) -> None:
    """Add ``list`` and ``show ID`` to ``group``, both reading ``queue`` without taking."""
    name = group.name or ""

    @group.command("list", help=f"""{list_help}

    \b
    Examples:
      tasync {name} list
      tasync {name} list --json --limit 20
    """)
    @_limit_option
    @json_option
    def list_(*, limit: int, as_json: bool) -> None:
        _list(queue, title, limit=limit, as_json=as_json)

    @group.command("show", help=f"""{show_help}

    \b
    Examples:
      tasync {name} show INC42
      tasync {name} show INC42 --json
    """)
    @click.argument("key", metavar="ID")
    @_limit_option
    @json_option
    def show(*, key: str, limit: int, as_json: bool) -> None:
        _show(queue, key, limit=limit, as_json=as_json)


# -- dead letters -------------------------------------------------------------------------------


@click.group("dead")
def dead() -> None:
    """Alerts whose delivery failed after every retry (the dead-letter queue).

    \b
    Examples:
      tasync dead list
      tasync dead show INC42
      tasync dead requeue INC42
      tasync dead requeue --all --dry-run
    """


@dead.command("requeue")
@click.argument("alert_id", metavar="[ID]", required=False)
@click.option("--all", "everything", is_flag=True, help="Every dead letter (up to --limit).")
@click.option("--dry-run", is_flag=True, help="Say what would be sent again; change nothing.")
@click.option("--key-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="Cluster key file to sign the alerts again "
                                 "(default: $TASYNC_CLUSTER_KEY_FILE; else their own "
                                 "signatures are kept).")
@_limit_option
@json_option
def dead_requeue(*, alert_id: str | None, everything: bool, dry_run: bool,
                 key_file: Path | None, limit: int, as_json: bool) -> None:
    """Send dead letters again through the normal path, once the destination is fixed.

    Each is published to its precedence list with confirms; only then is its dead copy
    removed. The delivering node writes who asked to its trail (alert.requeued).

    \b
    Examples:
      tasync dead requeue INC42
      tasync dead requeue --all --dry-run
    """
    if bool(alert_id) == everything:
        raise click.UsageError("give an alert ID or --all")
    settings = make_settings(connect_retry_s=10.0)
    path = key_file or key_file_from_env()
    with looking_at(settings, topology.DEAD_LETTER_QUEUE, limit) as (browser, seen):
        chosen = [m for m in seen if everything or describe(m)["key"] == alert_id]
        if not chosen and alert_id:
            raise ConfigError(f"no dead letter {alert_id!r} (looked at the first {limit}; "
                              "see --limit)")
        done = [] if dry_run else _requeue(settings, browser, chosen,
                                           KeyRing.load(path) if path else None)
    if dry_run:
        done = [{"id": describe(m)["key"], "list": describe(m)["list"], "requeued": False}
                for m in chosen]
    if as_json:
        print_json({"dry_run": dry_run, "alerts": done})
    for item in [] if as_json else done:
        verb = "would requeue" if dry_run else "requeued"
        click.echo(f"{verb} {item['id']} to {(item['list'] or '?').replace('.', ' ')}")
    if not chosen:
        click.echo("no dead letters", err=True)
    if len(done) < len(chosen):
        sys.exit(1)


def _requeue(settings: Settings, browser: QueueBrowser, chosen: list[Browsed],
             keyring: KeyRing | None) -> list[dict[str, Any]]:
    """Send ``chosen`` again; each dead copy is acknowledged once the new one is confirmed."""
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    done: list[dict[str, Any]] = []
    with AlertSender(settings, keyring=keyring, name=f"requeue by {who}") as sender:
        for message in chosen:
            key = describe(message)["key"]
            try:
                result = sender.resend(message.body, message.headers, requeued_by=who)
            except MessageError as exc:
                click.echo(f"tasync: {key}: not a valid alert, left dead ({exc})", err=True)
                continue
            browser.ack(message)  # only now: the broker holds the new copy
            for warning in result.warnings:
                click.echo(f"tasync: warning: {warning}", err=True)
            done.append({"id": key, "list": ".".join(result.hosts), "requeued": True})
    return done


# -- quarantine -----------------------------------------------------------------------------------


@click.group("quarantine")
def quarantine() -> None:
    """What nodes refused (bad signature, schema, sender), with the reason.

    \b
    Examples:
      tasync quarantine list
      tasync quarantine show INC42
    """


_looking_commands(
    dead, topology.DEAD_LETTER_QUEUE, "dead letters",
    list_help="The dead letters, oldest first, with why and where they failed; takes "
              "nothing away.",
    show_help="One dead letter: the alert, the reason, the node, the attempts; exit 1 if "
              "absent.")
_looking_commands(
    quarantine, topology.QUARANTINE_QUEUE, "quarantined",
    list_help="Refused messages, oldest first, with the reason and the node; takes nothing "
              "away.",
    show_help="One refused message by alert id (or the q-... key the list shows); exit 1 if "
              "absent.")

DEAD_COMMANDS = (dead, quarantine)
