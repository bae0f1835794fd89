"""``tasync broker``: prepare a RabbitMQ virtual host for a tasync network.

``broker setup`` declares the shared topology. With ``--users`` it also creates one broker user
per node, admin and sender with least-privilege permissions (``tasync.broker.permissions``), through
``rabbitmqctl`` on a broker host (``tasync.broker.users``). It is idempotent: a second run changes
nothing and never touches a password it did not generate in that run.

The ``--ca-file/--cert-file/--key-file`` options (``tls_options``) are shared with any command
that wants them; ``$TASYNC_SSL_CA_FILE``, ``$TASYNC_SSL_CERT_FILE`` and ``$TASYNC_SSL_KEY_FILE``
do the same from the environment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from tasync.broker import topology
from tasync.broker.allowlist import AllowList, Entry
from tasync.broker.connection import close_quietly, connect
from tasync.broker.errors import BrokerAdminError, ConfigError
from tasync.broker.permissions import Account
from tasync.broker.settings import ENV_RABBITMQCTL, Settings
from tasync.broker.tls import tls_files
from tasync.broker.users import (
    Outcome,
    RabbitCtl,
    ensure_accounts,
    load_credentials,
    user_urls,
    write_credentials,
)
from tasync.options import json_option, make_settings, print_json

F = TypeVar("F", bound=Callable[..., Any])

SETUP_HELP = """Declare the exchanges, the change-log stream and the shared queues (idempotent).

With --users, also create one RabbitMQ user per node, admin and sender, with
least-privilege permissions on the vhost of --broker: only master-capable nodes
(allowed by --hosts-file, or the one --master) may write to tasync.config; a backup
reads only its own queues; senders may only publish alerts. Users are managed with
rabbitmqctl, so run this on a RabbitMQ host as root or the rabbitmq user (or give
--rabbitmqctl 'ssh broker1 sudo rabbitmqctl'). New passwords are generated and written
to --credentials-out (mode 0600), never printed unless --show-passwords.

\b
Examples:
  tasync broker setup
  tasync broker setup --users --hosts-file /etc/tasync/tasync.hosts --node c \\
      --admin ops --sender remedy --credentials-out /root/tasync-users.json
  tasync broker setup --broker amqps://admin:PW@mq1:5671/tasync --ca-file ca.pem \\
      --cert-file admin.pem --key-file admin.key
"""


def tls_options(fn: F) -> F:
    """``--ca-file``, ``--cert-file``, ``--key-file`` for ``amqps://`` brokers."""
    path = click.Path(dir_okay=False, path_type=Path)
    fn = click.option("--key-file", "tls_key_file", type=path, default=None,
                      help="Private key of --cert-file [$TASYNC_SSL_KEY_FILE].")(fn)
    fn = click.option("--cert-file", "tls_cert_file", type=path, default=None,
                      help="Client certificate (PEM) for amqps:// [$TASYNC_SSL_CERT_FILE].")(fn)
    return click.option("--ca-file", "tls_ca_file", type=path, default=None,
                        help="CA certificate(s) that signed the broker's certificate, for "
                             "amqps:// [$TASYNC_SSL_CA_FILE].")(fn)


def tls_settings(ca_file: Path | None, cert_file: Path | None,
                 key_file: Path | None, **overrides: Any) -> Settings:
    """Settings from ``--broker`` and the TLS options (else ``$TASYNC_SSL_*``); usage errors."""
    try:
        tls = tls_files(ca_file, cert_file, key_file)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    return make_settings(tls=tls, **overrides)


@click.group()
def broker() -> None:
    """Prepare the broker for a tasync network.

    \b
    Examples:
      tasync broker setup
      tasync broker setup --users --master a --node b --credentials-out users.json
    """


@broker.command("setup", help=SETUP_HELP)
@click.option("--users", "with_users", is_flag=True,
              help="Also create the broker users (nodes, admins, senders).")
@click.option("--node", "nodes", multiple=True, metavar="NAME",
              help="A node that gets a user of its own (repeat the option).")
@click.option("--hosts-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="tasync.hosts: its allowed nodes may act as master; its plain "
                                 "name entries are nodes too.")
@click.option("--master", "single_master", metavar="NAME", default=None,
              help="The single master-capable node (instead of --hosts-file).")
@click.option("--admin", "admins", multiple=True, metavar="NAME",
              help="An operator user: every command, but no direct write to tasync.config.")
@click.option("--sender", "senders", multiple=True, metavar="NAME",
              help="A user that may only publish alerts to tasync.alerts.")
@click.option("--senders-create-lists", is_flag=True,
              help="Let senders create the queue of a new ad-hoc precedence list (RabbitMQ "
                   "then also lets them read alert queues).")
@click.option("--credentials-out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="FILE",
              help="Write generated passwords and URLs here (mode 0600, merged on re-runs).")
@click.option("--show-passwords", is_flag=True, help="Print generated passwords too.")
@click.option("--reset-passwords", is_flag=True,
              help="Give existing users new passwords (running nodes need the new URL).")
@click.option("--rabbitmqctl", "ctl_command", envvar=ENV_RABBITMQCTL, default="rabbitmqctl",
              show_default=True, metavar="COMMAND",
              help="How to run rabbitmqctl, e.g. 'rabbitmqctl -n rabbit@mq1'.")
@json_option
@tls_options
def broker_setup(*, with_users: bool, nodes: tuple[str, ...], hosts_file: Path | None,
                 single_master: str | None, admins: tuple[str, ...], senders: tuple[str, ...],
                 senders_create_lists: bool, credentials_out: Path | None, show_passwords: bool,
                 reset_passwords: bool, ctl_command: str, as_json: bool,
                 tls_ca_file: Path | None, tls_cert_file: Path | None,
                 tls_key_file: Path | None) -> None:
    """Declare the topology; with ``--users``, create the broker users (see SETUP_HELP)."""
    accounts: list[Account] = []
    if with_users:
        accounts = plan_accounts(nodes=nodes, hosts_file=hosts_file, single_master=single_master,
                                 admins=admins, senders=senders,
                                 senders_create_lists=senders_create_lists)
        if credentials_out is None and not show_passwords:
            raise click.UsageError("--users needs --credentials-out FILE (or --show-passwords) "
                                   "so that generated passwords are not lost")
        if credentials_out is not None:
            load_credentials(credentials_out)  # refuse a foreign file before creating anyone
    elif nodes or admins or senders or hosts_file or single_master or credentials_out:
        raise click.UsageError("--node, --hosts-file, --master, --admin, --sender and "
                               "--credentials-out only make sense with --users")
    settings = tls_settings(tls_ca_file, tls_cert_file, tls_key_file)
    node_names = [a.name for a in accounts if a.role == "node"]
    declare_topology(settings, node_names)
    report: dict[str, Any] = {"broker": settings.display_urls, "topology": "declared",
                              "sync_queues": node_names}
    outcomes: list[Outcome] = []
    if accounts:
        outcomes = ensure_accounts(RabbitCtl(ctl_command), settings.vhost, accounts,
                                   reset_passwords=reset_passwords)
        report["users"] = [o.summary() for o in outcomes]
        if credentials_out is not None:
            report["credentials_file"] = str(credentials_out)
            report["passwords_written"] = write_credentials(
                credentials_out, vhost=settings.vhost, broker_urls=settings.broker_urls,
                outcomes=outcomes)
    _print_report(report, outcomes, settings, as_json=as_json, show_passwords=show_passwords)
    failed = [o for o in outcomes if o.error]
    if failed:
        raise BrokerAdminError(f"{len(failed)} user(s) not set up; first: "
                               f"{failed[0].account.name}: {failed[0].error}")


def plan_accounts(*, nodes: Sequence[str], hosts_file: Path | None, single_master: str | None,
                  admins: Sequence[str], senders: Sequence[str],
                  senders_create_lists: bool = False) -> list[Account]:
    """The accounts to create, with each node's master capability decided by the allow-list.

    Raises:
        click.UsageError: a bad name, both --hosts-file and --master, no node at all, or no
            node that may act as master.
    """
    allow = _masters(hosts_file, single_master)
    names = list(dict.fromkeys([*nodes, *_named_nodes(allow.entries)]))
    if not names:
        raise click.UsageError("no node given: use --node NAME or name nodes in --hosts-file")
    _check_names(names, [*admins, *senders])
    accounts = [Account(n, "node", master_capable=allow.check(n).allowed) for n in names]
    if not any(a.master_capable for a in accounts):
        raise click.UsageError(f"no node may act as master under {allow.source}: nobody could "
                               "write configuration changes")
    accounts += [Account(a, "admin") for a in admins]
    accounts += [Account(s, "sender", create_lists=senders_create_lists) for s in senders]
    return accounts


def _masters(hosts_file: Path | None, single_master: str | None) -> AllowList:
    if hosts_file is not None and single_master is not None:
        raise click.UsageError("give either --hosts-file or --master, not both")
    try:
        if hosts_file is not None:
            return AllowList.load(hosts_file)
        if single_master is not None:
            return AllowList.single(topology.check_node_name(single_master))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    raise click.UsageError("say who may act as master: --hosts-file tasync.hosts or "
                           "--master NAME")


def _check_names(nodes: Sequence[str], others: Sequence[str]) -> None:
    """Every name must be one routing-key word, and name one user only."""
    seen: set[str] = set()
    for name in [*nodes, *others]:
        if not topology.NODE_NAME_RE.match(name):
            raise click.UsageError(f"invalid name {name!r}: use letters, digits, '-' and '_' "
                                   "(node names become queue names)")
        if name in seen:
            raise click.UsageError(f"{name!r} is named twice: one user has one role")
        seen.add(name)


def _named_nodes(entries: Sequence[Entry]) -> list[str]:
    """Plain node names an allow-list allows (no globs, addresses or denials)."""
    return [e.pattern for e in entries
            if e.kind == "name" and not e.deny and not any(c in e.pattern for c in "*?[")
            and topology.NODE_NAME_RE.match(e.pattern)]


def declare_topology(settings: Settings, nodes: Sequence[str] = ()) -> None:
    """Declare the shared topology and the sync queue of each named node, as the --broker user.

    A node's sync queue is created here so that changes committed before its first start wait
    for it instead of depending on the change log's retention.
    """
    conn = connect(settings, name="tasync-setup", retry_s=5.0)
    try:
        channel = conn.channel()
        topology.declare_all(channel, settings)
        for node in nodes:
            topology.declare_sync_queue(channel, node)
    finally:
        close_quietly(conn)


def _print_report(report: dict[str, Any], outcomes: list[Outcome], settings: Settings, *,
                  as_json: bool, show_passwords: bool) -> None:
    secrets = {o.account.name: o.password for o in outcomes if o.password}
    if as_json:
        if show_passwords:
            for row in report.get("users", []):
                password = secrets.get(row["user"])
                if password:
                    row["password"] = password
                    row["url"] = user_urls(settings.broker_urls, row["user"], password)
        print_json(report)
        return
    click.echo(f"topology declared on {settings.display_urls}")
    for node in report["sync_queues"]:
        click.echo(f"sync queue {topology.sync_queue(node)} declared")
    for outcome in outcomes:
        detail = f" ({', '.join(outcome.changes)})" if outcome.changes else ""
        if outcome.error:
            detail = f": {outcome.error}"
        click.echo(f"user {outcome.account.name:<16} {outcome.account.label:<24} "
                   f"{outcome.action}{detail}")
        if show_passwords and outcome.password:
            url = user_urls(settings.broker_urls, outcome.account.name, outcome.password)
            click.echo(f"  url: {url}")
    if "credentials_file" in report:
        click.echo(f"{report['passwords_written']} new password(s) written to "
                   f"{report['credentials_file']} (mode 0600)")


def main(argv: list[str] | None = None) -> None:
    """``python -m tasync.cli_broker setup ...``: ``tasync broker setup ...``, options and all."""
    import sys

    from tasync.cli import main as tasync_main

    tasync_main(["broker", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
