"""``tasync``: the operator's command line (design section 6).

Exit codes: 0 ok, 1 failed, 2 usage, 3 broker unreachable.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from tasync.cli_alerts import ALERT_COMMANDS, normalise_host_args
from tasync.cli_broker import broker
from tasync.cli_config import config
from tasync.cli_dead import DEAD_COMMANDS
from tasync.cli_hosts import hosts
from tasync.cli_recover import promote, recover
from tasync.cli_replay import replay
from tasync.cli_trace import trace
from tasync.client import gather_status, print_table, rpc_client
from tasync.demo import demo
from tasync.options import (
    broker_option,
    handle_errors,
    json_option,
    make_settings,
    print_json,
    timeout_option,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tasync")
def cli() -> None:
    """tasync: an alert-messaging network over RabbitMQ, with replication and failover.

    \b
    One node is the master: change its configuration with `tasync config`, and every
    backup applies the same changes in the same order. Alerts sent with `tasync send`
    go to the first live node of a precedence list.
    \b
    Start here:   tasync demo
    Every node:   tasync status
    """


cli.add_command(broker)
cli.add_command(config)
cli.add_command(hosts)
cli.add_command(recover)
cli.add_command(replay)
cli.add_command(promote)
cli.add_command(demo)
for _command in (*ALERT_COMMANDS, *DEAD_COMMANDS, trace):
    cli.add_command(_command)


@cli.command()
@timeout_option(2.0)
@json_option
@broker_option
@handle_errors
def status(*, timeout_s: float, as_json: bool, broker_url: str) -> None:
    """Every node: role, epoch, applied seq, lag, alive, ready, config checksum."""
    with rpc_client(make_settings(broker_url)) as rpc:
        rows = gather_status(rpc, timeout_s=timeout_s)
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("no node answered", err=True)
    print_table(
        ["node", "role", "epoch", "seq", "lag", "alive", "ready", "in sync", "checksum"],
        [[r["node"], r.get("role", "?"), r.get("epoch", ""), r.get("applied_seq", ""),
          r.get("lag", ""), _yes(r.get("alive")), _yes(r.get("ready")),
          _yes(r.get("in_sync")) if r.get("alive") else "", str(r.get("checksum", ""))[:12]]
         for r in rows],
    )


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tasync`` command."""
    args = normalise_host_args(list(sys.argv[1:] if argv is None else argv))
    cli.main(args=args, prog_name="tasync")


if __name__ == "__main__":
    main()
