"""``tasync send``, ``tasync totals`` and ``tasync intake``: the alert side of the command line.

``send`` keeps the classic ``-host`` spelling working for existing integration scripts::

    telalertc -i ops -m "disk full" -host primary backup1 backup2
    tasync    send -i ops -m "disk full" -host primary backup1 backup2

click cannot give one option a variable number of values, so ``tasync``'s ``main()`` passes a
``send`` command line through ``tasync.host_args`` first, which turns ``-host A B C`` into
``--host A --host B --host C``.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Any

import click

from tasync.alert_lists import ask_all
from tasync.broker.alerts import PRIORITY_DEFAULT, Alert, new_alert_id
from tasync.broker.allowlist import AllowList
from tasync.broker.audit import Trail
from tasync.broker.errors import ConfigError, NoAnswer
from tasync.broker.settings import IntakeSettings, key_file_from_env
from tasync.broker.signing import KeyRing
from tasync.broker.since import Since
from tasync.client import print_table, rpc_client
from tasync.options import (
    json_option,
    make_settings,
    print_json,
    since_option,
    timeout_option,
)
from tasync.producers.sender import AlertSender, parse_hosts

COUNTER_COLUMNS = ("received", "delivered", "failed", "taken_over", "redelivered",
                   "duplicates", "skipped", "refused", "dead_lettered")


SEND_HELP = """Send an alert to the first live server of a precedence list.

Returns once the broker has confirmed the alert: from then on it is delivered even if
servers die. With no listed server running, the alert waits in its queue (a warning
says so) and is delivered when one starts.

\b
Examples:
  tasync send -i ops-mail -m "disk full on db1" --host a b
  tasync send -g oncall -m "P1 opened" --route remedy --source remedy --id INC42
  tasync send -i ops-mail -m "link down" -host b a          (the classic form)
"""
INTAKE_HELP = """Accept alerts over HTTP (generic JSON, Alertmanager) and queue them.

Answers 202 once the broker confirmed every alert of a request; 503 with Retry-After
at once while the broker is unreachable. GET /openapi.json describes the endpoints.

\b
Examples:
  tasync intake --route-for remedy=remedy --route-for nms=nms
  tasync intake --listen 0.0.0.0:8080 --token-file /etc/tasync/intake.token --default-route nms
  curl -d '{"source":"remedy","destination":"ops","message":"P1"}' localhost:8080/alerts
"""
_LIMITS = IntakeSettings()


def keyring_from_env(key_file: Path | None) -> KeyRing | None:
    """The key ring of ``key_file``, else of ``$TASYNC_CLUSTER_KEY_FILE``; None without either."""
    path = key_file or key_file_from_env()
    return KeyRing.load(path) if path else None


@click.command("send", help=SEND_HELP)
@click.option("-i", "--destination", metavar="DEST", help="Deliver to this destination.")
@click.option("-g", "--group", metavar="GROUP", help="Deliver to this group.")
@click.option("-m", "--message", "text", metavar="TEXT",
              help="The alert text; '-' reads it from standard input.")
@click.option("--subject", metavar="TEXT", help="A short title (mail subject, chat title).")
@click.option("--source", default="cli", show_default=True, envvar="TASYNC_SOURCE",
              help="Who sends it; totals are counted per source.")
@click.option("--id", "alert_id", metavar="ID",
              help="Idempotency key: resending the same id delivers once. Generated if absent.")
@click.option("--priority", type=click.IntRange(0, 9), default=PRIORITY_DEFAULT,
              show_default=True, help="0 (lowest) to 9 (highest).")
@click.option("--route", metavar="NAME", envvar="TASYNC_ROUTE",
              help="A named route (precedence list) from the configuration.")
@click.option("--host", "hosts", multiple=True, metavar="NODE", envvar="TASYNC_HOSTS",
              help="The precedence list, first server first: --host a b c (or -host a b c).")
@click.option("--key-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="Cluster key file to sign the alert "
                                 "(default: $TASYNC_CLUSTER_KEY_FILE).")
@json_option
def send(*, destination: str | None, group: str | None, text: str | None,
         subject: str | None, source: str, alert_id: str | None, priority: int,
         route: str | None, hosts: tuple[str, ...], key_file: Path | None, as_json: bool) -> None:
    """Send an alert; the help text is ``SEND_HELP`` (kept apart for click's layout)."""
    if bool(destination) == bool(group):
        raise click.UsageError("give exactly one of -i DEST or -g GROUP")
    if text is None:
        raise click.UsageError("give the alert text with -m TEXT (or -m - to read stdin)")
    if text == "-":
        text = sys.stdin.read()
    if route and hosts:
        raise click.UsageError("give either --route or --host, not both")
    if not route and not hosts:
        raise click.UsageError("name the servers with --host A B ... or --route NAME")
    # A script that cannot reach any broker gets exit 3 within seconds and may retry later.
    settings = make_settings(connect_retry_s=10.0)
    with AlertSender(settings, keyring=keyring_from_env(key_file)) as sender:
        host_list = parse_hosts(hosts) if hosts else sender.resolve_route(str(route))
        alert = Alert(id=alert_id or new_alert_id(), source=source,
                      target_kind="destination" if destination else "group",
                      target=str(destination or group), text=text, subject=subject,
                      priority=priority, hosts=host_list)
        result = sender.send(alert)
    for warning in result.warnings:
        click.echo(f"tasync: warning: {warning}", err=True)
    if as_json:
        print_json({"id": alert.id, "hosts": list(result.hosts), "consumers": result.consumers,
                    "warnings": result.warnings})
    else:
        click.echo(f"sent alert {alert.id} to {' '.join(result.hosts)}")


@click.command("totals")
@since_option(allow_seq=False, what="only traffic from")
@timeout_option(2.0)
@json_option
def totals(*, since: Since | None, timeout_s: float, as_json: bool) -> None:
    """Traffic through each live server, by source: received, delivered, failed, taken over.

    "Taken over" counts alerts a server delivered although it was not first in their
    precedence list: the servers ahead of it were down, hung, or full (overflow).
    "Refused" counts alerts a server quarantined (tasync quarantine list), "dead
    lettered" failed alerts it moved to the dead letters (tasync dead list).

    \b
    Examples:
      tasync totals
      tasync totals --since 2h
      tasync totals --since 2026-01-31T08:00:00Z --json
    """
    start = since.ts if since is not None else None
    with rpc_client(make_settings()) as rpc:
        answers, missing = ask_all(rpc, "totals", {"since": start}, timeout_s=timeout_s)
    reports = sorted(answers, key=lambda d: str(d.get("node")))
    if as_json:
        print_json({"since": start, "nodes": reports, "not_answering": missing})
        return
    if not reports:
        raise NoAnswer("no server answered; is any tasync-worker running?")
    rows: list[list[Any]] = []
    for report in reports:
        for source, counts in report["sources"].items():
            rows.append([report["node"], source, *(counts[c] for c in COUNTER_COLUMNS)])
        rows.append([report["node"], "(all)", *(report["total"][c] for c in COUNTER_COLUMNS)])
    title = "alert totals" + (f" since {_when(start)}" if start else "")
    print_table(["node", "source", *(c.replace("_", " ") for c in COUNTER_COLUMNS)], rows,
                title=title)
    if missing:
        click.echo(f"not answering: {' '.join(missing)}", err=True)


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _mapping(values: tuple[str, ...]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for value in values:
        source, sep, route = value.partition("=")
        if not sep or not source or not route:
            raise click.BadParameter(f"{value!r}: use SOURCE=ROUTE", param_hint="--route-for")
        mapping[source] = route
    return mapping


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{value!r}: use HOST:PORT", param_hint="--listen")
    return host.strip("[]") or "127.0.0.1", int(port)


@click.command("intake", help=INTAKE_HELP)
@click.option("--listen", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT",
              help="Where to accept HTTP (port 0 picks a free one and prints it).")
@click.option("--route-for", multiple=True, metavar="SOURCE=ROUTE",
              help="Send alerts of SOURCE along ROUTE (repeatable).")
@click.option("--default-route", metavar="ROUTE", help="Route for unmapped sources.")
@click.option("--default-host", "default_hosts", multiple=True, metavar="NODE",
              help="Precedence list for unmapped sources without a default route.")
@click.option("--max-body", type=click.IntRange(min=1024), default=_LIMITS.max_body_bytes,
              show_default=True, help="Largest request in bytes (larger: 413).")
@click.option("--max-alerts", type=click.IntRange(min=1), default=_LIMITS.max_alerts,
              show_default=True, help="Most alerts in one POST /alerts (more: 413, split).")
@click.option("--senders", type=click.IntRange(1, 64), default=_LIMITS.senders,
              show_default=True, help="Broker connections publishing side by side.")
@click.option("--retry-window", "retry_window_s", type=click.FloatRange(min=1),
              default=_LIMITS.retry_window_s, show_default=True, metavar="SECONDS",
              help="An Alertmanager notification seen again within this time is a retry "
                   "(same ids); later it is a reminder (new ids). Keep it below "
                   "repeat_interval.")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="File holding a bearer token that requests must present.")
@click.option("--hosts-file", type=click.Path(dir_okay=False, path_type=Path),
              help="telalert.hosts: client addresses allowed to post alerts.")
@click.option("--key-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="Cluster key file to sign alerts.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the intake's trail (telalert.trail) here: alerts Alertmanager "
                   "left out.")
def intake(*, listen: str, route_for: tuple[str, ...], default_route: str | None,
           default_hosts: tuple[str, ...], max_body: int, max_alerts: int, senders: int,
           retry_window_s: float, token_file: Path | None, hosts_file: Path | None,
           key_file: Path | None, data_dir: Path | None) -> None:
    """Run the HTTP intake; the help text is ``INTAKE_HELP``."""
    from tasync.intake_app import open_intake
    from tasync.producers.intake import IntakeConfig
    from tasync.web import bind, build_app, serve

    host, port = _listen(listen)
    token = token_file.read_text().strip() if token_file else None
    if token_file and not token:
        raise ConfigError(f"{token_file} is empty")
    limits = IntakeSettings(max_body_bytes=max_body, max_alerts=max_alerts, senders=senders,
                            retry_window_s=retry_window_s)
    config = IntakeConfig(
        routes=_mapping(route_for), default_route=default_route,
        default_hosts=parse_hosts(default_hosts) if default_hosts else (), token=token,
        allow=AllowList.load(hosts_file) if hosts_file else None, limits=limits)
    sock = bind(host, port)
    trail = Trail(data_dir, "intake") if data_dir else None
    with open_intake(config, make_settings(), keyring=keyring_from_env(key_file),
                     trail=trail) as part:
        bound_host, bound_port = sock.getsockname()[:2]
        click.echo(f"intake listening on http://{bound_host!s}:{bound_port}", err=True)
        click.echo(f"{bound_host!s}:{bound_port}")
        sys.stdout.flush()
        serve(build_app([part]), sock)
